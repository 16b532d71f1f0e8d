"""examples/example_usage.py: the seed's benchmark script (standard attention vs TritonMultiHeadAttention)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from .helpers import BACKEND, ON_GPU

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "example_usage.py"
TINY = dict(seq_lens=(16, 33), d_models=(32,), num_heads=(2,), batch_size=1, dtype="fp32", cpu_repeats=1)


@pytest.fixture(scope="module")
def example():
    if not SCRIPT.exists():
        pytest.skip("examples/example_usage.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("example_usage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_writes_json_and_png(example, tmp_path):
    result = example.run_benchmark_suite(**TINY, out_dir=tmp_path, verbose=False)
    meta, records = json.loads((tmp_path / "example_usage.json").read_text()).values()
    assert meta["backend"] == BACKEND == result["meta"]["backend"]  # the real kernels (interpreted on CPU)
    assert meta["device"] == ("cuda" if ON_GPU else "cpu") and meta["commit"] and meta["date_utc"]
    assert len(records) == 2 * 2 * 3  # S x (fwd, fwdbwd) x providers
    for rec in records:
        assert rec["ms"] is not None and rec["ms"] > 0, rec
        assert rec["speedup_vs_standard"] is not None
        assert rec["check"]["out"] < 1e-4 and rec["check"]["dx"] < 1e-4, rec
    assert {r["provider"] for r in records} == {"standard", "torch_mha", "triton"}
    assert {r["mode"] for r in records} == {"fwd", "fwdbwd"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert sorted(p.name for p in result["pngs"]) == ["example_usage_speedup.png", "example_usage_time.png"]
        assert all(p.stat().st_size > 1000 for p in result["pngs"])


def test_main_prints_table_with_backend(example, tmp_path, capsys):
    assert example.main(["--seq-lens", "17", "--d-models", "32,48", "--heads", "2,5", "--batch-size", "1",
                         "--dtype", "fp32", "--no-backward", "--causal", "--cpu-repeats", "1", "--no-plots",
                         "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"triton provider backend: {BACKEND}" in out
    assert "skipped (d_model % heads != 0): [(32, 5), (48, 5)]" in out
    rows = [line for line in out.splitlines() if line.startswith("| 32 |") or line.startswith("| 48 |")]
    assert len(rows) == 2 and all("| fwd |" in row for row in rows)
    assert not list(tmp_path.glob("*.png"))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_wrong_output_fails_loudly(example, tmp_path, monkeypatch):
    class Broken(example.TritonMultiHeadAttention):
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return out + 1e-2, weights

    monkeypatch.setattr(example, "TritonMultiHeadAttention", Broken)
    with pytest.raises(example.CorrectnessError, match=r"triton out differs from the float64 reference"):
        example.run_benchmark_suite(**TINY, out_dir=tmp_path, verbose=False)


def test_wrong_gradient_fails_loudly(example, tmp_path, monkeypatch):
    """A provider whose forward is right but whose backward is wrong is caught before timing."""
    class Broken(example.TritonMultiHeadAttention):
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return _ScaleGrad.apply(out), weights

    monkeypatch.setattr(example, "TritonMultiHeadAttention", Broken)
    with pytest.raises(example.CorrectnessError, match=r"triton dx differs"):
        example.run_benchmark_suite(**TINY, out_dir=tmp_path, verbose=False)


def test_standard_attention_matches_torch(example):
    """The yardstick itself: StandardMultiHeadAttention == torch.nn.MultiheadAttention with its weights."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(24, 3, batch_first=True, dtype=torch.float64)
    std = example.StandardMultiHeadAttention(24, 3, dtype=torch.float64)
    std.load_state_dict(mha.state_dict())
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    mask = torch.ones(11, 11, dtype=torch.bool).triu(1)
    for causal in (False, True):
        ref = mha(x, x, x, need_weights=False, attn_mask=mask if causal else None, is_causal=causal)[0]
        torch.testing.assert_close(std(x, x, x, is_causal=causal)[0], ref)


def test_large_configs_are_checked_on_a_shortened_sequence(example):
    """The float64 oracle of a GPU-sized config (B=4, H=16, S=8192: 34 GB of scores) must not run in full."""
    x = torch.empty(4, 8192, 64, device="meta")
    cut = example.check_input(x, 16, 60e9)
    assert cut.shape[0] == 1 and 16 <= cut.shape[1] < 8192 and 16 * cut.shape[1] ** 2 * 8 * 6 <= 4e9
    small = torch.empty(2, 128, 64, device="meta")
    assert example.check_input(small, 2, 60e9) is small
