"""Sweep launch configurations of the forward, dk/dv and dq kernels on the GPU.

Prints, per (dtype, D, causal, S), the time of each candidate and the best one, and writes
``DIR/sweep.json``. The winners are what kernels/configs.py hard-codes (with the card and date).

    python benchmarks/sweep_configs.py --out DIR [--seqlens 1024,4096] [--dtypes fp16] [--dropout 0.1]

The backward kinds time the whole backward; which dq path runs follows ``configs.fuse_dq`` (set
HF_TRITON_ATTN_DQ=split or fused to force one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import collect_meta  # noqa: E402
from hf_triton_attn.kernels.backward import flash_bwd  # noqa: E402
from hf_triton_attn.kernels.forward import flash_fwd  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def candidates(kind: str, d: int):
    """A pruned space: block shapes that fit Hopper's shared memory at this head dim."""
    stages = (2, 3, 4) if kind.startswith("fwd") else (2, 3)
    blocks = {
        "fwd": [(128, 64), (128, 128), (64, 64), (64, 128)],
        "dkdv": [(32, 128), (64, 128), (32, 64), (64, 64), (128, 64), (128, 128)],
        "dq": [(128, 32), (128, 64), (64, 64), (64, 32)],
    }[kind.removesuffix("_ptr")]
    for (bm, bn), w, s in itertools.product(blocks, (4, 8), stages):
        if d >= 128 and bm * bn >= 128 * 128 and s > 2:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def common_args(b, h, s, causal, d):
    return dict(
        key_mask=None,
        query_mask=None,
        segments=None,
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


def time_or_none(fn, timed: bool = True) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=40, return_mode="median") if timed else 0.0
    except Exception as exc:  # out of shared memory / registers for this config
        print(f"    config failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        return None


_problems: dict = {}


# --fill: key + query padding masks with this mean fraction of real tokens; --dropout: attention dropout
# (environment variables, so the spawned precompile workers see them too)
FILL = float(os.environ["SWEEP_FILL"]) if os.environ.get("SWEEP_FILL") else None
DROPOUT = float(os.environ.get("SWEEP_DROPOUT", "0"))


def problem(dtype_name: str, d: int, causal: bool, s: int) -> dict:
    """Inputs, buffers and launcher arguments of one benchmark shape (cached per process)."""
    key = (dtype_name, d, causal, s)
    if key not in _problems:
        _problems.clear()
        torch.cuda.empty_cache()
        b, h = 16384 // s, 2048 // d
        mk = lambda: torch.randn(b, s, h, d, device="cuda", dtype=DTYPES[dtype_name]).transpose(1, 2)
        q, k, v = mk(), mk(), mk()
        o = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        args = common_args(b, h, s, causal, d)
        if FILL is not None:  # right padding, lengths uniform around FILL * s (the padded benchmark's)
            g = torch.Generator().manual_seed(260)
            lens = (FILL * s * (0.5 + torch.rand(b, generator=g))).round().long().clamp(1, s)
            args["key_mask"] = args["query_mask"] = (torch.arange(s)[None] < lens[:, None]).cuda()
        if DROPOUT:
            args["dropout_p"] = DROPOUT
            args["rng"] = torch.tensor([1234, 5678], device="cuda", dtype=torch.int64)
        flash_fwd(q, k, v, o, lse, **args)
        _problems[key] = dict(q=q, k=k, v=v, o=o, lse=lse, args=args, do=torch.randn_like(o),
                              dq=torch.empty_like(q), dk=torch.empty_like(k), dv=torch.empty_like(v),
                              delta=torch.empty_like(lse), flops=4 * b * h * s * s * d * (0.5 if causal else 1.0))
    return _problems[key]


def run_job(job: tuple, timed: bool = True) -> float | None:
    """job = (dtype, D, causal, S, kind, config): compile (and time) one launch configuration."""
    dtype_name, d, causal, s, kind, cfg = job
    p = problem(dtype_name, d, causal, s)
    use_tma = False if kind.endswith("_ptr") else None  # KIND: TMA where possible; KIND_ptr: pointer loads
    if kind.startswith("fwd"):
        fn = lambda: flash_fwd(p["q"], p["k"], p["v"], p["o"], p["lse"], config=cfg, use_tma=use_tma,
                               **p["args"])
    else:
        kw = {"config": cfg} if kind.startswith("dkdv") else {"config_dq": cfg}
        fn = lambda: flash_bwd(p["do"], p["q"], p["k"], p["v"], p["o"], p["lse"], p["delta"], p["dq"],
                               p["dk"], p["dv"], use_tma=use_tma, **kw, **p["args"])
    return time_or_none(fn, timed)


def _precompile(job: tuple) -> None:
    run_job(job, timed=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep_out")
    ap.add_argument("--seqlens", default="4096")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--jobs", type=int, default=12, help="processes that compile in parallel first")
    ap.add_argument("--kinds", default="fwd,dkdv,dq",
                    help="kernels to sweep: fwd, dkdv, dq (TMA where possible), each also as KIND_ptr (pointer loads)")
    ap.add_argument("--fill", type=float, default=None,
                    help="add key and query padding masks with this mean fill (e.g. 0.58, 1.0)")
    ap.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability (e.g. 0.1)")
    args = ap.parse_args()
    global FILL, DROPOUT
    FILL, DROPOUT = args.fill, args.dropout
    if FILL is not None:
        os.environ["SWEEP_FILL"] = str(FILL)
    os.environ["SWEEP_DROPOUT"] = str(DROPOUT)
    os.makedirs(args.out, exist_ok=True)
    combos = list(itertools.product(args.dtypes.split(","), map(int, args.dims.split(",")), (False, True),
                                    map(int, args.seqlens.split(","))))
    jobs = [(dt, d, causal, s, kind, cfg) for dt, d, causal, s in combos
            for kind in args.kinds.split(",") for cfg in candidates(kind, d)]
    t0 = time.time()
    # Compilation is CPU-bound and serial per process: warm Triton's on-disk cache from a pool
    # (jobs stay grouped by shape, so a worker allocates each problem once), then time serially.
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        pool.map(_precompile, jobs, chunksize=max(1, len(jobs) // (4 * args.jobs)))
    print(f"precompiled {len(jobs)} configs in {time.time() - t0:.0f} s", flush=True)
    results = {"meta": collect_meta("cuda"), "runs": []}
    summary = []
    for dt, d, causal, s in combos:
        rows = []
        for job in jobs:
            if job[:4] == (dt, d, causal, s):
                ms = run_job(job)
                mult = 1.0 if job[4].startswith("fwd") else 2.5
                flops = problem(dt, d, causal, s)["flops"]
                rows.append(dict(kind=job[4], config=job[5], ms=ms,
                                 tflops=None if ms is None else flops * mult / ms / 1e9))
        results["runs"].append(dict(dtype=dt, D=d, causal=causal, S=s, rows=rows))
        for kind in args.kinds.split(","):
            ok = sorted((r for r in rows if r["kind"] == kind and r["ms"] is not None), key=lambda r: r["ms"])
            for rank, r in enumerate(ok[:5]):
                c = r["config"]
                summary.append(f"{dt} D={d:3d} causal={int(causal)} S={s:5d} {kind:7s} #{rank + 1} "
                               f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} "
                               f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s")
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(summary))
    print(f"sweep total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
