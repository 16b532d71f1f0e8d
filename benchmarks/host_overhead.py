"""Host (CPU) time per attention call at decode shapes, where the GPU work is ~10 us and the
Python around the launch decides the step time.

    python -m benchmarks.host_overhead [--out DIR] [--calls 2000]

Times, per call, a tight loop of N calls followed by one synchronize (so the wall time per call is
the host time whenever it exceeds the GPU time): SDPA, ``flash_attention`` with and without a
padding mask, the Hugging Face interface function, our validation alone, the launcher alone, and
the bare Triton launch. Then a cProfile of the ``flash_attention`` loop (top functions by own
time). Writes ``host_overhead.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import PACKAGE_SOURCE  # noqa: F401  (before hf_triton_attn: HF_TRITON_ATTN_SOURCE)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def gpu_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=20, rep=100) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)

    from hf_triton_attn import flash_attention, ops

    dev = torch.device("cuda")
    b, h, sk, d = 8, 12, 600, 64  # GPT-2 124M generate: B8, 512-token prompt + up to 128 new
    q = torch.randn(b, 1, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # HF's BSHD -> BHSD view
    k = torch.randn(b, h, sk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(b, sk, dtype=torch.bool, device=dev)
    mask[0, :40] = False

    # First call of a new specialization (D = 72, causal, bf16): Triton compiles; no autotuning runs,
    # so this is the whole first-call cost (a warm on-disk Triton cache skips the compile).
    first: dict[str, float] = {}
    qf, kf, vf = (torch.randn(2, 4, 256, 72, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for label in ("first call", "second call"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out_f = flash_attention(qf, kf, vf, causal=True)
        torch.cuda.synchronize()
        first[f"{label}: forward s"] = time.perf_counter() - start
        start = time.perf_counter()
        out_f.sum().backward()
        torch.cuda.synchronize()
        first[f"{label}: backward s"] = time.perf_counter() - start

    rows: dict[str, float] = {}
    rows["sdpa"] = per_call_us(lambda: F.scaled_dot_product_attention(q, k, v), args.calls)
    rows["flash_attention"] = per_call_us(lambda: flash_attention(q, k, v), args.calls)
    rows["flash_attention + mask"] = per_call_us(lambda: flash_attention(q, k, v, attention_mask=mask), args.calls)

    kw = dict(causal=False, softmax_scale=None, dropout_p=0.0, attention_mask=None, query_mask=None,
              segment_ids=None, seqused_k=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
              max_seqlen_k=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, backend=None)
    rows["_validate only"] = per_call_us(lambda: ops._validate(q, k, v, **kw), args.calls)
    fargs = (q, k, v, None, None, None, None, None, None, None, None, 1, sk, d ** -0.5, 0.0, -1, -1, 0.0, False, False)
    rows["_forward_impl (no autograd)"] = per_call_us(lambda: ops._forward_impl(*fargs), args.calls)
    apply = ops._FlashAttnFunction.apply  # (q, k, v, the other arguments as one tuple)
    rows["_FlashAttnFunction.apply"] = per_call_us(lambda: apply(*fargs[:3], fargs[3:]), args.calls)

    from hf_triton_attn.kernels.forward import flash_fwd

    out = ops._empty_out(q, d, False)
    lse = ops._empty_lse(q, False)
    launch_kw = ops._launch_args(q, k, v, b, False, None, None, None, None, None, None, None, None, 1, sk,
                                 d ** -0.5, 0.0, -1, -1, 0.0, False)
    rows["flash_fwd launcher"] = per_call_us(lambda: flash_fwd(q, k, v, out, lse, **launch_kw), args.calls)
    rows["torch.empty x2"] = per_call_us(lambda: (ops._empty_out(q, d, False), ops._empty_lse(q, False)),
                                         args.calls)

    try:
        from hf_triton_attn.patches.hf_interface import attention_forward

        class _Module(torch.nn.Module):
            is_causal = True

        module = _Module()
        rows["hf attention_forward (causal, no mask)"] = per_call_us(
            lambda: attention_forward(module, q, k, v, None, scaling=d ** -0.5), args.calls)
        rows["hf attention_forward (causal, mask)"] = per_call_us(
            lambda: attention_forward(module, q, k, v, mask, scaling=d ** -0.5), args.calls)
    except ImportError:
        pass

    # BERT after unpadding (encoder_unpad): varlen, H12 D64, tiny (256 tokens) so the GPU work stays
    # below the host time; beside SDPA on the same tokens as one dense (1, 12, 256, 64) batch.
    tokens = torch.randn(1, 256, 3, h, d, device=dev, dtype=torch.bfloat16)
    qv, kv, vv = (tokens[:, :, i].transpose(1, 2) for i in range(3))  # (1, H, T, D) views, as HF makes them
    cu = torch.tensor([0, 64, 128, 192, 256], dtype=torch.int32, device=dev)
    packed = lambda t: t.squeeze(0).transpose(0, 1)  # noqa: E731
    rows["sdpa, varlen-sized dense"] = per_call_us(lambda: F.scaled_dot_product_attention(qv, kv, vv), args.calls)
    rows["flash_attention varlen"] = per_call_us(
        lambda: flash_attention(packed(qv), packed(kv), packed(vv), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                max_seqlen_q=64, max_seqlen_k=64), args.calls)
    try:
        from hf_triton_attn.patches.hf_interface import attention_forward

        class _Encoder(torch.nn.Module):
            is_causal = False

        encoder = _Encoder()
        varlen_kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=64, max_length_k=64)
        hf_varlen = lambda: attention_forward(encoder, qv, kv, vv, None, scaling=d ** -0.5, **varlen_kw)  # noqa: E731
        rows["hf attention_forward varlen (BERT, unpadded)"] = per_call_us(hf_varlen, args.calls)
    except ImportError:
        hf_varlen = None

    # Pointer arguments as ints vs as tensors (kernels/launch.py), A B A B ... in this process.
    from hf_triton_attn.kernels import launch

    if launch._INT_POINTERS[0]:
        cases = {"flash_attention": lambda: flash_attention(q, k, v),
                 "flash_attention varlen": lambda: flash_attention(
                     packed(qv), packed(kv), packed(vv), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64,
                     max_seqlen_k=64)}
        best: dict[str, float] = {}
        for _ in range(5):
            for ints in (False, True):
                launch._INT_POINTERS[0] = ints
                for name, fn in cases.items():
                    label = f"{name}, pointers as {'ints' if ints else 'tensors'}"
                    best[label] = min(best.get(label, float("inf")), per_call_us(fn, args.calls // 4))
        launch._INT_POINTERS[0] = True
        rows.update(best)

    gpu = {"sdpa": gpu_us(lambda: F.scaled_dot_product_attention(q, k, v)),
           "flash_attention": gpu_us(lambda: flash_attention(q, k, v))}

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        flash_attention(q, k, v, attention_mask=mask)
    torch.cuda.synchronize()
    prof.disable()
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(25)

    varlen_profile = ""
    if hf_varlen is not None:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            hf_varlen()
        torch.cuda.synchronize()
        prof.disable()
        varlen_stream = io.StringIO()
        pstats.Stats(prof, stream=varlen_stream).sort_stats("tottime").print_stats(25)
        varlen_profile = varlen_stream.getvalue()

    print(f"host time per call, B{b} H{h} Sq1 Sk{sk} D{d} bf16 ({args.calls} calls, best of 3); varlen rows: "
          "4 x 64 tokens, H12 D64:")
    for name, us in rows.items():
        print(f"  {name:45s} {us:8.1f} us")
    print("first-call latency (compile, no autotuning): " + ", ".join(f"{n} {t:.2f}" for n, t in first.items()))
    print("GPU time per call (do_bench): " + ", ".join(f"{n} {t:.1f} us" for n, t in gpu.items()))
    print(stream.getvalue())
    if varlen_profile:
        print("== cProfile, hf attention_forward varlen")
        print(varlen_profile)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.json").write_text(json.dumps(
            {"host_us": rows, "gpu_us": gpu, "first_call_s": first, "device": torch.cuda.get_device_name(),
             "torch": torch.__version__,
             "profile": stream.getvalue(), "profile_hf_varlen": varlen_profile}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
