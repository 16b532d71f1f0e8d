"""Test set-up. On CPU the real Triton kernels run through Triton's interpreter, which must be
switched on before triton is first imported; the GPU run (scripts/gpu_run.sh) sets
HF_TRITON_ATTN_TEST_DEVICE=cuda and runs the same tests compiled."""

import os

if os.environ.get("HF_TRITON_ATTN_TEST_DEVICE", "cpu") != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("HF_TRITON_ATTN_TEST_GPUS") and os.environ.get("PYTEST_XDIST_WORKER"):
    # Spread xdist workers over the host's GPUs (set before CUDA initialises in this process).
    worker = int(os.environ["PYTEST_XDIST_WORKER"].lstrip("gw") or 0)
    os.environ["CUDA_VISIBLE_DEVICES"] = str(worker % int(os.environ["HF_TRITON_ATTN_TEST_GPUS"]))

import pytest  # noqa: E402
import torch  # noqa: E402

ON_GPU = os.environ.get("HF_TRITON_ATTN_TEST_DEVICE", "cpu") == "cuda"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs HF_TRITON_ATTN_TEST_DEVICE=cuda and a GPU")
    for item in items:
        if "gpu" in item.keywords and not (ON_GPU and torch.cuda.is_available()):
            item.add_marker(skip_gpu)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the op allocates starts as NaN, so an element the kernels never write fails."""
    from hf_triton_attn import ops

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.dtype.is_floating_point else t
        return wrapper

    for name in ("_empty_out", "_empty_lse", "_empty_grad"):
        monkeypatch.setattr(ops, name, poisoned(getattr(ops, name)))
    from hf_triton_attn.kernels import backward

    real_sums = backward._dq_sums

    def poisoned_sums(q, zeroed):  # the delta kernel must zero what is not zeroed here
        t = real_sums(q, zeroed)
        return t if zeroed else t.fill_(float("nan"))
    monkeypatch.setattr(backward, "_dq_sums", poisoned_sums)
    yield
