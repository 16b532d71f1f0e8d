"""The interface adapter: ``attn_implementation="hf_triton_attn"`` for models that dispatch through
transformers' ``AttentionInterface`` (BERT, GPT-2, Llama, Mistral, Qwen2, Gemma-2, ...).

Two functions are registered under the name ``hf_triton_attn``:
- a mask function (``AttentionMaskInterface``) that hands the attention the 2-D padding mask
  ``(B, kv_len)`` (or None) for the mask patterns the kernel expresses natively (causal,
  bidirectional, sliding window), and the exact 4-D boolean mask for anything else (packed
  sequences, chunked attention, custom ``or``/``and`` masks);
- an attention function that runs ``flash_attention`` and, for whatever it does not understand (a
  4-D mask, unknown kwargs such as ``s_aux``, ``output_attentions=True``, unsupported dtypes or head
  dims), calls that model's own ``eager_attention_forward`` with the equivalent additive mask, warned
  once per reason.

This is the only module that imports transformers; ``hf_triton_attn/__init__.py`` imports it
when transformers is installed.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    flash_attention_mask,
    sdpa_mask,
)

from ..ops import flash_attention
from ..reference import allowed_positions
from ..registry import Adapter, AdapterKind, Support, register_adapter

NAME = "hf_triton_attn"
# kwargs that models pass along and that change nothing in the attention itself
_HARMLESS_KWARGS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_hidden_states", "return_dict", "past_key_values",
    "layer_idx", "token_type_ids", "position_embeddings",
})
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_warned: set[str] = set()


def _and_parts(fn) -> tuple | None:
    """The functions combined by ``and_masks(...)``, or None if ``fn`` is not such a combination."""
    if getattr(fn, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    for cell in fn.__closure__ or ():
        parts = cell.cell_contents
        if isinstance(parts, tuple) and all(callable(p) for p in parts):
            return parts
    return None


def _familiar(mask_function) -> bool:
    """Mask patterns the kernel expresses natively (with the 2-D padding mask): causal,
    bidirectional, and causal sliding window (``and_masks(sliding_window_overlay(w), causal)``,
    the kernel's ``window_size=(w - 1, 0)``). Anything else (packed sequences, chunks, bidirectional
    windows, custom overlays) gets the exact 4-D mask and the eager path."""
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return True
    parts = _and_parts(mask_function)
    if parts is None or len(parts) != 2:
        return False
    names = sorted(getattr(p, "__qualname__", "") for p in parts)
    return names == ["causal_mask_function", "sliding_window_overlay.<locals>.inner_mask"]


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    """2-D padding mask (or None) for native patterns; the exact 4-D bool mask otherwise."""
    if _familiar(mask_function):
        return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                    attention_mask, **kwargs)
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def _fallback_reason(query: torch.Tensor, attention_mask, kwargs: dict) -> str | None:
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in _HARMLESS_KWARGS and k not in _VARLEN_KWARGS and k != "output_attentions"
                     and v is not None)
    if unknown:
        return f"unsupported argument(s) {', '.join(unknown)}"
    if attention_mask is not None and attention_mask.dim() != 2:
        return f"a {attention_mask.dim()}-D attention mask"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype}"
    if query.shape[-1] > 256:
        return f"head dim {query.shape[-1]} > 256"
    return None


def _window(module, is_causal, sliding_window) -> tuple[bool, tuple[int, int] | None]:
    """(causal, window_size) in the kernel's terms; window None when only eager can express it."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if not sliding_window:
        return causal, (-1, -1)
    # HF's causal sliding window keeps keys with kv > q - w: w keys including the query itself.
    return causal, ((sliding_window - 1, 0) if causal else None)


def _additive_mask(query, key, attention_mask, causal: bool, window: tuple[int, int]) -> torch.Tensor | None:
    """The eager (additive, 4-D) form of what the kernel would have applied."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        return attention_mask
    sq, sk = query.shape[2], key.shape[2]
    used = sk if attention_mask is None else attention_mask.shape[1]
    ok = allowed_positions(sq, sk, used_k=used, causal=causal, window_size=window, device=query.device)
    ok = ok.view(1, 1, sq, sk)
    if attention_mask is not None:
        keys = F.pad(attention_mask.bool(), (0, sk - used))
        ok = ok & keys.view(keys.shape[0], 1, 1, sk)
    return torch.where(ok, 0.0, torch.finfo(query.dtype).min).to(query.dtype)


def _eager(module, query, key, value, attention_mask, reason: str, causal, window, dropout, scaling, **kwargs):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"hf_triton_attn: {reason}: this call runs the model's eager attention (warned once)",
                      stacklevel=3)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"hf_triton_attn: {reason}, and {type(module).__module__} has no "
                                  "eager_attention_forward to fall back to")
    if window is None and (attention_mask is None or attention_mask.dim() != 4):
        raise NotImplementedError("hf_triton_attn: a bidirectional sliding window needs the model's 4-D mask")
    mask = _additive_mask(query, key, attention_mask, causal, window)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> (out (B, Sq, Hq, Dv), None), like transformers' sdpa."""
    causal, window = _window(module, is_causal, sliding_window)
    reason = _fallback_reason(query, attention_mask, kwargs)
    if reason is None and window is None:
        reason = "a bidirectional sliding window"
    if reason is not None:
        extra = {k: v for k, v in (("sliding_window", sliding_window), ("softcap", softcap)) if v is not None}
        return _eager(module, query, key, value, attention_mask, reason, causal, window, dropout, scaling,
                      **extra, **kwargs)
    common = dict(causal=causal, softmax_scale=scaling, dropout_p=float(dropout), window_size=window,
                  softcap=float(softcap or 0.0))
    if kwargs.get("cu_seq_lens_q") is not None:
        # Padding-free batch (DataCollatorWithFlattening): q is (1, H, total, D); views, no copies.
        out = flash_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu_seqlens_q=kwargs["cu_seq_lens_q"].to(torch.int32), cu_seqlens_k=kwargs["cu_seq_lens_k"].to(torch.int32),
            max_seqlen_q=int(kwargs["max_length_q"]), max_seqlen_k=int(kwargs["max_length_k"]), **common)
        return out.unsqueeze(0), None
    key_mask = seqused = None
    if attention_mask is not None:
        batch, used = attention_mask.shape
        sk = key.shape[2]
        if used < sk:  # static cache: only the first `used` slots hold keys
            seqused = torch.full((batch,), used, dtype=torch.int32, device=key.device)
            key_mask = F.pad(attention_mask, (0, sk - used))
        else:
            key_mask = attention_mask
    out = flash_attention(query, key, value, attention_mask=key_mask, seqused_k=seqused, **common)
    return out.transpose(1, 2), None


def register() -> None:
    """Make ``attn_implementation="hf_triton_attn"`` resolvable (called on ``import hf_triton_attn``)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)


# ----------------------------------------------------------------------------------------------
# patch_model support: switch a model (and its sub-models) to this implementation, undoably
# ----------------------------------------------------------------------------------------------

def _interface_models(model: torch.nn.Module) -> list:
    from transformers import PreTrainedModel

    return [m for m in model.modules()
            if isinstance(m, PreTrainedModel) and getattr(type(m), "_supports_attention_backend", False)]


def _apply(model: torch.nn.Module):
    """Set ``config._attn_implementation`` to ours on the model and every sub-model's config."""
    previous: list[tuple[object, str | None]] = []
    for sub in _interface_models(model):
        cfg = sub.config
        if all(cfg is not seen for seen, _ in previous):
            previous.append((cfg, cfg._attn_implementation_internal))
            cfg._attn_implementation_internal = NAME

    def undo() -> None:
        for cfg, value in reversed(previous):
            cfg._attn_implementation_internal = value
    return undo


def _check(model: torch.nn.Module) -> list[str]:
    if not getattr(type(model), "_supports_attention_backend", False):
        return [f"{type(model).__name__} picks its attention at construction, not through AttentionInterface"]
    return []


HF_INTERFACE = register_adapter(Adapter(
    name="hf_interface",
    kind=AdapterKind.INTERFACE,
    classes=("transformers.modeling_utils:PreTrainedModel",),
    apply=_apply,
    support=Support(notes="anything unsupported runs the model's eager attention, exactly"),
    checks=(_check,),
))
