"""FlashAttention and TritonMultiHeadAttention (hf_triton_attn/modules.py).

Parity with torch.nn.MultiheadAttention given the same weights: outputs, attention weights and the
gradients of the inputs and of every parameter, under the pass rule of tests/helpers.py (our error
against a float64 torch module at most twice torch's own fp32 error, plus a floor). Each case also
asserts which path ran (the kernel, with which causal flag, or the exact eager path) through a spy on
``hf_triton_attn.modules.flash_attention``. Small odd sizes except the seed's snippet.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_triton_attn import FlashAttention, TritonMultiHeadAttention, flash_attention
from hf_triton_attn import modules as modules_mod

from .helpers import BACKEND, DEVICE, assert_pass_rule, make_qkv, spy_on

N, L, S, E, H = 2, 17, 23, 48, 3
F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    """The modules call flash_attention with the auto backend: route it to the kernels under test."""
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    return spy_on(monkeypatch, modules_mod)


def _rand(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


def _torch_mha(**kw) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    kw.setdefault("batch_first", True)
    mha = nn.MultiheadAttention(E, H, **kw).to(DEVICE)
    with torch.no_grad():  # non-zero biases, so that their gradients and values are exercised
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    return mha


def _pad_mask(n: int, length: int) -> torch.Tensor:
    """bool, True = padding: right padding in row 0, left padding and a hole in the last row."""
    m = torch.zeros(n, length, dtype=torch.bool, device=DEVICE)
    m[0, length - 5:] = True
    m[-1, :3] = True
    m[-1, 7] = True
    return m


def _bottom_right_causal(length_q: int, length_k: int) -> torch.Tensor:
    return torch.ones(length_q, length_k, dtype=torch.bool, device=DEVICE).triu(length_k - length_q + 1)


def _to_oracle(x):
    return x.double() if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else x


def check_parity(ref: nn.MultiheadAttention, inputs, call: dict, *, ours_call: dict | None = None,
                 causal: bool = False):
    """Run ours (from_torch(ref)), ref (fp32) and a float64 copy of ref on the same inputs (the same
    tensor objects stay the same, so self-attention takes the fused projection); compare everything."""
    ours = TritonMultiHeadAttention.from_torch(ref, causal=causal)
    oracle = copy.deepcopy(ref).double()
    leaves = list({id(t): t for t in inputs}.values())

    def clone(dtype):
        m = {id(t): t.detach().to(dtype).requires_grad_() for t in leaves}
        return [m[id(t)] for t in inputs], [m[id(t)] for t in leaves]

    (a_in, a_leaves), (r_in, r_leaves), (o_in, o_leaves) = clone(F32), clone(F32), clone(F64)
    out, w = ours(*a_in, **(call if ours_call is None else ours_call))
    out_r, w_r = ref(*r_in, **call)
    out_o, w_o = oracle(*o_in, **{k: _to_oracle(v) for k, v in call.items()})
    assert out.shape == out_r.shape and out.dtype == F32
    assert_pass_rule("output", out, out_r, out_o, F32)
    if call.get("need_weights"):
        assert w.shape == w_r.shape
        assert_pass_rule("weights", w, w_r, w_o, F32)
    else:
        assert w is None
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    dout = _rand(*out.shape, seed=9)
    g = torch.autograd.grad(out, a_leaves + list(ours.parameters()), dout)
    g_r = torch.autograd.grad(out_r, r_leaves + list(ref.parameters()), dout)
    g_o = torch.autograd.grad(out_o, o_leaves + list(oracle.parameters()), dout.double())
    for name, a, r, o in zip([f"d_input{i}" for i in range(len(leaves))] + names, g, g_r, g_o):
        assert a.shape == o.shape, name
        assert_pass_rule(name, a, r, o, F32)
    return out, w


# ----------------------------------------------------------------------------------------------
# the seed's snippet
# ----------------------------------------------------------------------------------------------

def test_seed_snippet_runs(kernel_calls):
    q, k, v = (_rand(4, 100, 512, seed=i) for i in range(3))
    with torch.device(q.device):  # verbatim, with the GPU as default device on the GPU run
        attention = TritonMultiHeadAttention(512, 8)
        output, attn_weights = attention(q, k, v)
    assert output.shape == (4, 100, 512) and attn_weights is None
    assert torch.isfinite(output).all()
    assert len(kernel_calls) == 1, "the snippet must run the kernel"


# ----------------------------------------------------------------------------------------------
# parity with torch.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------

def _self(seed=1, n=N, length=L, batch_first=True):
    x = _rand(n, length, E, seed=seed) if batch_first else _rand(length, n, E, seed=seed)
    return (x, x, x)


def _cross(kdim=E, vdim=E, shared_kv=False):
    q = _rand(N, L, E, seed=1)
    k = _rand(N, S, kdim, seed=2)
    return (q, k, k) if shared_kv else (q, k, _rand(N, S, vdim, seed=3))


def _case(name):
    """-> (torch ctor kwargs, inputs, call, ours_call or None, ours causal ctor, expected kernel causal or None
    for the exact path)."""
    nw = {"need_weights": False}
    square_float = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    if name == "self_kpm":
        return {}, _self(), {**nw, "key_padding_mask": _pad_mask(N, L)}, None, False, False
    if name == "self_no_bias":
        return {"bias": False}, _self(), nw, None, False, False
    if name == "cross_kdim_vdim_kpm":
        return ({"kdim": 32, "vdim": 40}, _cross(32, 40), {**nw, "key_padding_mask": _pad_mask(N, S)}, None,
                False, False)
    if name == "cross_shared_kv":
        return {}, _cross(shared_kv=True), nw, None, False, False
    if name == "cross_separate_kv":
        return {}, _cross(), nw, None, False, False
    if name == "batch_first_false":
        pad = _pad_mask(N, L)
        return {"batch_first": False}, _self(batch_first=False), {**nw, "key_padding_mask": pad}, None, False, False
    if name == "is_causal_hint_float_mask":
        return {}, _self(), {**nw, "attn_mask": square_float, "is_causal": True}, None, False, True
    if name == "is_causal_hint_with_kpm":
        mask = _bottom_right_causal(L, L)  # bool like the padding mask (torch warns on mixed types)
        call = {**nw, "attn_mask": mask, "is_causal": True, "key_padding_mask": _pad_mask(N, L)}
        return {}, _self(), call, None, False, True
    if name == "is_causal_without_mask":
        mask = _bottom_right_causal(L, L)
        return {}, _self(), {**nw, "attn_mask": mask, "is_causal": True}, {**nw, "is_causal": True}, False, True
    if name == "ctor_causal_cross_bottom_right":
        return {}, _cross(), {**nw, "attn_mask": _bottom_right_causal(L, S)}, nw, True, True
    if name == "bool_bottom_right_cross_mask_detected":
        return {}, _cross(), {**nw, "attn_mask": _bottom_right_causal(L, S)}, None, False, True
    if name == "ctor_causal_cross_need_weights":
        call = {"need_weights": True, "attn_mask": _bottom_right_causal(L, S)}
        return {}, _cross(), call, {"need_weights": True}, True, None
    if name == "bool_causal_mask_detected":
        return {}, _self(), {**nw, "attn_mask": _bottom_right_causal(L, L)}, None, False, True
    if name == "bool_all_false_mask":
        mask = torch.zeros(L, S, dtype=torch.bool, device=DEVICE)
        return {}, _cross(), {**nw, "attn_mask": mask}, None, False, False
    if name == "bool_band_mask":
        i, j = torch.arange(L, device=DEVICE)[:, None], torch.arange(L, device=DEVICE)[None, :]
        return {}, _self(), {**nw, "attn_mask": (j - i).abs() > 3}, None, False, None
    if name == "bool_per_head_mask":
        mask = torch.rand(N * H, L, S, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.3
        mask[:, :, 0] = False  # every row keeps a key (torch gives NaN for empty rows)
        return {}, _cross(), {**nw, "attn_mask": mask}, None, False, None
    if name == "float_mask":
        return {}, _cross(), {**nw, "attn_mask": _rand(L, S, seed=5)}, None, False, None
    if name == "float_kpm_binary":
        kpm = torch.zeros(N, L, device=DEVICE).masked_fill(_pad_mask(N, L), float("-inf"))
        return {}, _self(), {**nw, "key_padding_mask": kpm}, None, False, False
    if name == "float_kpm_bias":
        return {}, _self(), {**nw, "key_padding_mask": _rand(N, L, seed=6)}, None, False, None
    if name == "ctor_causal_and_float_mask":
        return {}, _self(), {**nw, "attn_mask": square_float + _rand(L, L, seed=7)}, None, True, None
    if name == "need_weights_averaged":
        call = {"need_weights": True, "key_padding_mask": _pad_mask(N, S)}
        return {"kdim": 32, "vdim": 40}, _cross(32, 40), call, None, False, None
    if name == "need_weights_per_head_batch_first_false":
        call = {"need_weights": True, "average_attn_weights": False, "attn_mask": _bottom_right_causal(L, L)}
        return {"batch_first": False}, _self(batch_first=False), call, None, False, None
    if name == "unbatched_kpm":
        x = _rand(L, E, seed=8)
        return {}, (x, x, x), {**nw, "key_padding_mask": _pad_mask(1, L)[0]}, None, False, False
    if name == "unbatched_per_head_mask_weights":
        q, k = _rand(L, E, seed=8), _rand(S, E, seed=9)
        mask = torch.rand(H, L, S, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.3
        mask[:, :, -1] = False
        call = {"need_weights": True, "average_attn_weights": False, "attn_mask": mask}
        return {}, (q, k, k), call, None, False, None
    raise KeyError(name)


CASES = [
    "self_kpm", "self_no_bias", "cross_kdim_vdim_kpm", "cross_shared_kv", "cross_separate_kv", "batch_first_false",
    "is_causal_hint_float_mask", "is_causal_hint_with_kpm", "is_causal_without_mask",
    "ctor_causal_cross_bottom_right", "bool_bottom_right_cross_mask_detected", "ctor_causal_cross_need_weights",
    "bool_causal_mask_detected", "bool_all_false_mask", "bool_band_mask",
    "bool_per_head_mask", "float_mask", "float_kpm_binary", "float_kpm_bias", "ctor_causal_and_float_mask",
    "need_weights_averaged", "need_weights_per_head_batch_first_false", "unbatched_kpm",
    "unbatched_per_head_mask_weights",
]


@pytest.mark.parametrize("name", CASES)
def test_parity_with_torch_mha(name, kernel_calls):
    ctor, inputs, call, ours_call, causal, expect = _case(name)
    check_parity(_torch_mha(**ctor), inputs, call, ours_call=ours_call, causal=causal)
    if expect is None:
        assert kernel_calls == [], "this call must take the exact path"
    else:
        assert len(kernel_calls) == 1, "this call must run the kernel"
        assert kernel_calls[0]["causal"] is expect
        keep = kernel_calls[0]["attention_mask"]
        kpm = (call if ours_call is None else ours_call).get("key_padding_mask")
        if kpm is None:
            assert keep is None
        else:
            blocked = kpm if kpm.dtype == torch.bool else kpm == float("-inf")
            assert torch.equal(keep, ~blocked.view(keep.shape)), "keep mask = not key_padding_mask"


def test_float64_module_takes_the_exact_path(kernel_calls):
    ref = _torch_mha().double()
    ours = TritonMultiHeadAttention.from_torch(ref)
    x = _rand(N, L, E, seed=1).double()
    pad = _pad_mask(N, L)
    out, _ = ours(x, x, x, key_padding_mask=pad)
    torch.testing.assert_close(out, ref(x, x, x, key_padding_mask=pad, need_weights=False)[0])
    assert kernel_calls == []


def test_fully_masked_rows_give_zero_not_nan(kernel_calls):
    """Documented difference: torch gives NaN where every key is masked; we give 0 attention."""
    ours = TritonMultiHeadAttention.from_torch(_torch_mha())
    x = _rand(N, L, E, seed=1).requires_grad_()
    pad = torch.zeros(N, L, dtype=torch.bool, device=DEVICE)
    pad[1] = True
    bias = ours.out_proj.bias.detach()
    for need_weights in (False, True):
        out, w = ours(x, x, x, key_padding_mask=pad, need_weights=need_weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1], bias.expand(L, E))  # 0 attention, then out_proj
        if need_weights:
            assert torch.equal(w[1], torch.zeros_like(w[1]))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()
    assert len(kernel_calls) == 1  # need_weights=False ran the kernel, need_weights=True the exact path


def test_wrong_is_causal_hint_is_caught_where_values_are_checkable(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_VALIDATE", "1")  # CPU tensors are always checked; CUDA ones with this
    ours = TritonMultiHeadAttention(E, H, device=DEVICE)
    x = _rand(N, L, E, seed=1)
    band = torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1) | torch.ones(
        L, L, dtype=torch.bool, device=DEVICE).tril(-3)
    with pytest.raises(ValueError, match="`attn_mask` must be the causal mask"):
        ours(x, x, x, attn_mask=band, is_causal=True)
    # without the hint the same mask is served exactly
    out, _ = ours(x, x, x, attn_mask=band)
    assert torch.isfinite(out).all()


def test_is_causal_hint_is_trusted_where_values_are_not_checked(kernel_calls, monkeypatch):
    """On a GPU (without HF_TRITON_ATTN_VALIDATE=1) the hint is taken as torch's contract says: the mask
    is not read (no device sync) and the kernel runs causal."""
    monkeypatch.setattr(modules_mod, "_values_checkable", lambda t: False)
    monkeypatch.setattr(modules_mod, "_blocked", None)  # reading the mask would fail
    mask = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    check_parity(_torch_mha(), _self(), {"need_weights": False, "attn_mask": mask, "is_causal": True})
    assert len(kernel_calls) == 1 and kernel_calls[0]["causal"] is True


def test_compiles_fullgraph():
    """Under torch.compile mask values are never read (no data-dependent branch): a bool padding mask
    with is_causal runs the kernel's custom op, a float mask the exact path, without graph breaks."""
    torch._dynamo.reset()
    ref = _torch_mha()
    ours = TritonMultiHeadAttention.from_torch(ref)
    x, bias = _rand(N, L, E, seed=1), _rand(L, L, seed=5)
    pad = _pad_mask(N, L)

    def both(a, m, f):
        return ours(a, a, a, key_padding_mask=m, is_causal=True)[0] + ours(a, a, a, attn_mask=f)[0]

    out = torch.compile(both, backend="aot_eager", fullgraph=True)(x, pad, bias)
    expected = (ref(x, x, x, key_padding_mask=pad, attn_mask=_bottom_right_causal(L, L), need_weights=False)[0]
                + ref(x, x, x, attn_mask=bias, need_weights=False)[0])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)  # fp32, |out| ~ 1: a few ulps of sums


def test_dropout_reaches_the_kernel_only_in_training(kernel_calls):
    ours = TritonMultiHeadAttention(E, H, dropout=0.25, device=DEVICE)
    x = _rand(1, 5, E, seed=1)
    ours(x, x, x)
    ours.eval()
    ours(x, x, x)
    assert [c["dropout_p"] for c in kernel_calls] == [0.25, 0.0]


# ----------------------------------------------------------------------------------------------
# parameters, state_dict, conversion
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"kdim": 32, "vdim": 40}, {"bias": False}, {"kdim": 32}],
                         ids=["packed", "kdim_vdim", "no_bias", "kdim_only"])
def test_parameters_init_and_state_dict_match_torch(kw):
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, H, batch_first=True, **kw)
    torch.manual_seed(3)
    ours = TritonMultiHeadAttention(E, H, **kw)
    sd, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_r)
    for key in sd:
        assert torch.equal(sd[key], sd_r[key]), f"{key}: initialised differently from torch"
    # checkpoints load both ways (strict)
    other = _torch_mha(**kw)
    ours.load_state_dict(other.state_dict())
    ref.load_state_dict(ours.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value.cpu())
    assert ours._qkv_same_embed_dim == ref._qkv_same_embed_dim
    assert (ours.embed_dim, ours.kdim, ours.vdim, ours.num_heads, ours.head_dim) == (
        ref.embed_dim, ref.kdim, ref.vdim, ref.num_heads, ref.head_dim)


def test_from_torch_and_to_torch():
    ref = nn.MultiheadAttention(E, H, dropout=0.1, kdim=32, vdim=40).to(DEVICE)  # torch's default batch_first=False
    ref.eval()
    ref.out_proj.bias.requires_grad_(False)
    rng = torch.get_rng_state()
    ours = TritonMultiHeadAttention.from_torch(ref)
    assert torch.equal(torch.get_rng_state(), rng), "from_torch must not draw random numbers"
    assert ours.batch_first is False and ours.dropout == 0.1 and not ours.training and not ours.causal
    assert not ours.out_proj.bias.requires_grad and ours.in_proj_bias.requires_grad
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value) and ours.state_dict()[key].data_ptr() != value.data_ptr()
    back = ours.to_torch()
    assert isinstance(back, nn.MultiheadAttention) and back.batch_first is False and back.kdim == 32
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert "kdim=32, vdim=40" in repr(ours) and "batch_first=False" in repr(ours)
    assert TritonMultiHeadAttention.from_torch(ref, causal=True).causal


def test_from_torch_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="add_bias_kv"):
        TritonMultiHeadAttention.from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        TritonMultiHeadAttention.from_torch(nn.MultiheadAttention(E, H, add_zero_attn=True))
    with pytest.raises(TypeError, match="`mha` must be a torch.nn.MultiheadAttention; got Linear"):
        TritonMultiHeadAttention.from_torch(nn.Linear(4, 4))


# ----------------------------------------------------------------------------------------------
# inside nn.TransformerEncoderLayer
# ----------------------------------------------------------------------------------------------

def test_transformer_encoder_layer_matches_and_trains(kernel_calls):
    """Train mode: TransformerEncoderLayer's fused native path (eval + no_grad) would skip self_attn,
    so the comparison runs in training with dropout 0, and the spy proves our kernel ran. The layer
    turns the bool padding mask and the causal mask into float masks (0 / -inf): still the kernel."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True).to(DEVICE)
    mod = copy.deepcopy(ref)
    mod.self_attn = TritonMultiHeadAttention.from_torch(mod.self_attn)
    oracle = copy.deepcopy(ref).double()
    for m in (ref, mod, oracle):
        m.train()
    x = _rand(N, L, E, seed=1)
    pad = _pad_mask(N, L)
    causal = _bottom_right_causal(L, L)  # bool like the padding mask; the layer turns both into float

    out = mod(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    out_r = ref(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    out_o = oracle(x.double(), src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    assert len(kernel_calls) == 1 and kernel_calls[0]["causal"] is True, "the layer did not run our kernel"
    assert_pass_rule("layer output", out, out_r, out_o, F32)
    dout = _rand(*out.shape, seed=9)
    names = [n for n, _ in mod.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(out, list(mod.parameters()), dout)
    grads_r = torch.autograd.grad(out_r, list(ref.parameters()), dout)
    grads_o = torch.autograd.grad(out_o, list(oracle.parameters()), dout.double())
    for name, a, r, o in zip(names, grads, grads_r, grads_o):
        assert_pass_rule(name, a, r, o, F32)

    opt = torch.optim.SGD(mod.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = mod(x, src_key_padding_mask=pad).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[2] < losses[1] < losses[0], losses
    assert len(kernel_calls) == 4


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_native_eval_path_reads_our_parameters(causal, kernel_calls):
    """Eval + no_grad with an even head count: torch's fused encoder-layer path skips self_attn.forward,
    reading its torch-named attributes and calling its merge_masks: still the same answer (our causal
    option folded into the mask), just not our kernel (documented)."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(E, 4, dim_feedforward=64, dropout=0.0, batch_first=True).to(DEVICE).eval()
    mod = copy.deepcopy(ref)
    mod.self_attn = TritonMultiHeadAttention.from_torch(mod.self_attn, causal=causal)
    x = _rand(N, L, E, seed=1)
    pad = torch.zeros(N, L, dtype=torch.bool, device=DEVICE)
    pad[0, -4:] = True
    mask = _bottom_right_causal(L, L) if causal else None
    with torch.no_grad():
        for kpm in (None, pad):
            expected = ref(x, src_mask=mask, src_key_padding_mask=kpm)
            torch.testing.assert_close(mod(x, src_key_padding_mask=kpm), expected)
    assert kernel_calls == []


# ----------------------------------------------------------------------------------------------
# FlashAttention
# ----------------------------------------------------------------------------------------------

def test_flash_attention_module_matches_the_function(kernel_calls):
    q, k, v = make_qkv(2, 4, 2, 9, 13, 16, 8, F32, seed=3)
    keep = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    keep[1, 10:] = False
    attn = FlashAttention(causal=True, softmax_scale=0.3)
    out = attn(q, k, v, attention_mask=keep)
    expected = flash_attention(q, k, v, causal=True, softmax_scale=0.3, attention_mask=keep, backend=BACKEND)
    assert torch.equal(out, expected)
    out2, lse = attn(q, k, v, causal=False, return_lse=True, softcap=5.0)
    assert torch.equal(out2, flash_attention(q, k, v, softmax_scale=0.3, softcap=5.0, backend=BACKEND))
    assert lse.shape == (2, 4, 9)
    assert [c["causal"] for c in kernel_calls] == [True, False]
    assert repr(attn) == "FlashAttention(causal=True, softmax_scale=0.3, dropout=0.0)"


def test_flash_attention_module_dropout_only_in_training(kernel_calls):
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16, 16, F32, seed=4)
    attn = FlashAttention(dropout=0.2)
    assert attn.training
    attn(q, k, v)
    attn.eval()
    attn(q, k, v)
    assert [c["dropout_p"] for c in kernel_calls] == [0.2, 0.0]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dropout": 1.0}, ValueError, r"`dropout` must be a float in \[0, 1\); got float 1.0"),
    ({"causal": 1}, TypeError, "`causal` must be a bool; got int 1"),
    ({"softmax_scale": "x"}, TypeError, "`softmax_scale` must be None or a finite float"),
])
def test_flash_attention_module_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FlashAttention(**kwargs)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((50, 3), {}, ValueError, r"`d_model` must be divisible by num_heads \(3\); got 50"),
    ((48, 0), {}, ValueError, "`num_heads` must be a positive int; got int 0"),
    ((48.0, 3), {}, TypeError, "`d_model` must be a positive int; got float 48.0"),
    ((48, 3), {"dropout": 1.5}, ValueError, r"`dropout` must be a float in \[0, 1\)"),
    ((48, 3), {"kdim": 0}, ValueError, "`kdim` must be None or a positive int; got int 0"),
    ((48, 3), {"batch_first": None}, TypeError, "`batch_first` must be a bool"),
])
def test_constructor_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TritonMultiHeadAttention(*args, **kwargs)


def _bad_forward_cases():
    x = _rand(N, L, E, seed=1)
    k32 = _rand(N, S, 32, seed=2)
    v40 = _rand(N, S, 40, seed=3)
    ok = (x, k32, v40)
    return [
        ("query_dim", (_rand(N, L, 40, seed=1), k32, v40), {}, ValueError,
         r"`query` must be of feature \(last\) dim 48; got shape \(2, 17, 40\)"),
        ("key_dim", (x, _rand(N, S, 48, seed=2), v40), {}, ValueError, r"`key` must be of feature \(last\) dim 32"),
        ("value_dim", (x, k32, _rand(N, S, 32, seed=3)), {}, ValueError, r"`value` must be of feature \(last\) dim 40"),
        ("query_4d", (x[None], k32, v40), {}, ValueError, r"`query` must be 3-D \(batched\) or 2-D"),
        ("key_2d", (x, k32[0], v40), {}, ValueError, "`key` must be 3-D like query"),
        ("value_len", (x, k32, v40[:, :-1]), {}, ValueError, r"`value` must be of key's batch and sequence sizes"),
        ("batch", (x, k32[:1], v40[:1]), {}, ValueError, r"`key` must be of query's batch size 2"),
        ("query_type", ([1.0], k32, v40), {}, TypeError, "`query` must be a torch.Tensor; got list"),
        ("query_dtype", (x.double(), k32, v40), {}, TypeError, r"`query` must be of the parameters' dtype"),
        ("query_int", (x.long(), k32, v40), {}, TypeError, "`query` must be a floating-point tensor"),
        ("kpm_shape", ok, {"key_padding_mask": torch.zeros(N, S - 1, dtype=torch.bool, device=DEVICE)}, ValueError,
         r"`key_padding_mask` must be of shape \(2, 23\) \(batch, key length\); got shape \(2, 22\)"),
        ("kpm_dtype", ok, {"key_padding_mask": torch.zeros(N, S, dtype=torch.int64, device=DEVICE)}, TypeError,
         r"`key_padding_mask` must be a bool \(True = masked out\) or float .*; got dtype torch.int64"),
        ("mask_shape", ok, {"attn_mask": torch.zeros(L, S - 1, dtype=torch.bool, device=DEVICE)}, ValueError,
         r"`attn_mask` must be of shape \(L, S\) or \(N \* num_heads, L, S\) = \(17, 23\) or \(6, 17, 23\)"),
        ("mask_heads", ok, {"attn_mask": torch.zeros(H, L, S, dtype=torch.bool, device=DEVICE)}, ValueError,
         r"`attn_mask` must be .*; got shape \(3, 17, 23\)"),
        ("mask_dtype", ok, {"attn_mask": torch.zeros(L, S, dtype=torch.uint8, device=DEVICE)}, TypeError,
         "`attn_mask` must be a bool"),
        ("need_weights", ok, {"need_weights": "yes"}, TypeError, "`need_weights` must be a bool; got str"),
        ("is_causal", ok, {"is_causal": None}, TypeError, "`is_causal` must be a bool; got NoneType"),
    ]


@pytest.mark.parametrize("case", _bad_forward_cases(), ids=lambda c: c[0])
def test_forward_errors(case):
    _, args, kwargs, exc, match = case
    ours = TritonMultiHeadAttention(E, H, kdim=32, vdim=40, device=DEVICE)
    with pytest.raises(exc, match=match):
        ours(*args, **kwargs)
