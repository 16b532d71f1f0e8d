"""Forward launch configurations on the padded benchmark batch, timed as CUDA-graph replays.

The padded shape of issue 5 (B32 H12 S512 D64 bf16, right padding with lengths uniform in
fill * S * [0.5, 1.5]) through both of our paths: the dense batch with key + query masks (TMA loads)
and its real tokens packed (varlen, pointer loads). Each (fill, path, config) is captured once in a
CUDA graph and timed by ``do_bench`` on the replay, so the host's launch cost (which these
0.03-0.1 ms calls can exceed) stays out; SDPA cuDNN with the same mask is timed the same way.

    python -m benchmarks.padded_configs [--fills 0.26,0.58,1.0] [--dropout 0.1] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_key_masks import lengths_mask  # noqa: E402
from benchmarks.common import collect_meta, hf_layout, pack_padded  # noqa: E402
from benchmarks.decode_timing import graph_of  # noqa: E402
from benchmarks.sweep_configs import common_args  # noqa: E402
from hf_triton_attn.kernels.forward import flash_fwd  # noqa: E402

B, H, S, D = 32, 12, 512, 64
CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
           for (bm, bn), w, st in itertools.product(((128, 64), (64, 64), (128, 128), (64, 128), (128, 32)),
                                                    (4, 8), (2, 3))]


def graph_ms(fn) -> float | None:
    """Median ms of CUDA-graph replays of ``fn``; None where the config does not launch."""
    try:
        graph = graph_of(fn)
    except Exception as exc:  # out of shared memory / registers for this config
        print(f"    config failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        return None
    do_bench(graph.replay, warmup=1, rep=10)  # discarded: the first timing after a capture runs slow
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def launch_args(num_seqs: int, max_len: int, key_mask, query_mask, cu, is_varlen: bool, dropout_p: float) -> dict:
    """flash_fwd's keywords (``sweep_configs.common_args``) for a non-causal batch with these masks / packing."""
    rng = torch.tensor([1234, 5678], device="cuda", dtype=torch.int64) if dropout_p else None
    return dict(common_args(num_seqs, H, max_len, False, D), key_mask=key_mask, query_mask=query_mask,
                cu_seqlens_q=cu, cu_seqlens_k=cu, rng=rng, dropout_p=dropout_p, is_varlen=is_varlen)


def time_fill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fill: float, dropout_p: float) -> list[dict]:
    """Every config on both paths at one fill, printed best first; the rows for the JSON."""
    mask = lengths_mask(B, S, fill, holes=False, seed=int(fill * 1000))
    qp, kp, vp, cu, max_len = pack_padded(q, k, v, mask)
    sdpa_mask = mask[:, None, None, :]

    def cudnn_call() -> None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)

    cudnn = graph_ms(cudnn_call)
    o, lse = torch.empty_like(q), torch.empty(B, H, S, device="cuda", dtype=torch.float32)
    op, lsep = torch.empty_like(qp), torch.empty(H, qp.shape[0], device="cuda", dtype=torch.float32)
    masked_args = launch_args(B, S, mask, mask, None, False, dropout_p)
    packed_args = launch_args(B, max_len, None, None, cu, True, dropout_p)
    paths = {
        "masks": functools.partial(flash_fwd, q, k, v, o, lse, **masked_args),
        "varlen": functools.partial(flash_fwd, qp, kp, vp, op, lsep, **packed_args),
    }
    print(f"fill {fill:.2f}: cudnn {cudnn:.4f} ms", flush=True)
    rows = []
    for path, call in paths.items():
        results = [(cfg, graph_ms(functools.partial(call, config=cfg))) for cfg in [None] + CONFIGS]
        default_ms = results[0][1]
        ranked = sorted((r for r in results[1:] if r[1] is not None), key=lambda r: r[1])
        for cfg, ms in ranked[:4]:
            print(f"  {path:6s} {ms:.4f} ms ({cudnn / ms:.2f}x cudnn) {cfg}", flush=True)
        print(f"  {path:6s} default {default_ms:.4f} ms ({cudnn / default_ms:.2f}x cudnn)", flush=True)
        rows += [dict(fill=fill, dropout_p=dropout_p, path=path, config=cfg, ms=ms, cudnn_ms=cudnn)
                 for cfg, ms in results]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fills", default="0.26,0.58,1.0")
    ap.add_argument("--dropout", type=float, default=0.0, help="attention dropout p of our calls (cuDNN: p = 0)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    q, k, v = (hf_layout(B, S, H, D, torch.bfloat16, "cuda") for _ in range(3))
    print(f"# {torch.cuda.get_device_name()}; B{B} H{H} S{S} D{D} bf16 forward, dropout {args.dropout}, ms of "
          f"CUDA-graph replays; default = configs.fwd_config", flush=True)
    rows = [row for fill in args.fills.split(",") for row in time_fill(q, k, v, float(fill), args.dropout)]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "padded_configs.json"), "w") as f:
            json.dump(dict(meta=collect_meta("cuda"), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
