"""Training on the patched attention: ``transformers.Trainer`` fine-tunes, PEFT LoRA, gradient
checkpointing and save/load round trips, each against the same model on its eager attention with
identical weights and seeds. Tiny configs; on CPU the kernels run through Triton's interpreter.

Tolerances come from data, as in ``helpers.assert_pass_rule``: where an exact comparison is possible
the kernel's error against a float64 copy of the model must be at most twice the error of the eager
fp32 (or fp16) model against it, plus the dtype's floor times the output scale. Loss curves of two
fp32 runs are compared with the same rule, the sdpa run standing in for "another exact attention".
With dropout on, the two runs draw different masks; their gap is compared with the gap between two
eager runs that differ only in the dropout seed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_triton_attn  # noqa: E402  (registers the attention name)
from hf_triton_attn.patches import hf_interface  # noqa: E402

from .helpers import BACKEND, DEVICE, FLOOR, ON_GPU, assert_pass_rule, spy_on  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*must be `None` or an integer.*"),
    pytest.mark.filterwarnings("ignore:.*loss_type=None.*"),
]

VOCAB = 97
LAYERS = 2


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


# ---------------------------------------------------------------------------------------------
# tiny models and data
# ---------------------------------------------------------------------------------------------

def _gpt2(dropout: float = 0.0):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=1, eos_token_id=2, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def _bert_classifier(dropout: float = 0.0):
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64, num_labels=2,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg)


def _llama(attention_dropout: float = 0.0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   attention_dropout=attention_dropout, pad_token_id=0, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


def _bert(dropout: float = 0.0):
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                  attn_implementation="eager")
    return transformers.BertModel(cfg)


def _copies(factory, n: int, seed: int = 0, **kwargs) -> list:
    """``n`` models with identical weights (the first one's), on DEVICE."""
    torch.manual_seed(seed)
    first = factory(**kwargs).to(DEVICE)
    rest = [copy.deepcopy(first) for _ in range(n - 1)]
    return [first, *rest]


class _LMData(torch.utils.data.Dataset):
    """Arithmetic progressions mod VOCAB: the next token depends on the previous two, through attention."""

    def __init__(self, n: int = 48, length: int = 32):
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 6, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _ClsData(torch.utils.data.Dataset):
    """Random lengths (padded per batch), balanced labels: class 1 draws 85% of its tokens from the lower
    half of the vocabulary, class 0 15%. Small (16 items) so that 20 steps of batch 2 clearly learn it."""

    def __init__(self, n: int = 16, lo: int = 5, hi: int = 32):
        g = torch.Generator().manual_seed(2)
        self.items = []
        for i in range(n):
            length = int(torch.randint(lo, hi + 1, (1,), generator=g))
            label = i % 2
            low = torch.rand(length, generator=g) < (0.85 if label else 0.15)
            ids = torch.where(low, torch.randint(3, 50, (length,), generator=g),
                              torch.randint(50, VOCAB, (length,), generator=g))
            self.items.append((ids, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, label = self.items[i]
        return {"input_ids": ids, "labels": label}


def _pad_collate(features):
    """Right-pads a batch to its longest sequence (pad id 0) with a 0/1 attention mask."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    mask = torch.zeros(len(features), length, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])] = f["input_ids"]
        mask[i, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def _train(model, dataset, tmp_path, *, seed: int, steps: int, collate=None, lr: float = 3e-3) -> list[float]:
    """A Trainer run of ``steps`` optimizer steps; the per-step training losses from its log history."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run{seed}"), per_device_train_batch_size=2, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=not ON_GPU, save_strategy="no",
        seed=seed, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps
    return losses


_TASKS = {
    "gpt2": (_gpt2, _LMData, None),
    "bert-cls": (_bert_classifier, _ClsData, _pad_collate),
}
STEPS = 20


def _mean(xs) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# 1. Trainer fine-tunes
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(_TASKS))
def test_trainer_losses_match_eager_without_dropout(task, tmp_path, monkeypatch):
    """Per-step losses of a Trainer fine-tune on the patched model equal the eager run's to fp32 rounding.

    Bound (data-derived): 2 x the largest per-step gap between the sdpa and eager runs (another exact
    attention, same seeds) + FLOOR[fp32] x the loss scale. Regression: Trainer passes
    ``num_items_in_batch`` through the model's ``**kwargs`` into every attention call, and the adapter
    treated it as an unknown argument, so every Trainer step silently ran the eager fallback (the kernel
    never trained); the spy below counts the kernel calls."""
    factory, data, collate = _TASKS[task]
    eager, sdpa, ours = _copies(factory, 3)
    sdpa.set_attn_implementation("sdpa")
    report = hf_triton_attn.patch_model(ours)
    # BERT's encoder is also unpadded (encoder_unpad): padded batches reach the kernel packed (varlen)
    assert report.num_patched == (2 if task == "bert-cls" else 1), str(report)
    dataset = data()
    ref = _train(eager, dataset, tmp_path, seed=0, steps=STEPS, collate=collate)
    alt = _train(sdpa, dataset, tmp_path, seed=0, steps=STEPS, collate=collate)
    calls = spy_on(monkeypatch, hf_interface)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an eager fallback warns: make it fail loudly here
        got = _train(ours, dataset, tmp_path, seed=0, steps=STEPS, collate=collate)
    assert len(calls) == STEPS * LAYERS, f"the kernel ran {len(calls)} times, expected {STEPS * LAYERS}"
    assert all(c["dropout_p"] == 0.0 for c in calls)
    if collate is not None:  # padded batches of random lengths reach the kernel packed (BERT: encoder_unpad)
        assert sum(c.get("cu_seqlens_q") is not None for c in calls) >= STEPS * LAYERS // 2
    assert _mean(ref[-5:]) < _mean(ref[:5]) - 0.2, f"the task did not train: {ref}"
    bound = 2 * max(abs(a - b) for a, b in zip(alt, ref)) + FLOOR[torch.float32] * max(ref)
    gaps = [abs(a - b) for a, b in zip(got, ref)]
    assert max(gaps) <= bound, f"loss gap {max(gaps):.3e} > {bound:.3e}; eager {ref}, ours {got}"
    # the trained weights agree too (a wrong backward shows here first)
    for (name, p_ref), (_, p_alt), (_, p_got) in zip(eager.named_parameters(), sdpa.named_parameters(),
                                                     ours.named_parameters()):
        err, err_alt = float((p_got - p_ref).detach().abs().max()), float((p_alt - p_ref).detach().abs().max())
        scale = max(float(p_ref.detach().abs().max()), 1.0)
        assert err <= 2 * err_alt + FLOOR[torch.float32] * scale, f"{name}: {err:.3e} vs sdpa {err_alt:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(_TASKS))
def test_trainer_with_dropout_follows_the_eager_trend(task, tmp_path, monkeypatch):
    """With dropout 0.1 (attention and hidden) the runs draw different masks, so losses differ step by
    step. Both must decrease, and over the last 8 steps the mean |ours - eager| must stay within 3x the
    same statistic between two eager runs that differ only in the dropout seed (the noise of dropout
    itself), plus the fp32 floor."""
    factory, data, collate = _TASKS[task]
    eager, eager_other_seed, ours = _copies(factory, 3, dropout=0.1)
    hf_triton_attn.patch_model(ours)
    dataset = data()
    ref = _train(eager, dataset, tmp_path, seed=0, steps=STEPS, collate=collate)
    noise_run = _train(eager_other_seed, dataset, tmp_path, seed=1, steps=STEPS, collate=collate)
    calls = spy_on(monkeypatch, hf_interface)
    got = _train(ours, dataset, tmp_path, seed=0, steps=STEPS, collate=collate)
    assert len(calls) == STEPS * LAYERS and all(c["dropout_p"] == pytest.approx(0.1) for c in calls)
    for name, run in (("eager", ref), ("ours", got)):
        assert _mean(run[-5:]) < _mean(run[:5]) - 0.2, f"{name} run did not train: {run}"
    k = 8
    noise = _mean([abs(a - b) for a, b in zip(noise_run[-k:], ref[-k:])])
    gap = _mean([abs(a - b) for a, b in zip(got[-k:], ref[-k:])])
    band = 3 * noise + FLOOR[torch.float32] * max(ref)
    assert gap <= band, (f"mean |ours - eager| {gap:.4f} over the last {k} steps > band {band:.4f} "
                         f"(seed noise {noise:.4f})")


# ---------------------------------------------------------------------------------------------
# shared: one right-padded causal-LM batch, and forward + backward with the pass rule
# ---------------------------------------------------------------------------------------------

def _lm_batch(length: int = 13):
    """Right padding, as training collators pad. (Left padding gives fully masked pad rows, where the
    float64 oracle cannot be HF's eager attention: it takes the softmax in float32, and the float64
    mask minimum becomes -inf there, so those rows turn NaN and spread to the real ones.)"""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, length - 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def _oracle(model):
    """A float64 copy of ``model`` on sdpa (exact float64 math; HF's eager attention takes its softmax
    in float32, which would leave the "oracle" with fp32 probabilities)."""
    twin = copy.deepcopy(model).double()
    inner = next(m for m in twin.modules() if isinstance(m, transformers.PreTrainedModel))
    inner.set_attn_implementation("sdpa")
    return twin


def _lm_step(model, ids, mask, labels, *, backward: bool = True):
    """Loss, logits at real positions and every parameter gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    if backward:
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.detach().reshape(1), "logits": out.logits.detach()[mask.bool()], **grads}


def _assert_step_matches(ours: dict, eager: dict, oracle: dict, dtype: torch.dtype) -> None:
    assert ours.keys() == eager.keys() == oracle.keys(), "different parameters received gradients"
    for name in eager:
        assert_pass_rule(name, ours[name], eager[name], oracle[name], dtype)


def _peft():
    return pytest.importorskip("peft")


def _lora(model, seed: int = 0):
    """LoRA r=4 on q_proj/v_proj with a non-zero B (init_lora_weights=False), so the adapters matter."""
    peft = _peft()
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


# ---------------------------------------------------------------------------------------------
# 2. PEFT LoRA
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["patch-then-wrap", "wrap-then-patch"])
def test_lora_forward_backward_match_eager(order, monkeypatch):
    """A LoRA-wrapped tiny Llama, patched before or after ``get_peft_model``: loss, logits and every LoRA
    gradient pass the pass rule against the float64 copy, with the unpatched PEFT model as the
    same-dtype reference; only LoRA parameters get gradients; unpatching restores eager."""
    base, base_copy = _copies(_llama, 2)
    ref = _lora(base_copy)
    oracle = _oracle(ref)
    if order == "patch-then-wrap":
        report = hf_triton_attn.patch_model(base)
        ours = _lora(base)
        assert report.patched == {"hf_interface": ["LlamaForCausalLM"]}, str(report)
        again = hf_triton_attn.patch_model(ours)
        assert again.num_patched == 0 and again.already_patched == ["base_model.model"], str(again)
    else:
        ours = _lora(base)
        report = hf_triton_attn.patch_model(ours)
        assert report.patched == {"hf_interface": ["base_model.model"]}, str(report)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert ours.base_model.model.config._attn_implementation == "hf_triton_attn"
    batch = _lm_batch()
    calls = spy_on(monkeypatch, hf_interface)
    got = _lm_step(ours, *batch)
    assert len(calls) == LAYERS
    want, want64 = _lm_step(ref, *batch), _lm_step(oracle, *batch)
    assert {n for n in got if n not in ("loss", "logits")} == {
        n for n, p in ours.named_parameters() if p.requires_grad} and all("lora_" in n for n in got if "." in n)
    _assert_step_matches(got, want, want64, torch.float32)
    # unpatch the object that was patched: back to eager, the kernel no longer runs
    hf_triton_attn.unpatch_model(base if order == "patch-then-wrap" else ours)
    assert ours.base_model.model.config._attn_implementation == "eager"
    n = len(calls)
    ours(input_ids=batch[0], attention_mask=batch[1])
    assert len(calls) == n


def test_unpatch_through_a_peft_wrapper():
    """Regression: ``unpatch_model(peft_model)`` after ``patch_model(base)`` raised AttributeError
    ("'PeftModel' object has no attribute '_hf_triton_attn_undo'"): patching.py reads its private
    attributes with getattr/hasattr, which PeftModel/LoraModel forward to the wrapped model, so the
    base's undo list was found (and emptied) through the wrapper and then deleted from the wrapper,
    where it never was. Unpatching the wrapper must restore everything patched inside it."""
    base, = _copies(_llama, 1)
    hf_triton_attn.patch_model(base)
    wrapped = _lora(base)
    hf_triton_attn.unpatch_model(wrapped)
    assert base.config._attn_implementation == "eager"
    hf_triton_attn.unpatch_model(base)  # nothing left to undo: a no-op, not an error
    assert hf_triton_attn.patch_model(wrapped).patched == {"hf_interface": ["base_model.model"]}


def test_merge_and_unload_keeps_the_patch_and_unpatches(monkeypatch):
    """``merge_and_unload()`` of a patched PeftModel returns the base model, still on the kernel (the
    config is shared) with outputs equal to the eager merged model's. Regression: ``unpatch_model`` on
    that merged model was a silent no-op (the undo records live on the PeftModel that was patched), so
    it stayed patched; unpatching it must restore eager."""
    base, base_copy = _copies(_llama, 2)
    ours, ref = _lora(base), _lora(base_copy)
    hf_triton_attn.patch_model(ours)
    merged, ref_merged = ours.merge_and_unload(), ref.merge_and_unload()
    oracle = _oracle(ref_merged)
    assert merged.config._attn_implementation == "hf_triton_attn"
    batch = _lm_batch()
    calls = spy_on(monkeypatch, hf_interface)
    got = _lm_step(merged, *batch, backward=False)  # merging froze every weight: forward only
    assert len(calls) == LAYERS
    _assert_step_matches(got, _lm_step(ref_merged, *batch, backward=False), _lm_step(oracle, *batch, backward=False),
                         torch.float32)
    hf_triton_attn.unpatch_model(merged)
    assert merged.config._attn_implementation == "eager", "unpatch_model(merged) left the model patched"


def test_lora_on_a_half_precision_base_keeps_fp32_adapters(monkeypatch):
    """PEFT's default ``autocast_adapter_dtype=True`` keeps LoRA weights in fp32 on an fp16 base; LoRA
    layers cast their result back to the base dtype, so q, k and v reach the kernel as fp16 (one dtype,
    no mixed-dtype call). Loss, logits and the fp32 LoRA gradients pass the fp16 pass rule against the
    float64 copy, with the eager fp16 PEFT model as the reference. (CPU: the interpreter runs fp16.)"""
    base, base_copy = _copies(_llama, 2)
    base.half()
    base_copy.half()
    ours, ref = _lora(base), _lora(base_copy)
    lora_dtypes = {p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    base_dtypes = {p.dtype for n, p in ours.named_parameters() if "lora_" not in n}
    assert lora_dtypes == {torch.float32} and base_dtypes == {torch.float16}
    oracle = _oracle(ref)
    hf_triton_attn.patch_model(ours)
    seen = []
    real = hf_interface.flash_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(hf_interface, "flash_attention", spy)
    batch = _lm_batch()
    got = _lm_step(ours, *batch)
    assert seen == [(torch.float16,) * 3] * LAYERS
    _assert_step_matches(got, _lm_step(ref, *batch), _lm_step(oracle, *batch), torch.float16)


# ---------------------------------------------------------------------------------------------
# 3. Gradient checkpointing
# ---------------------------------------------------------------------------------------------

def _bert_step(model, ids, mask):
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    hidden[real].pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"hidden": hidden.detach()[real], **grads}


def _bert_batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 19), generator=g)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, 11:] = 0  # right padding
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("name,reentrant", [("llama", False), ("llama", True), ("bert", False)])
def test_gradient_checkpointing_matches_eager(name, reentrant, monkeypatch):
    """``gradient_checkpointing_enable()`` on a tiny Llama / BERT in training mode (dropout 0): outputs and
    every gradient pass the pass rule (float64 oracle without checkpointing, eager fp32 with checkpointing
    as the reference), and the kernel runs twice per layer: the forward and the recomputation."""
    factory = _llama if name == "llama" else _bert
    eager, ours = _copies(factory, 2)
    oracle = _oracle(eager).train()
    for m in (eager, ours):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
    hf_triton_attn.patch_model(ours)
    step = (lambda m: _lm_step(m, *_lm_batch())) if name == "llama" else (lambda m: _bert_step(m, *_bert_batch()))
    calls = spy_on(monkeypatch, hf_interface)
    got = step(ours)
    assert len(calls) == 2 * LAYERS, f"{len(calls)} kernel calls: expected forward + recomputation per layer"
    _assert_step_matches(got, step(eager), step(oracle), torch.float32)


def test_gradient_checkpointing_replays_the_kernel_dropout(monkeypatch):
    """With attention dropout 0.1 the kernel draws its dropout seed from torch's generator, which
    checkpointing saves and restores: the recomputed forward regenerates the same mask, so gradients
    with checkpointing equal those without it (same seed). A different seed moves them far outside
    that tolerance, so the comparison can fail."""
    plain, ckpt = _copies(_llama, 2, attention_dropout=0.1)
    ckpt.gradient_checkpointing_enable()
    for m in (plain, ckpt):
        m.train()
        hf_triton_attn.patch_model(m)
    batch = _lm_batch()
    calls = spy_on(monkeypatch, hf_interface)
    torch.manual_seed(5)
    want = _lm_step(plain, *batch)
    torch.manual_seed(5)
    got = _lm_step(ckpt, *batch)
    torch.manual_seed(6)
    other = _lm_step(plain, *batch)
    assert len(calls) == 4 * LAYERS and all(c["dropout_p"] == pytest.approx(0.1) for c in calls)
    worst_same = worst_other = 0.0
    for name in want:
        scale = max(float(want[name].abs().max()), 1.0)
        worst_same = max(worst_same, float((got[name] - want[name]).abs().max()) / scale)
        worst_other = max(worst_other, float((other[name] - want[name]).abs().max()) / scale)
    assert worst_same <= FLOOR[torch.float32], f"checkpointed grads differ by {worst_same:.3e} (relative)"
    assert worst_other > 100 * FLOOR[torch.float32], "another dropout seed should change the gradients"


# ---------------------------------------------------------------------------------------------
# 4. save_pretrained / from_pretrained, copies and pickles of a patched model
# ---------------------------------------------------------------------------------------------

def test_save_pretrained_while_patched_round_trips(tmp_path, monkeypatch):
    """A patched model saved with ``save_pretrained`` writes the same files as the unpatched model
    (config.json text and safetensors bytes identical: nothing records "hf_triton_attn"), loads into an
    eager model with a bitwise-identical state_dict and bitwise-identical outputs, and loads in a
    fresh interpreter that never imports hf_triton_attn."""
    model, twin = _copies(_llama, 2)
    model.eval()
    twin.eval()
    ids, mask, _ = _lm_batch()
    with torch.no_grad():
        ref_logits = twin(input_ids=ids, attention_mask=mask).logits
    report = hf_triton_attn.patch_model(model)
    assert report.num_patched == 1
    calls = spy_on(monkeypatch, hf_interface)
    with torch.no_grad():
        ours_logits = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == LAYERS
    patched_dir, plain_dir = tmp_path / "patched", tmp_path / "plain"
    model.save_pretrained(patched_dir)
    twin.save_pretrained(plain_dir)
    config_text = (patched_dir / "config.json").read_text()
    assert "hf_triton_attn" not in config_text
    saved = json.loads(config_text)
    assert "_attn_implementation" not in saved and "attn_implementation" not in saved, sorted(saved)
    for f in sorted(p.name for p in plain_dir.iterdir()):
        assert (patched_dir / f).read_bytes() == (plain_dir / f).read_bytes(), f"{f} differs when saved patched"
    assert model.config._attn_implementation == "hf_triton_attn"  # saving did not unpatch the live model

    loaded = transformers.LlamaForCausalLM.from_pretrained(patched_dir, attn_implementation="eager").to(DEVICE).eval()
    assert loaded.config._attn_implementation == "eager"
    want = twin.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ref_logits)
    real = mask.bool()
    with torch.no_grad():
        oracle = _oracle(twin)(input_ids=ids, attention_mask=mask).logits
    assert_pass_rule("logits", ours_logits[real], ref_logits[real], oracle[real], torch.float32)

    # from_pretrained(attn_implementation="hf_triton_attn") and save again: still nothing recorded
    ours_loaded = transformers.LlamaForCausalLM.from_pretrained(patched_dir, attn_implementation="hf_triton_attn")
    assert ours_loaded.config._attn_implementation == "hf_triton_attn"
    ours_loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == config_text

    # a process that never imports hf_triton_attn loads the checkpoint on transformers' default
    code = ("import sys, transformers\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "assert 'hf_triton_attn' not in sys.modules\n"
            "print(m.config._attn_implementation)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_TRITON_ATTN_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code, str(patched_dir)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] in ("sdpa", "eager"), res.stdout


def test_deepcopy_of_a_patched_model_is_independent(monkeypatch):
    """Regression: the interface adapter's undo was a closure over the original model's configs, and
    ``copy.deepcopy`` copies closures by reference: ``unpatch_model(copy)`` switched the ORIGINAL back to
    eager and left the copy patched. (TRL's reference models and EMA copies deep-copy models.)"""
    model, = _copies(_llama, 1)
    hf_triton_attn.patch_model(model)
    twin = copy.deepcopy(model)
    assert twin.config is not model.config and twin.config._attn_implementation == "hf_triton_attn"
    calls = spy_on(monkeypatch, hf_interface)
    ids, mask, _ = _lm_batch()
    twin(input_ids=ids, attention_mask=mask)
    assert len(calls) == LAYERS
    hf_triton_attn.unpatch_model(twin)
    assert twin.config._attn_implementation == "eager", "unpatch_model(copy) left the copy patched"
    assert model.config._attn_implementation == "hf_triton_attn", "unpatch_model(copy) unpatched the original"


def test_deepcopy_of_a_forward_patched_module_uses_its_own_weights():
    """Regression (silent wrong answer): forward adapters installed ``module.forward`` as a closure over the
    module; ``copy.deepcopy`` kept the closure, so the copy's attention ran with the ORIGINAL module's
    weights (fixed by ``forward_common.InstalledForward``). Zeroing the copy's output projection must
    zero the copy's output and leave the original's unchanged."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).to(DEVICE)
    hf_triton_attn.patch_model(mha)
    twin = copy.deepcopy(mha)
    x = torch.randn(2, 5, 32, device=DEVICE)
    with torch.no_grad():
        before = mha(x, x, x, need_weights=False)[0]
        twin.out_proj.weight.zero_()
        twin.out_proj.bias.zero_()
        assert torch.equal(mha(x, x, x, need_weights=False)[0], before)
        out = twin(x, x, x, need_weights=False)[0]
    assert torch.count_nonzero(out) == 0, "the copy ran the original module's weights"


def test_torch_save_of_a_patched_model(tmp_path):
    """Regression: ``torch.save(model)`` (a whole-model pickle) of a patched model failed with "Can't pickle
    local object '_apply.<locals>.undo'". The loaded model is still patched and unpatches to eager."""
    model, = _copies(_llama, 1)
    hf_triton_attn.patch_model(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.config._attn_implementation == "hf_triton_attn"
    hf_triton_attn.unpatch_model(loaded)
    assert loaded.config._attn_implementation == "eager" and model.config._attn_implementation == "hf_triton_attn"
