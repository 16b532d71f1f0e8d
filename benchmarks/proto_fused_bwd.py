"""Prototype (not the package's kernel): a backward that computes dQ in the dK/dV kernel, in
FlashAttention-3's orientation. At D = 128 the package's split backward runs 7 matmuls per tile
(dk/dv: S, dP, dV, dK; dq: S, dP, dQ) against 5 for a fused one; at D = 64 its fused backward is
query-major and stages P and dS through shared memory to transpose them.

Per program: one (batch, head) and BLOCK_N keys; it streams query blocks of BLOCK_M rows:

    S^T  = K Q^T               [BLOCK_N, BLOCK_M]   (K the A operand, loaded once)
    P^T  = exp2(S^T * c - lse2)
    dV  += P^T dO              [BLOCK_N, D]         (P^T: register A operand)
    dP^T = V dO^T              [BLOCK_N, BLOCK_M]
    dS^T = P^T (dP^T - delta)
    dK  += dS^T Q              [BLOCK_N, D]
    dQ  += (dS^T)^T K          [BLOCK_M, D]         fp32, one TMA reduce-add per tile

Dense (B, H, S, D) 16-bit tensors (any strides with unit stride along D), S a multiple of the blocks, no
GQA, no masks, no dropout; causal or not. Only for measuring
whether the two saved matmuls outweigh the dQ reductions and register pressure in Triton 3.6 (sm_90).

    python -m benchmarks.proto_fused_bwd [--dim 64] [--seqlens 1024,4096] [--configs 64x64w4s3,...] [--bshd]

Measured (H200, session 19, results/2026-11-28_h200_session19_run4_11_proto_fused_bwd.log; package / prototype,
delta not included in the prototype's time):
- D = 128: best 128x64w8s3 (TMA reduce) or s4 with pointer atomics: non-causal 0.87-0.98x, causal 0.95-0.96x at
  S = 1024, 1.01-1.04x at 4096, 1.08-1.11x at 16384. 8 warps at ~255 registers fill the register file (one
  program per SM) and K, V, two to four Q / dO stages and the dQ tile fill shared memory (181-231 KB).
- D = 64: 64x64w4s3 non-causal 0.97-0.99x at S = 1024, 1.01-1.12x beyond; causal 1.08-1.09x at 1024,
  1.05-1.13x at 4096, 1.02-1.11x at 16384 (fp16 alike; HF's (B, S, H, D) layout alike).
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl

from hf_triton_attn.kernels.common import LOG2E


@triton.jit
def _proto_bwd_steps(
    dk, dv, k, v, Q_DESC, DO_DESC, DQ_DESC, DQ_ACC, lse_base, delta_base, kv_off, stride_kn,
    b, h, offs_n, offs_d, scale2, start, end,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DQ_TMA: tl.constexpr,
):
    """Query blocks [start, end) of one key block; MASKED: apply the causal mask (diagonal blocks)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        q = Q_DESC.load([b, h, start_m, 0]).reshape([BLOCK_M, HEAD_DIM])
        do = DO_DESC.load([b, h, start_m, 0]).reshape([BLOCK_M, HEAD_DIM])
        lse2 = tl.load(lse_base + offs_m) * LOG2E  # [BLOCK_M]
        delta = tl.load(delta_base + offs_m)  # [BLOCK_M]
        s_t = tl.dot(k, tl.trans(q))  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t * scale2 - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))  # [BLOCK_N, BLOCK_M]
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        dq = tl.dot(tl.trans(ds_t), k)  # [BLOCK_M, HEAD_DIM] = dS K
        if DQ_TMA:
            DQ_DESC.atomic_add([b, h, start_m, 0], dq.reshape([1, 1, BLOCK_M, HEAD_DIM]))
        else:  # pointer atomics (the CPU interpreter has no descriptor reduce); DQ_ACC has K's layout
            tl.atomic_add(DQ_ACC + kv_off + offs_m[:, None].to(tl.int64) * stride_kn + offs_d[None, :], dq,
                          sem="relaxed")
    return dk, dv


@triton.jit
def _proto_bwd_kernel(
    Q_DESC, DO_DESC, DQ_DESC, DQ_ACC, K, V, LSE, DELTA, DK, DV,
    stride_kb, stride_kh, stride_kn,
    stride_lb, stride_lh,
    seqlen, num_heads, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DQ_TMA: tl.constexpr, SPLIT_CAUSAL: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_off = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    # K, V [BLOCK_N, HEAD_DIM]: the A operands of S^T = K Q^T and dP^T = V dO^T for every query block
    k = tl.load(K + kv_off + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :])
    v = tl.load(V + kv_off + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lse_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    delta_base = DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    scale2 = sm_scale * LOG2E
    # Causal: query rows before start_n see none of these keys. SPLIT_CAUSAL: the diagonal blocks in a
    # masked loop of their own, the rest unmasked (as the package's kernels do); otherwise the mask is
    # applied on every block. At D = 128 the split made ptxas spill 61 registers instead of 12: causal
    # S = 16384 7.06 -> 8.18 ms (H200, session 19).
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    full_lo = lo
    if CAUSAL and SPLIT_CAUSAL:
        full_lo = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, seqlen)
        dk, dv = _proto_bwd_steps(dk, dv, k, v, Q_DESC, DO_DESC, DQ_DESC, DQ_ACC, lse_base, delta_base, kv_off,
                                  stride_kn, b, h, offs_n, offs_d, scale2, lo, full_lo,
                                  True, BLOCK_M, HEAD_DIM, DQ_TMA)
    dk, dv = _proto_bwd_steps(dk, dv, k, v, Q_DESC, DO_DESC, DQ_DESC, DQ_ACC, lse_base, delta_base, kv_off,
                              stride_kn, b, h, offs_n, offs_d, scale2, full_lo, seqlen,
                              CAUSAL and not SPLIT_CAUSAL, BLOCK_M, HEAD_DIM, DQ_TMA)
    out_off = kv_off + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty))


def proto_backward(q, k, v, o, do, lse, causal: bool, config: tuple[int, int, int, int], dq_tma: bool = True,
                   delta: torch.Tensor | None = None, split_causal: bool = False):
    """dq, dk, dv from the forward's o and natural-log lse [B, H, S]. q, k, v, o, do: (B, H, S, D) of one shape,
    unit stride along D, S a multiple of both blocks of ``config`` (BLOCK_M, BLOCK_N, warps, stages).
    ``delta`` = rowsum(o * do) in fp32 if already computed (the package's delta kernel takes ~0.055 ms at
    B*S = 16384, H*D = 2048 on an H100: NOTES, session 13)."""
    from hf_triton_attn.kernels.launch import tma_descriptor

    block_m, block_n, warps, stages = config
    b, h, s, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v: the prototype needs one shape (no GQA); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if s % block_m or s % block_n:
        raise ValueError(f"seqlen: the prototype has no bounds checks, so S must be a multiple of "
                         f"BLOCK_M = {block_m} and BLOCK_N = {block_n}; got {s}")
    sm_scale = 1.0 / math.sqrt(d)
    if delta is None:
        delta = rowsum_delta(o, do)
    dq_acc = torch.zeros_like(k, dtype=torch.float32)  # K's layout: the pointer-atomic path indexes it so
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    grid = (triton.cdiv(s, block_n), b * h)
    _proto_bwd_kernel[grid](
        tma_descriptor(q, block_m), tma_descriptor(do, block_m), tma_descriptor(dq_acc, block_m), dq_acc,
        k, v, lse, delta, dk, dv,
        k.stride(0), k.stride(1), k.stride(2), lse.stride(0), lse.stride(1),
        s, h, sm_scale, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, DQ_TMA=dq_tma,
        SPLIT_CAUSAL=split_causal,
        num_warps=warps, num_stages=stages)
    return (dq_acc * sm_scale).to(q.dtype), dk, dv


def rowsum_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(o * dO) in fp32, [B, H, S], by torch (fp32 copies: slower than the package's delta kernel)."""
    return (o.float() * do.float()).sum(-1)


def parse_config(text: str) -> tuple[tuple[int, int, int, int], str]:
    """'128x64w8s2p' -> ((BLOCK_M=64, BLOCK_N=128, 8 warps, 2 stages), 'p'): keys x queries, as FA3 writes
    them, then flags: 'p' dq by pointer atomics, 'c' the causal diagonal in a loop of its own."""
    body = text.rstrip("pc")
    keys, rest = body.split("x")
    queries, rest = rest.split("w")
    warps, stages = rest.split("s")
    return (int(queries), int(keys), int(warps), int(stages)), text[len(body):]


def time_case(seqlen: int, causal: bool, configs: list[str], dtype: torch.dtype, d: int = 128,
              bshd: bool = False) -> str:
    """One grid cell: the package's backward (autograd, same process) beside each prototype config."""
    import functools

    from triton.testing import do_bench

    from benchmarks.common import attention_flops, tflops
    from hf_triton_attn import flash_attention

    hd = 2048 // d  # H * D = 2048
    b = max(1, 16384 // seqlen)
    if bshd:  # HF's layout: (B, S, H, D) memory seen as (B, H, S, D)
        q, k, v, do = (torch.randn(b, seqlen, hd, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(4))
    else:
        q, k, v, do = (torch.randn(b, hd, seqlen, d, device="cuda", dtype=dtype) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(qg, kg, vg, causal=causal, return_lse=True)
    package_bwd = functools.partial(torch.autograd.grad, out, (qg, kg, vg), do, retain_graph=True)
    ref = package_bwd()
    base_ms = do_bench(package_bwd, warmup=20, rep=200)
    flops = (attention_flops(b, hd, seqlen, seqlen, d, causal, "fwdbwd")
             - attention_flops(b, hd, seqlen, seqlen, d, causal, "fwd"))
    line = (f"D={d} S={seqlen:6d} B={b:2d} causal={int(causal)} package bwd {base_ms:.3f} ms "
            f"({tflops(flops, base_ms):.0f} TFLOP/s) | prototype (delta given; package / prototype)")
    o_, lse_ = out.detach(), lse.detach()
    delta = rowsum_delta(o_, do)
    line += f" [torch delta {do_bench(functools.partial(rowsum_delta, o_, do), warmup=20, rep=100):.3f} ms]"
    for text in configs:
        config, flags = parse_config(text)
        call = functools.partial(proto_backward, q, k, v, o_, do, lse_, causal, config, "p" not in flags, delta,
                                 "c" in flags)
        try:
            err = max(float((g.float() - r.float()).abs().max() / r.float().abs().max()) for g, r in zip(call(), ref))
            ms = do_bench(call, warmup=20, rep=200)
            line += f" | {text} {ms:.3f} ({base_ms / ms:.2f}x, rel err {err:.1e})"
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
            line += f" | {text} failed: {type(exc).__name__}: {str(exc)[:80]}"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--configs", default="128x64w8s2,128x64w8s1,128x32w8s2,64x64w4s2")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bshd", action="store_true", help="q, k, v, dO in HF's (B, S, H, D) memory layout")
    a = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.manual_seed(0)
    for seqlen in (int(x) for x in a.seqlens.split(",")):
        for causal in (False, True):
            print(time_case(seqlen, causal, a.configs.split(","), dtype, a.dim, a.bshd), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
