"""Registry, patch_model/unpatch_model/patched, and the torch.nn.MultiheadAttention forward adapter."""

import copy

import pytest
import torch

from hf_triton_attn import Adapter, AdapterKind, patch_model, patched, register_adapter, unpatch_model
from hf_triton_attn.registry import lookup_adapter, registered_adapters, supported_classes_markdown, unregister_adapter

from .helpers import BACKEND, DEVICE, spy_on


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    """Adapters call flash_attention with the auto backend: route it to the kernels under test."""
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


def _mha(batch_first=True, **kw):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(64, 4, batch_first=batch_first, **kw).to(DEVICE)


def _seq(n, length, e=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, e, generator=g).to(DEVICE).requires_grad_()


def _compare(ref_mod, test_mod, *args, grads=True, **kwargs):
    clones = {id(a): a.detach().clone().requires_grad_() for a in args}  # self-attention passes x thrice
    ref_args = [clones[id(a)] for a in args]
    out_ref, _ = ref_mod(*ref_args, **kwargs)
    out, weights = test_mod(*args, **kwargs)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)
    if grads:
        dout = torch.randn_like(out)
        leaves = list({id(a): a for a in args}.values())
        g = torch.autograd.grad(out, leaves + list(test_mod.parameters()), dout)
        g_ref = torch.autograd.grad(out_ref, [clones[id(a)] for a in leaves] + list(ref_mod.parameters()), dout)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    return out, weights


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_self_attention_with_padding_matches_torch(batch_first, monkeypatch):
    ref = _mha(batch_first)
    mod = copy.deepcopy(ref)
    report = patch_model(mod)
    assert report.patched == {"torch_mha": ["MultiheadAttention"]}
    from hf_triton_attn.patches import torch_mha

    calls = spy_on(monkeypatch, torch_mha)
    x = _seq(3, 37)
    x = x if batch_first else x.detach().transpose(0, 1).requires_grad_()
    pad = torch.zeros(3, 37, dtype=torch.bool, device=DEVICE)
    pad[0, 30:] = True
    pad[2, :5] = True
    _, weights = _compare(ref, mod, x, x, x, key_padding_mask=pad, need_weights=False)
    assert weights is None and calls, "the kernel path did not run"


def test_mha_cross_attention_kdim_vdim_and_causal():
    ref = _mha(kdim=32, vdim=48)
    mod = copy.deepcopy(ref)
    patch_model(mod)
    q, k, v = _seq(2, 20), _seq(2, 29, 32, seed=2), _seq(2, 29, 48, seed=3)
    _compare(ref, mod, q, k, v, need_weights=False)
    ref2 = _mha()
    mod2 = copy.deepcopy(ref2)
    patch_model(mod2)
    x = _seq(2, 25)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(25, device=DEVICE)
    _compare(ref2, mod2, x, x, x, attn_mask=causal, is_causal=True, need_weights=False)


def test_mha_need_weights_and_custom_masks_take_the_exact_path():
    ref = _mha()
    mod = copy.deepcopy(ref)
    patch_model(mod)
    x = _seq(2, 17)
    out, w = _compare(ref, mod, x, x, x)  # torch's default need_weights=True
    assert w is not None and w.shape == (2, 17, 17)
    band = torch.ones(17, 17, dtype=torch.bool, device=DEVICE).triu(3)
    _compare(ref, mod, x, x, x, attn_mask=band, need_weights=False)


def test_encoder_layer_trains_on_the_patched_attention(monkeypatch):
    """TransformerEncoderLayer in train mode calls self_attn (its fused fast path is eval-only).

    It turns a bool src_key_padding_mask into a float one, which takes the exact path (float masks
    may carry arbitrary biases); without padding the kernel runs, and we check that it does."""
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=96, dropout=0.0, batch_first=True).to(DEVICE)
    mod = copy.deepcopy(ref)
    patch_model(mod)
    from hf_triton_attn.patches import torch_mha

    calls = spy_on(monkeypatch, torch_mha)
    ref.train()
    mod.train()
    x = _seq(2, 21)
    torch.testing.assert_close(mod(x), ref(x.detach()), atol=2e-5, rtol=2e-5)
    assert calls, "the encoder layer did not run the patched attention"
    pad = torch.zeros(2, 21, dtype=torch.bool, device=DEVICE)
    pad[1, 15:] = True
    n = len(calls)
    torch.testing.assert_close(mod(x, src_key_padding_mask=pad), ref(x.detach(), src_key_padding_mask=pad),
                               atol=2e-5, rtol=2e-5)
    assert len(calls) == n, "a float padding mask must take the exact path"
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    loss0 = mod(x.detach()).pow(2).mean()
    loss0.backward()
    opt.step()
    assert mod(x.detach()).pow(2).mean() < loss0


def test_patch_is_idempotent_reversible_and_leaves_state_alone():
    model = torch.nn.Sequential(_mha(), torch.nn.Linear(64, 64)).to(DEVICE)
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r1 = patch_model(model)
    r2 = patch_model(model)
    assert r1.num_patched == 1 and r2.num_patched == 0 and r2.already_patched == ["0"]
    assert list(model.state_dict()) == keys
    assert "forward" in model[0].__dict__
    unpatch_model(model)
    assert "forward" not in model[0].__dict__ and not hasattr(model[0], "_hf_triton_attn_adapter")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with patched(model) as report:
        assert report.num_patched == 1 and "forward" in model[0].__dict__
    assert "forward" not in model[0].__dict__
    assert "patched by torch_mha" in str(r1)


def test_include_exclude_strict_and_unservable_modules():
    model = torch.nn.ModuleDict({"a": _mha(), "b": _mha(), "c": _mha(add_bias_kv=True)})
    report = patch_model(model, include=["a", "c"])
    assert report.patched == {"torch_mha": ["a"]}
    assert report.skipped["b"] == "not matched by include"
    assert "add_bias_kv=True" in report.skipped["c"]
    unpatch_model(model)
    assert patch_model(model, exclude=[torch.nn.MultiheadAttention]).num_patched == 0
    with pytest.raises(ValueError, match=r"cannot serve c \(torch_mha: add_bias_kv=True"):
        patch_model(model, strict=True)
    assert not any("forward" in m.__dict__ for m in model.values()), "strict failure must leave nothing patched"


def test_registry_lookup_subclasses_and_user_adapters():
    class MyMHA(torch.nn.MultiheadAttention):
        pass

    assert lookup_adapter(MyMHA).name == "torch_mha"  # served through its base class

    class MyAttention(torch.nn.Module):
        def forward(self, x):
            return x

    seen = []
    adapter = Adapter(name="mine", kind=AdapterKind.FORWARD,
                      classes=(f"{MyAttention.__module__}:{MyAttention.__qualname__}",),
                      apply=lambda m: seen.append(m) or (lambda: seen.remove(m)))
    register_adapter(adapter)
    try:
        with pytest.raises(ValueError, match="already served by adapter 'mine'"):
            register_adapter(Adapter(name="other", kind=AdapterKind.FORWARD, classes=adapter.classes,
                                     apply=adapter.apply))
        model = torch.nn.Sequential(MyAttention())
        assert patch_model(model).patched == {"mine": ["0"]} and len(seen) == 1
        unpatch_model(model)
        assert seen == []
        assert any(a is adapter for _, a in registered_adapters())
        assert "| `test_registry_lookup_subclasses_and_user_adapters.<locals>.MyAttention` | mine |" in \
            supported_classes_markdown()
    finally:
        unregister_adapter(adapter)
    with pytest.raises(ValueError, match="must be 'module.path:ClassName'"):
        register_adapter(Adapter(name="bad", kind=AdapterKind.FORWARD, classes=("NoColon",), apply=adapter.apply))


def test_readme_table_is_generated_from_the_registry():
    """The README documents the registry as installed with transformers (the HF adapters register then)."""
    import pathlib

    pytest.importorskip("transformers")

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- supported-classes:start -->\n")[1].split("\n<!-- supported-classes:end -->")[0]
    assert block == supported_classes_markdown(), "README table is stale: regenerate it from the registry"


def test_patched_mha_compiles_fullgraph():
    """The adapter declares torch_compile=True: a patched module traces without graph breaks."""
    torch._dynamo.reset()
    ref = _mha()
    mod = copy.deepcopy(ref)
    patch_model(mod)
    x = _seq(2, 19)
    pad = torch.zeros(2, 19, dtype=torch.bool, device=DEVICE)
    pad[0, 12:] = True
    compiled = torch.compile(lambda a, m: mod(a, a, a, key_padding_mask=m, need_weights=False)[0],
                             backend="aot_eager", fullgraph=True)
    out = compiled(x, pad)
    torch.testing.assert_close(out, ref(x, x, x, key_padding_mask=pad, need_weights=False)[0], atol=2e-5, rtol=2e-5)
