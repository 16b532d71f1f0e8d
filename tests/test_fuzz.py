"""Property test: random problems (shapes, GQA, masks, windows, softcap, ALiBi, dropout, varlen)
against the float64 oracle, forward and all three gradients.

Bounded in CI (HF_TRITON_ATTN_FUZZ_EXAMPLES, default 30 on CPU, derandomized so CI is
reproducible; 100 on the GPU). scripts/gpu_run.sh runs this file as a part of its own ("fuzz",
FUZZ_CASES cases, 100 unless asked for more, e.g. 2000 for a long run), split into
HF_TRITON_ATTN_FUZZ_SHARDS parametrized shards, one per xdist worker (each shard explores its own
random examples). A failing case is printed by hypothesis as the falsifying
example (its ``seed`` rebuilds the tensors) with a ``@reproduce_failure`` blob for replay.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_triton_attn import attention_reference, flash_attention
from hf_triton_attn.testing import draw_dropout_rng, dropout_keep_mask

from .helpers import BACKEND, DEVICE, ON_GPU, assert_pass_rule, cu_seqlens, stored_output_allowance

SHARDS = int(os.environ.get("HF_TRITON_ATTN_FUZZ_SHARDS", "1"))
EXAMPLES = -(-int(os.environ.get("HF_TRITON_ATTN_FUZZ_EXAMPLES", "100" if ON_GPU else "30")) // SHARDS)
# CI replays the same cases (derandomized); HF_TRITON_ATTN_FUZZ_RANDOM=1 explores new ones.
DERANDOMIZE = not ON_GPU and os.environ.get("HF_TRITON_ATTN_FUZZ_RANDOM", "0") != "1"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@st.composite
def problems(draw):
    varlen = draw(st.booleans())
    n_seq = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 8, 16, 24, 32, 40, 64, 80, 96, 128]))
    dv = draw(st.sampled_from([d, d, 16, 40]))
    if varlen:
        lens_q = draw(st.lists(st.integers(0, 70), min_size=n_seq, max_size=n_seq))
        lens_k = [lq if draw(st.booleans()) else draw(st.integers(0, 70)) for lq in lens_q]
        if max(lens_q) == 0:
            lens_q[0] = 1
    else:
        sq, sk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
        lens_q, lens_k = [sq] * n_seq, [sk] * n_seq
    causal = draw(st.booleans())
    left = draw(st.sampled_from([-1, -1, 0, 5, 33]))
    right = draw(st.sampled_from([-1, -1, 0, 7]))
    return dict(
        varlen=varlen, n_seq=n_seq, hq=hq, hkv=hkv, d=d, dv=dv, lens_q=lens_q, lens_k=lens_k,
        dtype=draw(st.sampled_from(DTYPES)), causal=causal, window=(left, right),
        softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 20.0])),
        alibi=draw(st.sampled_from([None, None, "heads", "batch"])),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.0, 0.25])),
        key_mask=not varlen and draw(st.booleans()),
        query_mask=not varlen and draw(st.booleans()),
        seqused=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, hq, hkv, d, dv, dtype = p["n_seq"], p["hq"], p["hkv"], p["d"], p["dv"], p["dtype"]
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()
    kw = dict(causal=p["causal"], window_size=p["window"], softcap=p["softcap"], dropout_p=p["dropout"])
    if p["varlen"]:
        tq, tk = sum(p["lens_q"]), sum(p["lens_k"])
        q, k, v = rnd(tq, hq, d), rnd(max(tk, 0), hkv, d), rnd(max(tk, 0), hkv, dv)
        kw.update(cu_seqlens_q=cu_seqlens(p["lens_q"]), cu_seqlens_k=cu_seqlens(p["lens_k"]),
                  max_seqlen_q=max(p["lens_q"]), max_seqlen_k=max(p["lens_k"]))
    else:
        sq, sk = p["lens_q"][0], p["lens_k"][0]
        q, k, v = rnd(n, hq, sq, d), rnd(n, hkv, sk, d), rnd(n, hkv, sk, dv)
        if p["key_mask"]:
            kw["attention_mask"] = (torch.rand(n, sk, generator=g) > 0.3).to(DEVICE)
        if p["query_mask"]:
            kw["query_mask"] = (torch.rand(n, sq, generator=g) > 0.3).to(DEVICE)
    if p["seqused"]:
        kw["seqused_k"] = torch.tensor([int(torch.randint(0, lk + 1, (1,), generator=g)) for lk in p["lens_k"]],
                                       dtype=torch.int32, device=DEVICE)
    if p["alibi"] == "heads":
        kw["alibi_slopes"] = torch.rand(hq, generator=g).to(DEVICE)
    elif p["alibi"] == "batch":
        kw["alibi_slopes"] = torch.rand(n, hq, generator=g).to(DEVICE)
    return q, k, v, kw


@settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems())
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_fuzz_against_oracle(shard, p):
    try:
        _check_case(p)
    except Exception as exc:  # logged before hypothesis shrinks it, so a killed run still names the case
        _log_case(shard, p, f"FAIL {type(exc).__name__}: {str(exc)[:300]!r}")
        raise
    _log_case(shard, p)


def _check_case(p):
    q, k, v, kw = _build(p)
    torch.manual_seed(p["seed"])
    out = flash_attention(q, k, v, backend=BACKEND, **kw)
    ref_kw = dict(kw)
    if p["dropout"] > 0:
        torch.manual_seed(p["seed"])
        rng = draw_dropout_rng(DEVICE)
        ref_kw["dropout_mask"] = dropout_keep_mask(rng, p["n_seq"], p["hq"], max(p["lens_q"]), max(p["lens_k"]),
                                                   p["dropout"])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, p["dtype"])
    grads = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ora_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, **ref_kw)
    ora = attention_reference(*ora_in, **ref_kw)
    assert_pass_rule("out", out, ref, ora, p["dtype"])
    ref_grads = torch.autograd.grad(ref, ref_in, dout, allow_unused=True)
    ora_grads = torch.autograd.grad(ora, ora_in, dout.double(), allow_unused=True)
    allowance = stored_output_allowance(q, k, v, kw, out, ora, dout)
    for name, a, r, o, leaf in zip(("dq", "dk", "dv"), grads, ref_grads, ora_grads, (q, k, v)):
        zero = torch.zeros_like(leaf, dtype=torch.float64)
        a = a if a is not None else zero
        if name in allowance:  # take off what reading the stored output explains, elementwise
            o = o if o is not None else zero
            diff = (a.double() - o).abs()
            a = o + torch.sign(a.double() - o) * (diff - allowance[name]).clamp(min=0)
        assert_pass_rule(name, a, r if r is not None else zero, o if o is not None else zero, p["dtype"])


def _log_case(shard: int, p: dict, failure: str = "") -> None:
    """One line per case in $HF_TRITON_ATTN_FUZZ_LOG (the GPU run counts cases from it); failures
    start with FAIL and carry the error."""
    path = os.environ.get("HF_TRITON_ATTN_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write((failure + " " if failure else "") + f"shard={shard} "
                    + " ".join(f"{k}={v}" for k, v in p.items()) + "\n")
