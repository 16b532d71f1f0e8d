"""Forward adapter for GPT-Neo self-attention (``GPTNeoSelfAttention``, transformers 5.17).

GPT-Neo picks its attention class at construction (``GPT_NEO_ATTENTION_CLASSES``), never through
``AttentionInterface``, so ``patch_model`` replaces each module's ``forward``. What the eager
forward computes (``models/gpt_neo/modeling_gpt_neo.py``, ``_attn`` lines 105-130) and how it maps::

    q, k upcast to fp32; s = q @ k^T            (NO 1/sqrt(D))        -> softmax_scale=1.0
    s = where(self.bias[Sk-Sq:Sk, :Sk], s, fp32 min)                   -> causal=True (bottom-right)
        global layers: bias = tril(ones)
        local layers:  bias = tril(ones) xor tril(ones, -w): keys j with i - w < j <= i, i.e. w keys
                       including the query itself                     -> window_size=(w - 1, 0)
    s = s + attention_mask                      (4-D additive, causal + padding)
                                                                      -> key/query padding masks
    p = softmax(s, fp32).to(v.dtype); p = attn_dropout(p)             -> dropout_p in training
    out = p @ v; out_proj; resid_dropout       (kept as is)

Numerics: eager upcasts q and k to fp32 before the product; the kernel multiplies the fp16/bf16
values with fp32 accumulation, which is the same math (a product of two fp16/bf16 numbers is exact
in fp32) up to summation order; the softmax is fp32 in both and P is cast to v's dtype before
``P @ V`` in both. Unscaled scores never exist in half precision in either. One deliberate
difference: eager's PADDING mask is additive in the model dtype (``finfo(fp16).min = -65504``)
while its scores are fp32, so once ``|q.k|`` passes ~65504 an fp16 model attends to padded keys
(the causal part uses fp32 min and holds); the kernel masks exactly, matching the fp32 model
(``tests/test_forward_adapters.py::test_gpt_neo_fp16_unscaled_scores_beyond_the_fp16_range``).

The 4-D mask. ``GPTNeoModel`` builds the mask with ``create_causal_mask`` (eager: additive, 0 or
``finfo(dtype).min``, shape ``(B, 1, Sq, Sk)``, the same tensor for every layer). The adapter reads
the key padding mask off its last row (the last query of a bottom-right causal mask sees every
key) and then checks the WHOLE mask equals "causal & key padding" exactly; anything else (a user
4-D mask, packed-sequence masks, a static cache's prefill whose causal diagonal is not
bottom-right) runs the original forward. The check is done once per mask tensor and remembered
for the other layers (one host sync per model forward on GPU; this is why ``torch_compile`` is
declared unsupported: the data-dependent choice breaks the graph). ``read_causal_mask`` is shared
with the Bloom and Falcon adapters.

Falls back to the original forward, exactly (warned once per reason): ``output_attentions=True``,
a mask that is not causal + padding, dtypes other than fp16/bf16/fp32, ``attn_dropout.p >= 1``.
Not patched at all: subclasses that override ``forward`` (``GPTNeoFlashAttention2``, which also
ignores the local window), unknown ``attention_type``, a ``bias`` buffer that is not the band the
config describes. Pad query rows are written 0 (as FlashAttention-2 leaves them): compare only
real positions.
"""

from __future__ import annotations

import torch

from ..ops import flash_attention
from .forward_common import (
    check_dropout,
    check_hidden_states,
    check_key_length,
    dropout_of,
    fallback_warning,
    forward_overridden,
    read_causal_mask,
    register_forward_adapter,
)

__all__ = ["GPT_NEO"]

_CLASS = "transformers.models.gpt_neo.modeling_gpt_neo:GPTNeoSelfAttention"
_warned: set[str] = set()


# ----------------------------------------------------------------------------------------------
# GPT-Neo
# ----------------------------------------------------------------------------------------------

def _window(module: torch.nn.Module) -> tuple[int, int]:
    """Local layers keep keys i - w < j <= i (w keys including the query): the kernel's (w - 1, 0)."""
    if module.attention_type == "local":
        return (int(module.config.window_size) - 1, 0)
    return (-1, -1)


def _fallback_reason(module, hidden_states, output_attentions) -> str | None:
    if output_attentions:
        return "output_attentions=True"
    return check_dropout(module, module.attn_dropout) or check_hidden_states(hidden_states)


def neo_forward(module, original, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
    """``GPTNeoSelfAttention.forward`` with the attention in ``flash_attention`` (kwargs are ignored,
    as the original ignores them)."""
    reason = _fallback_reason(module, hidden_states, output_attentions)
    padding = None
    if reason is None:
        padding = read_causal_mask(attention_mask, batch=hidden_states.shape[0], sq=hidden_states.shape[1])
        reason = padding if isinstance(padding, str) else None
    if reason is not None:
        fallback_warning(_warned, "gpt_neo", reason)
        return original(hidden_states, attention_mask=attention_mask, layer_past=layer_past, use_cache=use_cache,
                        output_attentions=output_attentions, **kwargs)
    heads, head_dim = module.num_heads, module.head_dim
    # (B, S, E) -> (B, H, S, D) transposed views of the projections, as eager's _split_heads.
    query = module._split_heads(module.q_proj(hidden_states), heads, head_dim)
    key = module._split_heads(module.k_proj(hidden_states), heads, head_dim)
    value = module._split_heads(module.v_proj(hidden_states), heads, head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_id)
    check_key_length(attention_mask, key, "gpt_neo")
    out = flash_attention(
        query, key, value, causal=True, softmax_scale=1.0, window_size=_window(module),
        attention_mask=padding.key_mask, query_mask=padding.query_mask,
        dropout_p=dropout_of(module, module.attn_dropout))
    out = module._merge_heads(out, heads, head_dim)  # BSHD memory: the permute + contiguous are free
    out = module.resid_dropout(module.out_proj(out))
    return out, None


def _expected_bias(module: torch.nn.Module) -> torch.Tensor:
    """The band ``GPTNeoSelfAttention.__init__`` builds (modeling_gpt_neo.py lines 56-66)."""
    n = module.bias.shape[-1]
    bias = torch.tril(torch.ones((n, n), dtype=torch.bool, device=module.bias.device))
    if module.attention_type == "local":
        bias = torch.bitwise_xor(bias, torch.tril(bias, -int(module.config.window_size)))
    return bias.view(1, 1, n, n)


def _checks(module: torch.nn.Module) -> list[str]:
    reasons = forward_overridden(module, _CLASS)
    kind = getattr(module, "attention_type", None)
    if kind not in ("global", "local"):
        return reasons + [f"attention_type {kind!r} (only 'global' and 'local' exist)"]
    if kind == "local" and int(module.config.window_size) < 1:
        reasons.append(f"window_size {module.config.window_size} < 1")
    elif module.bias.device.type != "meta" and not torch.equal(module.bias, _expected_bias(module)):
        reasons.append("its causal `bias` buffer is not the band its config describes")
    return reasons


GPT_NEO = register_forward_adapter(
    "gpt_neo", _CLASS, neo_forward,
    notes="global and local (window w -> (w - 1, 0)) layers, unscaled scores; "
          "output_attentions=True and non-causal 4-D masks take the original forward",
    checks=(_checks,),
)
