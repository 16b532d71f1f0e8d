"""Shared test machinery: inputs, the float64 oracle, and the data-derived pass rule.

Pass rule (flash-attn's): the kernel's error against the float64 oracle must be at most twice the
error of the same-dtype PyTorch reference against that oracle, plus a small floor; never NaN.
"""

from __future__ import annotations

import os

import torch

from hf_triton_attn import flash_attention
from hf_triton_attn.reference import attention_reference

ON_GPU = os.environ.get("HF_TRITON_ATTN_TEST_DEVICE", "cpu") == "cuda"
DEVICE = "cuda" if ON_GPU else "cpu"
BACKEND = "triton" if ON_GPU else "interpret"
# Absolute floors relative to the output scale: rounding of the final cast to the dtype, and for
# gradients the delta trick (dS = P * (dO.V - dO.O)) whose exact cancellation the eager reference
# gets for free but an fp32 kernel only to ~1e-6 (tests/test_fuzz.py: Sk = 1, GQA, Sq = 64 gave
# 2.05e-6 where the oracle is exactly 0).
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_qkv(batch, hq, hkv, sq, sk, d, dv, dtype, *, layout="bhsd", device=DEVICE, seed=0):
    """Random q, k, v (requires_grad) in the SDPA layout; ``layout="bshd"`` gives transposed views."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(b, h, s, e):
        x = torch.randn(b, s, h, e, generator=g) if layout == "bshd" else torch.randn(b, h, s, e, generator=g)
        x = x.to(device=device, dtype=dtype)
        x = x.transpose(1, 2) if layout == "bshd" else x
        return x.requires_grad_()

    return rnd(batch, hq, sq, d), rnd(batch, hkv, sk, d), rnd(batch, hkv, sk, dv)


def cu_seqlens(lens: list[int], device=DEVICE) -> torch.Tensor:
    """int32 cumulative sequence starts [0, l0, l0 + l1, ...] for the varlen API."""
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def max_err(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    diff = (a.detach().double() - b.detach().double()).abs()
    if valid is not None:
        diff = diff[valid.expand_as(diff)] if valid.shape != diff.shape else diff[valid]
    return float(diff.max()) if diff.numel() else 0.0


def assert_pass_rule(name: str, kernel: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor,
                     dtype: torch.dtype) -> None:
    assert not torch.isnan(kernel).any(), f"{name}: NaN in kernel output (or an element never written)"
    err_k = max_err(kernel, oracle)
    err_r = max_err(ref, oracle)
    scale = max(float(oracle.detach().abs().max()), 1.0) if oracle.numel() else 1.0
    bound = 2 * err_r + FLOOR[dtype] * scale
    assert err_k <= bound, f"{name}: kernel err {err_k:.3e} > bound {bound:.3e} (ref err {err_r:.3e})"


def check_against_oracle(q, k, v, *, grad: bool = True, dout_seed: int = 1, **kwargs):
    """Run the kernel, the same-dtype reference and the float64 oracle; compare out, LSE and grads."""
    dtype = q.dtype
    out, lse = flash_attention(q, k, v, backend=BACKEND, return_lse=True, **kwargs)
    assert out.shape[:-1] == q.shape[:-1] and out.shape[-1] == v.shape[-1]
    ref_kwargs = dict(kwargs)
    ref_kwargs.pop("deterministic", None)
    leaves = (q, k, v)
    ref_in = [t.detach().clone().requires_grad_() for t in leaves]
    ora_in = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = attention_reference(*ref_in, **ref_kwargs)
    ora_out, ora_lse = attention_reference(*ora_in, return_lse=True, **ref_kwargs)

    assert_pass_rule("out", out, ref_out, ora_out, dtype)
    finite = torch.isfinite(ora_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE: -inf rows differ from the oracle"
    lse_scale = max([1.0] + [float(ora_lse[finite].abs().max())] * bool(finite.any()))
    assert max_err(lse[finite], ora_lse[finite]) <= 1e-3 * lse_scale, "LSE differs from the oracle"
    if not grad:
        return out
    g = torch.Generator(device="cpu").manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout)
    ora_grads = torch.autograd.grad(ora_out, ora_in, dout.double())
    for name, a, r, o in zip(("dq", "dk", "dv"), grads, ref_grads, ora_grads):
        assert a.shape == o.shape, f"{name}: shape {a.shape} != {o.shape}"
        assert_pass_rule(name, a, r, o, dtype)
    return out


def spy_on(monkeypatch, module, name: str = "flash_attention") -> list:
    """Record the kwargs of every call to ``module.<name>`` (still calling it): proves a path ran."""
    calls: list = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


class _LaunchCounter:
    """Stands in for a ``CachedLauncher``: records each launch's grid and its other arguments
    ``(args, constexprs, num_warps, num_stages)``, then launches."""

    def __init__(self, real) -> None:
        self.real, self.grids, self.calls = real, [], []

    def __call__(self, grid, *args):
        self.grids.append(grid)
        self.calls.append(args)
        return self.real(grid, *args)

    def __getattr__(self, name):
        return getattr(self.real, name)


def record_launches(monkeypatch, module, name: str) -> _LaunchCounter:
    """Replace the launcher ``module.<name>`` by a recording one and return it (``.grids``, ``.calls``)."""
    counter = _LaunchCounter(getattr(module, name))
    monkeypatch.setattr(module, name, counter)
    return counter


def count_launches(monkeypatch, module, name: str) -> list:
    """Replace the launcher ``module.<name>`` by a counting one; returns the list of launch grids."""
    return record_launches(monkeypatch, module, name).grids


def stored_output_allowance(q, k, v, kw, out, ora, dout, dot_rounding: bool = False) -> dict:
    """Elementwise bounds of the dq / dk error caused by the backward reading the stored output.

    The kernel's backward uses ``delta_i = dO_i . O_i`` with O as stored (rounded to the input dtype,
    FlashAttention-2 does the same); the same-dtype PyTorch reference differentiates the softmax
    instead. The difference ``Delta_i = dO_i . (O_stored_i - O_exact_i)`` enters
    ``dS_ij = P_ij (dP_ij - delta_i)`` (times ``1 - tanh^2 <= 1`` with softcap, P without dropout), so
    ``|error dq_i| <= scale |Delta_i| max|k|`` and ``|error dk_j| <= scale max|q| sum_i P_ij |Delta_i|``;
    ``sum_i P_ij |Delta_i|`` is the value-gradient of the float64 oracle on a ones value for an output
    gradient ``|Delta|``. Where the exact gradient cancels to 0 (each query sees one key, dropout
    scaling the output off the dtype's grid) this term is all that is left (GPU fuzz, 2026-11-26);
    so it is where the forward's p for the row maximum is not exactly 1 (FlashAttention-2's
    exp2(x * scale - max * scale) FMA) and is rounded to the dtype before the P V dot (GPU edge-case
    test, one-hot fp16 rows, 2026-11-26).

    ``dot_rounding``: the same cancellation also leaves the fp32 rounding of ``dP_ij = dO_i . v_j``
    and of ``delta_i``, two D-term dot products summed in different orders (tensor cores / BLAS vs
    the delta kernel), so ``|Delta_i|`` grows by ``2 D u sum_d |dO_id| (max|v| / (1 - dropout_p) + |O_id|)`` with
    ``u = 2**-24`` (the textbook ``gamma_D`` bound, doubled for accumulators that truncate). It
    decides one-hot rows: on an AMD EPYC CPU the interpreter's fp16 one-hot dq came out 2.0e-5 off
    the exact 0 (a 1-ulp difference of dP and delta), which the stored-output term alone calls 0.
    Off by default: a test comparing against the same-dtype reference (the fuzz's pass rule) has
    that rounding in the reference's error already, and this worst-case bound would dominate fp32.
    """
    scale = kw.get("softmax_scale") or q.shape[-1] ** -0.5
    dout64, out64 = dout.double(), out.detach().double()
    delta = (dout64 * (out64 - ora.detach())).sum(-1).abs()  # [..., Sq] or [T, H]
    if dot_rounding:
        vmax = float(v.detach().abs().max()) if v.numel() else 0.0
        keep_scale = 1.0 / (1.0 - kw.get("dropout_p", 0.0))
        unit = 2.0 * v.shape[-1] * 2.0**-24  # gamma_D with 2u per add
        delta = delta + unit * (dout64.abs() * (vmax * keep_scale + out64.abs())).sum(-1)
    oracle_kw = {name: val for name, val in kw.items() if name != "dropout_p"}
    q64, k64 = q.detach().double(), k.detach().double()
    ones = torch.ones(k64.shape[:-1] + (1,), dtype=torch.float64, device=k.device, requires_grad=True)
    o2 = attention_reference(q64, k64, ones, **oracle_kw)
    (weighted,) = torch.autograd.grad(o2, ones, delta.unsqueeze(-1).to(o2.dtype), allow_unused=True)
    if weighted is None:
        weighted = torch.zeros_like(ones)
    qmax = float(q64.abs().max()) if q64.numel() else 0.0
    kmax = float(k64.abs().max()) if k64.numel() else 0.0
    return {"dq": scale * delta.unsqueeze(-1) * kmax, "dk": scale * qmax * weighted}
