"""benchmarks/decode_floor.py's bare-read kernel reads every key of K and V (so the floor it times is
the floor of reading the whole cache), and the decode benchmarks' case parser names a bad case."""

import argparse

import pytest
import torch

from tests.helpers import DEVICE

floor = pytest.importorskip("benchmarks.decode_floor")
timing = pytest.importorskip("benchmarks.decode_timing")


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
