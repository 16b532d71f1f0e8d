# ruff: noqa: B023  (closures run inside the loop iteration that made them)
"""Probe: does Triton 3.6's Hopper warp specialization pay for attention on this card?

    python -m benchmarks.ws_probe [--dims 64,128] [--seqlens 1024,4096]

A minimal non-causal forward (tutorial-shaped, on-device tensor descriptors, which Hopper's automatic
warp specialization needs: host-built descriptors fail in its data partitioning) compiled with and
without ``tl.range(..., warp_specialize=True)``, timed beside this package's forward, SDPA flash
(FA2) and SDPA cuDNN on the issue-5 grid (B*S = 16384, H*D = 2048, bf16, contiguous (B, H, S, D)).
An experiment, not a feature: the probe kernel supports nothing but dense non-causal attention with
S a multiple of its blocks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_triton_attn import flash_attention  # noqa: E402


@triton.jit
def _probe_fwd(Q, K, V, O, sm_scale, N_CTX, Z_H,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    rows = Z_H * N_CTX
    desc_q = tl.make_tensor_descriptor(Q, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O, shape=[rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    base = off_hz * N_CTX
    q = desc_q.load([base + start_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    scale2 = sm_scale * 1.4426950408889634
    for start_n in tl.range(0, N_CTX, BLOCK_N, warp_specialize=WS):
        kT = desc_k.load([base + start_n, 0]).T
        qk = tl.dot(q, kT)  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale2)
        p = tl.math.exp2(qk * scale2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([base + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    desc_o.store([base + start_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))


def probe(q, k, v, block_m: int, block_n: int, stages: int, ws: bool) -> torch.Tensor:
    b, h, s, d = q.shape
    o = torch.empty_like(q)
    grid = (s // block_m, b * h)
    _probe_fwd[grid](q, k, v, o, d ** -0.5, s, b * h, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, WS=ws,
                     num_warps=4, num_stages=stages)
    return o


CONFIGS = {64: [(128, 128, 2), (128, 128, 3), (128, 64, 3), (128, 64, 2), (64, 64, 2)],
           128: [(128, 128, 2), (128, 64, 2), (128, 64, 3)]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqlens", default="1024,4096")
    args = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "bf16 non-causal forward, TFLOP/s (median do_bench), max |err| vs cuDNN")
    for d in map(int, args.dims.split(",")):
        for s in map(int, args.seqlens.split(",")):
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * b * h * s * s * d

            def tf(fn) -> float:
                fn()
                return flops / do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-9

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = F.scaled_dot_product_attention(q, k, v)
            row = {"ours": tf(lambda: flash_attention(q, k, v))}
            for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                def run(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v)
                row[name] = tf(run)
            err_ours = (flash_attention(q, k, v).float() - ref.float()).abs().max().item()
            print(f"D{d} S{s}: ours {row['ours']:.0f} (err {err_ours:.2e}) fa2 {row['fa2']:.0f} "
                  f"cudnn {row['cudnn']:.0f}", flush=True)
            for bm, bn, st in CONFIGS[d]:
                for ws in (False, True):
                    label = f"  probe {bm}x{bn} s{st} ws={int(ws)}"
                    try:
                        out = probe(q, k, v, bm, bn, st, ws)
                        err = (out.float() - ref.float()).abs().max().item()
                        t = tf(lambda: probe(q, k, v, bm, bn, st, ws))
                        print(f"{label}: {t:.0f} TFLOP/s ({t / row['cudnn']:.2f}x cuDNN, "
                              f"{t / row['ours']:.2f}x ours) err {err:.2e}", flush=True)
                    except Exception as exc:  # an experiment: report and go on
                        print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
