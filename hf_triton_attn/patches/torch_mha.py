"""Forward adapter for ``torch.nn.MultiheadAttention``: its own projections, our kernel between.

Served on the fast path: self- and cross-attention, ``batch_first`` either way, ``kdim``/``vdim``,
a boolean ``key_padding_mask`` (True = padding, torch's convention), ``is_causal=True`` with its
square causal ``attn_mask`` (torch requires both), dropout in training. Everything else takes the
module's original forward, exactly: ``need_weights=True`` (torch's default; weights cost an S^2
tensor), any other ``attn_mask``, float key padding masks, ``add_bias_kv``, ``add_zero_attn``.
One deliberate difference: a row whose keys are all padding gives 0 here where torch gives NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import flash_attention
from ..registry import Adapter, AdapterKind, Support, register_adapter
from .forward_common import install_forward


def _fast_path_ok(module: torch.nn.MultiheadAttention, query, key, key_padding_mask, need_weights,
                  attn_mask, is_causal) -> bool:
    if need_weights or module.bias_k is not None or module.add_zero_attn:
        return False
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        return False
    if attn_mask is not None:
        seq_dim = 1 if module.batch_first else 0
        if not is_causal or query.shape[seq_dim] != key.shape[seq_dim]:
            return False
    return query.dtype in (torch.float16, torch.bfloat16, torch.float32) and query.dim() == 3


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """(N, L, E_in) -> (N, heads, L, head_dim) as a transposed view of the projection."""
    n, length, _ = x.shape
    return F.linear(x, weight, bias).view(n, length, heads, -1).transpose(1, 2)


def mha_forward(module: torch.nn.MultiheadAttention, original, query, key, value, key_padding_mask=None,
                need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    if not _fast_path_ok(module, query, key, key_padding_mask, need_weights, attn_mask, is_causal):
        return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q = _project(query, w_q, b_q, heads)
    k = _project(key, w_k, b_k, heads)
    v = _project(value, w_v, b_v, heads)
    out = flash_attention(
        q, k, v, causal=bool(is_causal), dropout_p=module.dropout if module.training else 0.0,
        attention_mask=None if key_padding_mask is None else ~key_padding_mask)
    n, length = query.shape[0], query.shape[1]
    out = F.linear(out.transpose(1, 2).reshape(n, length, e), module.out_proj.weight, module.out_proj.bias)
    return (out if module.batch_first else out.transpose(0, 1)), None


def _checks(module: torch.nn.MultiheadAttention) -> list[str]:
    reasons = []
    if module.bias_k is not None:
        reasons.append("add_bias_kv=True (runs the original forward on every call)")
    if module.add_zero_attn:
        reasons.append("add_zero_attn=True (runs the original forward on every call)")
    return reasons


TORCH_MHA = register_adapter(Adapter(
    name="torch_mha",
    kind=AdapterKind.FORWARD,
    classes=("torch.nn.modules.activation:MultiheadAttention",),
    apply=lambda module: install_forward(module, mha_forward),
    support=Support(kv_cache=False, notes="need_weights=True and arbitrary attn_mask take the original forward"),
    checks=(_checks,),
    head_dim_of=lambda m: m.head_dim,
))
