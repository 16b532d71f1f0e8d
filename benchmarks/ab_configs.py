"""A few kernel-grid configs, timed quickly, for A/B runs of two package copies on one machine.

    python -m benchmarks.ab_configs --configs 64:1024:nc:fwd,128:1024:nc:fwd [--dtype fp16] [--reps 3]

Each config is ``D:S:c|nc:fwd|fwdbwd[:dropout_p]`` at the grid of issue 5 (B*S = 16384, H*D = 2048, q/k/v in the
Hugging Face layout as in bench_kernels.py). Prints one line per config: ours and SDPA's flash
backend (FA2), median ms of do_bench, ``reps`` times alternating, and the ratio of the medians.
Alternate two packages by running it in turn with and without ``HF_TRITON_ATTN_SOURCE=DIR``: one
process per package, so each sees only its own kernels (the Triton cache keeps the compiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import PACKAGE_SOURCE, hf_layout  # noqa: E402  (imports hf_triton_attn from DIR if set)
from hf_triton_attn import flash_attention  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse(config: str) -> tuple[int, int, bool, str, float]:
    fields = config.split(":")
    if len(fields) not in (4, 5) or fields[2] not in ("c", "nc") or fields[3] not in ("fwd", "fwdbwd"):
        raise SystemExit(f"--configs: expected D:S:c|nc:fwd|fwdbwd[:dropout_p], got {config!r}")
    dropout_p = float(fields[4]) if len(fields) == 5 else 0.0
    return int(fields[0]), int(fields[1]), fields[2] == "c", fields[3], dropout_p


def timer(fn, q, k, v, causal: bool, mode: str, dropout_p: float):
    dout = torch.randn_like(q)

    def fwd() -> torch.Tensor:
        return fn(q, k, v, causal, dropout_p)

    def fwdbwd() -> None:
        fn(q, k, v, causal, dropout_p).backward(dout)
    step = fwd if mode == "fwd" else fwdbwd
    return lambda: do_bench(step, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")


def ours(q, k, v, causal, dropout_p):
    return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)


def fa2(q, k, v, causal, dropout_p):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", required=True, help="comma list of D:S:c|nc:fwd|fwdbwd[:dropout_p]")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    label = f"package {PACKAGE_SOURCE}" if PACKAGE_SOURCE else "package from the working tree"
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, {label}; ms: ours (samples) | fa2 (samples)")
    for config in args.configs.split(","):
        d, s, causal, mode, dropout_p = parse(config)
        b, h = 16384 // s, 2048 // d
        q, k, v = (hf_layout(b, s, h, d, DTYPES[args.dtype], "cuda", mode == "fwdbwd") for _ in range(3))
        run_ours, run_fa2 = (timer(fn, q, k, v, causal, mode, dropout_p) for fn in (ours, fa2))
        mine, theirs = [], []
        for _ in range(args.reps):
            mine.append(run_ours())
            theirs.append(run_fa2())
        m, t = statistics.median(mine), statistics.median(theirs)
        print(f"{config:>18} ours {m:.4f} ({' '.join(f'{x:.4f}' for x in mine)}) | fa2 {t:.4f} "
              f"({' '.join(f'{x:.4f}' for x in theirs)}) | {t / m:.3f}x fa2", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
