"""Validation messages, backend choice, custom op / torch.compile, autocast, per-call overhead."""

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import hf_triton_attn
from hf_triton_attn import flash_attention, ops

from .helpers import BACKEND, DEVICE, ON_GPU, make_qkv


def _base():
    q, k, v = make_qkv(2, 4, 2, 8, 10, 16, 16, torch.float32)
    return dict(q=q.detach(), k=k.detach(), v=v.detach())


def _varlen_base():
    t = lambda *s: torch.randn(*s, device=DEVICE)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    return dict(q=t(8, 2, 16), k=t(8, 2, 16), v=t(8, 2, 16), cu_seqlens_q=cu, cu_seqlens_k=cu,
                max_seqlen_q=5, max_seqlen_k=5)


BAD_INPUTS = [
    # (id, base, changes, exception, text the message must contain)
    ("q_not_tensor", _base, dict(q=[1.0]), TypeError, "`q` must be a torch.Tensor"),
    ("int_dtype", _base, dict(q=torch.zeros(2, 4, 8, 16, dtype=torch.int32)), TypeError, "float16, bfloat16 or float32"),
    ("fp64", _base, dict(k=torch.zeros(2, 2, 10, 16, dtype=torch.float64)), TypeError, "dtype torch.float64"),
    ("dtype_mismatch", _base, dict(k=torch.zeros(2, 2, 10, 16, dtype=torch.float16)), TypeError, "of q's dtype"),
    ("q_3d", _base, dict(q=torch.zeros(4, 8, 16)), ValueError, "4-D (batch, heads, seqlen, head_dim)"),
    ("batch_mismatch", _base, dict(k=torch.zeros(3, 2, 10, 16), v=torch.zeros(3, 2, 10, 16)), ValueError, "batch size 2"),
    ("seqlen_kv_mismatch", _base, dict(v=torch.zeros(2, 2, 9, 16)), ValueError, "k's sequence length 10"),
    ("heads_kv_mismatch", _base, dict(v=torch.zeros(2, 1, 10, 16)), ValueError, "k's number of heads 2"),
    ("head_dim_mismatch", _base, dict(k=torch.zeros(2, 2, 10, 8)), ValueError, "q's head dim 16"),
    ("gqa_not_divisible", _base, dict(k=torch.zeros(2, 3, 10, 16), v=torch.zeros(2, 3, 10, 16)), ValueError, "dividing q's 4"),
    ("head_dim_too_big", _base, dict(q=torch.zeros(2, 4, 8, 300), k=torch.zeros(2, 2, 10, 300), v=torch.zeros(2, 2, 10, 300)), ValueError, "head dim in 1..256"),
    ("head_dim_v_too_big", _base, dict(v=torch.zeros(2, 2, 10, 257)), ValueError, "`v` must be a head dim"),
    ("dropout_negative", _base, dict(dropout_p=-0.1), ValueError, "`dropout_p` must be a float in [0, 1)"),
    ("dropout_one", _base, dict(dropout_p=1.0), ValueError, "[0, 1)"),
    ("softcap_negative", _base, dict(softcap=-1.0), ValueError, "`softcap` must be a finite float >= 0"),
    ("scale_nan", _base, dict(softmax_scale=float("nan")), TypeError, "`softmax_scale`"),
    ("causal_not_bool", _base, dict(causal=1), TypeError, "`causal` must be a bool"),
    ("window_bad", _base, dict(window_size=(-2, 0)), ValueError, "`window_size`"),
    ("window_len", _base, dict(window_size=(1, 2, 3)), ValueError, "pair (left, right)"),
    ("mask_shape", _base, dict(attention_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "`attention_mask` must be of shape (2, 10)"),
    ("mask_4d", _base, dict(attention_mask=torch.ones(2, 1, 8, 10, dtype=torch.bool)), ValueError, "`attention_mask` must be of shape (2, 10)"),
    ("mask_float", _base, dict(attention_mask=torch.ones(2, 10)), TypeError, "bool or integer"),
    ("query_mask_shape", _base, dict(query_mask=torch.ones(2, 10, dtype=torch.bool)), ValueError, "`query_mask` must be of shape (2, 8)"),
    ("segments_sq_ne_sk", _base, dict(segment_ids=torch.zeros(2, 8, dtype=torch.int64)), ValueError, "`segment_ids` must be used with Sq == Sk (packed self-attention); got Sq 8, Sk 10"),
    ("segments_shape", _base, dict(segment_ids=torch.zeros(2, 10, dtype=torch.int64)), ValueError, "`segment_ids` must be of shape (2, 8)"),
    ("segments_float", _base, dict(segment_ids=torch.zeros(2, 8)), TypeError, "`segment_ids` must be an integer tensor"),
    ("seqused_dtype", _base, dict(seqused_k=torch.tensor([3, 4])), TypeError, "`seqused_k` must be an int32"),
    ("seqused_shape", _base, dict(seqused_k=torch.tensor([3], dtype=torch.int32)), ValueError, "of shape (2,)"),
    ("seqused_range", _base, dict(seqused_k=torch.tensor([3, 11], dtype=torch.int32)), ValueError, "values in [0, 10]"),
    ("alibi_shape", _base, dict(alibi_slopes=torch.ones(3)), ValueError, "`alibi_slopes` must be of shape (4,) or (2, 4)"),
    ("alibi_int", _base, dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "float tensor"),
    ("backend_name", _base, dict(backend="cuda"), ValueError, "`backend` must be None or one of"),
    ("varlen_missing", _varlen_base, dict(max_seqlen_k=None), ValueError, "`max_seqlen_k` must be given too"),
    ("varlen_4d", _varlen_base, dict(q=torch.zeros(1, 8, 2, 16)), ValueError, "3-D (total_tokens, heads, head_dim)"),
    ("cu_dtype", _varlen_base, dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "`cu_seqlens_q` must be an int32"),
    ("cu_shape", _varlen_base, dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "of cu_seqlens_q's shape (3,)"),
    ("cu_not_monotonic", _varlen_base, dict(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError, "non-decreasing prefix sums from 0 to 8"),
    ("cu_total", _varlen_base, dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "to 8 (the token count)"),
    ("max_seqlen_small", _varlen_base, dict(max_seqlen_q=4), ValueError, "`max_seqlen_q` must be >= the longest sequence (5)"),
    ("max_seqlen_tensor", _varlen_base, dict(max_seqlen_q=torch.tensor(5)), TypeError, "`max_seqlen_q` must be a Python int"),
    ("varlen_with_mask", _varlen_base, dict(attention_mask=torch.ones(2, 5)), ValueError, "`attention_mask` must be None in varlen mode"),
    ("varlen_with_segments", _varlen_base, dict(segment_ids=torch.zeros(8, dtype=torch.int64)), ValueError, "`segment_ids` must be None in varlen mode"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_message(case, monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_VALIDATE", "1")  # value checks of GPU tensors are opt-in (they sync)
    _, base, changes, exc, text = case
    kwargs = base()
    kwargs.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in changes.items()})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    kwargs.setdefault("backend", BACKEND)
    with pytest.raises(exc) as info:
        flash_attention(q, k, v, **kwargs)
    assert text in str(info.value), str(info.value)
    assert "got" in str(info.value)


@pytest.mark.skipif(ON_GPU, reason="device mismatch needs two devices; CPU run uses meta")
def test_device_mismatch():
    q, k, v = _base()["q"], _base()["k"], _base()["v"]
    with pytest.raises(ValueError, match="on the same device as q"):
        flash_attention(q, k.to("meta"), v, backend=BACKEND)


def test_backends_agree_and_reference_needs_no_triton():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, torch.float32)
    a = flash_attention(q, k, v, causal=True, backend=BACKEND)
    b = flash_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="CPU behaviour")
def test_auto_backend_on_cpu_warns_once_and_uses_reference(monkeypatch):
    monkeypatch.setattr(ops, "_warned_cpu_fallback", False)
    monkeypatch.delenv("HF_TRITON_ATTN_BACKEND", raising=False)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32)
    with pytest.warns(UserWarning, match="reference implementation"):
        flash_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attention(q, k, v)
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", "interpret")
    assert ops._choose_backend(None, q) == "interpret"
    assert ops._choose_backend("reference", q) == "reference"  # explicit argument wins
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="HF_TRITON_ATTN_BACKEND"):
        flash_attention(q, k, v)


@pytest.mark.skipif(ON_GPU, reason="CPU behaviour")
def test_explicit_triton_backend_on_cpu_never_falls_back():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        flash_attention(q, k, v, backend="triton")


@pytest.mark.skipif(ON_GPU, reason="CPU behaviour")
def test_interpret_backend_without_interpreter_says_how():
    code = ("import torch, hf_triton_attn as h; q=torch.randn(1,1,4,16);"
            "h.flash_attention(q,q,q,backend='interpret')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr


def test_lse_shapes():
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16, 16, torch.float32)
    out, lse = flash_attention(q, k, v, backend=BACKEND, return_lse=True)
    assert lse.shape == (2, 4, 9) and lse.dtype == torch.float32 and not lse.requires_grad
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    qv = torch.randn(9, 4, 16, device=DEVICE)
    _, lse = flash_attention(qv, qv[:, :2], qv[:, :2], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5,
                             max_seqlen_k=5, backend=BACKEND, return_lse=True)
    assert lse.shape == (4, 9)


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_backward_gets_no_zero_filled_lse_gradient(path):
    """The LSE output never gets a gradient (non-differentiable), so nothing may allocate and zero-fill
    one on each backward (autograd's default for an output without a gradient: it did, one allocation
    and one fill launch per call). Both autograd paths: the eager Function, and the custom op's
    registration that torch.compile runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like"):
                self.shapes.append(tuple(out.shape))
            return out

    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, 16, torch.float32)
    if path == "eager":
        out, lse = flash_attention(q, k, v, causal=True, backend=BACKEND, return_lse=True)
    else:
        out, lse = ops._flash_attn_fwd_op(q, k, v, None, None, None, None, None, None, None, None, 20, 20, 0.25,
                                          0.0, -1, 0, 0.0, False, not ON_GPU)
    mode = ZeroFills()
    with mode:
        out.sum().backward()
    assert tuple(lse.shape) not in mode.shapes, mode.shapes
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    """The custom op with its fake implementation traces with no graph break, forward and backward."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 2, 24, 24, 16, 16, torch.float32)
    mask = torch.ones(1, 24, dtype=torch.bool, device=DEVICE)
    mask[0, 20:] = False

    def f(q, k, v):
        return flash_attention(q * 1.0, k, v, causal=True, attention_mask=mask, backend=BACKEND).relu()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(q, k, v)
    ref = f(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="the interpreter only runs on CPU")
def test_interpreted_bf16_is_refused_not_wrong():
    """Regression: the Triton interpreter's bf16 tl.dot returned ~8e8 errors; now a clear error."""
    q, k, v = (t.detach().bfloat16() for t in make_qkv(1, 2, 2, 16, 16, 16, 16, torch.float32))
    with pytest.raises(ValueError, match="cannot run bfloat16"):
        flash_attention(q, k, v, backend="interpret")


def test_custom_op_passes_opcheck():
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 12, 12, 16, 16, torch.float32))
    args = (q, k, v, None, None, None, None, None, None, None, None, 12, 12, 0.25, 0.0, -1, 0, 0.0, False, not ON_GPU)
    torch.library.opcheck(ops._flash_attn_fwd_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_autocast_casts_inputs():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 16, 16, torch.float32)
    dtype = torch.float16 if ON_GPU else torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype):
        out = flash_attention(q, k, v, backend="reference" if not ON_GPU else BACKEND)
    assert out.dtype == dtype


def test_eager_overhead_is_small():
    """Host-side cost per call (validation + autograd.Function) on tiny inputs, reference-free.

    Measured against a no-op launch so only our Python shows; bounded generously for slow CI."""
    from hf_triton_attn.kernels import decode, forward

    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 16, 16, 16, 16, torch.float32))
    real, real_decode = forward.flash_fwd, decode.flash_decode
    forward.flash_fwd = decode.flash_decode = lambda *a, **kw: None  # Sq = 16 takes the decode kernel
    try:
        for _ in range(20):
            flash_attention(q, k, v, causal=True, backend=BACKEND)
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            flash_attention(q, k, v, causal=True, backend=BACKEND)
        per_call_us = (time.perf_counter() - t0) / n * 1e6
    finally:
        forward.flash_fwd, decode.flash_decode = real, real_decode
    print(f"eager per-call host overhead: {per_call_us:.1f} us")
    assert per_call_us < 500


def test_public_api_surface():
    assert set(hf_triton_attn.__all__) >= {"flash_attention", "attention_reference", "__version__"}
    assert flash_attention.__doc__ and "bottom-right" in flash_attention.__doc__
