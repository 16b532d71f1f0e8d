"""In-kernel dropout (a hash per key pair): exact against the reference given the exposed mask, reproducible."""

import pytest
import torch

from hf_triton_attn import attention_reference, flash_attention
from hf_triton_attn.testing import draw_dropout_rng, dropout_keep_mask

from .helpers import BACKEND, DEVICE, assert_pass_rule, make_qkv


def _run_with_mask(q, k, v, p, seed, **kw):
    torch.manual_seed(seed)
    out = flash_attention(q, k, v, dropout_p=p, backend=BACKEND, **kw)
    torch.manual_seed(seed)
    rng = draw_dropout_rng(DEVICE)
    return out, rng


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-dq", "split-dq"])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, window_size=(9, 0))],
                         ids=["dense", "causal", "window"])
def test_dropout_matches_reference_with_kernel_mask(kw, deterministic):
    """Both backwards (dq summed by the dk/dv kernel, or dq's own kernel) regenerate the forward's mask."""
    kw = dict(kw, deterministic=deterministic)
    q, k, v = make_qkv(2, 4, 2, 45, 50, 32, 32, torch.float32)
    p = 0.3
    out, rng = _run_with_mask(q, k, v, p, 1234, **kw)
    mask = dropout_keep_mask(rng, 2, 4, 45, 50, p)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ora_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kw = {k: v for k, v in kw.items() if k != "deterministic"}
    ref = attention_reference(*ref_in, dropout_p=p, dropout_mask=mask, **ref_kw)
    ora = attention_reference(*ora_in, dropout_p=p, dropout_mask=mask, **ref_kw)
    assert_pass_rule("out", out, ref, ora, torch.float32)
    for name, a, r, o in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout),
                             torch.autograd.grad(ora, ora_in, dout.double())):
        assert_pass_rule(name, a, r, o, torch.float32)


def test_dropout_varlen_uses_sequence_coordinates():
    g = torch.Generator().manual_seed(0)
    lens = [20, 37]
    q = torch.randn(57, 2, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(57, 2, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(57, 2, 16, generator=g).to(DEVICE).requires_grad_()
    cu = torch.tensor([0, 20, 57], dtype=torch.int32, device=DEVICE)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=37, max_seqlen_k=37, causal=True)
    out, rng = _run_with_mask(q, k, v, 0.2, 7, **kw)
    mask = dropout_keep_mask(rng, len(lens), 2, 37, 37, 0.2)
    ora = attention_reference(*(t.detach().double() for t in (q, k, v)), dropout_p=0.2, dropout_mask=mask, **kw)
    ref = attention_reference(*(t.detach() for t in (q, k, v)), dropout_p=0.2, dropout_mask=mask, **kw)
    assert_pass_rule("out", out, ref, ora, torch.float32)


def test_dropout_reproducible_and_seed_dependent():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, torch.float32)
    a, _ = _run_with_mask(q, k, v, 0.5, 1, causal=True)
    b, _ = _run_with_mask(q, k, v, 0.5, 1, causal=True)
    c, _ = _run_with_mask(q, k, v, 0.5, 2, causal=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_statistics(p):
    torch.manual_seed(0)
    rng = draw_dropout_rng(DEVICE)
    mask = dropout_keep_mask(rng, 2, 3, 64, 96, p)
    n = mask.numel()
    rate = mask.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # rows and heads must not share one pattern
    assert not torch.equal(mask[0, 0, 0], mask[0, 0, 1]) and not torch.equal(mask[0, 0], mask[0, 1])


def _correlation_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally shaped 0/1 tensors, in units of its null standard error 1/sqrt(n)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()) * a.numel() ** 0.5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_has_no_correlations_between_neighbours(p):
    """The keep-mask hashes a pair of keys (2c, 2c + 1) to 32 bits and gives each key the top 14 bits of
    one half; row and column keys are added before the hash's tail. None of that may show as structure:
    the two keys of a pair, neighbouring pairs, the next key but one, neighbouring rows and heads, and the
    (i, j), (i, j'), (i', j), (i', j') quads that an additive combination could tie together are
    uncorrelated within 5 standard errors (n = 2**20 scores). A hash that gives both keys of a pair
    the same half fails these."""
    torch.manual_seed(1)
    mask = dropout_keep_mask(draw_dropout_rng(DEVICE), 1, 2, 512, 1024, p).cpu()
    k = mask[0]  # (heads, rows, keys)
    checks = {
        "pair halves": (k[..., 0::2], k[..., 1::2]),
        "neighbouring pairs": (k[..., 1:-1:2], k[..., 2::2]),
        "key j and j + 2": (k[..., :-2], k[..., 2:]),
        "neighbouring rows": (k[:, :-1], k[:, 1:]),
        "diagonal neighbours": (k[:, :-1, :-1], k[:, 1:, 1:]),
        "heads": (k[0], k[1]),
    }
    for name, (a, b) in checks.items():
        z = _correlation_z(a, b)
        assert abs(z) < 5, f"{name}: correlation {z:.1f} standard errors from 0"
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    rows = torch.randint(0, 512, (n, 2), generator=gen)
    cols = torch.randint(0, 1024, (n, 2), generator=gen)
    distinct = (rows[:, 0] != rows[:, 1]) & (cols[:, 0] != cols[:, 1])  # else the product is a square
    rows, cols = rows[distinct], cols[distinct]
    c = k[0].double() - (1 - p)
    quad = c[rows[:, 0], cols[:, 0]] * c[rows[:, 0], cols[:, 1]] * c[rows[:, 1], cols[:, 0]] * c[rows[:, 1], cols[:, 1]]
    z = float(quad.mean() / (quad.std() / quad.numel() ** 0.5))
    assert abs(z) < 5, f"quads: mean product {z:.1f} standard errors from 0"


def test_dropout_replayed_by_gradient_checkpointing():
    """checkpoint() restores the RNG state, so the recomputed forward draws the same mask."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, 16, torch.float32)
    fn = lambda a, b, c: flash_attention(a, b, c, dropout_p=0.3, backend=BACKEND)
    torch.manual_seed(3)
    out = checkpoint(fn, q, k, v, use_reentrant=False)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(3)
    out2 = fn(q, k, v)
    g2 = torch.autograd.grad(out2.sum(), (q, k, v))
    assert torch.equal(out, out2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
