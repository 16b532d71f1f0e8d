"""Encoder unpadding (``hf_triton_attn/patches/encoder_unpad.py``): BERT-style encoders run their layers on
the packed real tokens with varlen attention. Tiny fp32 models, CPU through the interpreted kernels.

Three models with identical weights: ``eager`` (transformers' own attention), ``padded`` (patched, the
encoder adapter excluded: the interface adapter's padded kernel path) and ``ours`` (patched). Tolerances
come from data (``helpers.assert_pass_rule``): the error of ours against a float64 copy of the model must
be at most twice the eager model's error plus the fp32 floor. Only real positions are compared; ours
writes zeros at padding positions (checked), where eager holds values computed from the pad tokens.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_triton_attn  # noqa: E402  (registers the attention name)
from hf_triton_attn.patches import encoder_layers, encoder_unpad, hf_interface  # noqa: E402

from .helpers import BACKEND, DEVICE, FLOOR, assert_pass_rule, spy_on  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*must be `None` or an integer.*"),
    pytest.mark.filterwarnings("ignore:.*loss_type=None.*"),
]

VOCAB = 97
LAYERS = 2
# Rows of the batch: right padding (odd length), left padding, a single real token, no padding.
LENGTHS = (9, 10, 1, 13)
SEQLEN = 13
LEFT_PADDED = 1
_SMALL = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=2,
              vocab_size=VOCAB, max_position_embeddings=40)


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


# ---------------------------------------------------------------------------------------------
# tiny models and data
# ---------------------------------------------------------------------------------------------

def _config(name: str, **kw):
    T = transformers
    common = dict(_SMALL, **kw)
    if name == "distilbert":
        cfg = T.DistilBertConfig(dim=32, hidden_dim=37, n_layers=LAYERS, n_heads=2, vocab_size=VOCAB,
                                 max_position_embeddings=40, dropout=common.get("hidden_dropout_prob", 0.0),
                                 attention_dropout=common.get("attention_probs_dropout_prob", 0.0))
    else:
        classes = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "xlm_roberta": T.XLMRobertaConfig,
                   "camembert": T.CamembertConfig, "electra": T.ElectraConfig, "data2vec_text": T.Data2VecTextConfig,
                   "ernie": T.ErnieConfig}
        common.setdefault("hidden_dropout_prob", 0.0)
        common.setdefault("attention_probs_dropout_prob", 0.0)
        if name == "electra":
            common["embedding_size"] = 32
        cfg = classes[name](**common)
    cfg._attn_implementation_internal = "eager"
    return cfg


def _model(name: str, cls: str = "Model", seed: int = 0, **kw):
    """A tiny model of family ``name`` on eager attention (``cls``: the head, e.g. ForSequenceClassification)."""
    prefixes = {"bert": "Bert", "roberta": "Roberta", "xlm_roberta": "XLMRoberta", "camembert": "Camembert",
                "electra": "Electra", "data2vec_text": "Data2VecText", "ernie": "Ernie", "distilbert": "DistilBert"}
    torch.manual_seed(seed)
    return getattr(transformers, prefixes[name] + cls)(_config(name, **kw)).to(DEVICE)


def _encoder_class(model) -> type:
    return next(type(m) for m in model.modules() if encoder_unpad._served_class(m) is not None)


def _trio(name: str, cls: str = "Model", **kw):
    """(eager, padded, ours): identical weights; padded = patched with the encoder adapter excluded."""
    eager = _model(name, cls, **kw)
    padded, ours = copy.deepcopy(eager), copy.deepcopy(eager)
    report = hf_triton_attn.patch_model(padded, exclude=[_encoder_class(padded)])
    assert list(report.patched) == ["hf_interface"], str(report)
    report = hf_triton_attn.patch_model(ours)
    assert sorted(report.patched) == ["encoder_unpad", "hf_interface"], str(report)
    return eager, padded, ours


def _oracle(model):
    """A float64 copy on sdpa (eager's fp32 softmax of a float64 model is not a float64 oracle)."""
    oracle = copy.deepcopy(model).double()
    oracle.set_attn_implementation("sdpa")
    return oracle


def _batch(pad_id: int = 0, lengths=LENGTHS, seqlen: int = SEQLEN, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for row, n in enumerate(lengths):
        if row == LEFT_PADDED:
            mask[row, seqlen - n:] = 1
        else:
            mask[row, :n] = 1
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen), generator=g).masked_fill(mask == 0, pad_id)
    return ids.to(DEVICE), mask.to(DEVICE)


def _cu_seqlens(mask) -> list[int]:
    return [0, *torch.cumsum(mask.sum(1), 0).tolist()]


def _hidden(model, ids, mask, **kw):
    return model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


def _assert_unpadded(calls, mask, n: int = LAYERS) -> None:
    """The kernel ran ``n`` times, each on the packed tokens of ``mask`` (varlen, no padding mask)."""
    assert len(calls) == n, f"{len(calls)} kernel calls, expected {n}"
    for c in calls:
        assert c.get("cu_seqlens_q") is not None, "the attention did not get the packed batch"
        assert c["cu_seqlens_q"].tolist() == _cu_seqlens(mask) and c["max_seqlen_q"] == int(mask.sum(1).max())
        assert c.get("attention_mask") is None and c.get("query_mask") is None


def _assert_padded(calls) -> None:
    assert calls and all(c.get("cu_seqlens_q") is None for c in calls), "expected the padded (fallback) path"


# ---------------------------------------------------------------------------------------------
# 1. outputs and gradients
# ---------------------------------------------------------------------------------------------

FAMILIES = ["bert", "roberta", "xlm_roberta", "camembert", "electra", "data2vec_text", "ernie", "distilbert"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_eager_and_the_padded_path(name, monkeypatch):
    """Every registered encoder: real positions pass the rule against a float64 copy (eager fp32 as the
    reference error), for ours and for the padded path; padding positions of ours are exactly 0; the
    kernel ran once per layer on the packed tokens."""
    eager, padded, ours = _trio(name)
    for m in (eager, padded, ours):
        m.eval()
    ids, mask = _batch(pad_id=eager.config.pad_token_id or 0)
    real = mask.bool()
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        got = _hidden(ours, ids, mask)
        _assert_unpadded(calls, mask)
        want, oracle = _hidden(eager, ids, mask), _hidden(_oracle(eager), ids, mask)
        assert_pass_rule(f"{name} unpadded", got[real], want[real], oracle[real], torch.float32)
        assert torch.count_nonzero(got[~real]) == 0, "padding positions must be 0"
        if name in ("bert", "distilbert"):
            other = _hidden(padded, ids, mask)
            assert_pass_rule(f"{name} padded path", other[real], want[real], oracle[real], torch.float32)


def test_a_row_without_real_tokens(monkeypatch):
    """A fully padded row is a zero-length sequence in the packed batch: the other rows match the padded
    path, and the empty row is all zeros."""
    _, padded, ours = _trio("bert")
    ids, mask = _batch(lengths=(5, 0, 7), seqlen=7)
    real = mask.bool()
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        got = _hidden(ours.eval(), ids, mask)
        _assert_unpadded(calls, mask)
        want = _hidden(padded.eval(), ids, mask)
    torch.testing.assert_close(got[real], want[real], atol=FLOOR[torch.float32], rtol=FLOOR[torch.float32])
    assert torch.count_nonzero(got[1]) == 0


def _loss(out, mask, seed: int = 3):
    """A loss over real positions only, with random weights (so every position and feature matters)."""
    real = mask.bool()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out[real].shape, generator=g, dtype=out.dtype).to(out.device)
    return (out[real] * w).sum()


def _grads(model, ids, mask, **kw) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _loss(_hidden(model, ids, mask, **kw), mask).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_gradients_of_every_parameter_match(name, monkeypatch):
    """fp32, train mode without dropout: the gradient of every parameter through a loss on real positions
    passes the rule (float64 oracle, eager as the reference error), and the same parameters get gradients
    (the gather/scatter of unpad/re-pad is exact). BERT: the padded kernel path passes it too."""
    eager, padded, ours = _trio(name)
    ids, mask = _batch(pad_id=eager.config.pad_token_id or 0)
    oracle = _oracle(eager)
    for m in (eager, padded, ours, oracle):
        m.train()
    calls = spy_on(monkeypatch, hf_interface)
    got = _grads(ours, ids, mask)
    _assert_unpadded(calls, mask)
    want, exact = _grads(eager, ids, mask), _grads(oracle, ids, mask)
    assert got.keys() == want.keys()
    for n in want:
        assert_pass_rule(f"{n} unpadded", got[n], want[n], exact[n], torch.float32)
    if name == "bert":
        other = _grads(padded, ids, mask)
        assert other.keys() == want.keys()
        for n in want:
            assert_pass_rule(f"{n} padded", other[n], want[n], exact[n], torch.float32)


def test_output_hidden_states_are_repadded(monkeypatch):
    """``output_hidden_states``: entry 0 is the embedding output exactly as eager's (the padded input the
    adapter packed), the later entries pass the rule at real positions and are 0 at padding positions.
    A selection of layers (a list) keeps transformers' ``None`` for the unselected ones."""
    eager, _, ours = _trio("bert")
    ids, mask = _batch()
    real = mask.bool()
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        _assert_unpadded(calls, mask)
        want = eager(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        oracle = _oracle(eager)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == LAYERS + 1
    assert torch.equal(got[0], want[0])
    for i in range(1, LAYERS + 1):
        assert got[i].shape == want[i].shape
        assert_pass_rule(f"hidden_states[{i}]", got[i][real], want[i][real], oracle[i][real], torch.float32)
        assert torch.count_nonzero(got[i][~real]) == 0
    with torch.no_grad():
        some = ours(input_ids=ids, attention_mask=mask, output_hidden_states=[1]).hidden_states
        some_eager = eager(input_ids=ids, attention_mask=mask, output_hidden_states=[1]).hidden_states
    assert [s is None for s in some] == [s is None for s in some_eager] and any(s is not None for s in some)
    assert all(any(torch.equal(s, g) for g in got) for s in some if s is not None)


# ---------------------------------------------------------------------------------------------
# 2. exact fallbacks
# ---------------------------------------------------------------------------------------------

def _no_varlen(calls) -> None:
    assert all(c.get("cu_seqlens_q") is None for c in calls), "a fallback case got the packed batch"


def test_fallbacks_run_the_original_forward_exactly(monkeypatch):
    """Where unpadding is not exact or not servable, the encoder runs its original forward: outputs are
    bitwise those of the padded path (or of eager where the model is not switched), and no kernel call
    gets the packed batch. Cases: no padding, output_attentions, a 4-D mask, torch.compile tracing, an
    unknown argument (warned once), an excluded layer, a model not switched to hf_triton_attn."""
    _, padded, ours = _trio("bert")
    for m in (padded, ours):
        m.eval()
    ids, mask = _batch(lengths=(5, 7), seqlen=7)
    calls = spy_on(monkeypatch, hf_interface)

    def same(*args, **kw) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the interface warns about its own eager fallbacks
            a, b = ours(*args, **kw), padded(*args, **kw)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        _no_varlen(calls)

    same(input_ids=ids, attention_mask=torch.ones_like(mask))  # no padding: the encoder gets mask None
    assert len(calls) == 2 * LAYERS
    same(input_ids=ids, attention_mask=mask, output_attentions=True)  # eager attention, with weights
    same(input_ids=ids, attention_mask=mask.bool()[:, None, None, :].expand(-1, 1, 7, -1))  # a 4-D mask
    with monkeypatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        same(input_ids=ids, attention_mask=mask)

    encoder_unpad._warned.clear()
    with torch.no_grad():
        emb, key_mask = ours.embeddings(input_ids=ids), mask.bool()
        with pytest.warns(UserWarning, match="encoder_unpad: unsupported argument.s. extra_flag"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*hf_triton_attn: unsupported.*")
                got = ours.encoder(emb, attention_mask=key_mask, extra_flag=1).last_hidden_state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(got, padded.encoder(emb, attention_mask=key_mask, extra_flag=1).last_hidden_state)
    _no_varlen(calls)

    # an excluded attention module: its eager attention knows no cu_seq_lens, so the encoder keeps padding
    excluded, twin = copy.deepcopy(padded), copy.deepcopy(padded)
    hf_triton_attn.unpatch_model(excluded)
    hf_triton_attn.unpatch_model(twin)
    report = hf_triton_attn.patch_model(excluded, exclude=["encoder.layer.1.*"])
    assert "encoder_unpad" in report.patched
    hf_triton_attn.patch_model(twin, exclude=["encoder.layer.1.*", "BertEncoder"])
    calls.clear()
    with torch.no_grad():
        assert torch.equal(_hidden(excluded.eval(), ids, mask), _hidden(twin.eval(), ids, mask))
    assert len(calls) == 2  # per model: layer 0 on the padded kernel path, layer 1 on eager
    _no_varlen(calls)

    # only the encoder patched: the model still runs eager attention, and so does the encoder
    eager_model = copy.deepcopy(twin)
    hf_triton_attn.unpatch_model(eager_model)
    reference = copy.deepcopy(eager_model)
    assert hf_triton_attn.patch_model(eager_model.encoder).patched == {"encoder_unpad": ["BertEncoder"]}
    calls.clear()
    with torch.no_grad():
        assert torch.equal(_hidden(eager_model, ids, mask), _hidden(reference, ids, mask))
    assert not calls


def test_a_changed_module_tree_is_seen_after_the_first_forward(monkeypatch):
    """The attention modules found inside the encoder are cached between forwards (walking the module
    tree cost 225 us per call for BERT-base); adding, replacing or deleting layers after a forward must
    still change what the adapter decides. An appended layer whose attention is excluded (it runs
    eager attention, which knows no packed batch), or such a self-attention put in place of a patched
    one, sends the call to the original forward (bitwise the padded twin's output); deleting that
    layer again brings the unpadded path back."""
    from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

    _, padded, ours = _trio("bert")
    for m in (padded, ours):
        m.eval()
    ids, mask = _batch()
    calls = spy_on(monkeypatch, hf_interface)

    def run(expect_unpadded: bool, layers: int = LAYERS) -> None:
        calls.clear()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _hidden(ours, ids, mask)
            if expect_unpadded:
                _assert_unpadded(calls, mask, layers)
            else:
                _no_varlen(calls)
                assert torch.equal(got, _hidden(padded, ids, mask))

    run(expect_unpadded=True)
    torch.manual_seed(5)
    extra = BertLayer(ours.config).to(DEVICE).eval()
    extra.attention.self.__dict__[hf_interface.EXCLUDED_ATTR] = True  # what patch_model(exclude=...) marks
    for m in (ours, padded):  # ModuleList.append registers a module
        m.encoder.layer.append(copy.deepcopy(extra))
    run(expect_unpadded=False)
    for m in (ours, padded):  # ModuleList.__delitem__ registers nothing: it rebuilds layer._modules
        del m.encoder.layer[-1]
    run(expect_unpadded=True)
    torch.manual_seed(6)
    eager_self = BertSelfAttention(ours.config).to(DEVICE).eval()
    eager_self.__dict__[hf_interface.EXCLUDED_ATTR] = True
    for m in (ours, padded):  # a submodule replaced two levels below the encoder's children
        m.encoder.layer[0].attention.self = copy.deepcopy(eager_self)
    run(expect_unpadded=False)


def test_a_decoder_keeps_the_padded_path(monkeypatch):
    """``is_decoder`` (causal self-attention, a cache): the original forward, bitwise the padded path."""
    eager, padded, ours = _trio("bert", "LMHeadModel", is_decoder=True)
    ids, mask = _batch(lengths=(5, 7), seqlen=7)
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
        b = padded(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(a, b)
    _assert_padded(calls)


def test_torch_compile_fullgraph_takes_the_padded_path(monkeypatch):
    """The token count is data-dependent, so a fullgraph trace of the encoder takes the padded path
    (declared ``torch_compile=False``; nothing breaks the graph) and matches eager-mode unpadding."""
    torch._dynamo.reset()
    _, padded, ours = _trio("bert")
    ours.eval()
    ids, mask = _batch(lengths=(5, 7), seqlen=7)
    with torch.no_grad():
        emb = ours.embeddings(input_ids=ids)
        want = ours.encoder(emb, attention_mask=mask.bool()).last_hidden_state
        compiled = torch.compile(lambda e, m: ours.encoder(e, attention_mask=m).last_hidden_state,
                                 backend="eager", fullgraph=True)
        got = compiled(emb, mask.bool())
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert encoder_unpad.ENCODER_UNPAD.support.torch_compile is False


# ---------------------------------------------------------------------------------------------
# 3. patch_model / unpatch_model
# ---------------------------------------------------------------------------------------------

def test_patch_unpatch_round_trip_copies_and_pickles(tmp_path, monkeypatch):
    """patch_model applies the encoder adapter with the interface adapter (both reported), twice is a
    no-op, parameters/buffers/state_dict keys never change; deepcopy and torch.save of a patched model work
    (the copy runs its own weights); unpatch_model restores exactly (bitwise-identical outputs, no instance
    forward left); save_pretrained of the patched model writes the unpatched model's files."""
    eager = _model("bert", "ForSequenceClassification").eval()
    model = copy.deepcopy(eager)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = hf_triton_attn.patch_model(model, strict=True)
    assert report.patched == {"hf_interface": ["BertForSequenceClassification"], "encoder_unpad": ["bert.encoder"]}
    assert not report.skipped
    again = hf_triton_attn.patch_model(model)
    assert again.num_patched == 0 and again.already_patched == ["BertForSequenceClassification", "bert.encoder"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    ids, mask = _batch()
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    _assert_unpadded(calls, mask)

    twin = copy.deepcopy(model)
    assert twin.bert.encoder.forward.module is twin.bert.encoder
    buf = io.BytesIO()
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, logits)
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
        twin.bert.encoder.layer[1].output.dense.weight.zero_()  # the copy's own weights, not the original's
        assert not torch.equal(twin(input_ids=ids, attention_mask=mask).logits, logits)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    assert sum(c.get("cu_seqlens_q") is not None for c in calls) == 4 * LAYERS

    model.save_pretrained(tmp_path / "patched")
    eager.save_pretrained(tmp_path / "plain")
    for f in sorted(p.name for p in (tmp_path / "plain").iterdir()):
        assert (tmp_path / "patched" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f

    hf_triton_attn.unpatch_model(model)
    assert "forward" not in model.bert.encoder.__dict__ and model.config._attn_implementation == "eager"
    with torch.no_grad():
        restored = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(restored, eager(input_ids=ids, attention_mask=mask).logits)
    hf_triton_attn.unpatch_model(twin)
    assert "forward" not in twin.bert.encoder.__dict__


def test_include_exclude_select_the_encoder(monkeypatch):
    """exclude=<encoder class or name> keeps the padded interface path; include=<attention class> selects
    the attention modules, and the encoder that holds them is unpadded."""
    base = _model("bert").eval()
    m1 = copy.deepcopy(base)
    report = hf_triton_attn.patch_model(m1, exclude=["encoder"])
    assert report.patched == {"hf_interface": ["BertModel"]} and report.skipped == {"encoder": "matched by exclude"}
    m2 = copy.deepcopy(base)
    report = hf_triton_attn.patch_model(m2, include=["BertSelfAttention"])
    assert report.patched == {"hf_interface": ["BertModel"], "encoder_unpad": ["encoder"]}, str(report)
    ids, mask = _batch()
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        _hidden(m2, ids, mask)
        _assert_unpadded(calls, mask)
        calls.clear()
        _hidden(m1, ids, mask)
        _assert_padded(calls)


# ---------------------------------------------------------------------------------------------
# 4. training: checkpointing, dropout, Trainer, PEFT
# ---------------------------------------------------------------------------------------------

def test_gradient_checkpointing(monkeypatch):
    """``gradient_checkpointing_enable()`` with ``use_reentrant`` False (transformers' default) and True:
    every gradient equals the run without checkpointing (same kernel, same packing: to the fp32 floor),
    and the kernel ran forward + recomputation per layer on the packed tokens."""
    _, _, ours = _trio("bert")
    ids, mask = _batch()
    want = _grads(ours.train(), ids, mask)
    for reentrant in (False, True):
        ckpt = copy.deepcopy(ours)
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ckpt.train()
        calls = spy_on(monkeypatch, hf_interface)
        got = _grads(ckpt, ids, mask)
        _assert_unpadded(calls, mask, n=2 * LAYERS)
        assert got.keys() == want.keys()
        for n in want:
            scale = max(float(want[n].abs().max()), 1.0)
            assert float((got[n] - want[n]).abs().max()) <= FLOOR[torch.float32] * scale, (reentrant, n)


def test_dropout_in_train_mode(monkeypatch):
    """Attention dropout 0.3 in train mode reaches the varlen kernel; the same seed reproduces the output
    bitwise, another seed changes it; statistically, ours deviates from the eval-mode output as much as
    the padded path does (their masks differ: the kernel draws them from different coordinates)."""
    _, padded, ours = _trio("bert", attention_probs_dropout_prob=0.3)
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        clean = _hidden(ours.eval(), ids, mask)[real]
        ours.train()
        padded.train()
        calls = spy_on(monkeypatch, hf_interface)
        runs = {}
        for key, model, seed in (("a", ours, 7), ("a2", ours, 7), ("b", ours, 8), ("p", padded, 9)):
            torch.manual_seed(seed)
            runs[key] = _hidden(model, ids, mask)[real]
    unpadded = [c for c in calls if c.get("cu_seqlens_q") is not None]
    assert len(unpadded) == 3 * LAYERS and all(c["dropout_p"] == pytest.approx(0.3) for c in unpadded)
    assert torch.equal(runs["a"], runs["a2"]) and not torch.equal(runs["a"], runs["b"])
    ours_dev = float((torch.stack([runs["a"], runs["b"]]) - clean).abs().mean())
    padded_dev = float((runs["p"] - clean).abs().mean())
    assert 0.5 * padded_dev < ours_dev < 2 * padded_dev, (ours_dev, padded_dev)


class _ClsData(torch.utils.data.Dataset):
    """Random lengths 1..SEQLEN (padded per batch by the collator), labels from the first token."""

    def __init__(self, n: int = 12):
        g = torch.Generator().manual_seed(2)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(1, SEQLEN + 1, (1,), generator=g))
            ids = torch.randint(3, VOCAB, (length,), generator=g)
            self.items.append({"input_ids": ids.tolist(), "labels": int(ids[0] % 2)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _train(model, tmp_path, tag: str, steps: int = 2) -> list[float]:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / tag), per_device_train_batch_size=4, max_steps=steps, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=DEVICE == "cpu", save_strategy="no",
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)

    def collate(features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}

    trainer = transformers.Trainer(model=model, args=args, train_dataset=_ClsData(), data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_short_run_matches_eager(tmp_path, monkeypatch):
    """A 2-step Trainer fine-tune of BertForSequenceClassification on padded batches of random lengths:
    the per-step losses of ours match eager's within 2x the sdpa-vs-eager gap (another exact attention,
    same seeds) + the fp32 floor, no fallback warned, and every step ran the kernel on packed tokens."""
    eager = _model("bert", "ForSequenceClassification")
    sdpa, ours = copy.deepcopy(eager), copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    assert "encoder_unpad" in hf_triton_attn.patch_model(ours).patched
    ref, alt = _train(eager, tmp_path, "eager"), _train(sdpa, tmp_path, "sdpa")
    calls = spy_on(monkeypatch, hf_interface)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # any fallback warning fails loudly here
        got = _train(ours, tmp_path, "ours")
    assert len(got) == len(ref) == 2
    assert len(calls) == 2 * LAYERS and sum(c.get("cu_seqlens_q") is not None for c in calls) >= LAYERS
    bound = 2 * max(abs(a - b) for a, b in zip(alt, ref)) + FLOOR[torch.float32] * max(ref)
    assert max(abs(a - b) for a, b in zip(got, ref)) <= bound, (got, ref, alt)


def test_peft_lora_gradients_pass_the_rule(monkeypatch):
    """PEFT LoRA (r=4 on query/value, non-zero B) patched after ``get_peft_model``: the report names the
    wrapped model's encoder, the lean layers run (LoRA wraps leaves), and every LoRA gradient passes the
    rule (float64 oracle, eager reference)."""
    peft = pytest.importorskip("peft")
    base = _model("bert").train()

    def lora(model):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                              init_lora_weights=False)
        torch.manual_seed(11)
        return peft.get_peft_model(copy.deepcopy(model), cfg)

    eager, ours, oracle = lora(base), lora(base), lora(base).double()
    report = hf_triton_attn.patch_model(ours)
    assert report.patched["encoder_unpad"] == ["base_model.model.encoder"], str(report)
    oracle.base_model.model.set_attn_implementation("sdpa")
    ids, mask = _batch()
    calls = spy_on(monkeypatch, hf_interface)
    runs = _lean_runs(monkeypatch)
    got = _grads(ours, ids, mask)
    _assert_unpadded(calls, mask)
    assert runs == [LAYERS], "LoRA layers are leaves: the lean runner calls them as modules"
    want, exact = _grads(eager, ids, mask), _grads(oracle, ids, mask)
    assert got.keys() == want.keys() and all("lora_" in n for n in got)
    for n in want:
        assert_pass_rule(n, got[n], want[n], exact[n], torch.float32)
    hf_triton_attn.unpatch_model(ours)
    assert "forward" not in ours.base_model.model.encoder.__dict__


# ---------------------------------------------------------------------------------------------
# 5. lean layers (encoder_layers.py): the same leaf modules without transformers' layer modules
# ---------------------------------------------------------------------------------------------

# transformers versions the lean runner was reviewed against: their layers must run lean
REVIEWED = ("5.17.0", "5.24.0")


def _lean_runs(monkeypatch) -> list:
    """One entry per forward that ran the lean runner."""
    runs: list = []
    real = encoder_layers._Runner.__call__

    def spy(self, *args):
        runs.append(len(self.structure.layers))
        return real(self, *args)

    monkeypatch.setattr(encoder_layers._Runner, "__call__", spy)
    return runs


def _run(model, ids, mask, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and parameter gradients of one forward + backward, torch's generator seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = _hidden(model, ids, mask)
    _loss(out, mask).backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _idle_hook(module, args):
    return None


@pytest.mark.parametrize("name", FAMILIES)
def test_lean_layers_are_bitwise_transformers_layers(name, monkeypatch):
    """Every family (DistilBERT included), eval and train mode with hidden and attention dropout: the lean runner's
    output and every parameter gradient are bitwise those of transformers' own layers on the same packed
    tokens (forced by an idle pre-hook on a composite module), with the same seed. The lean runner ran
    exactly when the family's source fingerprint is known, which it must be on a reviewed version."""
    _, _, ours = _trio(name, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    encoder = next(m for m in ours.modules() if encoder_unpad._served_class(m) is not None)
    family = encoder_layers.FAMILIES[type(encoder).__name__]
    known = encoder_layers.source_fingerprint(type(encoder), family) in encoder_layers._KNOWN_SOURCES
    if transformers.__version__ in REVIEWED:
        assert known, f"{name}: the lean runner was reviewed against transformers {transformers.__version__}"
    ids, mask = _batch(pad_id=ours.config.pad_token_id or 0)
    runs = _lean_runs(monkeypatch)
    calls = spy_on(monkeypatch, hf_interface)
    for train in (False, True):
        ours.train(train)
        lean = _run(ours, ids, mask, seed=5)
        assert runs == ([LAYERS] if known else []), runs
        handle = encoder.layer[0].register_forward_pre_hook(_idle_hook)
        layers = _run(ours, ids, mask, seed=5)
        handle.remove()
        assert len(runs) == (1 if known else 0), "a hook on a composite module must send the layers to transformers"
        _assert_unpadded(calls, mask, n=2 * LAYERS)
        assert torch.equal(lean[0], layers[0]), f"{name} train={train}: outputs differ"
        assert lean[1].keys() == layers[1].keys() and len(lean[1]) > 0
        for n in lean[1]:
            assert torch.equal(lean[1][n], layers[1][n]), f"{name} train={train}: gradient of {n} differs"
        if train:  # dropout drew: another seed changes the output
            assert not torch.equal(lean[0], _run(ours, ids, mask, seed=6)[0])
        runs.clear()
        calls.clear()


def test_lean_layers_step_aside_where_the_composites_matter(monkeypatch):
    """transformers' layers run (bitwise the lean output where both apply) with a forward hook on a layer,
    a global module hook, a layer replaced by a subclass, an unknown source fingerprint, a forward set on
    a layer instance (accelerate's hooks), gradient checkpointing in training, and output_hidden_states
    (collected by hooks on the layers). A hook or an instance forward on a leaf module keeps the lean
    runner, and its effect: the same output as transformers' layers with it, the same [1, T, E] input."""
    _, _, ours = _trio("bert")
    ours.eval()
    ids, mask = _batch()
    runs = _lean_runs(monkeypatch)
    with torch.no_grad():
        want = _hidden(ours, ids, mask)
    assert runs == [LAYERS]

    def layers_run(model=ours, **kw) -> torch.Tensor:
        runs.clear()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, **kw)
        assert not runs, "expected transformers' layers"
        return out.last_hidden_state

    handle = ours.encoder.layer[1].register_forward_hook(lambda m, a, o: None)
    assert torch.equal(layers_run(), want)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert torch.equal(layers_run(), want)
    finally:
        handle.remove()

    class Layer(type(ours.encoder.layer[0])):
        pass

    sub = copy.deepcopy(ours)
    runs.clear()
    with torch.no_grad():
        _hidden(sub, ids, mask)
    assert runs == [LAYERS]
    sub.encoder.layer[1].__class__ = Layer  # after a lean forward: a subclass may override a forward,
    assert torch.equal(layers_run(sub), want)  # and a __class__ assignment registers no module

    with monkeypatch.context() as mp:
        mp.setattr(encoder_layers, "_KNOWN_SOURCES", frozenset())
        mp.setattr(encoder_layers, "_class_verdicts", {})
        mp.setattr(encoder_layers, "_structures", weakref.WeakKeyDictionary())
        assert torch.equal(layers_run(), want)

    # accelerate's hooks replace the instance's forward (device placement, offloaded weights)
    layer = ours.encoder.layer[0]
    layer.forward = functools.partial(type(layer).forward, layer)
    assert torch.equal(layers_run(), want)
    del layer.forward

    hidden = layers_run(output_hidden_states=True)
    assert torch.equal(hidden, want)

    ckpt = copy.deepcopy(ours)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    layers_run(ckpt)

    # a leaf hook (scales the query projection): lean and transformers' layers apply it alike
    query = ours.encoder.layer[0].attention.self.query
    seen: list = []

    def scale(m, args, out):
        seen.append(tuple(args[0].shape))
        return out * 1.5

    leaf = query.register_forward_hook(scale)
    runs.clear()
    with torch.no_grad():
        lean = _hidden(ours, ids, mask)
    assert runs == [LAYERS]
    handle = ours.encoder.layer[0].attention.self.register_forward_pre_hook(_idle_hook)
    layers = layers_run()
    handle.remove()
    leaf.remove()
    assert torch.equal(lean, layers) and not torch.equal(lean, want)
    total = int(mask.sum())
    assert seen == [(1, total, ours.config.hidden_size)] * 2, "a hooked leaf sees transformers' [1, T, E]"
    # an instance-level forward on a leaf (accelerate) is honoured: the leaf is called as a module
    query.forward = lambda x: torch.nn.Linear.forward(query, x) * 1.5
    runs.clear()
    with torch.no_grad():
        assert torch.equal(_hidden(ours, ids, mask), lean)
    assert runs == [LAYERS]
    del query.forward
