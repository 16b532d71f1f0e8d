"""The decode benchmarks: benchmarks/decode_floor.py's bare-read kernel reads every key of K and V (so the
floor it times is the floor of reading the whole cache), decode_timing's case parser names a bad case, and
bench_kernels' decode table shows the CUDA-graph replay times beside the eager ones when they were taken."""

import argparse

import pytest
import torch

from tests.helpers import DEVICE

floor = pytest.importorskip("benchmarks.decode_floor")
timing = pytest.importorskip("benchmarks.decode_timing")
bench_kernels = pytest.importorskip("benchmarks.bench_kernels")


def test_bare_read_sums_every_key_of_its_split():
    torch.manual_seed(0)
    hkv, cache, d, splits, block_n = 3, 192, 128, 3, 32
    # float32: the interpreter's sums are exact enough to tell a skipped or doubled tile (~1e1) from rounding
    k, v = (torch.randn(1, hkv, cache, d, device=DEVICE) for _ in range(2))
    call, out = floor.read_call(k, v, splits, block_n, warps=4, stages=2)
    out.fill_(float("nan"))
    call()
    expected = (k + v).reshape(hkv, splits, cache // splits, d).sum(dim=(2, 3)).flatten()
    torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=1e-5, atol=1e-3)


def test_bare_read_refuses_a_cache_it_would_cut_short():
    k = torch.zeros(1, 1, 100, 128, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of splits \\* block_n = 64, got 100"):
        floor.read_call(k, k, 2, 32, warps=4, stages=2)


def test_decode_case_parses_and_names_bad_cases():
    assert timing.decode_case("32:8:1:8192") == (32, 8, 1, 8192)
    with pytest.raises(argparse.ArgumentTypeError, match="four positive ints\\), got '32:8'"):
        timing.decode_case("32:8")
    with pytest.raises(argparse.ArgumentTypeError, match="Hkv dividing Hq, got Hq 32, Hkv 7"):
        timing.decode_case("32:7:1:64")


def _decode_record(provider, ms, graph_ms=None):
    record = dict(bench="decode", D=128, dtype="bf16", Hq=32, Hkv=8, B=1, cache=8192, provider=provider, ms=ms,
                  gbps=33.6e6 / (ms * 1e-3) / 1e9)
    if graph_ms is not None:
        record["graph_ms"] = graph_ms
    return record


def test_decode_table_shows_graph_replays_beside_eager_times():
    records = [_decode_record("ours", 0.029, 0.0234), _decode_record("sdpa_cudnn", 0.022, 0.0225),
               _decode_record("sdpa_efficient", 0.286)]
    header, columns, row = bench_kernels.decode_summary(records)
    assert header.endswith("| CUDA-graph replay ms ==")
    eager, graph = row.split(" | ")
    assert eager.split()[3:] == ["0.029", "(1159)", "0.022", "(1527)", "0.286", "(117)"]
    assert graph.split() == ["0.0234", "0.0225", "-"]  # a provider without a replay time shows "-"
    # without replay times (CPU runs, older JSON) the table is the eager one alone
    plain = bench_kernels.decode_summary([_decode_record("ours", 0.029)])
    assert "|" not in plain[0] + plain[1] + plain[2]
