"""Forward adapter for Falcon attention (``FalconAttention``, transformers 5.17): rotary and ALiBi.

Falcon picks its attention class at construction (``FALCON_ATTENTION_CLASSES``): ``eager`` and
``sdpa`` are the SAME class, ``FalconAttention``, whose forward branches on
``config._attn_implementation == "sdpa"`` (``models/falcon/modeling_falcon.py`` lines 311-422).
Projections (``_split_heads``, lines 254-283), layouts the adapter keeps as eager has them::

    new_decoder_architecture: fused (B, S, Hkv, H/Hkv + 2, D); k, v broadcast to all H heads and
        flattened (the cache stores H heads). The copies of one kv head are identical, so the
        kernel reads k[:, ::H/Hkv] (a strided view, Hkv heads): GQA without re-reading copies.
    multi_query: k, v have 1 head (MQA).                 otherwise: H heads each.

Rotary variant (``alibi is None``): q, k rotated with ``position_embeddings`` before the cache
update; eager ``softmax(q.k / sqrt(D) + mask, dtype=hidden dtype)`` (no dropout: "It is unclear
why dropout is not applied here"), SDPA the same with ``dropout_p=0``: kernel
``softmax_scale=inv_norm_factor``, causal, padding, never dropout.

ALiBi variant (``config.alibi``). ``FalconModel.forward`` (lines 744-786) builds
``alibi = build_alibi_tensor(mask2d)`` (Bloom's, except the slopes are rounded to bf16 and the
product ``slope * position`` is formed in bf16) and FOLDS it into the mask it passes to every layer::

    mask = masked_fill(alibi.view(B, H, 1, Sk) / sqrt(D), causal_mask < -1, finfo.min)  (B, H, Sq, Sk)

Then the layer's eager branch (lines 394-409) adds alibi once more::

    logits = (q.k + alibi) * inv_norm_factor + mask = q.k / sqrt(D) + 2 * alibi / sqrt(D)

while the SDPA branch (lines 376-392) only adds the mask: ``q.k / sqrt(D) + alibi / sqrt(D)``.
In 5.17 eager therefore applies ALiBi twice, SDPA once (the original Falcon code applied it once:
a transformers bug). The adapter reproduces whatever branch the module runs, exactly: it reads the
mask back (plain causal + padding, or the folded form, checked bitwise) and uses
``slopes * c * inv_norm_factor`` with ``c = [eager branch] + [alibi folded into the mask]``
(2 for eager models, 1 for SDPA models). That ``slope * p_j`` with mask-cumsum positions equals the
kernel's ``-slope * |i + Sk - Sq - j|`` up to a per-row constant is proved in ``bloom.py``; the same
contiguous-padding and bitwise ``alibi`` checks apply. Dropout: ``attention_dropout`` in training
(both branches).

Deliberate numerical differences: eager's ALiBi is ``bf16(bf16(slope) * position)``, exact for
power-of-two slopes (H a power of two up to 8) and positions below 256, a staircase otherwise; the
kernel uses the bf16-rounded slopes times the exact distance, in fp32. Eager's fp16/bf16 scores
and softmax run in half precision (alibi branch: fp32 scores, then the logits are cast to the
model dtype for the softmax); the kernel's are fp32.

Falls back to the original forward, exactly (warned once per reason): ``output_attentions=True``,
no attention mask, masks other than (folded) causal + padding, padding with holes under ALiBi, a
non-standard ``alibi``, rotary without ``position_embeddings``, dtypes other than fp16/bf16/fp32.
Not patched: ``FalconFlashAttention2`` (it overrides ``forward``). Pad query rows are written 0.
"""

from __future__ import annotations

import math

import torch

from ..ops import flash_attention
from .bloom import alibi_conditions, alibi_slopes_of
from .forward_common import (
    check_dropout,
    check_hidden_states,
    check_key_length,
    dropout_of,
    fallback_warning,
    model_module,
    plain_expected,
    read_causal_mask,
    register_forward_adapter,
)

__all__ = ["FALCON"]

_CLASS = "transformers.models.falcon.modeling_falcon:FalconAttention"
_warned: set[str] = set()


def _folded_expected(alibi: torch.Tensor, num_heads: int, head_dim: int):
    """The mask ``FalconModel`` passes with ALiBi folded in (modeling_falcon.py lines 771-786)."""
    def expected(allowed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        folded = alibi.reshape(allowed.shape[0], num_heads, 1, -1) / math.sqrt(head_dim)
        return torch.masked_fill(folded, ~allowed, torch.finfo(mask.dtype).min)
    return expected


def _read_mask(module, hidden_states, alibi, attention_mask):
    """(padding or reason, alibi multiple carried by the mask: 0 plain, 1 folded)."""
    batch, q_len = hidden_states.shape[:2]
    if alibi is None:
        return read_causal_mask(attention_mask, batch=batch, sq=q_len), 0
    heads = module.num_heads
    extra = dict(extra=alibi_conditions(module, alibi, heads), extra_tensors=(alibi,))
    candidates = []  # (tag, expected, multiple): FalconModel always folds; a plain mask from direct calls
    if attention_mask.dtype != torch.bool and attention_mask.dim() == 4 and attention_mask.shape[1] == heads:
        candidates.append(("falcon-folded", _folded_expected(alibi, heads, module.head_dim), 1))
    if attention_mask.dim() != 4 or attention_mask.shape[1] == 1:
        candidates.append(("falcon", plain_expected, 0))
    reasons = []
    for tag, expected, multiple in candidates:
        padding = read_causal_mask(attention_mask, batch=batch, sq=q_len, tag=tag, expected=expected, **extra)
        if not isinstance(padding, str):
            return padding, multiple
        reasons.append(padding)
    return (reasons[0] if reasons else f"an attention mask of shape {tuple(attention_mask.shape)}"), 0


def _fallback_reason(module, hidden_states, alibi, attention_mask, output_attentions, position_embeddings):
    if output_attentions:
        return "output_attentions=True"
    if attention_mask is None:
        return "no attention mask"
    if alibi is None and position_embeddings is None:
        return "rotary layer without position_embeddings"
    if alibi is not None:
        reason = check_dropout(module, module.attention_dropout)
        if reason:
            return reason
        batch, heads, sk = hidden_states.shape[0], module.num_heads, alibi.shape[-1]
        # FalconModel hands the layers alibi reshaped to (B, H, 1, Sk); build_alibi_tensor makes (B*H, 1, Sk)
        if tuple(alibi.shape) not in ((batch * heads, 1, sk), (batch, heads, 1, sk)):
            return f"an alibi of shape {tuple(alibi.shape)}"
    return check_hidden_states(hidden_states)


def _project(module, hidden_states, alibi, position_embeddings):
    """q (B, H, S, D), k and v (B, Hkv', S, D) exactly as eager builds them (lines 323-336)."""
    num_kv_heads = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
    query, key, value = module._split_heads(module.query_key_value(hidden_states))
    batch, q_len = query.shape[:2]
    query = query.transpose(1, 2).reshape(batch, module.num_heads, q_len, module.head_dim)
    key = key.transpose(1, 2).reshape(batch, num_kv_heads, q_len, module.head_dim)
    value = value.transpose(1, 2).reshape(batch, num_kv_heads, q_len, module.head_dim)
    if alibi is None:
        cos, sin = position_embeddings
        query, key = model_module(module).apply_rotary_pos_emb(query, key, cos, sin)
    return query, key, value


def _kv_heads_for_kernel(module, key: torch.Tensor, value: torch.Tensor):
    """new_decoder_architecture stores each kv head H/Hkv times: hand the kernel one copy (a view)."""
    if module.new_decoder_architecture:
        group = module.num_heads // module.config.num_kv_heads
        if group > 1 and key.shape[1] == module.num_heads:
            return key[:, ::group], value[:, ::group]
    return key, value


def falcon_forward(module, original, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                   use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    """``FalconAttention.forward`` (eager or SDPA branch, as the config says) in ``flash_attention``."""
    reason = _fallback_reason(module, hidden_states, alibi, attention_mask, output_attentions, position_embeddings)
    padding, alibi_in_mask = None, 0
    if reason is None:
        padding, alibi_in_mask = _read_mask(module, hidden_states, alibi, attention_mask)
        reason = padding if isinstance(padding, str) else None
    if reason is not None:
        fallback_warning(_warned, "falcon", reason)
        return original(hidden_states, alibi, attention_mask, position_ids=position_ids, layer_past=layer_past,
                        use_cache=use_cache, output_attentions=output_attentions,
                        position_embeddings=position_embeddings, **kwargs)
    query, key, value = _project(module, hidden_states, alibi, position_embeddings)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    check_key_length(attention_mask, key, "falcon")
    key, value = _kv_heads_for_kernel(module, key, value)
    scale = float(module.inv_norm_factor)
    slopes, dropout = None, 0.0
    if alibi is not None:
        eager_branch = module.config._attn_implementation != "sdpa"
        times = int(eager_branch) + alibi_in_mask  # how often this branch adds alibi / sqrt(D)
        if times:
            slopes = alibi_slopes_of(module, module.num_heads, hidden_states.device) * (times * scale)
        dropout = dropout_of(module, module.attention_dropout)
    out = flash_attention(query, key, value, causal=True, softmax_scale=scale, alibi_slopes=slopes,
                          attention_mask=padding.key_mask, query_mask=padding.query_mask, dropout_p=dropout)
    batch, q_len = hidden_states.shape[:2]
    out = out.transpose(1, 2).reshape(batch, q_len, module.num_heads * module.head_dim)
    return module.dense(out), None


FALCON = register_forward_adapter(
    "falcon", _CLASS, falcon_forward,
    notes="rotary (MHA, multi_query, new_decoder_architecture GQA) and ALiBi, eager or SDPA "
          "branch reproduced; output_attentions=True takes the original forward",
)
