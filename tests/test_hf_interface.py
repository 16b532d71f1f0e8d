"""The interface adapter: attn_implementation="hf_triton_attn" against each model's eager attention,
identical weights, tiny configs, CPU through the interpreted kernels. Padded positions are excluded."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_triton_attn  # noqa: E402,F401  (registers the attention name)
from hf_triton_attn.patches import hf_interface  # noqa: E402

from .helpers import BACKEND, DEVICE, spy_on  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*must be `None` or an integer.*")


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


def _tiny(name: str, impl: str):
    T = transformers
    common = dict(vocab_size=97, attn_implementation=impl)
    if name == "llama":
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.LlamaForCausalLM(cfg)
    if name == "mistral":
        cfg = T.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, sliding_window=7, **common)
        return T.MistralForCausalLM(cfg)
    if name == "gemma2":
        cfg = T.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, sliding_window=9, attn_logit_softcapping=1.5,
                             query_pre_attn_scalar=16, **common)
        return T.Gemma2ForCausalLM(cfg)
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, **common)
        return T.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = T.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           **common)
        return T.BertModel(cfg)
    if name == "roberta":
        cfg = T.RobertaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              pad_token_id=0, **common)
        return T.RobertaModel(cfg)
    if name == "distilbert":
        cfg = T.DistilBertConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, **common)
        return T.DistilBertModel(cfg)
    if name == "qwen2":
        cfg = T.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        return T.Qwen2ForCausalLM(cfg)
    if name == "bart":
        cfg = T.BartConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                           max_position_embeddings=64, pad_token_id=0, **common)
        return T.BartForConditionalGeneration(cfg)
    raise ValueError(name)


def _pair(name: str):
    torch.manual_seed(0)
    ref = _tiny(name, "eager").to(DEVICE).eval()
    ours = _tiny(name, "hf_triton_attn").to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _batch(padding: str, length: int = 23):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    if padding == "left":
        mask[0, :6] = 0
    else:
        mask[0, length - 6:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _output(res):
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def _out(model, ids, mask):
    return _output(model(input_ids=ids, attention_mask=mask))


def _padding_free_batch(lens=(7, 12, 4)):
    """Three token sequences and their DataCollatorWithFlattening batch (cu_seq_lens, no labels)."""
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in lens]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collate([{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels", None)
    return seqs, batch


@pytest.mark.parametrize("name,padding", [("llama", "left"), ("mistral", "left"), ("gemma2", "left"),
                                          ("gpt2", "left"), ("bert", "right"), ("bert", "left"),
                                          ("roberta", "right"), ("distilbert", "left"), ("qwen2", "left")])
def test_forward_and_gradients_match_eager(name, padding, monkeypatch):
    ref, ours = _pair(name)
    ids, mask = _batch(padding)
    calls = spy_on(monkeypatch, hf_interface)
    a, b = _out(ref, ids, mask), _out(ours, ids, mask)
    assert len(calls) == 2, "every layer must run the kernel (no eager fallback)"
    # pad query rows are skipped (self-attention: the key mask is the query mask)
    assert all(c["query_mask"] is not None for c in calls)
    real = mask.bool()
    torch.testing.assert_close(b[real], a[real], atol=1e-4, rtol=1e-4)
    # gradients of every parameter through a loss on real positions only
    (a[real].pow(2).mean()).backward()
    (b[real].pow(2).mean()).backward()
    for (n1, p1), (_, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=n1: f"{n}: {m}")


def test_kernel_path_really_runs(monkeypatch):
    ref, ours = _pair("llama")
    calls = spy_on(monkeypatch, hf_interface)
    ids, mask = _batch("left")
    _out(ours, ids, mask)
    assert len(calls) == 2 and calls[0]["causal"] and calls[0]["attention_mask"] is not None


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_with_left_padding_matches_eager(cache, name):
    ref, ours = _pair(name)
    ids, mask = _batch("left", 11)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    a = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    b = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(a, b)


def test_from_pretrained_with_attn_implementation(tmp_path):
    ref, _ = _pair("gpt2")
    ref.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_triton_attn")
    loaded = loaded.to(DEVICE)
    assert loaded.config._attn_implementation == "hf_triton_attn"
    ids, mask = _batch("left")
    torch.testing.assert_close(_out(loaded.eval(), ids, mask)[mask.bool()], _out(ref, ids, mask)[mask.bool()],
                               atol=1e-4, rtol=1e-4)


def test_output_attentions_takes_the_exact_eager_path():
    ref, ours = _pair("llama")
    ids, mask = _batch("left")
    hf_interface._warned.clear()
    with pytest.warns(UserWarning, match="output_attentions=True"):
        b = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    a = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    torch.testing.assert_close(b.logits[real], a.logits[real], atol=1e-5, rtol=1e-5)
    assert b.attentions is not None and b.attentions[0].shape == a.attentions[0].shape


def test_unknown_kwarg_and_4d_mask_fall_back_exactly():
    _, ours = _pair("llama")
    attn = ours.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g)
    from transformers.models.llama.modeling_llama import eager_attention_forward

    hf_interface._warned.clear()
    with pytest.warns(UserWarning, match="unsupported argument"):
        out, _ = hf_interface.attention_forward(attn, q, k, v, None, scaling=0.25, s_aux=torch.zeros(4))
    bias = torch.zeros(2, 1, 9, 9)
    bias[..., 3] = -1.0  # an arbitrary additive 4-D mask: only the eager path can apply it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out4, _ = hf_interface.attention_forward(attn, q, k, v, bias, scaling=0.25)
    ref4, _ = eager_attention_forward(attn, q, k, v, bias, scaling=0.25)
    torch.testing.assert_close(out4, ref4)
    assert out.shape == (2, 9, 4, 16)


def test_padding_free_batches_use_varlen(monkeypatch):
    """cu_seq_lens_* from DataCollatorWithFlattening reach the kernel's varlen path, exactly."""
    ref, ours = _pair("llama")
    calls = spy_on(monkeypatch, hf_interface)
    seqs, batch = _padding_free_batch()
    packed = ours(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}).logits[0]
    assert calls and calls[0]["cu_seqlens_q"] is not None
    start = 0
    for s in seqs:
        alone = ref(input_ids=s[None].to(DEVICE)).logits[0]
        torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-4, rtol=1e-4)
        start += len(s)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_padding_free_batch_falls_back_per_sequence(name):
    """Regression: the eager fallback (here output_attentions=True) of a padding-free batch ignored
    cu_seq_lens and attended across the packed sequences (max error 1.68 on BERT, found 2026-11-26)."""
    ref, ours = _pair(name)
    seqs, batch = _padding_free_batch()
    if name == "bert":
        batch.pop("position_ids", None)  # BERT takes absolute positions of the packed row; compare per token
    inputs = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ours(**inputs, output_attentions=True)
    packed = _output(res)[0]
    start = 0
    for s in seqs:
        if name == "bert":
            pos = torch.arange(start, start + len(s))[None].to(DEVICE)
            alone = _output(ref(input_ids=s[None].to(DEVICE), position_ids=pos))[0]
        else:
            alone = _output(ref(input_ids=s[None].to(DEVICE)))[0]
        torch.testing.assert_close(packed[start:start + len(s)], alone, atol=1e-4, rtol=1e-4)
        start += len(s)


def test_set_attn_implementation_on_a_loaded_model():
    ref, _ = _pair("llama")
    model = _tiny("llama", "eager").to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    model.set_attn_implementation("hf_triton_attn")
    assert model.model.layers[0].self_attn.config._attn_implementation == "hf_triton_attn"
    ids, mask = _batch("left")
    torch.testing.assert_close(_out(model, ids, mask)[mask.bool()], _out(ref, ids, mask)[mask.bool()],
                               atol=1e-4, rtol=1e-4)


def test_patch_model_switches_and_unpatch_restores(monkeypatch):
    ref, _ = _pair("llama")
    model = _tiny("llama", "eager").to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    keys = list(model.state_dict())
    report = hf_triton_attn.patch_model(model)
    assert report.patched == {"hf_interface": ["LlamaForCausalLM"]}, str(report)
    assert model.config._attn_implementation == "hf_triton_attn"
    again = hf_triton_attn.patch_model(model)
    assert again.num_patched == 0 and again.already_patched == ["LlamaForCausalLM"]
    calls = spy_on(monkeypatch, hf_interface)
    ids, mask = _batch("left")
    torch.testing.assert_close(_out(model, ids, mask)[mask.bool()], _out(ref, ids, mask)[mask.bool()],
                               atol=1e-4, rtol=1e-4)
    assert len(calls) == 2 and list(model.state_dict()) == keys
    hf_triton_attn.unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    n = len(calls)
    _out(model, ids, mask)
    assert len(calls) == n


def test_models_that_bypass_the_interface_are_reported():
    """XLM computes attention itself and has no forward adapter: reported with the reason, strict raises.
    GPT-Neo also bypasses the interface, but its forward adapter serves it: strict does not raise."""
    T = transformers
    xlm = T.XLMWithLMHeadModel(T.XLMConfig(vocab_size=97, emb_dim=32, n_layers=1, n_heads=4))
    report = hf_triton_attn.patch_model(xlm)
    assert report.num_patched == 0
    assert "picks its attention at construction" in report.skipped["XLMWithLMHeadModel"]
    with pytest.raises(ValueError, match="cannot serve XLMWithLMHeadModel"):
        hf_triton_attn.patch_model(xlm, strict=True)
    neo = T.GPTNeoForCausalLM(T.GPTNeoConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                                             attention_types=[[["global", "local"], 1]], window_size=4))
    report = hf_triton_attn.patch_model(neo, strict=True)
    assert report.num_patched == 2 and "picks its attention at construction" in report.skipped["GPTNeoForCausalLM"]

def test_encoder_decoder_bart_with_cross_attention(monkeypatch):
    """BART: encoder self-attention, causal decoder self-attention and cross-attention all run the kernel;
    cross-attention keeps every decoder row (the encoder's mask says nothing about them)."""
    ref, ours = _pair("bart")
    ids, mask = _batch("right")
    g = torch.Generator().manual_seed(5)
    dec = torch.randint(3, 97, (2, 9), generator=g).to(DEVICE)
    dec_mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    dec_mask[1, 6:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    calls = spy_on(monkeypatch, hf_interface)
    a, b = ref(**kw).logits, ours(**kw).logits
    assert len(calls) == 3, "encoder self, decoder self and cross attention each run the kernel"
    causal = [c for c in calls if c["causal"]]
    cross = [c for c in calls if not c["causal"] and c["attention_mask"] is not None
             and c["attention_mask"].shape[1] == ids.shape[1] and c is not calls[0]]
    assert len(causal) == 1 and len(cross) == 1 and cross[0]["query_mask"] is None
    real = dec_mask.bool()
    torch.testing.assert_close(b[real], a[real], atol=1e-4, rtol=1e-4)
    a[real].pow(2).mean().backward()
    b[real].pow(2).mean().backward()
    for (n1, p1), (_, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=n1: f"{n}: {m}")


def test_t5_is_reported_and_keeps_its_own_attention():
    """T5 adds a relative position bias to the scores: patch_model leaves it alone with the reason, and an
    explicit attn_implementation="hf_triton_attn" takes the exact eager fallback (warned once)."""
    T = transformers
    cfg = T.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(cfg).eval()
    report = hf_triton_attn.patch_model(model)
    assert report.num_patched == 0
    assert "relative position bias" in report.skipped["T5ForConditionalGeneration"]
    with pytest.raises(ValueError, match="relative position bias"):
        hf_triton_attn.patch_model(model, strict=True)
    ids = torch.randint(3, 97, (2, 7))
    ref = model(input_ids=ids, decoder_input_ids=ids).logits
    ours = T.T5ForConditionalGeneration._from_config(cfg, attn_implementation="hf_triton_attn").eval()
    ours.load_state_dict(model.state_dict())
    assert ours.encoder.block[0].layer[0].SelfAttention.config._attn_implementation == "hf_triton_attn"
    hf_interface._warned.clear()
    with pytest.warns(UserWarning, match="position_bias"):
        out = ours(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_position_ids_without_cu_seq_lens(name, monkeypatch):
    """DataCollatorWithFlattening without flash kwargs: only packed position_ids reach the model. The mask
    function hands the sequence ids to the kernel (segment_ids, no host sync); logits and gradients match
    eager on the same packed batch, and each sequence equals its own run (Mistral: with its window)."""
    ref, ours = _pair(name)
    lens = [7, 12, 4]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in lens]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=False, return_position_ids=True)
    batch = collate([{"input_ids": s.tolist()} for s in seqs])
    batch.pop("labels", None)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    assert set(batch) == {"input_ids", "position_ids"}
    batch["use_cache"] = False  # transformers looks for packed sequences only without a cache (training)
    calls = spy_on(monkeypatch, hf_interface)
    b = ours(**batch).logits[0]
    assert len(calls) == 2 and calls[0]["segment_ids"] is not None and calls[0]["causal"]
    a = ref(**batch).logits[0]
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    start = 0
    for s in seqs:
        alone = ref(input_ids=s[None].to(DEVICE)).logits[0]
        torch.testing.assert_close(b[start:start + len(s)], alone, atol=1e-4, rtol=1e-4)
        start += len(s)
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    for (n1, p1), (_, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=n1: f"{n}: {m}")


def test_include_exclude_select_attention_modules_inside_a_model(monkeypatch):
    """The config switch is model-wide; exclude/include pick layers, the others run eager attention."""
    ref, _ = _pair("llama")
    model = _tiny("llama", "eager").to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    report = hf_triton_attn.patch_model(model, exclude=["model.layers.1.*"])
    assert report.patched == {"hf_interface": ["LlamaForCausalLM"]}
    assert report.skipped == {"model.layers.1.self_attn": "matched by exclude"}
    calls = spy_on(monkeypatch, hf_interface)
    ids, mask = _batch("left")
    real = mask.bool()
    torch.testing.assert_close(_out(model, ids, mask)[real], _out(ref, ids, mask)[real], atol=1e-4, rtol=1e-4)
    assert len(calls) == 1, "layer 0 on the kernel, layer 1 on eager"
    hf_triton_attn.unpatch_model(model)
    assert not any(hasattr(m, hf_interface.EXCLUDED_ATTR) for m in model.modules())
    report = hf_triton_attn.patch_model(model, include=["LlamaAttention"])
    assert report.num_patched == 1 and not report.skipped
    report = hf_triton_attn.patch_model(hf_triton_attn.unpatch_model(model) or model, include=["nothing*"])
    assert report.num_patched == 0 and report.skipped["LlamaForCausalLM"] == "not matched by include"


def test_chunked_prefill_with_a_cache_matches_one_pass(monkeypatch):
    """Prefill in chunks (Sq > 1 queries against a longer cache: bottom-right causal, kv offset) gives the
    logits of one full pass, with dynamic and static caches."""
    _, ours = _pair("llama")
    ids, mask = _batch("right", 21)
    ids, mask = ids[1:], mask[1:]  # one unpadded row: chunks see every earlier key
    full = ours(input_ids=ids).logits
    calls = spy_on(monkeypatch, hf_interface)
    for cache in (transformers.DynamicCache(config=ours.config),
                  transformers.StaticCache(config=ours.config, max_cache_len=32)):
        parts = []
        for lo, hi in ((0, 8), (8, 17), (17, 21)):
            out = ours(input_ids=ids[:, lo:hi], past_key_values=cache, use_cache=True,
                       cache_position=torch.arange(lo, hi, device=DEVICE))
            parts.append(out.logits)
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
    assert any(c["causal"] and c.get("seqused_k") is None for c in calls)
