"""Backward with dq in its own kernel ("split") or summed by the dk/dv kernel ("fused": one fp32 TMA
reduce-add per tile on Hopper), at the kernel grid of issue 5, beside SDPA's flash and cuDNN backends.

    python benchmarks/bench_dq_modes.py [--seqlens 1024,4096] [--dims 64,128] [--dropout 0,0.1] [--dtype bf16]
        [--layout bhsd|hf]

Prints fwd+bwd ms (median of do_bench) per mode; the policy in ``kernels/configs.fuse_dq``
comes from this table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import collect_meta, hf_layout, meta_title  # noqa: E402
from hf_triton_attn import flash_attention  # noqa: E402

MODES = ("split", "fused")


def fwd_bwd_ms(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, p: float) -> float:
    g = torch.randn_like(q)

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        attention(q, k, v, causal, p).backward(g)
    return do_bench(step, warmup=25, rep=100)


def ours(q, k, v, causal, p):
    return flash_attention(q, k, v, causal=causal, dropout_p=p)


def sdpa(q, k, v, causal, p):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def row(d: int, s: int, causal: bool, p: float, dtype: torch.dtype, layout: str) -> str:
    """``layout`` "hf": (B, S, H, D) contiguous viewed as (B, H, S, D), as Hugging Face models pass them."""
    b, h = 16384 // s, 2048 // d
    if layout == "hf":
        q, k, v = (hf_layout(b, s, h, d, dtype, "cuda", True) for _ in range(3))
    else:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    times = []
    for mode in MODES:
        os.environ["HF_TRITON_ATTN_DQ"] = mode
        times.append(fwd_bwd_ms(ours, q, k, v, causal, p))
    os.environ.pop("HF_TRITON_ATTN_DQ")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                times.append(fwd_bwd_ms(sdpa, q, k, v, causal, p))
        except RuntimeError:
            times.append(float("nan"))
    return f"{d:>4} {s:>6} {causal!s:>6} {p:>4} | " + " ".join(f"{t:8.3f}" for t in times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dropout", default="0,0.1")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--layout", default="bhsd", choices=("bhsd", "hf"))
    args = ap.parse_args(argv)
    print(meta_title(collect_meta("cuda")))
    print(f"{'D':>4} {'S':>6} {'causal':>6} {'p':>4} | " + " ".join(f"{m:>8}" for m in (*MODES, "fa2", "cudnn"))
          + f"   (ms, fwd+bwd, {args.dtype}, {args.layout} layout)")
    for d, s, causal, p in itertools.product([int(x) for x in args.dims.split(",")],
                                             [int(x) for x in args.seqlens.split(",")], (False, True),
                                             [float(x) for x in args.dropout.split(",")]):
        print(row(d, s, causal, p, DTYPES[args.dtype], args.layout), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
