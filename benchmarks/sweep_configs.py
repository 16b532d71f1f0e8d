"""Sweep launch configurations of the forward, dk/dv and dq kernels on the GPU.

Prints, per (dtype, D, causal, S), the time of each candidate and the best one, and writes
``DIR/sweep.json``. The winners are what kernels/configs.py hard-codes (with the card and date).

    python benchmarks/sweep_configs.py --out DIR [--seqlens 1024,4096] [--dtypes fp16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import metadata  # noqa: E402
from hf_triton_attn.kernels.backward import flash_bwd  # noqa: E402
from hf_triton_attn.kernels.forward import flash_fwd  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def candidates(kind: str, d: int):
    if kind == "fwd":
        blocks = [(128, 64), (128, 128), (64, 64), (128, 32), (64, 128)]
        warps, stages = [4, 8], [2, 3, 4]
    elif kind == "dkdv":
        blocks = [(32, 128), (64, 128), (32, 64), (64, 64), (16, 128)]
        warps, stages = [4, 8], [2, 3]
    else:
        blocks = [(128, 32), (128, 64), (64, 64), (64, 32), (128, 128)]
        warps, stages = [4, 8], [2, 3]
    for (bm, bn), w, s in itertools.product(blocks, warps, stages):
        if d >= 128 and bm * bn >= 128 * 128 and s > 2:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def common_args(b, h, s, causal, d):
    return dict(
        key_mask=None,
        query_mask=None,
        seqused_k=None,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        alibi=None,
        rng=None,
        max_seqlen_q=s,
        max_seqlen_k=s,
        num_seqs=b,
        sm_scale=d**-0.5,
        softcap=0.0,
        window_left=-1,
        window_right=0 if causal else -1,
        dropout_p=0.0,
        is_varlen=False,
        dot_precision="ieee",
    )


def time_or_none(fn) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as exc:  # out of shared memory / registers for this config
        print(f"    config failed: {type(exc).__name__}: {str(exc)[:100]}")
        return None


def sweep_one(dtype, d, causal, s):
    b, h = 16384 // s, 2048 // d
    mk = lambda: torch.randn(b, s, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    q, k, v = mk(), mk(), mk()
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    args = common_args(b, h, s, causal, d)
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    rows = []
    for cfg in candidates("fwd", d):
        ms = time_or_none(lambda cfg=cfg: flash_fwd(q, k, v, o, lse, config=cfg, **args))
        rows.append(("fwd", cfg, ms))
    flash_fwd(q, k, v, o, lse, **args)
    do = torch.randn_like(o)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    for kind in ("dkdv", "dq"):
        for cfg in candidates(kind, d):
            kw = {"config": cfg} if kind == "dkdv" else {"config_dq": cfg}
            ms = time_or_none(lambda kw=kw: flash_bwd(do, q, k, v, o, lse, delta, dq, dk, dv, **kw, **args))
            rows.append((kind, cfg, ms))
    out = []
    for kind, cfg, ms in rows:
        mult = 1.0 if kind == "fwd" else 2.5
        out.append(dict(kind=kind, config=cfg, ms=ms, tflops=None if ms is None else flops * mult / ms / 1e9))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep_out")
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--dims", default="64,128")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {"meta": metadata(), "runs": []}
    summary = []
    for dt, d, causal, s in itertools.product(
        args.dtypes.split(","),
        map(int, args.dims.split(",")),
        (False, True),
        map(int, args.seqlens.split(",")),
    ):
        print(f"sweep {dt} D={d} causal={causal} S={s}", flush=True)
        rows = sweep_one(DTYPES[dt], d, causal, s)
        results["runs"].append(dict(dtype=dt, D=d, causal=causal, S=s, rows=rows))
        for kind in ("fwd", "dkdv", "dq"):
            ok = [r for r in rows if r["kind"] == kind and r["ms"] is not None]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            if best:
                c = best["config"]
                summary.append(
                    f"{dt} D={d:3d} causal={int(causal)} S={s:5d} {kind:4s} best "
                    f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} "
                    f"{best['ms']:.3f} ms"
                )
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
