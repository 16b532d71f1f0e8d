"""The memory floor under a latency-bound decode call: how fast can ONE launch read a KV cache at all?

Decode at B = 1, GQA 32:8, D = 128, an 8k bf16 cache reads 33.5 MB of K and V. ``decode_timing.py``
measures ours and cuDNN at 22-24 us with L2 flushed (about 1.5 TB/s, a third of the H200's HBM peak),
and the issue asks for 1.2x cuDNN there. This probe times kernels that only READ the same K and V
(same layout, a grid of (KV head, split) programs each streaming its split in [BLOCK_N, D] tiles and
storing one float), with no softmax, no dot and no merge, so their time is the floor any decode kernel
of that launch shape pays: launch + DRAM latency + bytes over bandwidth. Also an empty kernel (the
launch and graph-replay floor). Each is a CUDA-graph replay, timed L2-hot, after a 256 MB write flush
(do_bench's memset) and after a 256 MB read flush (``decode_timing`` helpers).

    python -m benchmarks.decode_floor [--out decode_floor.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.decode_timing import flushed_us, graph_of, hot_us


@triton.jit
def _read_kv_kernel(K, V, OUT, stride_kh, stride_kn, stride_vh, stride_vn, keys_per_split,
                    BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Program (h, s) reads keys [s * keys_per_split, (s + 1) * keys_per_split) of K and V head h."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    start = s * keys_per_split
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)  # [BLOCK_N, D]
    for n in tl.range(start, start + keys_per_split, BLOCK_N):
        k = tl.load(K + h * stride_kh + (n + offs_n)[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(V + h * stride_vh + (n + offs_n)[:, None] * stride_vn + offs_d[None, :])
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(OUT + h * tl.num_programs(1) + s, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _empty_kernel(OUT):
    tl.store(OUT + tl.program_id(0), 0.0)


def read_call(k: torch.Tensor, v: torch.Tensor, splits: int, block_n: int, warps: int,
              stages: int) -> tuple[Callable[[], None], torch.Tensor]:
    """One launch of ``_read_kv_kernel`` over all of K and V (no key is left out), as a callable, and
    the (Hkv * splits,) fp32 tensor it writes: the sum of K + V over each (KV head, split)."""
    hkv, cache, d = k.shape[1], k.shape[2], k.shape[3]
    if cache % (splits * block_n):
        raise ValueError(f"read_call: expected the cache length to be a multiple of splits * block_n = "
                         f"{splits * block_n}, got {cache}")
    out = torch.empty(hkv * splits, device=k.device, dtype=torch.float32)
    per_split = cache // splits

    def call():
        _read_kv_kernel[(hkv, splits)](k, v, out, k.stride(1), k.stride(2), v.stride(1), v.stride(2), per_split,
                                       BLOCK_N=block_n, D=d, num_warps=warps, num_stages=stages)

    return call, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    hkv, cache, d = 8, 8192, 128
    k, v = (torch.randn(1, hkv, cache, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mb = 2 * k.numel() * k.element_size() / 1e6
    print(f"== {torch.cuda.get_device_name()} | K+V {mb:.1f} MB (B1, {hkv} KV heads, {cache} keys, D{d}, bf16)")
    print(f"{'kernel':>34} {'hot':>7} {'write':>7} {'read':>7}  (us; TB/s at write-flush)")
    rows = []

    def record(name: str, fn, nbytes: float) -> None:
        fn()
        graph = graph_of(fn)
        row = {"kernel": name, "hot_us": hot_us(graph.replay), "write_us": flushed_us(graph.replay, write=True),
               "read_us": flushed_us(graph.replay, write=False)}
        rows.append(row)
        rate = f"{nbytes / row['write_us'] / 1e6:6.2f}" if nbytes else ""
        print(f"{name:>34} {row['hot_us']:7.1f} {row['write_us']:7.1f} {row['read_us']:7.1f}  {rate}", flush=True)

    empty_out = torch.empty(256, device="cuda", dtype=torch.float32)
    record("empty (256 programs)", lambda: _empty_kernel[(256,)](empty_out), 0)
    for splits, block_n, warps, stages in itertools.product((16, 32, 64, 128), (32, 64), (2, 4), (2, 3, 4)):
        if cache % (splits * block_n):
            continue
        name = f"read splits {splits:>3} N{block_n} w{warps} s{stages}"
        try:
            record(name, read_call(k, v, splits, block_n, warps, stages)[0], mb * 1e6)
        except Exception as exc:  # out of shared memory, say
            print(f"{name:>34} failed: {type(exc).__name__}"[:120])
    kv = torch.cat([k.flatten(), v.flatten()])
    record("torch.sum of K and V", lambda: kv.sum(dtype=torch.float32), mb * 1e6)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "mb": mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
