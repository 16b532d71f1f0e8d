"""Where the time of one decode call goes: GPU time (L2 flushed or not) versus host time.

``bench_kernels.py`` times a decode call with ``do_bench``, which flushes the L2 cache (a 256 MB
memset) before each call and reads CUDA events around it. If the host needs longer to issue the call
than the memset runs, the events measure the host. This probe separates the two:

* ``bench``: ``do_bench`` of the eager call (what bench_kernels reports);
* ``graph``: ``do_bench`` of a CUDA-graph replay of the same call (one host launch: GPU time, L2 flushed);
* ``graph_hot``: the same replay in a loop without the flush (GPU time with the K/V cache in L2);
* ``graph_write`` / ``graph_read``: the replay after flushing L2 by writing 256 MB (do_bench's memset,
  which leaves L2 full of dirty lines that the call's reads must first write back) or by reading
  256 MB (L2 full of clean lines), events around the replay alone: how much of the flushed time is
  the write-back of do_bench's own memset;
* ``host_us``: host microseconds per eager call (a loop of calls, no sync inside);
* ``kernels`` / ``span``: the eager call's GPU time from the profiler's device trace after do_bench's
  flush, with no host time in it: its kernels' (and memsets') summed durations, and their span from the
  first start to the last end; ``g_kern`` / ``g_span`` the same for the graph replay (a capture can hold
  work an eager call does not, such as a memset).

for ours at each ``--splits`` count (``auto`` = the heuristic) and for SDPA's cuDNN, flash and
efficient backends, at the ``--cases`` (Hq:Hkv:B:cache) and ``--dim`` given (default: four D = 128 rows).

    python -m benchmarks.decode_timing --out decode_timing.json
    python -m benchmarks.decode_timing --dim 64 --cases 12:12:8:600 --splits auto 2 4
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import PACKAGE_SOURCE  # before hf_triton_attn: honours HF_TRITON_ATTN_SOURCE

CASES = ((32, 8, 1, 8192), (32, 32, 1, 8192), (32, 8, 1, 2048), (32, 8, 4, 8192))  # (Hq, Hkv, B, cache)


def host_us(fn: Callable[[], object], calls: int = 300) -> float:
    """Host microseconds per call: ``calls`` calls issued back to back, timed without a sync inside."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def graph_of(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` captured once (after a warm-up on a side stream, as torch recommends)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def hot_us(fn: Callable[[], object], calls: int = 200) -> float:
    """GPU microseconds per call without an L2 flush (back-to-back replays between two events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def flushed_samples_us(fn: Callable[[], object], write: bool, calls: int = 50) -> list[float]:
    """Sorted GPU microseconds of ``calls`` calls of ``fn``, each right after a 256 MB L2 flush by
    memset (``write``, as do_bench) or by a read (a sum over the same buffer); events around ``fn``."""
    buf = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")
    total = torch.empty((), dtype=torch.int64, device="cuda")
    times = []
    for _ in range(calls):
        if write:
            buf.zero_()
        else:
            torch.sum(buf, dim=0, dtype=torch.int64, out=total)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) * 1e3 for s, e in times)


def flushed_us(fn: Callable[[], object], write: bool, calls: int = 50) -> float:
    """Median of ``flushed_samples_us``."""
    us = flushed_samples_us(fn, write, calls)
    return us[len(us) // 2]


def device_time_us(fn: Callable[[], object], calls: int = 30) -> tuple[float, float]:
    """GPU time of ``fn`` with no host time in it, from the profiler's device trace (CUPTI): medians
    over ``calls`` calls, each after do_bench's 256 MB memset flush, of (the summed durations of the
    call's kernels and memsets, their span from the first start to the last end, gaps included).

    The flush's own kernel delimits the calls: its names come from a profile of the flush alone, and
    only events of those names longer than 20 us count as a flush (a call's own fills are short).
    """
    from torch.profiler import ProfilerActivity, profile

    buf = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")

    def device_events(prof) -> list[tuple[str, int, int]]:
        events = prof.profiler.kineto_results.events()
        return sorted((e.name(), e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                      if e.device_type() == torch.autograd.DeviceType.CUDA)

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        buf.zero_()
        torch.cuda.synchronize()
    flush_names = {name for name, _, _ in device_events(prof)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            buf.zero_()
            fn()
        torch.cuda.synchronize()
    groups: list[list[tuple[int, int]]] = []
    for name, start, end in sorted(device_events(prof), key=lambda e: e[1]):
        if name in flush_names and end - start > 20_000:
            groups.append([])
        elif groups:
            groups[-1].append((start, end))
    groups = [g for g in groups if g]
    if len(groups) != calls:
        raise RuntimeError(f"expected {calls} profiled calls after the flushes, found {len(groups)}")
    sums = sorted(sum(e - s for s, e in g) / 1e3 for g in groups)
    spans = sorted((max(e for _, e in g) - min(s for s, _ in g)) / 1e3 for g in groups)
    return sums[calls // 2], spans[calls // 2]


def measure(fn: Callable[[], object]) -> dict[str, float]:
    import triton.testing

    fn()
    graph = graph_of(fn)
    triton.testing.do_bench(fn, warmup=1, rep=10)  # discarded: see common.bench_ms
    try:
        kernel_us, span_us = device_time_us(fn)
        graph_kernel_us, graph_span_us = device_time_us(graph.replay)
    except RuntimeError as exc:  # a trace this parser does not understand: the event timings still count
        print(f"device trace: {exc}")
        kernel_us = span_us = graph_kernel_us = graph_span_us = float("nan")
    return {
        "kernel_us": kernel_us,
        "span_us": span_us,
        "graph_kernel_us": graph_kernel_us,
        "graph_span_us": graph_span_us,
        "bench_us": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3,
        "graph_us": triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3,
        "graph_hot_us": hot_us(graph.replay),
        "graph_write_us": flushed_us(graph.replay, write=True),
        "graph_read_us": flushed_us(graph.replay, write=False),
        "host_us": host_us(fn),
    }


def ours_call(q, k, v, splits: str) -> Callable[[], object]:
    from hf_triton_attn import flash_attention
    from hf_triton_attn.kernels import decode

    if splits == "auto":
        return lambda: flash_attention(q, k, v, backend="triton")
    n = int(splits)

    def call():
        original = decode.decode_splits
        decode.decode_splits = lambda *args: n
        try:
            return flash_attention(q, k, v, backend="triton")
        finally:
            decode.decode_splits = original

    return call


_ORIGINAL_META: dict = {}


def with_config(block_n: int, warps: int, stages: int):
    """Make ``flash_decode`` launch with these tile keys / warps / stages (``--sweep``)."""
    from hf_triton_attn.kernels import decode

    original = _ORIGINAL_META.setdefault("meta", decode._decode_meta)
    names = decode._launch_decode.constexpr_names

    def meta(*args):
        _, row_blocks, _, _, cx_split, cx_single, long_per_sm, _deep = original(*args)
        swap = lambda cx: tuple(block_n if n == "BLOCK_N" else x for n, x in zip(names, cx))  # noqa: E731
        # no deep tile for whole launches: the swept BLOCK_N and stages are the ones launched
        return block_n, row_blocks, warps, stages, swap(cx_split), swap(cx_single), long_per_sm, None

    decode._decode_meta = meta


def sweep(block_ns: list[int], warps_list: list[int], stages_list: list[int], splits_list: list[str],
          cases: list[tuple[int, int, int, int]], d: int = 128) -> None:
    """Decode tile configs x split counts at B = 1 (the latency-bound rows), ours only; head dim ``d``."""
    import itertools

    import triton.testing

    dtype = torch.bfloat16
    print(f"{'case':>16} {'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'splits':>6} {'bench':>7} {'graph':>7}  (us)")
    for hq, hkv, b, cache in cases:
        q = torch.randn(b, 1, hq, d, dtype=dtype, device="cuda").transpose(1, 2)
        k, v = (torch.randn(b, hkv, cache, d, dtype=dtype, device="cuda") for _ in range(2))
        for block_n, warps, stages, splits in itertools.product(block_ns, warps_list, stages_list, splits_list):
            with_config(block_n, warps, stages)
            fn = ours_call(q, k, v, splits)
            try:
                fn()
                graph = graph_of(fn)
                bench = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                replay = triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3
            except Exception as exc:  # out of shared memory, say
                print(f"{hq}:{hkv} B{b} {cache:>6} {block_n:>7} {warps:>5} {stages:>6} {splits:>6} failed: "
                      f"{type(exc).__name__}"[:160])
                continue
            print(f"{hq}:{hkv} B{b} {cache:>6} {block_n:>7} {warps:>5} {stages:>6} {splits:>6} "
                  f"{bench:7.1f} {replay:7.1f}")


def decode_case(text: str) -> tuple[int, int, int, int]:
    """``Hq:Hkv:B:cache`` -> (Hq, Hkv, B, cache), four positive ints with Hkv dividing Hq."""
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected Hq:Hkv:B:cache (four positive ints), got {text!r}")
    hq, hkv, b, cache = (int(p) for p in parts)
    if hq % hkv:
        raise argparse.ArgumentTypeError(f"expected Hkv dividing Hq, got Hq {hq}, Hkv {hkv} in {text!r}")
    return hq, hkv, b, cache


def sdpa_call(q, k, v, backend: SDPBackend) -> Callable[[], object]:
    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--splits", nargs="*", default=["auto", "8", "16", "64"])
    parser.add_argument("--no-sdpa", action="store_true", help="time ours only")
    parser.add_argument("--sweep", action="store_true", help="tile configs x split counts, ours only")
    parser.add_argument("--sweep-block-n", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--sweep-warps", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--sweep-stages", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--sweep-splits", nargs="*", default=["auto", "16", "64"])
    parser.add_argument("--sweep-cases", nargs="*", type=decode_case,
                        default=[(32, 8, 1, 8192), (32, 8, 1, 2048), (32, 32, 1, 8192)], help="Hq:Hkv:B:cache")
    parser.add_argument("--cases", nargs="*", type=decode_case, default=list(CASES),
                        help="Hq:Hkv:B:cache rows of the timing table")
    parser.add_argument("--dim", type=int, default=128, help="head dim (q, k and v)")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.sweep_block_n, args.sweep_warps, args.sweep_stages, args.sweep_splits, args.sweep_cases,
              args.dim)
        return
    dtype, d = torch.bfloat16, args.dim
    rows = []
    import hf_triton_attn

    print(f"== {torch.cuda.get_device_name()} | package {hf_triton_attn.__file__} (source {PACKAGE_SOURCE})")
    print(f"{'Hq:Hkv':>7} {'B':>3} {'cache':>6} {'impl':>12} {'bench':>8} {'graph':>8} {'hot':>8} {'write':>8} "
          f"{'read':>8} {'host':>8} {'kernels':>8} {'span':>8} {'g_kern':>8} {'g_span':>8}  (us)")
    for hq, hkv, b, cache in args.cases:
        q = torch.randn(b, 1, hq, d, dtype=dtype, device="cuda").transpose(1, 2)
        k, v = (torch.randn(b, hkv, cache, d, dtype=dtype, device="cuda") for _ in range(2))
        impls = {f"ours_{s}": ours_call(q, k, v, s) for s in args.splits}
        if not args.no_sdpa:
            impls["sdpa_cudnn"] = sdpa_call(q, k, v, SDPBackend.CUDNN_ATTENTION)
            impls["sdpa_flash"] = sdpa_call(q, k, v, SDPBackend.FLASH_ATTENTION)
            impls["sdpa_efficient"] = sdpa_call(q, k, v, SDPBackend.EFFICIENT_ATTENTION)
        for name, fn in impls.items():
            try:
                row = {"Hq": hq, "Hkv": hkv, "B": b, "cache": cache, "impl": name, **measure(fn)}
            except Exception as exc:  # a backend that declines this case
                print(f"{hq:>4}:{hkv:<2} {b:>3} {cache:>6} {name:>12} failed: {type(exc).__name__}: {exc}"[:200])
                continue
            rows.append(row)
            print(f"{hq:>4}:{hkv:<2} {b:>3} {cache:>6} {name:>12} {row['bench_us']:8.1f} {row['graph_us']:8.1f} "
                  f"{row['graph_hot_us']:8.1f} {row['graph_write_us']:8.1f} {row['graph_read_us']:8.1f} "
                  f"{row['host_us']:8.1f} {row['kernel_us']:8.1f} {row['span_us']:8.1f} {row['graph_kernel_us']:8.1f} "
                  f"{row['graph_span_us']:8.1f}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "package_source": PACKAGE_SOURCE,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
