"""Every rejected input of the public API, driven by the table in docs/bad-input.md.

Each row of the table (between the ``bad-input-table`` markers) carries an id; ``CASES`` below maps
that id to a call that triggers it. The test parametrizes over the ids parsed from the doc and
asserts the exception type and the exact message written in the row, so the doc and the code cannot
drift apart: a row without a case fails, a case without a row fails, a changed message fails.

All cases run on CPU tensors (validation does not depend on the device; ``meta`` tensors stand in for
"another device"), with ``backend="reference"`` unless the row is about the backend, so no kernel
runs: a check that stopped rejecting its input returns normally and the test fails.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_triton_attn import FlashAttention, TritonMultiHeadAttention, flash_attention, ops, patch_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
START, END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
COLUMNS = ["id", "API", "argument", "bad value", "exception", "message"]


@dataclass(frozen=True)
class Row:
    id: str
    api: str
    argument: str
    bad_value: str
    exception: str
    message: str


def _unquote(cell: str) -> str:
    """A table cell without its code-span delimiters (`` `x` `` or ``` `` x `` ```)."""
    cell = cell.strip()
    for fence in ("`` ", "`"):
        closing = fence[::-1]
        if cell.startswith(fence) and cell.endswith(closing) and len(cell) >= 2 * len(fence):
            return cell[len(fence):len(cell) - len(closing)]
    return cell


def parse_table(text: str) -> list[Row]:
    block = text.split(START, 1)[1].split(END, 1)[0]
    lines = [line for line in block.strip().splitlines() if line.strip()]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    assert header == COLUMNS, header
    rows = []
    for line in lines[2:]:
        cells = line.strip()[1:-1].split(" | ")
        assert len(cells) == len(COLUMNS), f"row needs {len(COLUMNS)} cells (no ' | ' inside a cell): {line}"
        rows.append(Row(*(_unquote(c) for c in cells)))
    return rows


ROWS = parse_table(DOC.read_text())
ROW_BY_ID = {r.id: r for r in ROWS}


# ----------------------------------------------------------------------------------------------
# valid starting points; each case changes one thing
# ----------------------------------------------------------------------------------------------

def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _meta(*shape, dtype=torch.bool):
    return torch.empty(*shape, dtype=dtype, device="meta")


def dense(**changes):
    """flash_attention on q (2, 4, 8, 16), k and v (2, 2, 10, 16), float32, CPU, with ``changes``."""
    kw = dict(q=_rand(2, 4, 8, 16, seed=1), k=_rand(2, 2, 10, 16, seed=2), v=_rand(2, 2, 10, 16, seed=3),
              backend="reference")
    kw.update(changes)
    return flash_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


CU = [0, 3, 8]


def cu(values=CU, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def varlen(**changes):
    """flash_attention on packed q, k, v (8, 2, 16) with cu_seqlens [0, 3, 8], max_seqlen 5, and ``changes``."""
    kw = dict(q=_rand(8, 2, 16, seed=1), k=_rand(8, 2, 16, seed=2), v=_rand(8, 2, 16, seed=3), cu_seqlens_q=cu(),
              cu_seqlens_k=cu(), max_seqlen_q=5, max_seqlen_k=5, backend="reference")
    kw.update(changes)
    return flash_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


def mha(**kw):
    """TritonMultiHeadAttention(48, 3, kdim=32, vdim=40) (CPU, float32) with ``kw`` changed."""
    args = dict(d_model=48, num_heads=3, kdim=32, vdim=40)
    args.update(kw)
    return TritonMultiHeadAttention(**args)


N, L, S = 2, 17, 23


def mha_call(*changes_args, **changes):
    """mha()(query (2, 17, 48), key (2, 23, 32), value (2, 23, 40)) with positional/keyword changes."""
    module = changes.pop("module", None) or mha()
    args = dict(query=_rand(N, L, 48, seed=1), key=_rand(N, S, 32, seed=2), value=_rand(N, S, 40, seed=3))
    args.update(changes)
    return module(**args)


def _mask_bool(*shape):
    return torch.zeros(*shape, dtype=torch.bool)


def _wrong_causal_hint():
    """Self-attention shapes (L == S) with is_causal=True and a mask that hides a pair causal shows."""
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    mask[5, 2] = True
    return mha_call(key=_rand(N, L, 32, seed=2), value=_rand(N, L, 40, seed=3), attn_mask=mask, is_causal=True)


def _nested_causal_merge():
    module = mha(kdim=None, vdim=None, causal=True)
    with warnings.catch_warnings():  # "nested tensors are in prototype stage"
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([_rand(3, 48), _rand(5, 48)])
    return module.merge_masks(None, None, nested)


def _strict(module: nn.Module):
    return patch_model(module, strict=True)


def _transformers_model(name: str):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "xlm":
        return T.XLMWithLMHeadModel(T.XLMConfig(vocab_size=97, emb_dim=32, n_layers=1, n_heads=4))
    cfg = T.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4)
    return T.T5ForConditionalGeneration(cfg)


class _Fixture:
    """What a case needs besides the call: pytest's monkeypatch, or a CUDA device."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch


def _with_kernels_interpreted(value: bool, call: Callable[[], object]) -> Callable[[_Fixture], object]:
    def run(fx: _Fixture):
        fx.monkeypatch.setattr(ops, "_kernels_interpreted", value)
        return call()
    return run


def _with_env(name: str, value: str, call: Callable[[], object]) -> Callable[[_Fixture], object]:
    def run(fx: _Fixture):
        fx.monkeypatch.setenv(name, value)
        return call()
    return run


NEEDS_CUDA = {"backend-triton-interpreted"}

# id -> a call that must raise what the doc's row says. A callable taking one argument gets a _Fixture.
CASES: dict[str, Callable] = {
    # --- flash_attention: tensors, dtypes, devices --------------------------------------------
    "q-not-tensor": lambda: dense(q=[1.0]),
    "k-not-tensor": lambda: dense(k=None),
    "v-not-tensor": lambda: dense(v=1.0),
    "k-other-device": lambda: dense(k=_meta(2, 2, 10, 16, dtype=torch.float32)),
    "v-other-device": lambda: dense(v=_meta(2, 2, 10, 16, dtype=torch.float32)),
    "q-int-dtype": lambda: dense(q=torch.zeros(2, 4, 8, 16, dtype=torch.int32)),
    "k-float64": lambda: dense(k=_rand(2, 2, 10, 16, dtype=torch.float64)),
    "v-complex": lambda: dense(v=torch.zeros(2, 2, 10, 16, dtype=torch.complex64)),
    "kv-dtype-mismatch": lambda: dense(k=_rand(2, 2, 10, 16, dtype=torch.float16)),
    # --- flash_attention: options -------------------------------------------------------------
    "backend-unknown": lambda: dense(backend="cuda"),
    "causal-not-bool": lambda: dense(causal=1),
    "softmax-scale-nan": lambda: dense(softmax_scale=math.nan),
    "softmax-scale-inf": lambda: dense(softmax_scale=math.inf),
    "softmax-scale-str": lambda: dense(softmax_scale="0.1"),
    "softmax-scale-bool": lambda: dense(softmax_scale=True),
    "dropout-negative": lambda: dense(dropout_p=-0.1),
    "dropout-one": lambda: dense(dropout_p=1.0),
    "dropout-nan": lambda: dense(dropout_p=math.nan),
    "dropout-str": lambda: dense(dropout_p="0.1"),
    "dropout-bool": lambda: dense(dropout_p=True),
    "softcap-negative": lambda: dense(softcap=-1.0),
    "softcap-inf": lambda: dense(softcap=math.inf),
    "softcap-none": lambda: dense(softcap=None),
    "window-below-minus-one": lambda: dense(window_size=(-2, 0)),
    "window-three-values": lambda: dense(window_size=(1, 2, 3)),
    "window-float": lambda: dense(window_size=(4.0, 0)),
    "window-bool": lambda: dense(window_size=(True, 0)),
    "window-int": lambda: dense(window_size=5),
    # --- flash_attention: dense shapes ----------------------------------------------------------
    "q-not-4d": lambda: dense(q=_rand(4, 8, 16)),
    "v-not-4d": lambda: dense(v=_rand(2, 2, 10, 16, 1)),
    "batch-mismatch": lambda: dense(k=_rand(3, 2, 10, 16), v=_rand(3, 2, 10, 16)),
    "v-seqlen-mismatch": lambda: dense(v=_rand(2, 2, 9, 16)),
    "v-heads-mismatch": lambda: dense(v=_rand(2, 1, 10, 16)),
    "k-head-dim-mismatch": lambda: dense(k=_rand(2, 2, 10, 8)),
    "gqa-not-dividing": lambda: dense(k=_rand(2, 3, 10, 16), v=_rand(2, 3, 10, 16)),
    "gqa-zero-kv-heads": lambda: dense(k=_rand(2, 0, 10, 16), v=_rand(2, 0, 10, 16)),
    "head-dim-zero": lambda: dense(q=_rand(2, 4, 8, 0), k=_rand(2, 2, 10, 0), v=_rand(2, 2, 10, 0)),
    "head-dim-too-big": lambda: dense(q=_rand(2, 4, 8, 300), k=_rand(2, 2, 10, 300), v=_rand(2, 2, 10, 300)),
    "v-head-dim-too-big": lambda: dense(v=_rand(2, 2, 10, 257)),
    # --- flash_attention: masks, segments, seqused_k, alibi ------------------------------------
    "attention-mask-not-tensor": lambda: dense(attention_mask=[1, 0]),
    "attention-mask-other-device": lambda: dense(attention_mask=_meta(2, 10)),
    "attention-mask-float": lambda: dense(attention_mask=torch.ones(2, 10)),
    "attention-mask-shape": lambda: dense(attention_mask=torch.ones(2, 9, dtype=torch.bool)),
    "attention-mask-4d": lambda: dense(attention_mask=torch.ones(2, 1, 8, 10, dtype=torch.bool)),
    "query-mask-not-tensor": lambda: dense(query_mask=True),
    "query-mask-other-device": lambda: dense(query_mask=_meta(2, 8)),
    "query-mask-float": lambda: dense(query_mask=torch.ones(2, 8, dtype=torch.float16)),
    "query-mask-shape": lambda: dense(query_mask=torch.ones(2, 10, dtype=torch.bool)),
    "segment-ids-not-tensor": lambda: dense(segment_ids=[0] * 8),
    "segment-ids-other-device": lambda: dense(segment_ids=_meta(2, 8, dtype=torch.int64)),
    "segment-ids-float": lambda: dense(segment_ids=torch.zeros(2, 8)),
    "segment-ids-bool": lambda: dense(segment_ids=torch.zeros(2, 8, dtype=torch.bool)),
    "segment-ids-shape": lambda: dense(segment_ids=torch.zeros(2, 10, dtype=torch.int64)),
    "segment-ids-cross-attention": lambda: dense(segment_ids=torch.zeros(2, 8, dtype=torch.int64)),
    "seqused-k-not-tensor": lambda: dense(seqused_k=[3, 4]),
    "seqused-k-other-device": lambda: dense(seqused_k=_meta(2, dtype=torch.int32)),
    "seqused-k-int64": lambda: dense(seqused_k=torch.tensor([3, 4])),
    "seqused-k-shape": lambda: dense(seqused_k=torch.tensor([3], dtype=torch.int32)),
    "seqused-k-too-large": lambda: dense(seqused_k=torch.tensor([3, 11], dtype=torch.int32)),
    "seqused-k-negative": lambda: dense(seqused_k=torch.tensor([-1, 4], dtype=torch.int32)),
    "alibi-not-tensor": lambda: dense(alibi_slopes=[0.5] * 4),
    "alibi-other-device": lambda: dense(alibi_slopes=_meta(4, dtype=torch.float32)),
    "alibi-int": lambda: dense(alibi_slopes=torch.ones(4, dtype=torch.int64)),
    "alibi-shape": lambda: dense(alibi_slopes=torch.ones(3)),
    # --- flash_attention: varlen ----------------------------------------------------------------
    "varlen-missing-max-seqlen-k": lambda: varlen(max_seqlen_k=None),
    "varlen-missing-three": lambda: varlen(cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None),
    "varlen-q-4d": lambda: varlen(q=_rand(1, 8, 2, 16)),
    "varlen-k-2d": lambda: varlen(k=_rand(8, 32)),
    "cu-seqlens-not-tensor": lambda: varlen(cu_seqlens_q=CU),
    "cu-seqlens-other-device": lambda: varlen(cu_seqlens_k=_meta(3, dtype=torch.int32)),
    "cu-seqlens-int64": lambda: varlen(cu_seqlens_q=cu(dtype=torch.int64)),
    "cu-seqlens-2d": lambda: varlen(cu_seqlens_q=cu().view(1, 3)),
    "cu-seqlens-length-one": lambda: varlen(cu_seqlens_k=cu([0])),
    "cu-seqlens-shapes-differ": lambda: varlen(cu_seqlens_k=cu([0, 8])),
    "max-seqlen-tensor": lambda: varlen(max_seqlen_q=torch.tensor(5)),
    "max-seqlen-float": lambda: varlen(max_seqlen_k=5.0),
    "max-seqlen-negative": lambda: varlen(max_seqlen_q=-1),
    "max-seqlen-bool": lambda: varlen(max_seqlen_q=True),
    "varlen-attention-mask": lambda: varlen(attention_mask=torch.ones(2, 5, dtype=torch.bool)),
    "varlen-query-mask": lambda: varlen(query_mask=torch.ones(2, 5, dtype=torch.bool)),
    "varlen-segment-ids": lambda: varlen(segment_ids=torch.zeros(8, dtype=torch.int64)),
    "cu-seqlens-decreasing": lambda: varlen(cu_seqlens_q=cu([0, 6, 5])),
    "cu-seqlens-not-from-zero": lambda: varlen(cu_seqlens_q=cu([1, 3, 8])),
    "cu-seqlens-wrong-total": lambda: varlen(cu_seqlens_k=cu([0, 3, 7])),
    "max-seqlen-q-too-small": lambda: varlen(max_seqlen_q=4),
    "max-seqlen-k-too-small": lambda: varlen(max_seqlen_k=3),
    # --- flash_attention: backends --------------------------------------------------------------
    "env-backend-unknown": _with_env("HF_TRITON_ATTN_BACKEND", "bogus", lambda: dense(backend=None)),
    "interpret-bfloat16": lambda: dense(q=_rand(2, 4, 8, 16, dtype=torch.bfloat16),
                                        k=_rand(2, 2, 10, 16, dtype=torch.bfloat16),
                                        v=_rand(2, 2, 10, 16, dtype=torch.bfloat16), backend="interpret"),
    "backend-triton-on-cpu": lambda: dense(backend="triton"),
    "backend-interpret-not-enabled": _with_kernels_interpreted(False, lambda: dense(backend="interpret")),
    "backend-triton-interpreted": _with_kernels_interpreted(
        True, lambda: dense(q=_rand(2, 4, 8, 16).cuda(), k=_rand(2, 2, 10, 16).cuda(), v=_rand(2, 2, 10, 16).cuda(),
                            backend="triton")),
    # --- FlashAttention -------------------------------------------------------------------------
    "fa-causal-not-bool": lambda: FlashAttention(causal=1),
    "fa-softmax-scale-str": lambda: FlashAttention(softmax_scale="x"),
    "fa-softmax-scale-inf": lambda: FlashAttention(softmax_scale=math.inf),
    "fa-softmax-scale-bool": lambda: FlashAttention(softmax_scale=False),
    "fa-dropout-one": lambda: FlashAttention(dropout=1.0),
    "fa-dropout-str": lambda: FlashAttention(dropout="0.1"),
    "fa-forward": lambda: FlashAttention()(_rand(2, 4, 8, 16), _rand(2, 2, 10, 16, dtype=torch.float16),
                                           _rand(2, 2, 10, 16)),
    # --- TritonMultiHeadAttention: constructor and conversion ----------------------------------
    "mha-d-model-float": lambda: mha(d_model=48.0),
    "mha-d-model-bool": lambda: mha(d_model=True),
    "mha-num-heads-zero": lambda: mha(num_heads=0),
    "mha-num-heads-none": lambda: mha(num_heads=None),
    "mha-not-divisible": lambda: mha(d_model=50),
    "mha-kdim-zero": lambda: mha(kdim=0),
    "mha-vdim-str": lambda: mha(vdim="x"),
    "mha-dropout": lambda: mha(dropout=1.5),
    "mha-batch-first-none": lambda: mha(batch_first=None),
    "mha-causal-str": lambda: mha(causal="yes"),
    "mha-bias-int": lambda: mha(bias=1),
    "mha-from-torch-not-mha": lambda: TritonMultiHeadAttention.from_torch(5),
    "mha-from-torch-bias-kv": lambda: TritonMultiHeadAttention.from_torch(
        nn.MultiheadAttention(48, 3, add_bias_kv=True)),
    "mha-merge-masks-nested-causal": _nested_causal_merge,
    # --- TritonMultiHeadAttention.forward -------------------------------------------------------
    "mha-query-not-tensor": lambda: mha_call(query=[1.0]),
    "mha-value-not-tensor": lambda: mha_call(value=None),
    "mha-query-4d": lambda: mha_call(query=_rand(1, N, L, 48)),
    "mha-key-2d": lambda: mha_call(key=_rand(S, 32)),
    "mha-query-feature-dim": lambda: mha_call(query=_rand(N, L, 40)),
    "mha-key-feature-dim": lambda: mha_call(key=_rand(N, S, 48)),
    "mha-value-feature-dim": lambda: mha_call(value=_rand(N, S, 32)),
    "mha-query-int": lambda: mha_call(query=torch.zeros(N, L, 48, dtype=torch.int64)),
    "mha-query-other-device": lambda: mha_call(query=_meta(N, L, 48, dtype=torch.float32)),
    "mha-value-length": lambda: mha_call(value=_rand(N, S - 1, 40)),
    "mha-batch-mismatch": lambda: mha_call(key=_rand(1, S, 32), value=_rand(1, S, 40)),
    "mha-dtype-mismatch": lambda: mha_call(query=_rand(N, L, 48, dtype=torch.float64)),
    "mha-need-weights-str": lambda: mha_call(need_weights="yes"),
    "mha-average-weights-none": lambda: mha_call(average_attn_weights=None),
    "mha-is-causal-none": lambda: mha_call(is_causal=None),
    "mha-kpm-not-tensor": lambda: mha_call(key_padding_mask="pad"),
    "mha-kpm-int": lambda: mha_call(key_padding_mask=torch.zeros(N, S, dtype=torch.int64)),
    "mha-kpm-other-device": lambda: mha_call(key_padding_mask=_meta(N, S)),
    "mha-kpm-shape": lambda: mha_call(key_padding_mask=_mask_bool(N, S - 1)),
    "mha-kpm-unbatched-shape": lambda: mha_call(query=_rand(L, 48), key=_rand(S, 32), value=_rand(S, 40),
                                                key_padding_mask=_mask_bool(N, S)),
    "mha-attn-mask-uint8": lambda: mha_call(attn_mask=torch.zeros(L, S, dtype=torch.uint8)),
    "mha-attn-mask-other-device": lambda: mha_call(attn_mask=_meta(L, S)),
    "mha-attn-mask-shape": lambda: mha_call(attn_mask=_mask_bool(L, S - 1)),
    "mha-attn-mask-heads": lambda: mha_call(attn_mask=_mask_bool(3, L, S)),
    "mha-wrong-causal-hint": _wrong_causal_hint,
    # --- patch_model(strict=True) ---------------------------------------------------------------
    "strict-add-bias-kv": lambda: _strict(nn.Sequential(nn.MultiheadAttention(32, 4, add_bias_kv=True))),
    "strict-add-zero-attn": lambda: _strict(nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, add_zero_attn=True)})),
    "strict-float64": lambda: _strict(nn.Sequential(nn.MultiheadAttention(32, 4, dtype=torch.float64))),
    "strict-head-dim-300": lambda: _strict(nn.Sequential(nn.MultiheadAttention(600, 2))),
    "strict-hf-bypasses-interface": lambda: _strict(_transformers_model("xlm")),
    "strict-hf-position-bias": lambda: _strict(_transformers_model("t5")),
}

EXCEPTIONS = {"ValueError": ValueError, "TypeError": TypeError}


@pytest.mark.parametrize("row_id", [r.id for r in ROWS])
def test_table_row(row_id, monkeypatch):
    row = ROW_BY_ID[row_id]
    assert row_id in CASES, f"docs/bad-input.md row {row_id!r} has no test case in tests/test_bad_input.py"
    if row_id in NEEDS_CUDA and not torch.cuda.is_available():
        pytest.skip("needs a CUDA tensor")
    monkeypatch.setenv("HF_TRITON_ATTN_VALIDATE", "0")  # CPU tensors are value-checked anyway
    monkeypatch.delenv("HF_TRITON_ATTN_BACKEND", raising=False)
    case = CASES[row_id]
    exc = EXCEPTIONS[row.exception]
    with pytest.raises(Exception) as info:
        case(_Fixture(monkeypatch)) if case.__code__.co_argcount == 1 else case()
    assert type(info.value) is exc, f"{row_id}: raised {type(info.value).__name__}: {info.value}"
    assert str(info.value) == row.message, f"{row_id}:\n doc:  {row.message}\n code: {info.value}"


def test_every_case_has_a_row_and_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate ids in docs/bad-input.md"
    assert not set(CASES) - set(ids), f"cases without a row in docs/bad-input.md: {sorted(set(CASES) - set(ids))}"
    for r in ROWS:
        assert re.fullmatch(r"[a-z0-9-]+", r.id), r.id
        assert r.exception in EXCEPTIONS, r
        assert r.api and r.argument and r.bad_value, r


def test_messages_name_the_argument_and_what_was_given():
    """The design contract: a message names the argument, the expectation and the actual value."""
    exempt = {"interpret-bfloat16", "env-backend-unknown",  # name the backend / variable instead
              "mha-merge-masks-nested-causal"}  # "must not be a NestedTensor": the actual value is implied
    for r in ROWS:
        if r.id.startswith(("strict-", "backend-")) or r.id in exempt:
            continue  # strict: names the modules and the reasons; backend-*: the backend and the device
        assert " must " in r.message and "; got " in r.message, r
