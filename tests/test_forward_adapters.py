"""Forward adapters for models that bypass AttentionInterface: GPT-Neo, Bloom, Falcon (transformers 5.17).

Each tiny random model (hidden 64, 2 layers, 4 heads, head dim 16, vocab 97) is compared with an eager
copy holding identical weights: logits at real positions of a left-padded batch, every parameter's
gradient, greedy generation with the KV cache; a spy proves every layer ran the kernel. Padded
positions are excluded (the kernel writes pad query rows as 0)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_triton_attn import patch_model, unpatch_model  # noqa: E402
from hf_triton_attn.patches import bloom, falcon, gpt_neo  # noqa: E402

from .helpers import BACKEND, DEVICE, spy_on  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*must be `None` or an integer.*")

WINDOW = 5  # GPT-Neo local layers: shorter than the batch, so the window matters
LAYERS = 2


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


def _tiny(name: str, **overrides):
    T = transformers
    if name == "gpt_neo":
        cfg = T.GPTNeoConfig(vocab_size=97, hidden_size=64, num_layers=LAYERS, num_heads=4,
                             attention_types=[[["global", "local"], 1]], window_size=WINDOW,
                             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **overrides)
        return T.GPTNeoForCausalLM(cfg)
    if name == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=97, hidden_size=64, n_layer=LAYERS, n_head=4, **overrides))
    variants = {
        "falcon": {},  # FalconConfig's defaults: rotary, multi_query (MQA)
        "falcon_mha_sdpa": dict(multi_query=False, attn_implementation="sdpa"),  # bool 4-D masks
        "falcon_gqa": dict(new_decoder_architecture=True, num_kv_heads=2),
        "falcon_alibi": dict(alibi=True),
        "falcon_alibi_sdpa": dict(alibi=True, attn_implementation="sdpa"),
    }
    kw = dict(vocab_size=97, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              attn_implementation="eager")
    kw.update(variants[name])
    kw.update(overrides)
    return T.FalconForCausalLM(T.FalconConfig(**kw))


def _adapter_module(name: str):
    return {"gpt_neo": gpt_neo, "bloom": bloom}.get(name, falcon)


def _attention_names(name: str) -> list[str]:
    if name == "gpt_neo":
        return [f"transformer.h.{i}.attn.attention" for i in range(LAYERS)]
    return [f"transformer.h.{i}.self_attention" for i in range(LAYERS)]


def _pair(name: str, **overrides):
    """(eager reference, patched copy with identical weights, PatchReport)."""
    torch.manual_seed(0)
    ref = _tiny(name, **overrides).to(DEVICE).eval()
    ours = copy.deepcopy(ref)
    report = patch_model(ours)
    return ref, ours, report


def _batch(length: int = 20, pad: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :pad] = 0  # left padding
    return ids.to(DEVICE), mask.to(DEVICE)


SLOPES = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]  # build_alibi_tensor's slopes for 4 heads
KV_HEADS = {"gpt_neo": 4, "bloom": 4, "falcon": 1, "falcon_mha_sdpa": 4, "falcon_gqa": 2, "falcon_alibi": 1,
            "falcon_alibi_sdpa": 1}  # Falcon's default is multi_query (MQA); GQA reaches the kernel unrepeated


def _record_kv_heads(monkeypatch, module) -> list[int]:
    """Wrap the (spied) kernel entry of ``module`` to record how many k heads each call gets."""
    heads: list[int] = []
    inner = module.flash_attention

    def record(q, k, v, **kwargs):
        heads.append(k.shape[1])
        return inner(q, k, v, **kwargs)

    monkeypatch.setattr(module, "flash_attention", record)
    return heads


def _check_kernel_arguments(name: str, calls: list) -> None:
    """GPT-Neo: unscaled, local window (w - 1, 0) on odd layers. Bloom: ALiBi added after the 1/sqrt(D)
    scaling. Falcon: ALiBi added before it, twice in the eager branch and once in SDPA's (5.17)."""
    first = calls[0]
    if name == "gpt_neo":
        assert [c["window_size"] for c in calls] == [(-1, -1), (WINDOW - 1, 0)] and first["softmax_scale"] == 1.0
        return
    assert first["softmax_scale"] == 0.25 and all("window_size" not in c for c in calls)
    slopes = torch.tensor(SLOPES, device=DEVICE)
    expected = {"bloom": slopes, "falcon_alibi": slopes * 2 * 0.25, "falcon_alibi_sdpa": slopes * 0.25}.get(name)
    if expected is None:
        assert first["alibi_slopes"] is None
    else:
        torch.testing.assert_close(first["alibi_slopes"], expected, rtol=0, atol=0)


FAMILIES = ["gpt_neo", "bloom", "falcon", "falcon_mha_sdpa", "falcon_gqa", "falcon_alibi", "falcon_alibi_sdpa"]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_gradients_match_eager_with_left_padding(name, monkeypatch):
    ref, ours, report = _pair(name)
    assert report.patched == {_adapter_module(name).__name__.rsplit(".", 1)[1]: _attention_names(name)}, str(report)
    calls = spy_on(monkeypatch, _adapter_module(name))
    kv_heads = _record_kv_heads(monkeypatch, _adapter_module(name))
    ids, mask = _batch()
    a = ref(input_ids=ids, attention_mask=mask).logits
    b = ours(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == LAYERS, "every layer must run the kernel (no fallback)"
    assert all(c["causal"] and c["attention_mask"] is not None and c["query_mask"] is not None for c in calls)
    assert all(c["dropout_p"] == 0.0 for c in calls)
    _check_kernel_arguments(name, calls)
    assert kv_heads == [KV_HEADS[name]] * LAYERS
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], atol=1e-4, rtol=1e-4)
    a[real].pow(2).mean().backward()
    b[real].pow(2).mean().backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert (p1.grad is None) == (p2.grad is None), n
        if p1.grad is not None:
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_gpt_neo_fp16_unscaled_scores_beyond_the_fp16_range(monkeypatch):
    """GPT-Neo does not scale q.k (eager upcasts q and k to fp32 for it). With q/k projections scaled so
    that |q.k| > 65504, the fp16 kernel must match the fp32 model: its scores are fp32 accumulations.
    (Eager fp16 itself leaks padding here: its additive padding mask is finfo(fp16).min = -65504, which
    such scores outweigh; the kernel masks exactly. See docs/notes/hf-integration.md.)"""
    torch.manual_seed(0)
    ref32 = _tiny("gpt_neo").to(DEVICE).eval()
    with torch.no_grad():
        for block in ref32.transformer.h:
            block.attn.attention.q_proj.weight.mul_(600.0)
            block.attn.attention.k_proj.weight.mul_(600.0)
    ours = copy.deepcopy(ref32).half()
    patch_model(ours)
    peak: list[float] = []
    inner = gpt_neo.flash_attention

    def record(q, k, v, **kwargs):
        peak.append(float((q.float() @ k.float().transpose(-1, -2)).abs().max()))
        return inner(q, k, v, **kwargs)

    monkeypatch.setattr(gpt_neo, "flash_attention", record)
    ids, mask = _batch()
    with torch.no_grad():
        expected = ref32(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits.float()
    assert len(peak) == LAYERS and max(peak) > 65504.0, peak
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=5e-3, rtol=5e-3)


def _assert_same_greedy_tokens(ref_out, tokens: torch.Tensor, prompt_len: int) -> None:
    """Identical ids, except where the reference's top-2 logits were a near-tie at the first difference."""
    expected = ref_out.sequences
    assert tokens.shape == expected.shape
    for row in range(expected.shape[0]):
        differ = (expected[row] != tokens[row]).nonzero()
        if differ.numel():
            step = int(differ[0]) - prompt_len
            top2 = ref_out.logits[step][row].float().topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, f"row {row} differs at step {step} without a near-tie"


@pytest.mark.parametrize("name", ["gpt_neo", "bloom", "falcon_gqa", "falcon_alibi"])
def test_greedy_generate_with_left_padding_and_cache(name, monkeypatch):
    ref, ours, _ = _pair(name)
    calls = spy_on(monkeypatch, _adapter_module(name))
    ids, mask = _batch(11, 3)
    steps = 4
    kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    expected = ref.generate(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                            **kw)
    tokens = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(calls) == steps * LAYERS, "prefill and every decoding step must run the kernel"
    assert [c["attention_mask"] is not None for c in calls] == [True] * (steps * LAYERS)  # left padding kept
    _assert_same_greedy_tokens(expected, tokens, ids.shape[1])


@pytest.mark.parametrize("name", ["gpt_neo", "bloom", "falcon_alibi"])
def test_unpatch_restores_bitwise_and_state_is_untouched(name):
    ref, ours, _ = _pair(name)
    keys = list(ours.state_dict())
    unpatch_model(ours)
    assert list(ours.state_dict()) == keys
    assert not any("forward" in m.__dict__ for m in ours.modules())
    ids, mask = _batch()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, a)


def _installed_forwards(model) -> list:
    return [(m, m.__dict__["forward"]) for m in model.modules() if "forward" in m.__dict__]


def test_deepcopy_and_pickle_of_a_patched_model(tmp_path):
    """Regression (silent wrong answer): a forward installed as a closure over the module survives
    ``copy.deepcopy`` still bound to the ORIGINAL module, so the copy ran the original's weights; and a
    closure cannot be pickled. The installed forward holds its module: copies rebind, pickles load."""
    ref, ours, _ = _pair("bloom")
    twin = copy.deepcopy(ours)
    installed = _installed_forwards(twin)
    assert len(installed) == LAYERS and all(f.module is m for m, f in installed)
    with torch.no_grad():
        for model in (ref, twin):  # the copy's own weights must be the ones that count
            for block in model.transformer.h:
                block.self_attention.query_key_value.weight.mul_(3.0)
    ids, mask = _batch(9, 2)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   ref(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.save(ours, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(f.module is m for m, f in _installed_forwards(loaded)) and len(_installed_forwards(loaded)) == LAYERS
    unpatch_model(loaded)
    assert _installed_forwards(loaded) == []


def test_unpatch_restores_an_earlier_instance_forward():
    """An instance-level forward installed before ours (accelerate's hooks do that) is what we call as
    the original, and what unpatching puts back."""
    _, model, _ = _pair("gpt_neo")
    unpatch_model(model)
    attn = model.transformer.h[0].attn.attention
    seen = []

    def hooked(*args, **kwargs):
        seen.append(1)
        return type(attn).forward(attn, *args, **kwargs)

    attn.forward = hooked
    patch_model(model)
    assert attn.__dict__["forward"].previous is hooked
    ids, mask = _batch(9, 2)
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions"):
        gpt_neo._warned.clear()
        model(input_ids=ids, attention_mask=mask, output_attentions=True)  # fallback: calls the hook
    assert seen == [1]
    unpatch_model(model)
    assert attn.__dict__["forward"] is hooked


@pytest.mark.parametrize("name", ["gpt_neo", "bloom", "falcon"])
def test_output_attentions_takes_the_original_forward_exactly(name, monkeypatch):
    ref, ours, _ = _pair(name)
    module = _adapter_module(name)
    calls = spy_on(monkeypatch, module)
    module._warned.clear()
    ids, mask = _batch()
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions=True"):
        b = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert calls == []
    assert torch.equal(b.logits, a.logits)
    assert all(torch.equal(x, y) for x, y in zip(b.attentions, a.attentions))


def test_bloom_padding_with_a_hole_takes_the_original_forward():
    """ALiBi positions from the mask's cumsum are a per-row shift of the kernel's only for contiguous
    real keys: a hole (1 0 1) must not reach the kernel."""
    ref, ours, _ = _pair("bloom")
    ids, mask = _batch()
    mask[1, 8] = 0
    bloom._warned.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="padding with holes"):
        b = ours(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        assert torch.equal(b, ref(input_ids=ids, attention_mask=mask).logits)


def test_gpt_neo_custom_4d_mask_takes_the_original_forward():
    ref, ours, _ = _pair("gpt_neo")
    ids, _ = _batch()
    n = ids.shape[1]
    keep = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril() & ~torch.ones(n, n, dtype=torch.bool,
                                                                                 device=DEVICE).tril(-3)
    keep[:, 0] = True  # a band plus an attention sink: not causal + padding
    mask4d = torch.zeros(2, 1, n, n, device=DEVICE).masked_fill(~keep, torch.finfo(torch.float32).min)
    gpt_neo._warned.clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="other than causal"):
        b = ours(input_ids=ids, attention_mask=mask4d).logits
    with torch.no_grad():
        assert torch.equal(b, ref(input_ids=ids, attention_mask=mask4d).logits)


@pytest.mark.parametrize("name,expected_p", [("gpt_neo", 0.25), ("bloom", 0.25), ("falcon_alibi", 0.25),
                                             ("falcon", 0.0)])
def test_attention_dropout_in_training(name, expected_p, monkeypatch):
    """Dropout on the probabilities in training (Falcon's rotary branch never drops: neither does eager)."""
    _, ours, _ = _pair(name, attention_dropout=0.25)
    calls = spy_on(monkeypatch, _adapter_module(name))
    ids, mask = _batch(9, 2)
    ours.train()
    with torch.no_grad():
        torch.manual_seed(3)
        first = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.manual_seed(3)
        again = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert [c["dropout_p"] for c in calls] == [expected_p] * (2 * LAYERS)
    assert torch.equal(first, again), "torch.manual_seed must reproduce the kernel's dropout"


def test_falcon_layer_called_with_a_plain_mask_adds_alibi_once(monkeypatch):
    """Called directly with a plain causal mask (not FalconModel's alibi-folded one), the eager branch
    adds ALiBi once: the adapter reads that off the mask and halves the slopes it uses inside a model."""
    _, ours, _ = _pair("falcon_alibi")
    layer = ours.transformer.h[0].self_attention
    calls = spy_on(monkeypatch, falcon)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 64, generator=g).to(DEVICE)
    mask2d = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask2d[1, :3] = 0
    alibi = falcon.model_module(layer).build_alibi_tensor(mask2d, 4, torch.float32)
    keep = torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril() & mask2d.bool()[:, None, None, :]
    mask4d = torch.zeros(2, 1, 9, 9, device=DEVICE).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        got, _ = layer(hidden, alibi, mask4d)
        expected, _ = type(layer).forward(layer, hidden, alibi, mask4d)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0]["alibi_slopes"], torch.tensor(SLOPES, device=DEVICE) * 0.25, rtol=0, atol=0)
    real = mask2d.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_subclasses_that_override_forward_are_not_patched():
    """E.g. GPTNeoFlashAttention2 / FalconFlashAttention2: their forward is not the eager one we serve."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    class MyNeoAttention(GPTNeoSelfAttention):
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs)

    torch.manual_seed(0)
    model = _tiny("gpt_neo")
    inner = model.transformer.h[0].attn
    inner.attention = MyNeoAttention(model.config, "global", 0)
    report = patch_model(model)
    assert report.patched == {"gpt_neo": ["transformer.h.1.attn.attention"]}
    assert "overrides GPTNeoSelfAttention.forward" in report.skipped["transformer.h.0.attn.attention"]
