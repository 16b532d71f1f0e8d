"""Forward adapter for Bloom attention (``BloomAttention``, transformers 5.17): ALiBi in the kernel.

Bloom builds its attention itself (no ``AttentionInterface``). The eager forward
(``models/bloom/modeling_bloom.py``, ``BloomAttention.forward`` lines 245-310) computes::

    fused = query_key_value(x).view(B, S, H, 3, D)       q/k/v = fused[..., i, :].transpose(1, 2)
    k, v = layer_past.update(k, v, layer_idx)            (a standard Cache in 5.17: the old
                                                          (B*H, D, S) key layout and
                                                          ``_reorder_cache`` are gone)
    s = alibi.baddbmm(q, k^T, beta=self.beta (1.0), alpha=self.inv_norm_factor (1/sqrt(D)))
      = beta * alibi + alpha * q.k                       -> softmax_scale=alpha, slopes * beta
    s = s + attention_mask                               (4-D additive causal + padding)
    p = softmax(s, fp32).to(dtype); p = attention_dropout(p)   -> dropout_p in training
    out = dense(merge(p @ v)) (tensor-parallel slices if pretraining_tp > 1 and slow_but_exact)
    out = dropout_add(out, residual, hidden_dropout, training)

with ``alibi = build_alibi_tensor(mask2d)`` (lines 45-89): ``slope_h * p_j``, ``p_j = (cumsum(m)_j
- 1) * m_j`` for the 2-D padding mask m, i.e. the position of KEY j counted over real tokens only.

Why the kernel's ALiBi gives the same softmax. The kernel adds ``-slope * |i + Sk - Sq - j|``
(bottom-right aligned, see ``ops.flash_attention``). Fix a batch row with key mask m, let
``off = Sk - Sq`` and let V_i = {j <= i + off : m_j = 1} be the keys query i sees. For j in V_i,
``p_j = j - z_j`` where z_j is the number of padding slots before j, and ``|i + off - j| =
i + off - j``. So, per head::

    eager bias - kernel bias = slope * (j - z_j) + slope * (i + off - j) = slope * (i + off - z_j)

If the real keys of the row are one contiguous run (left padding, right padding, both, and the
ones generate() appends: ``m = 0^a 1^n 0^r``), z_j = a for EVERY real key j, so the difference
``slope * (i + off - a)`` does not depend on j: it is a per-row constant, and softmax is invariant
to adding a constant to a row. Masked keys get probability 0 on both sides (eager adds
``finfo.min``: exp underflows to exactly 0 in the fp32 softmax). With a hole in the padding
(1 0 1), z_j varies over V_i and the two differ: such masks take the original forward. The
adapter checks, in the same host sync that verifies the mask, that the real keys are contiguous
and that ``alibi`` is bitwise what ``build_alibi_tensor`` makes from the mask's key row (a custom
alibi takes the original forward).

Deliberate numerical differences (not semantics): eager rounds ``slope * p_j`` to the model dtype
(bf16 keeps 8 significant bits: exact for positions below 256 with power-of-two slopes, a
staircase beyond) and runs ``baddbmm`` in the model dtype; the kernel evaluates the bias and the
scores in fp32.

Falls back to the original forward, exactly (warned once per reason): ``output_attentions=True``,
no attention mask (eager Bloom is then bidirectional), masks other than causal + padding, padding
with holes, a non-standard ``alibi``, dtypes other than fp16/bf16/fp32. Pad query rows are
written 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import flash_attention
from .forward_common import (
    check_dropout,
    check_hidden_states,
    check_key_length,
    dropout_of,
    fallback_warning,
    model_module,
    read_causal_mask,
    register_forward_adapter,
)

__all__ = ["BLOOM", "alibi_slopes_of", "contiguous_keys"]

_CLASS = "transformers.models.bloom.modeling_bloom:BloomAttention"
_warned: set[str] = set()
_slopes_cache: dict[tuple, torch.Tensor] = {}


def alibi_slopes_of(module: torch.nn.Module, num_heads: int, device: torch.device) -> torch.Tensor:
    """The per-head slopes exactly as the model's own ``build_alibi_tensor`` uses them (fp32).

    Read off the tensor it builds for positions (0, 1): row h is ``(0, slope_h)`` (Falcon's rounds
    the slopes to bf16 first, and this returns those rounded slopes)."""
    key = (type(module).__module__, num_heads, str(device))
    slopes = _slopes_cache.get(key)
    if slopes is None:
        build = model_module(module).build_alibi_tensor
        two = torch.ones(1, 2, dtype=torch.long, device=device)
        slopes = build(two, num_heads, torch.float32).view(num_heads, 2)[:, 1].contiguous()
        _slopes_cache[key] = slopes
    return slopes


def contiguous_keys(key_mask: torch.Tensor) -> torch.Tensor:
    """0-d bool: every row's real keys form one run (``0^a 1^n 0^r``): at most one 0 -> 1 rise,
    counting a virtual 0 before the first slot."""
    rises = (key_mask[:, 1:] & ~key_mask[:, :-1]).sum(dim=1) + key_mask[:, 0].long()
    return (rises <= 1).all()


def alibi_conditions(module, alibi: torch.Tensor, num_heads: int):
    """Extra checks for ``read_causal_mask``: contiguous padding and the standard alibi tensor."""
    build = model_module(module).build_alibi_tensor

    def extra(key_mask: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
        rebuilt = build(key_mask.long(), num_heads, alibi.dtype)
        if rebuilt.numel() == alibi.numel():
            same = (rebuilt.view(alibi.shape) == alibi).all()
        else:
            same = torch.zeros((), dtype=torch.bool, device=alibi.device)
        return [(contiguous_keys(key_mask), "padding with holes (ALiBi positions are not a per-row shift)"),
                (same, "an alibi tensor other than build_alibi_tensor(attention_mask)")]
    return extra


def _fallback_reason(module, hidden_states, alibi, attention_mask, output_attentions) -> str | None:
    if output_attentions:
        return "output_attentions=True"
    if attention_mask is None:
        return "no attention mask (eager Bloom then attends bidirectionally)"
    batch = hidden_states.shape[0]
    if not isinstance(alibi, torch.Tensor) or alibi.dim() != 3 or alibi.shape[:2] != (batch * module.num_heads, 1):
        return f"an alibi of shape {tuple(getattr(alibi, 'shape', ()))}"
    return check_dropout(module, module.attention_dropout) or check_hidden_states(hidden_states)


def _dense(module, context: torch.Tensor) -> torch.Tensor:
    """Output projection, with the tensor-parallel slicing eager uses (modeling_bloom.py lines 298-307)."""
    if module.pretraining_tp > 1 and module.slow_but_exact:
        slices = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(module.pretraining_tp):
            lo, hi = int(i * slices), int((i + 1) * slices)
            output = output + F.linear(context[:, :, lo:hi], module.dense.weight[:, lo:hi])
        return output
    return module.dense(context)


def bloom_forward(module, original, hidden_states, residual, alibi, attention_mask, layer_past=None,
                  use_cache=False, output_attentions=False, **kwargs):
    """``BloomAttention.forward`` with the attention (ALiBi included) in ``flash_attention``."""
    heads = module.num_heads
    reason = _fallback_reason(module, hidden_states, alibi, attention_mask, output_attentions)
    padding = None
    if reason is None:
        padding = read_causal_mask(attention_mask, batch=hidden_states.shape[0], sq=hidden_states.shape[1],
                                   tag="bloom", extra=alibi_conditions(module, alibi, heads), extra_tensors=(alibi,))
        reason = padding if isinstance(padding, str) else None
    if reason is not None:
        fallback_warning(_warned, "bloom", reason)
        return original(hidden_states, residual, alibi, attention_mask, layer_past=layer_past, use_cache=use_cache,
                        output_attentions=output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    query, key, value = module._reshape(module.query_key_value(hidden_states))  # strided views of fused qkv
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    check_key_length(attention_mask, key, "bloom")
    slopes = alibi_slopes_of(module, heads, hidden_states.device) * float(module.beta)
    out = flash_attention(
        query, key, value, causal=True, softmax_scale=float(module.inv_norm_factor), alibi_slopes=slopes,
        attention_mask=padding.key_mask, query_mask=padding.query_mask,
        dropout_p=dropout_of(module, module.attention_dropout))
    context = out.transpose(1, 2).reshape(batch, q_len, heads * module.head_dim)  # BSHD memory: a view
    output = _dense(module, context)
    output = model_module(module).dropout_add(output, residual, module.hidden_dropout, module.training)
    return output, None


BLOOM = register_forward_adapter(
    "bloom", _CLASS, bloom_forward,
    notes="ALiBi from the mask's cumsum as a per-row shift of the kernel's ALiBi; "
          "padding with holes and output_attentions=True take the original forward",
)
