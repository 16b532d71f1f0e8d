"""Edge cases of ``flash_attention`` and of patching (GitHub issue "Reliability", items 4-6).

CPU runs the real kernels interpreted (``TRITON_INTERPRET=1``, fp32/fp16); the GPU run
(``HF_TRITON_ATTN_TEST_DEVICE=cuda``) runs the same tests compiled plus the ``gpu``-marked ones
(devices, streams, CUDA graphs, threads, autocast). Shapes are small: every case here is about a
boundary, not about size. The special-value behaviour tested here is the one documented in
docs/bad-input.md ("Special values"). Three tests are regression tests of bugs this file found
(fixed 2026-11-26): NaN of a padded query row reaching the backward, the reference reading beyond
``seqused_k``, and interpreted calls from several threads.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_triton_attn import attention_reference, flash_attention, patch_model, patched, unpatch_model
from hf_triton_attn.testing import draw_dropout_rng, dropout_keep_mask

from .helpers import (
    BACKEND,
    DEVICE,
    ON_GPU,
    assert_pass_rule,
    check_against_oracle,
    cu_seqlens,
    make_qkv,
    spy_on,
    stored_output_allowance,
)

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
REPO = Path(__file__).resolve().parents[1]
# NaN/inf inputs make numpy (Triton's interpreter) warn about invalid values: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")


def fa(q, k, v, **kw):
    return flash_attention(q, k, v, backend=BACKEND, **kw)


def _nan_rows(out: torch.Tensor) -> torch.Tensor:
    """Bool (..., S): rows of a (..., S, D) tensor holding a NaN."""
    return torch.isnan(out).any(dim=-1)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(q, k, v, dout=None, **kw):
    """(out, dq, dk, dv) of the kernel on fresh leaves."""
    q, k, v = _leaves(q, k, v)
    out = fa(q, k, v, **kw)
    dout = torch.ones_like(out) if dout is None else dout
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


# ==============================================================================================
# 1. sizes at the boundary: S = 1, empty batch, no keys, no queries
# ==============================================================================================

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_query_one_key(causal, dtype):
    """Sq = Sk = 1: p = 1 exactly, so out is v itself (GQA: each query head its KV head's v)."""
    q, k, v = make_qkv(2, 4, 2, 1, 1, 16, 24, dtype)
    out = check_against_oracle(q, k, v, causal=causal)
    assert torch.equal(out, v.detach().repeat_interleave(2, dim=1))


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 7), (1, 2, 2, 0, 7), (1, 2, 2, 5, 0), (2, 4, 2, 0, 0)],
                         ids=["batch0", "sq0", "sk0", "sq0_sk0_gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_dims_forward_and_backward_match_sdpa(shape, causal):
    """B = 0, Sq = 0, Sk = 0: what torch's SDPA gives (an empty output, or zeros when there is no key),
    forward and backward, LSE -inf, gradients of the inputs' shapes (zeros)."""
    b, hq, hkv, sq, sk = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, 16, 16, torch.float32)
    out, lse = fa(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (b, hq, sq, 16) and lse.shape == (b, hq, sq)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    sdpa_in = _leaves(*(t.cpu() for t in (q, k, v)))  # torch's SDPA on the CPU as the yardstick
    sdpa = F.scaled_dot_product_attention(sdpa_in[0], *(t.repeat_interleave(hq // hkv, 1) for t in sdpa_in[1:]))
    sdpa_grads = torch.autograd.grad(sdpa, sdpa_in, dout.cpu())
    assert torch.equal(out.cpu(), sdpa)
    for g, s, t in zip(grads, sdpa_grads, (q, k, v)):
        assert g.shape == t.shape and torch.equal(g.cpu(), s) and (g == 0).all()


def test_varlen_with_no_tokens_and_empty_sequences():
    """Packed batches with zero tokens in total, and sequences with no query or no key."""
    for lens_q, lens_k in (([0, 0], [0, 0]), ([0, 3, 2], [4, 0, 2])):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(sum(lens_q), 2, 16, generator=g).to(DEVICE).requires_grad_()
        k = torch.randn(sum(lens_k), 2, 16, generator=g).to(DEVICE).requires_grad_()
        v = torch.randn(sum(lens_k), 2, 16, generator=g).to(DEVICE).requires_grad_()
        kw = dict(cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=max(lens_q),
                  max_seqlen_k=max(lens_k))
        out, lse = fa(q, k, v, return_lse=True, **kw)
        ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), **kw)
        assert out.shape == (sum(lens_q), 2, 16) and lse.shape == (2, sum(lens_q))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is not None and g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, (q, k, v)))
    # the second batch: sequence 1 has no key -> its rows are 0 with LSE -inf
    assert (out[0:3] == 0).all() and torch.isneginf(lse[:, 0:3]).all()


# ==============================================================================================
# 2. masks at the boundary: every key masked, a single real key
# ==============================================================================================

@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("how,sq", [("attention_mask", 20), ("attention_mask", 4), ("seqused_k", 20),
                                    ("seqused_k", 4), ("window", 20), ("query_mask", 20)])
def test_everything_masked_gives_exact_zeros_forward_and_backward(how, sq):
    """No query sees any key: output 0, LSE -inf, and dq, dk, dv exactly 0 (not merely finite).
    Sq = 4 takes the decode kernel (few queries), Sq = 20 the main forward kernel."""
    q, k, v = make_qkv(2, 4, 2, sq, 40, 16, 16, torch.float32)
    kw = {
        "attention_mask": dict(attention_mask=torch.zeros(2, 40, dtype=torch.int32, device=DEVICE)),
        "seqused_k": dict(seqused_k=torch.zeros(2, dtype=torch.int32, device=DEVICE)),
        "window": dict(causal=True, window_size=(0, 0), attention_mask=torch.arange(40, device=DEVICE)
                       .lt(8).expand(2, 40)),  # row i sees only key i + 20, and keys 8..39 are masked
        "query_mask": dict(query_mask=torch.zeros(2, sq, dtype=torch.bool, device=DEVICE)),
    }[how]
    out, lse = fa(q, k, v, return_lse=True, **kw)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, g in zip("qkv", grads):
        assert (g == 0).all(), f"d{name} is not exactly 0"


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_real_key(dtype):
    """One real key per batch row (a different one in each): every output row is exactly that key's v,
    and gradients match the oracle (dk of the masked keys and dv of the masked keys exactly 0)."""
    q, k, v = make_qkv(2, 2, 1, 9, 40, 16, 16, dtype)
    mask = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 0] = True
    mask[1, 33] = True
    out = check_against_oracle(q, k, v, attention_mask=mask)
    expect = torch.stack([v.detach()[0, :, 0], v.detach()[1, :, 33]])  # (B, Hkv, Dv)
    assert torch.equal(out, expect.repeat_interleave(2, dim=1)[:, :, None].expand_as(out))
    _, _, dk, dv = _grads(q, k, v, attention_mask=mask)
    assert (dk[~mask[:, None, :, None].expand_as(dk)] == 0).all()
    assert (dv[~mask[:, None, :, None].expand_as(dv)] == 0).all()


# ==============================================================================================
# 3. numerics: fp16 scores beyond the fp16 range
# ==============================================================================================

@pytest.mark.parametrize("scale", [1e-5, None], ids=["spread", "saturated"])
def test_fp16_scores_beyond_fp16_range_match_fp64(scale):
    """q.k up to ~6.6e5 (fp16's max is 65504) before scaling. The kernel accumulates q.k in fp32, so
    the output and gradients match the float64 oracle with no inf/NaN, while attention computed in
    fp16 (the same-dtype eager reference) overflows. scale=None: D**-0.5, one-hot softmax rows."""
    g = torch.Generator().manual_seed(0)
    mk = lambda s: (torch.randn(1, 2, 33, 64, generator=g) * s).half().to(DEVICE)
    q, k, v = mk(150.0), mk(150.0), mk(1.0)
    assert float((q.double() @ k.double().transpose(-1, -2)).abs().max()) > 4 * 65504
    same_dtype = attention_reference(q, k, v, softmax_scale=scale)
    assert not torch.isfinite(same_dtype).all(), "the premise: fp16 scores overflow"
    out, dq, dk, dv = _grads(q, k, v, softmax_scale=scale)
    ora_in = _leaves(q.double(), k.double(), v.double())
    ora = attention_reference(*ora_in, softmax_scale=scale)
    ora_grads = torch.autograd.grad(ora, ora_in, torch.ones_like(ora))
    # One-hot rows have exact gradients of 0; what reading the stored (fp16) output and the fp32
    # rounding of dP and delta leave in dq / dk is bounded elementwise from the data
    # (helpers.stored_output_allowance; for this data at most 0.18 on dq and 0.98 on dk, whose |k|, |q|
    # reach ~600).
    allowance = stored_output_allowance(q, k, v, dict(softmax_scale=scale), out, ora, torch.ones_like(out),
                                        dot_rounding=True)
    for name, a, o in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ora, *ora_grads)):
        assert torch.isfinite(a).all(), name
        tol = 1e-2 * float(o.detach().abs().max()) + 1e-6  # fp16 rounding of the inputs' scale
        err = (a.detach().double() - o.detach()).abs() - allowance.get(name, 0.0)
        assert float(err.max()) <= tol, name


_BIG_SCORE_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", _BIG_SCORE_DTYPES, ids=str)
@pytest.mark.parametrize("log2_score", [20, 27, 30, 34], ids=lambda e: f"2^{e}")
def test_huge_scores_are_correct_or_non_finite(log2_score, dtype, causal):
    """Base-2 scores |q.k * scale * log2(e)| near 2**log2_score. The forward's exp2(fma(qk, scale2, -m))
    leaves the row max an exponent of up to ulp(m) / 2 (m is rounded, the FMA's product is not): the
    documented range (docs/bad-input.md, "Large finite values") is exact output below 2**28 (fp16,
    whose P V operand overflows past p = 65504) and 2**31 (bf16, fp32). Inside it every row must match
    the float64 oracle; beyond it a row may be inf / NaN but never finite and wrong (until 2026-11-26
    a row whose weights underflowed was written as a silent 0). The CPU interpreter rounds the product
    first and is exact at any size; the GPU shows the limits (H100: fp16 at 2**30, fp32 and bf16 at
    2**34 had finite wrong rows before the fix)."""
    if dtype == torch.float16 and log2_score > 30:
        pytest.skip("fp16 inputs cannot reach this score with D = 32")
    g = torch.Generator().manual_seed(log2_score)
    d, scale2 = 32, 32**-0.5 * 1.4426950408889634
    # randn rows: |q.k| reaches about 4 sqrt(d) mag**2 over 45 x 53 pairs
    mag = (2.0**log2_score / scale2 / (4 * d**0.5)) ** 0.5
    q, k, v = (torch.randn(2, 2, s, d, generator=g) * m for s, m in ((45, mag), (53, mag), (53, 1.0)))
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    top = float((q.double() @ k.double().transpose(-1, -2)).abs().max()) * scale2
    assert 2.0 ** (log2_score - 2) < top < 2.0 ** (log2_score + 2), f"premise: top score {top:.3g}"
    out, lse = fa(q, k, v, causal=causal, return_lse=True)
    ora, ora_lse = attention_reference(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
    finite = torch.isfinite(out).all(dim=-1)
    err = (out.double() - ora).abs().amax(dim=-1)
    tol = 1e-2 * float(ora.abs().max())  # the inputs' rounding to dtype moves one-hot picks no further
    worst = float(err[finite].max()) if finite.any() else 0.0
    assert worst <= tol, f"a finite row differs from the oracle by {worst:.3g}"
    # The LSE is fp32 whatever the dtype: it can stay finite (and right) where the output overflowed
    lse_finite = torch.isfinite(lse)
    lse_err = (lse.double() - ora_lse).abs()[lse_finite]
    worst = float(lse_err.max()) if lse_finite.any() else 0.0
    assert worst <= 1e-5 * float(ora_lse.abs().max()), f"a finite LSE differs from the oracle by {worst:.3g}"
    in_range = log2_score < (28 if dtype == torch.float16 else 31)
    if in_range:
        assert finite.all(), f"{int((~finite).sum())} non-finite rows inside the documented range"
        assert lse_finite.all(), "non-finite LSE inside the documented range"


# ==============================================================================================
# 4. special values (docs/bad-input.md, "Special values")
# ==============================================================================================

def _sv_inputs(sq=40, sk=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, s, 16, generator=g).to(DEVICE) for s in (sq, sk, sk)]


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_at_a_visible_position_propagates(where, causal):
    """A NaN in q row i, or in the k/v row of a key j that row i sees, makes row i NaN: never hidden.
    Rows that do not see it: a NaN in q or k never reaches them (bitwise the clean output)."""
    q, k, v = _sv_inputs()
    clean = fa(q, k, v, causal=causal)
    j = 30
    bad = {"q": q, "k": k, "v": v}[where].clone()
    bad[0, 0, j] = NAN
    args = dict(q=q, k=k, v=v)
    args[where] = bad
    out = fa(args["q"], args["k"], args["v"], causal=causal)
    rows = _nan_rows(out[0, 0])
    sees_j = torch.ones(40, dtype=torch.bool, device=DEVICE)
    if where == "q":
        sees_j = torch.arange(40, device=DEVICE) == j
    elif causal:
        sees_j = torch.arange(40, device=DEVICE) >= j
    assert rows[sees_j].all(), "a NaN at a visible position was hidden"
    assert torch.equal(out[0, 1], clean[0, 1]), "another head changed"
    if where in ("q", "k"):
        assert torch.equal(out[0, 0][~sees_j], clean[0, 0][~sees_j])


def test_infinities():
    """+inf in v: the affected output column is +inf, the others are untouched. +inf in q with keys of
    both signs: scores +-inf, the row is NaN. -inf in one key's k: rows whose score with it is -inf
    give it weight 0 (bitwise as if it were masked), rows whose score is +inf (or NaN) are NaN. A row
    whose every visible score is -inf counts as a row with no visible key (output 0, LSE -inf, as the
    reference). softcap caps infinite scores to +-softcap: finite, as the reference."""
    q, k, v = _sv_inputs()
    clean = fa(q, k, v)
    v_inf = v.clone()
    v_inf[0, 0, 10, 3] = INF
    out = fa(q, k, v_inf)
    assert torch.isposinf(out[0, 0, :, 3]).all()
    others = [c for c in range(16) if c != 3]
    assert torch.equal(out[..., others], clean[..., others]) and torch.equal(out[0, 1], clean[0, 1])
    q_inf = q.clone()
    q_inf[0, 0, 5, 0] = INF
    out = fa(q_inf, k, v)
    assert torch.equal(_nan_rows(out[0, 0]), torch.arange(40, device=DEVICE) == 5)
    k_inf = k.clone()
    k_inf[0, 0, 7, 0] = -INF
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 7] = False
    out, masked = fa(q, k_inf, v), fa(q, k, v, attention_mask=mask)
    ignores = q[0, 0, :, 0] > 0  # these rows score -inf against key 7
    assert torch.equal(out[0, 0, ignores], masked[0, 0, ignores]) and _nan_rows(out[0, 0, ~ignores]).all()
    k_pos = k.abs() + 0.1
    q_neg = q.clone()
    q_neg[0, 0, 5, 0] = -INF  # every score of row 5 is -inf
    out, lse = fa(q_neg, k_pos, v, return_lse=True)
    ref, ref_lse = attention_reference(q_neg, k_pos, v, return_lse=True)
    assert (out[0, 0, 5] == 0).all() and torch.isneginf(lse[0, 0, 5]) and (ref[0, 0, 5] == 0).all()
    capped = fa(q_inf, k, v, softcap=5.0)
    assert torch.isfinite(capped).all()
    torch.testing.assert_close(capped, attention_reference(q_inf, k, v, softcap=5.0), atol=1e-5, rtol=1e-5)


def _masked_key_kwargs(kind: str, j: int) -> dict:
    """Arguments that hide key j from every query row (40 x 40)."""
    if kind == "attention_mask":
        mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
        mask[0, j] = False
        return dict(attention_mask=mask)
    if kind == "window":
        return dict(window_size=(2, 2))  # row i sees keys i-2..i+2
    if kind == "segment_ids":
        ids = torch.zeros(1, 40, dtype=torch.int64, device=DEVICE)
        ids[0, j] = 1  # key j is a sequence of its own; only row j sees it
        return dict(segment_ids=ids)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["attention_mask", "causal", "window", "segment_ids"])
def test_nan_in_the_k_of_a_masked_key_never_reaches_the_output(kind):
    """A masked key's score is replaced by -inf before the exponential: NaN or inf in its k changes
    nothing in the output (bitwise), nor in dk or dv. dq is NaN: dq = dS k with dS = 0 there, and
    0 * NaN = NaN, exactly as autograd of PyTorch's eager attention (the reference) gives."""
    q, k, v = _sv_inputs()
    j = 30
    kw = dict(causal=True) if kind == "causal" else _masked_key_kwargs(kind, j)
    rows = torch.arange(40, device=DEVICE)
    blind = {"attention_mask": rows >= 0, "causal": rows < j, "window": (rows - j).abs() > 2,
             "segment_ids": rows != j}[kind]  # the rows that must not see key j
    k_zero, k_nan = k.clone(), k.clone()
    k_zero[0, :, j] = 0.0
    k_nan[0, :, j] = NAN
    k_nan[0, :, j, 0] = INF
    out_zero, dq0, dk0, dv0 = _grads(q, k_zero, v, **kw)
    out_nan, dq, dk, dv = _grads(q, k_nan, v, **kw)
    assert torch.equal(out_nan[:, :, blind], out_zero[:, :, blind])
    if kind == "attention_mask":
        assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert torch.equal(dk, dk0) and torch.equal(dv, dv0)
        assert torch.isnan(dq).any(), "documented: dq picks up 0 * NaN (as the eager reference)"
        ref_in = _leaves(q, k_nan, v)
        ref_dq = torch.autograd.grad(attention_reference(*ref_in, **kw), ref_in, torch.ones_like(out_nan))[0]
        assert torch.equal(_nan_rows(dq), _nan_rows(ref_dq))


@pytest.mark.parametrize("sq", [3, 20], ids=["decode", "forward"])
def test_nan_in_the_v_of_a_masked_key_is_not_sanitised(sq):
    """Masking decides which scores count, not which memory is read: a masked key's v is multiplied by
    p = 0 inside its tile, and 0 * NaN = NaN. With all keys in one tile, every row is NaN, as in the
    reference (and torch's eager attention). Zero padded positions yourself if they can hold NaN."""
    q, k, v = _sv_inputs(sq=sq, sk=12)
    mask = torch.ones(1, 12, dtype=torch.bool, device=DEVICE)
    mask[0, 7] = False
    v_nan = v.clone()
    v_nan[0, :, 7] = NAN
    out = fa(q, k, v_nan, attention_mask=mask)
    assert _nan_rows(out).all()
    assert _nan_rows(attention_reference(q, k, v_nan, attention_mask=mask)).all()
    v_zero = v.clone()
    v_zero[0, :, 7] = 0.0
    assert torch.isfinite(fa(q, k, v_zero, attention_mask=mask)).all()


@pytest.mark.parametrize("sq", [5, 40], ids=["decode", "forward"])
def test_keys_beyond_seqused_k_and_other_sequences_are_never_read(sq):
    """seqused_k: the unused tail of a KV cache is never loaded, so NaN there (an uninitialised cache)
    reaches neither the output nor any gradient. Varlen: a sequence never reads another's tokens."""
    q, k, v = _sv_inputs(sq=sq, sk=70)
    used = torch.tensor([41], dtype=torch.int32, device=DEVICE)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[0, :, 41:] = NAN
    v_nan[0, :, 41:] = INF
    dout = torch.randn(1, 2, sq, 16, device=DEVICE)
    clean = _grads(q, k, v, dout, causal=True, seqused_k=used)
    dirty = _grads(q, k_nan, v_nan, dout, causal=True, seqused_k=used)
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, b), name
    assert (dirty[2][:, :, 41:] == 0).all() and (dirty[3][:, :, 41:] == 0).all()

    g = torch.Generator().manual_seed(1)
    qv, kv, vv = (torch.randn(50, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEVICE)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=30, max_seqlen_k=30, causal=True)
    clean = fa(qv, kv, vv, **kw)
    kv2, vv2 = kv.clone(), vv.clone()
    kv2[:20] = NAN
    vv2[:20] = NAN
    out = fa(qv, kv2, vv2, **kw)
    assert torch.equal(out[20:], clean[20:]) and _nan_rows(out[:20]).all()


def test_a_padded_query_row_ignores_its_q():
    """query_mask = 0: the row is written as 0 (LSE -inf) whatever q holds, NaN included; other rows
    are bitwise unchanged."""
    q, k, v = _sv_inputs()
    qmask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    qmask[0, 12] = False
    clean = fa(q, k, v, query_mask=qmask)
    q_nan = q.clone()
    q_nan[0, :, 12] = NAN
    out, lse = fa(q_nan, k, v, query_mask=qmask, return_lse=True)
    assert (out[:, :, 12] == 0).all() and torch.isneginf(lse[:, :, 12]).all()
    assert torch.equal(out, clean)


def test_special_values_in_the_decode_path():
    """The same rules where few queries (Sq <= 16, a KV-cache step) take the split-KV decode kernel:
    NaN in q stays in its row, NaN in a visible key's k reaches every row, NaN in the k of a masked key
    changes nothing (bitwise), every score -inf gives a zero row."""
    q, k, v = _sv_inputs(sq=3, sk=50)
    mask = torch.ones(1, 50, dtype=torch.bool, device=DEVICE)
    mask[0, 17] = False
    clean = fa(q, k, v, causal=True, attention_mask=mask)
    q_nan = q.clone()
    q_nan[0, 0, 1] = NAN
    out = fa(q_nan, k, v, causal=True, attention_mask=mask)
    expected = torch.zeros(1, 2, 3, dtype=torch.bool, device=DEVICE)
    expected[0, 0, 1] = True
    assert torch.equal(_nan_rows(out), expected)
    assert torch.equal(out[0, 1], clean[0, 1]) and torch.equal(out[0, 0, ::2], clean[0, 0, ::2])
    k_vis, k_masked = k.clone(), k.clone()
    k_vis[0, :, 3] = NAN
    k_masked[0, :, 17] = NAN
    assert _nan_rows(fa(q, k_vis, v, causal=True, attention_mask=mask)).all()
    assert torch.equal(fa(q, k_masked, v, causal=True, attention_mask=mask), clean)
    q_neg = q.clone()
    q_neg[0, 0, 2, 0] = -INF
    out, lse = fa(q_neg, k.abs() + 0.1, v, return_lse=True)
    assert (out[0, 0, 2] == 0).all() and torch.isneginf(lse[0, 0, 2]) and torch.isfinite(out[0, 0, :2]).all()


def test_a_padded_query_row_nan_stays_out_of_the_gradients():
    """Regression target: a padded query row does not influence the output, so NaN in its q must not
    reach dv (any key) or its own dq (which is exactly 0). dk is NaN in the reference too (0 * NaN in
    dS^T q) and is not asserted."""
    q, k, v = _sv_inputs()
    qmask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    qmask[0, 12] = False
    q_nan = q.clone()
    q_nan[0, :, 12] = NAN
    _, dq, _, dv = _grads(q_nan, k, v, query_mask=qmask)
    ref_in = _leaves(q_nan, k, v)
    ref = attention_reference(*ref_in, query_mask=qmask)
    ref_dq, _, ref_dv = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    assert torch.isfinite(ref_dv).all() and (ref_dq[:, :, 12] == 0).all()  # what the oracle says
    assert torch.isfinite(dv).all(), "NaN of a padded query row reached dv"
    assert (dq[:, :, 12] == 0).all() and torch.isfinite(dq).all()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_runs_and_holes_over_many_blocks(causal):
    """Padding masks spanning many blocks, as key and query masks at once: right padding, left
    padding, and a run with a hole (the dq kernel zeroes padded query rows once, at the end). NaN in
    the q of every padded row changes neither the output nor dv (bitwise) nor dq (up to the order
    of the fused backward's fp32 dq sums on the GPU), and the clean run matches the oracle."""
    b, h, s, d = 3, 2, 300, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(DEVICE) for _ in range(3))
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, :230] = True  # right padding
    mask[1, 70:] = True  # left padding
    mask[2, 40:260] = True
    mask[2, 150] = False  # a hole
    mask = mask.to(DEVICE)
    q = torch.where(mask[:, None, :, None], q, 0.0)
    kw = dict(attention_mask=mask, query_mask=mask, causal=causal)
    check_against_oracle(*_leaves(q, k, v), **kw)
    dout = torch.randn(b, h, s, d, generator=g).to(DEVICE)
    out, dq, _, dv = _grads(q, k, v, dout, **kw)
    q_nan = torch.where(mask[:, None, :, None], q, NAN)
    out_nan, dq_nan, _, dv_nan = _grads(q_nan, k, v, dout, **kw)
    assert torch.equal(out_nan, out) and torch.equal(dv_nan, dv)
    torch.testing.assert_close(dq_nan, dq, rtol=1e-5, atol=1e-6)
    padded = ~mask[:, None, :].expand(b, h, s)
    assert (dq_nan[padded] == 0).all() and (out_nan[padded] == 0).all()


def test_reference_ignores_the_tail_beyond_seqused_k():
    q, k, v = _sv_inputs(sq=5, sk=70)
    used = torch.tensor([41], dtype=torch.int32, device=DEVICE)
    v_nan = v.clone()
    v_nan[0, :, 41:] = NAN
    out = attention_reference(q, k, v_nan, causal=True, seqused_k=used)
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True, seqused_k=used))


# ==============================================================================================
# 5. layouts: non-contiguous and stride-0 inputs
# ==============================================================================================

def _strided(layout: str, b, h, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "head_dim_stride_2":  # every other element of the last dim
        return torch.randn(b, h, s, 2 * d, generator=g).to(DEVICE)[..., ::2]
    if layout == "seq_stride_2":  # every other token
        return torch.randn(b, h, 2 * s, d, generator=g).to(DEVICE)[:, :, ::2]
    if layout == "bshd_batch_slice":  # a transposed BSHD view of every other batch row
        return torch.randn(2 * b, s, h, d, generator=g).to(DEVICE)[::2].transpose(1, 2)
    if layout == "shbd_permuted":  # (S, H, B, D) memory seen as (B, H, S, D)
        return torch.randn(s, h, b, d, generator=g).to(DEVICE).permute(2, 1, 0, 3)
    raise ValueError(layout)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("layout", ["head_dim_stride_2", "seq_stride_2", "bshd_batch_slice", "shbd_permuted"])
def test_non_contiguous_inputs(layout):
    q, k, v = (_strided(layout, 2, h, s, 16, seed).requires_grad_()
               for h, s, seed in ((4, 21, 0), (2, 34, 1), (2, 34, 2)))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_oracle(q, k, v, causal=True)


@pytest.mark.usefixtures("poison")
def test_stride_zero_inputs_expanded_over_heads_and_batch():
    """k/v of one head and one batch row expanded (stride 0) to (B, Hkv, Sk, D), q expanded over the
    batch: read in place; the gradient reaches the un-expanded leaves summed over the copies."""
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(1, 4, 23, 16, generator=g).to(DEVICE).requires_grad_()
    k0 = torch.randn(1, 1, 29, 16, generator=g).to(DEVICE).requires_grad_()
    v0 = torch.randn(1, 1, 29, 16, generator=g).to(DEVICE).requires_grad_()
    q, k, v = q0.expand(3, 4, 23, 16), k0.expand(3, 2, 29, 16), v0.expand(3, 2, 29, 16)
    assert q.stride(0) == 0 and k.stride(1) == 0 and k.stride(0) == 0
    out = fa(q, k, v, causal=True)
    ref_leaves = _leaves(q0.double(), k0.double(), v0.double())
    ref = attention_reference(ref_leaves[0].expand(3, 4, 23, 16), ref_leaves[1].expand(3, 2, 29, 16),
                              ref_leaves[2].expand(3, 2, 29, 16), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    for a, o in zip(torch.autograd.grad(out, (q0, k0, v0), dout),
                    torch.autograd.grad(ref, ref_leaves, dout.double())):
        torch.testing.assert_close(a.double(), o, atol=1e-4, rtol=1e-4)


# ==============================================================================================
# 6. determinism, dropout statistics
# ==============================================================================================

def test_deterministic_backward_with_dropout_mask_and_gqa_is_bitwise():
    """deterministic=True (dq then has its own kernel, no atomics): two runs under the same seed
    give bitwise-identical outputs and gradients, with dropout, padding and GQA together."""
    q, k, v = make_qkv(1, 2, 1, 33, 40, 16, 16, torch.float32)
    mask = torch.rand(1, 40, generator=torch.Generator().manual_seed(4)).gt(0.3).to(DEVICE)
    dout = torch.randn(1, 2, 33, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        out = fa(q, k, v, causal=True, attention_mask=mask, dropout_p=0.2, deterministic=True)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _mask_probe(b, h, sq, sk, dtype=torch.float32):
    """q = k = 0 (16 dims) and v = I (Dv = Sk): p is uniform (1/Sk), so out[i, j] = keep[i, j] / (Sk (1 - p))."""
    q = torch.zeros(b, h, sq, 16, device=DEVICE, dtype=dtype)
    k = torch.zeros(b, h, sk, 16, device=DEVICE, dtype=dtype)
    return q, k, torch.eye(sk, device=DEVICE, dtype=dtype).expand(b, h, sk, sk)


def _keep_read_from(out, sk, p, tol):
    """The bool keep-mask behind a ``_mask_probe`` output: every entry within ``tol`` of 0 or 1 once scaled."""
    scaled = out.float() * (sk * (1 - p))
    keep = scaled.round()
    assert ((scaled - keep).abs() < tol).all() and ((keep == 0) | (keep == 1)).all()
    return keep.bool()


def test_dropout_keep_rate_read_from_the_kernel_output():
    """Read the kernel's own keep mask out of its output: q = k = 0 makes p uniform (1/Sk) and v = I
    makes out[i, j] = keep[i, j] / (Sk (1 - p)). The keep rate is within 6 sigma of 1 - p (binomial),
    the mask is the one ``dropout_keep_mask`` reproduces, rows/heads/batches differ, and a second call
    without reseeding draws a new mask."""
    b, h, sq, sk, p = 2, 2, 64, 64, 0.3
    q, k, v = _mask_probe(b, h, sq, sk)
    torch.manual_seed(123)
    out = fa(q, k, v, dropout_p=p)
    out2 = fa(q, k, v, dropout_p=p)
    keep = _keep_read_from(out, sk, p, 1e-4)
    torch.manual_seed(123)
    assert torch.equal(keep, dropout_keep_mask(draw_dropout_rng(DEVICE), b, h, sq, sk, p))
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 6 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {6 * sigma:.4f}"
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(out, out2), "a second call reused the first call's mask"


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.97, 0.9999])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_dropout_mask_read_from_16bit_kernel_output(dtype, p):
    """Compiled for the GPU, the forward zeroes the dropped entries of a 16-bit P in key pairs with inline
    PTX (an fp16x2 compare of the two 14-bit draws, ``kernels/common.py::dropout_zero``), where fp32 and
    the interpreter select with the boolean mask that ``dropout_keep_mask`` also takes. Read the 16-bit
    kernel's mask out of its output as above (odd Sq, Sk and Dv = Sk) at thresholds from 2 to 16382 of
    2**14: it is the helper's, bit for bit."""
    b, h, sq, sk = 4, 4, 37, 130  # 77k scores: ~9 of them differ from the rest at either end of p
    q, k, v = _mask_probe(b, h, sq, sk, dtype)
    torch.manual_seed(5)
    keep = _keep_read_from(fa(q, k, v, dropout_p=p), sk, p, 2e-2)
    torch.manual_seed(5)
    expected = dropout_keep_mask(draw_dropout_rng(DEVICE), b, h, sq, sk, p)
    assert torch.equal(keep, expected), f"{(keep != expected).sum().item()} of {keep.numel()} differ"
    assert 0 < expected.sum() < expected.numel()


# ==============================================================================================
# 7. autocast
# ==============================================================================================

def _autocast_case(dtype):
    q, k, v = make_qkv(2, 4, 2, 33, 40, 32, 32, torch.float32)
    with torch.autocast(DEVICE, dtype=dtype):
        out = fa(q, k, v, causal=True)
        sdpa_in = _leaves(q, k, v)
        sdpa = F.scaled_dot_product_attention(sdpa_in[0], *(t.repeat_interleave(2, 1) for t in sdpa_in[1:]),
                                              is_causal=True)
    assert out.dtype == sdpa.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert all(g.dtype == torch.float32 for g in grads), "gradients of fp32 leaves are fp32"
    # oracle: float64 on the inputs as autocast rounded them
    ref_in = _leaves(*(t.to(dtype) for t in (q, k, v)))
    ref = attention_reference(*ref_in, causal=True)
    ora_in = _leaves(*(t.to(dtype).double() for t in (q, k, v)))
    ora = attention_reference(*ora_in, causal=True)
    assert_pass_rule("out", out, ref, ora, dtype)
    for name, a, r, o in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout),
                             torch.autograd.grad(ora, ora_in, dout.double())):
        assert_pass_rule(name, a, r, o, dtype)


@pytest.mark.skipif(ON_GPU, reason="CPU autocast (the GPU run tests CUDA autocast)")
def test_cpu_autocast_float16():
    """torch.autocast("cpu", float16) with fp32 inputs: the interpreted kernel computes in fp16 and
    returns fp16, as SDPA does under the same autocast; fp32 leaves get fp32 gradients."""
    _autocast_case(torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_autocast(dtype):
    _autocast_case(dtype)


@pytest.mark.gpu
def test_cuda_autocast_with_mixed_input_dtypes():
    """Under autocast q, k, v may differ in dtype: all are cast to the autocast dtype."""
    q, k, v = make_qkv(1, 2, 2, 17, 17, 32, 32, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fa(q, k.detach().half(), v.detach().bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16
    ref = attention_reference(*(t.detach().bfloat16().double() for t in (q, k, v)), causal=True)
    assert (out.double() - ref).abs().max() < 3e-2


# ==============================================================================================
# 8. threads
# ==============================================================================================

_THREAD_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules["transformers"] = None  # not needed here: skip its import (seconds)
    import warnings
    warnings.simplefilter("ignore")
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from hf_triton_attn import attention_reference, flash_attention
    cases = []
    for i in range(8):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(1, 2, 20 + 9 * i, 16, generator=g) for _ in range(3))
        cases.append((q, k, v, attention_reference(q, k, v, causal=True)))
    def job(i):
        q, k, v, ref = cases[i]
        return float((flash_attention(q, k, v, causal=True, backend="interpret") - ref).abs().max())
    sys.setswitchinterval(1e-6)
    for _ in range(3):
        try:
            with ThreadPoolExecutor(4) as pool:
                errors = list(pool.map(job, range(8)))
        except Exception as e:
            print("raised", type(e).__name__, str(e)[:300])
            sys.exit(1)
        if max(errors) > 1e-4:
            print("wrong results", errors)
            sys.exit(1)
    print("ok")
""")


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs on CPU only")
def test_interpreted_calls_from_several_threads():
    """Runs in a subprocess: a failed race leaves triton.language patched for the rest of the process."""
    env = {k: v for k, v in os.environ.items() if k != "HF_TRITON_ATTN_BACKEND"}
    res = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]


@pytest.mark.gpu
def test_cuda_calls_from_several_threads():
    """Forward and backward from 4 Python threads at once (after one warm-up call compiled the kernels)
    equal the same calls made one after another."""
    inputs = [make_qkv(2, 4, 2, 64 + 17 * i, 64 + 17 * i, 64, 64, torch.float16, seed=i) for i in range(8)]
    run = lambda i: _grads(*inputs[i], causal=bool(i % 2))
    run(0)
    torch.cuda.synchronize()
    expected = [run(i) for i in range(8)]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(ids):
        try:
            for i in ids:
                results[i] = run(i)
            torch.cuda.current_stream().synchronize()
        except BaseException as e:  # noqa: BLE001 (re-raised on the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(t, 8, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.cuda.synchronize()
    for i in range(8):
        for a, b in zip(results[i], expected[i]):
            assert torch.equal(a, b), i


# ==============================================================================================
# 9. CUDA: devices, streams, graphs
# ==============================================================================================

@pytest.mark.gpu
def test_inputs_on_different_devices_are_rejected():
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 8, 8, 16, 16, torch.float16))
    with pytest.raises(ValueError) as info:
        flash_attention(q, k.cpu(), v, backend="triton")
    assert str(info.value) == f"flash_attention: `k` must be on the same device as q ({q.device}); got device cpu"
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"`attention_mask` must be on the same device as q \(cuda:0\); got dev"):
        flash_attention(q, k, v, attention_mask=mask, backend="triton")
    with pytest.raises(ValueError, match=r"`q` must be on the same device|`k` must be on the same device"):
        flash_attention(q.cpu(), k, v, backend="triton")
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match=r"`v` must be on the same device as q \(cuda:0\); got device cuda:1"):
            flash_attention(q, k, v.to("cuda:1"), backend="triton")


@pytest.mark.gpu
def test_non_default_stream():
    """On a side stream, ordered after the default stream's writes of the inputs and read after a wait:
    the same bits as on the default stream (no cross-stream race, no hidden default-stream use)."""
    q, k, v = make_qkv(2, 4, 2, 300, 300, 64, 64, torch.float16)
    dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16)
    expected = _grads(q, k, v, dout, causal=True)
    src = [t.detach().clone() for t in (q, k, v)]
    qs, ks, vs = (torch.zeros_like(t).requires_grad_() for t in src)
    side = torch.cuda.Stream()
    torch.cuda._sleep(50_000_000)  # a long kernel on the default stream before the inputs are written
    with torch.no_grad():
        for dst, s in zip((qs, ks, vs), src):
            dst.copy_(s)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fa(qs, ks, vs, causal=True)
        grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip((out, *grads), expected):
        assert torch.equal(a, b)


def _warm_up_on_side_stream(fn, n=2):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_forward_and_backward(monkeypatch):
    """Forward + backward captured in a CUDAGraph; replays on new values copied into the static inputs
    equal eager calls on those values (bitwise: same kernels, same launch configuration)."""
    monkeypatch.delenv("HF_TRITON_ATTN_VALIDATE", raising=False)  # value checks would sync
    shape_kw = dict(causal=True, window_size=(100, 0))
    q, k, v = make_qkv(2, 4, 2, 200, 200, 64, 64, torch.float16)
    mask = torch.ones(2, 200, dtype=torch.bool, device="cuda")
    dout = torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.float16)

    def step():
        out = fa(q, k, v, attention_mask=mask, **shape_kw)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    _warm_up_on_side_stream(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        new = make_qkv(2, 4, 2, 200, 200, 64, 64, torch.float16, seed=seed)
        new_mask = torch.rand(2, 200, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) > 0.2
        with torch.no_grad():
            for dst, src in zip((q, k, v), new):
                dst.copy_(src)
            mask.copy_(new_mask)
            dout.normal_()
        graph.replay()
        torch.cuda.synchronize()
        out = fa(new[0], new[1], new[2], attention_mask=new_mask, **shape_kw)
        eager = (out, *torch.autograd.grad(out, new, dout))
        for name, a, b in zip(("out", "dq", "dk", "dv"), static, eager):
            assert torch.equal(a, b), f"replay {seed}: {name} differs from eager"


@pytest.mark.gpu
def test_cuda_graph_dropout_advances_the_rng_per_replay(monkeypatch):
    """The dropout seed/offset are drawn on the device from torch's (graph-safe) generator: each replay
    draws new ones, like torch's own dropout in graphs. Each replay's output is exactly the dropout
    that the replayed [seed, offset] describes (checked against the reference with that mask)."""
    from hf_triton_attn import ops

    monkeypatch.delenv("HF_TRITON_ATTN_VALIDATE", raising=False)
    drawn: list[torch.Tensor] = []
    real_draw = ops._draw_dropout_rng
    monkeypatch.setattr(ops, "_draw_dropout_rng", lambda device: drawn.append(real_draw(device)) or drawn[-1])
    q, k, v = (t.detach() for t in make_qkv(1, 2, 2, 128, 128, 64, 64, torch.float16))
    p = 0.25
    fn = lambda: fa(q, k, v, dropout_p=p, causal=True)
    _warm_up_on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    rng = drawn[-1]  # the captured draw: a static tensor the replays refill
    outs, rngs = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(static_out.clone())
        rngs.append(rng.clone())
        mask = dropout_keep_mask(rng, 1, 2, 128, 128, p)
        ref = attention_reference(q.double(), k.double(), v.double(), dropout_p=p, dropout_mask=mask, causal=True)
        assert (static_out.double() - ref).abs().max() < 2e-2
    assert not torch.equal(rngs[0], rngs[1]) and not torch.equal(rngs[1], rngs[2])
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


# ==============================================================================================
# 10. patch safety (complements tests/test_patching.py and test_forward_adapters.py)
# ==============================================================================================

@pytest.fixture
def kernel_backend(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


def _mha(seed=0, **kw):
    torch.manual_seed(seed)
    return nn.MultiheadAttention(32, 4, batch_first=True, **kw).to(DEVICE).eval()


def _mha_call(module, x, pad):
    with torch.no_grad():
        return module(x, x, x, key_padding_mask=pad, need_weights=False)[0]


def _x_pad(n=2, length=13):
    x = torch.randn(n, length, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    pad = torch.zeros(n, length, dtype=torch.bool, device=DEVICE)
    pad[0, 9:] = True
    return x, pad


@pytest.mark.usefixtures("kernel_backend")
def test_mha_patch_twice_unpatch_once_round_trip_is_bitwise(monkeypatch):
    """Patching twice changes nothing the first patch did (same installed forward, same bits); one
    unpatch restores the original forward and bitwise-identical outputs; so does leaving patched()."""
    from hf_triton_attn.patches import torch_mha

    mha = _mha()
    x, pad = _x_pad()
    before = _mha_call(mha, x, pad)
    calls = spy_on(monkeypatch, torch_mha)
    patch_model(mha)
    installed = mha.__dict__["forward"]
    once = _mha_call(mha, x, pad)
    assert patch_model(mha).num_patched == 0 and mha.__dict__["forward"] is installed
    twice = _mha_call(mha, x, pad)
    assert len(calls) == 2 and torch.equal(once, twice)
    torch.testing.assert_close(once, before, atol=2e-5, rtol=2e-5)
    unpatch_model(mha)
    assert "forward" not in mha.__dict__ and torch.equal(_mha_call(mha, x, pad), before)
    with patched(mha):
        assert torch.equal(_mha_call(mha, x, pad), once)
    assert torch.equal(_mha_call(mha, x, pad), before) and len(calls) == 3


@pytest.mark.usefixtures("kernel_backend")
def test_hf_model_patch_twice_unpatch_once_round_trip_is_bitwise():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    run = lambda: model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        before = run()
        patch_model(model)
        once = run()
        assert patch_model(model).num_patched == 0
        assert torch.equal(run(), once)
        unpatch_model(model)
        assert model.config._attn_implementation == "eager"
        assert torch.equal(run(), before)
    real = mask.bool()
    torch.testing.assert_close(once[real], before[real], atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("kernel_backend")
def test_state_saved_while_patched_loads_into_an_unpatched_module(tmp_path):
    """torch.save(state_dict) of a patched module: the same keys and bits, which an unpatched module
    (other initial weights) loads with strict=True and then computes bitwise what the original did."""
    original = _mha(seed=0)
    x, pad = _x_pad()
    expected = _mha_call(original, x, pad)
    patched_model = nn.ModuleDict({"attn": copy.deepcopy(original)})
    patch_model(patched_model)
    torch.save(patched_model.state_dict(), tmp_path / "sd.pt")
    fresh = nn.ModuleDict({"attn": _mha(seed=1)})
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"), strict=True)
    want = {f"attn.{k}": t for k, t in original.state_dict().items()}
    got = fresh.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "forward" not in fresh["attn"].__dict__
    assert torch.equal(_mha_call(fresh["attn"], x, pad), expected)


@pytest.mark.usefixtures("kernel_backend")
def test_forward_adapter_model_saved_while_patched_loads_unpatched(tmp_path):
    """GPT-Neo (forward adapter): save_pretrained while patched writes the same bytes as the unpatched
    model; from_pretrained gives an unpatched model with bitwise-identical weights and logits."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                                    attention_types=[[["global", "local"], 1]], window_size=4,
                                    max_position_embeddings=32)
    torch.manual_seed(0)
    plain = transformers.GPTNeoForCausalLM(cfg).eval()
    model = copy.deepcopy(plain)
    assert patch_model(model).num_patched == 2
    model.save_pretrained(tmp_path / "patched")
    plain.save_pretrained(tmp_path / "plain")
    for f in sorted(p.name for p in (tmp_path / "plain").iterdir()):
        assert (tmp_path / "patched" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f
    loaded = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "patched").eval()
    assert not any("forward" in m.__dict__ for m in loaded.modules())
    want, got = plain.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.usefixtures("kernel_backend")
def test_unservable_modules_are_reported_and_keep_working(monkeypatch):
    """Modules an adapter exists for but cannot serve are listed with the reason, left untouched (no
    instance forward) and compute bitwise what they computed before; their servable siblings are
    patched. strict=True raises naming every one of them and leaves nothing patched."""
    from hf_triton_attn.patches import torch_mha

    model = nn.ModuleDict({
        "ok": _mha(seed=0),
        "bias_kv": _mha(seed=1, add_bias_kv=True),
        "zero_attn": _mha(seed=2, add_zero_attn=True),
        "f64": _mha(seed=3).double(),
    })
    x, pad = _x_pad()
    inputs = {name: (x.double() if name == "f64" else x) for name in model}
    before = {name: _mha_call(m, inputs[name], pad) for name, m in model.items()}
    report = patch_model(model)
    assert report.patched == {"torch_mha": ["ok"]}
    assert report.skipped == {
        "bias_kv": "torch_mha: add_bias_kv=True (runs the original forward on every call)",
        "zero_attn": "torch_mha: add_zero_attn=True (runs the original forward on every call)",
        "f64": "torch_mha: parameter dtype torch.float64 not in ['torch.bfloat16', 'torch.float16', 'torch.float32']",
    }
    for name in ("bias_kv", "zero_attn", "f64"):
        assert f"skipped {name}: " in str(report)
    calls = spy_on(monkeypatch, torch_mha)
    for name, m in model.items():
        out = _mha_call(m, inputs[name], pad)
        if name == "ok":
            torch.testing.assert_close(out, before[name], atol=2e-5, rtol=2e-5)
        else:
            assert "forward" not in m.__dict__ and torch.equal(out, before[name]), name
    assert len(calls) == 1
    unpatch_model(model)
    with pytest.raises(ValueError) as info:
        patch_model(model, strict=True)
    for name in ("bias_kv", "zero_attn", "f64"):
        assert f"{name} (torch_mha: " in str(info.value)
    assert not any("forward" in m.__dict__ for m in model.values())
