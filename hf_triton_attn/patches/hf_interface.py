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

import inspect
import re
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
    "num_items_in_batch",  # transformers.Trainer passes it down for loss normalisation
})
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# set by patch_model on attention modules that include/exclude keep on the model's eager attention
EXCLUDED_ATTR = "_hf_triton_attn_excluded"
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


def _flat_and_parts(fn) -> list:
    """``and_masks`` nests (a sliding window is ``and_masks(overlay, causal)``, packing adds
    another level): the leaf functions, or ``[fn]`` when it is not a combination."""
    parts = _and_parts(fn)
    if parts is None:
        return [fn]
    return [leaf for p in parts for leaf in _flat_and_parts(p)]


_PACKED = "packed_sequence_mask_function.<locals>.inner_mask"
_REMAP = "remap_positions_for_packed_sequence.<locals>.inner_mask"


_NATIVE_LEAVES = (["causal_mask_function"], ["bidirectional_mask_function"],
                  ["causal_mask_function", "sliding_window_overlay.<locals>.inner_mask"])


def _familiar(mask_function) -> bool:
    """Mask patterns the kernel expresses natively (with the 2-D padding mask): causal,
    bidirectional, and causal sliding window (``and_masks(sliding_window_overlay(w), causal)``,
    the kernel's ``window_size=(w - 1, 0)``). Anything else (chunks, bidirectional windows, custom
    overlays) gets the exact 4-D mask and the eager path. Packing is handled by ``_packed_ids``."""
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return True
    names = sorted(getattr(p, "__qualname__", "") for p in _flat_and_parts(mask_function))
    return names == _NATIVE_LEAVES[2]


def _packed_ids(mask_function) -> torch.Tensor | None:
    """HF's packed sequence ids ``(B, S)`` when ``mask_function`` is a native pattern restricted to
    packed sequences (``and_masks(pattern, packed_sequence_mask_function(ids))``); else None."""
    leaves = _flat_and_parts(mask_function)
    packed = [p for p in leaves if getattr(p, "__qualname__", "") == _PACKED]
    if len(packed) != 1:
        return None
    ids = next((c.cell_contents for c in packed[0].__closure__ or ()
                if isinstance(c.cell_contents, torch.Tensor)), None)
    rest = []
    for p in leaves:
        if p is packed[0]:
            continue
        if getattr(p, "__qualname__", "") == _REMAP:
            # transformers >= 5.2x evaluates the base mask on per-sequence positions; inside one packed
            # sequence positions are consecutive (that is how the sequences are found), so the base
            # mask on token indices is the same relation.
            inner = next((c.cell_contents for c in p.__closure__ or () if callable(c.cell_contents)), None)
            if inner is None:
                return None
            rest.extend(_flat_and_parts(inner))
        else:
            rest.append(p)
    names = sorted(getattr(p, "__qualname__", "") for p in rest)
    return ids if ids is not None and names in _NATIVE_LEAVES else None


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    """2-D padding mask (or None) for native patterns; ``(B, 1, S)`` packed sequence ids for
    packed ``position_ids`` (HF's ``packed_sequence_mask``: one id per sequence); the exact 4-D
    bool mask otherwise."""
    packed_ids = _packed_ids(mask_function)
    if (packed_ids is not None and attention_mask is None and q_offset == 0 and kv_offset == 0
            and q_length == kv_length == packed_ids.shape[-1]):
        return packed_ids.expand(batch_size, -1).unsqueeze(1)
    if _familiar(mask_function) and isinstance(kv_offset, int) and kv_offset == 0:
        if attention_mask is None and isinstance(q_offset, int) and isinstance(kv_length, int):
            used = q_offset + q_length
            if used < kv_length:
                # A preallocated (static) cache without a padding mask: only the first `used` slots
                # hold keys; an all-ones mask of that length makes the attention use seqused_k.
                device = kwargs.get("device")
                return torch.ones(batch_size, used, dtype=torch.bool, device=device)
            return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                        attention_mask, **kwargs)
        if attention_mask is not None:
            return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                        attention_mask, **kwargs)
    # Rolling (sliding-window) caches with a kv offset, traced offsets: the exact 4-D mask.
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


_KNOWN_KWARGS = _HARMLESS_KWARGS | frozenset(_VARLEN_KWARGS) | {"output_attentions"}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fallback_reason(query: torch.Tensor, attention_mask, kwargs: dict) -> str | None:
    """Why this call cannot run the kernel (None: it can). Runs on every call of every layer, so the
    common case (known kwargs, a 2-D or no mask) is a few set and attribute lookups."""
    if kwargs:
        if kwargs.get("output_attentions"):
            return "output_attentions=True"
        # A loop, not ``kwargs.keys() - _KNOWN_KWARGS``: torch 2.11's dynamo cannot trace a set
        # difference of dict keys (InternalTorchDynamoError under transformers' auto-compiled
        # static-cache generate on CUDA, H100 2026-11-26).
        unknown = sorted(k for k, value in kwargs.items() if value is not None and k not in _KNOWN_KWARGS)
        if unknown:
            return f"unsupported argument(s) {', '.join(unknown)}"
    if attention_mask is not None:
        dim = attention_mask.dim()
        if dim == 3 and query.shape[2] != attention_mask.shape[-1]:
            return "packed sequence ids that do not match the query length"
        if dim not in (2, 3):
            return f"a {dim}-D attention mask"
    if query.dtype not in _KERNEL_DTYPES:
        return f"dtype {query.dtype}"
    if query.shape[-1] > 256:
        return f"head dim {query.shape[-1]} > 256"
    return None


def _queries_are_keys(module, causal: bool) -> bool:
    """True when the key padding mask also describes the queries (self-attention).

    Cross-attention is never causal, so causal modules qualify. A non-causal module qualifies only
    when it is positively a self-attention: a ``*SelfAttention`` class (BERT family, DistilBERT's
    ``MultiHeadSelfAttention``) or an encoder module of a BART-style shared class
    (``is_decoder=False``). BART's decoder cross-attention (``is_decoder=True``, not causal) and
    anything unknown keep every query row: the encoder's mask says nothing about the decoder's rows.
    """
    if causal:
        return True
    if "SelfAttention" in type(module).__name__:
        return True
    return getattr(module, "is_decoder", None) is False


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
    if attention_mask is not None and attention_mask.dim() == 3:  # packed sequence ids (B, 1, S)
        ids = attention_mask[:, 0]
        ok = allowed_positions(sq, sk, used_k=sk, causal=causal, window_size=window, device=query.device)
        ok = ok.view(1, 1, sq, sk) & (ids[:, None, :, None] == ids[:, None, None, :])
        return torch.where(ok, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
    used = sk if attention_mask is None else attention_mask.shape[1]
    ok = allowed_positions(sq, sk, used_k=used, causal=causal, window_size=window, device=query.device)
    ok = ok.view(1, 1, sq, sk)
    if attention_mask is not None:
        keys = F.pad(attention_mask.bool(), (0, sk - used))
        ok = ok & keys.view(keys.shape[0], 1, 1, sk)
    return torch.where(ok, 0.0, torch.finfo(query.dtype).min).to(query.dtype)


def _packed_ids_from_cu_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, query: torch.Tensor,
                                key: torch.Tensor) -> torch.Tensor:
    """(1, 1, total) sequence id of every packed token, for self-attention (cu_seq_lens_q == _k)."""
    if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
        raise NotImplementedError("hf_triton_attn: the eager fallback of a packed batch needs cu_seq_lens_q == "
                                  "cu_seq_lens_k (packed self-attention)")
    total = query.shape[2]
    if key.shape[2] != total:
        raise NotImplementedError(f"hf_triton_attn: packed query ({total}) and key ({key.shape[2]}) lengths differ")
    positions = torch.arange(total, device=query.device)
    ids = torch.searchsorted(cu_q[1:].to(query.device, torch.long), positions, right=True)
    return ids.view(1, 1, total)


def _eager(module, query, key, value, attention_mask, reason: str | None, causal, window, dropout, scaling,
           **kwargs):
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"hf_triton_attn: {reason}: this call runs the model's eager attention (warned once)",
                      stacklevel=3)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"hf_triton_attn: {reason or 'excluded by patch_model'}, and "
                                  f"{type(module).__module__} has no eager_attention_forward to fall back to")
    if window is None and (attention_mask is None or attention_mask.dim() != 4):
        raise NotImplementedError("hf_triton_attn: a bidirectional sliding window needs the model's 4-D mask")
    if kwargs.get("cu_seq_lens_q") is not None:
        # A padding-free batch (1, H, total, D): the eager path sees one long row, so the sequence
        # boundaries become packed sequence ids, i.e. a block-diagonal mask (exact, if slow).
        attention_mask = _packed_ids_from_cu_seqlens(kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], query, key)
    mask = _additive_mask(query, key, attention_mask, causal, window)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(1, H, T, D) -> the (T, H, D) view the varlen kernel reads. ``squeeze(0)``, not ``x[0]``: the
    backward of a select allocates a zeroed (1, H, T, D) gradient and copies into it (two more
    kernels and a full copy per tensor on CUDA), a squeeze's is a view: fwd+bwd of this path 335 ->
    160 us with the other changes (T = 300, H12 D64 bf16, 2-core CPU box, launches stubbed). A
    batch of several rows keeps ``x[0]``, as before."""
    return (x.squeeze(0) if x.shape[0] == 1 else x[0]).transpose(0, 1)


def _int32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int32; no ``.to`` call when it already is (the dispatch alone costs ~1 us)."""
    return t if t.dtype is torch.int32 else t.to(torch.int32)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scaling: float | None,
                     dropout: float, window: tuple[int, int], softcap: float, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
    """The kernel's varlen call on packed (T, H, D) q / k / v: ``attention_forward``'s padding-free
    branch and the encoder adapter's lean layers (``encoder_layers.py``) both make it here, so both run
    the same kernel call. Keywords spelled out (a dict unpacked costs ~0.45 us per call)."""
    return flash_attention(q, k, v, causal=causal, softmax_scale=scaling, dropout_p=dropout, window_size=window,
                           softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) -> (out (B, Sq, Hq, Dv), None), like transformers' sdpa."""
    causal, window = _window(module, is_causal, sliding_window)
    if module.__dict__.get(EXCLUDED_ATTR, False):  # patch_model(exclude=...): eager on request, no warning
        extra = {k: v for k, v in (("sliding_window", sliding_window), ("softcap", softcap)) if v is not None}
        return _eager(module, query, key, value, attention_mask, None, causal, window, dropout, scaling,
                      **extra, **kwargs)
    reason = _fallback_reason(query, attention_mask, kwargs)
    if reason is None and window is None:
        reason = "a bidirectional sliding window"
    if reason is not None:
        extra = {k: v for k, v in (("sliding_window", sliding_window), ("softcap", softcap)) if v is not None}
        return _eager(module, query, key, value, attention_mask, reason, causal, window, dropout, scaling,
                      **extra, **kwargs)
    dropout, softcap = float(dropout), float(softcap or 0.0)
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        # Padding-free batch (DataCollatorWithFlattening, or encoder_unpad's packed layers): q is
        # (1, H, total, D); views, no copies. cu_seq_lens converted only when not int32 already and
        # the keywords spelled out: 30.3 -> 27.0 us per call (2-core CPU box, launches stubbed).
        out = packed_attention(_packed(query), _packed(key), _packed(value), causal, scaling, dropout, window,
                               softcap, _int32(cu_q), _int32(kwargs["cu_seq_lens_k"]), int(kwargs["max_length_q"]),
                               int(kwargs["max_length_k"]))
        return out.unsqueeze(0), None
    if attention_mask is not None and attention_mask.dim() == 3:
        # Packed position_ids without cu_seq_lens: sequence ids per token, dense layout.
        out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, dropout_p=dropout,
                              window_size=window, softcap=softcap, segment_ids=attention_mask[:, 0])
        return out.transpose(1, 2), None
    key_mask = query_mask = seqused = None
    if attention_mask is not None:
        batch, used = attention_mask.shape
        sq, sk = query.shape[2], key.shape[2]
        if used < sk:  # static cache: only the first `used` slots hold keys
            seqused = torch.full((batch,), used, dtype=torch.int32, device=key.device)
            key_mask = F.pad(attention_mask, (0, sk - used))
        else:
            key_mask = attention_mask
        if 1 < sq <= used and _queries_are_keys(module, causal):
            # The queries are the last sq of the used keys: pad query rows are skipped and written
            # 0 (as HF's FlashAttention-2 path leaves them); decode steps (sq = 1) are always real.
            query_mask = attention_mask[:, used - sq:]
    # Keywords spelled out: a dict of the common ones, unpacked, cost 0.45 us more per call.
    out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling, dropout_p=dropout,
                          window_size=window, softcap=softcap, attention_mask=key_mask, query_mask=query_mask,
                          seqused_k=seqused)
    return out.transpose(1, 2), None


def register() -> None:
    """Make ``attn_implementation="hf_triton_attn"`` resolvable (called on ``import hf_triton_attn``)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)


# ----------------------------------------------------------------------------------------------
# patch_model support: switch a model (and its sub-models) to this implementation, undoably
# ----------------------------------------------------------------------------------------------

def _uses_interface(cls: type) -> bool:
    """Whether a PreTrainedModel class dispatches its attention through ``AttentionInterface``:
    transformers' own test (``_can_set_attn_implementation``: its modeling source calls
    ``ALL_ATTENTION_FUNCTIONS.get_interface``), the one ``set_attn_implementation`` uses."""
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if can_set is None:
        return bool(getattr(cls, "_supports_attention_backend", False))
    return bool(can_set())


# Extra arguments some families give the attention function that the kernel cannot apply (an
# additive score bias, attention sinks): their models would run eager attention on every call.
_UNSERVABLE_CALL_ARGS = {"position_bias": "a relative position bias (T5 family) added to the scores",
                         "s_aux": "attention sinks (s_aux)"}


def _unservable_call_args(cls: type) -> list[str]:
    module = sys.modules.get(cls.__module__)
    try:
        code = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return []
    found = set()
    for match in re.finditer(r"attention_interface\(", code):
        call = code[match.end():match.end() + 800]
        found.update(arg for arg in _UNSERVABLE_CALL_ARGS if re.search(rf"\b{arg}\s*=", call))
    return sorted(found)


def _interface_models(model: torch.nn.Module) -> list:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel) and _uses_interface(type(m))]


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the attention modules that call the interface inside ``model``: classes
    named ``*Attention*`` whose modeling module defines ``eager_attention_forward``."""
    found = []
    for name, m in model.named_modules():
        cls = type(m)
        if "Attention" in cls.__name__ and hasattr(sys.modules.get(cls.__module__), "eager_attention_forward"):
            found.append((name, m))
    return found


class _RestoreInterface:
    """Undo of ``_apply``: the previous ``_attn_implementation`` of each config and the exclusion
    marks. An object, not a closure: ``copy.deepcopy`` of a patched model maps these references to the
    copy's configs and modules (a closure would keep pointing at the original's), and it pickles."""

    def __init__(self, previous: list, marked: list) -> None:
        self.previous, self.marked = previous, marked

    def __call__(self) -> None:
        for m in self.marked:
            m.__dict__.pop(EXCLUDED_ATTR, None)
        for cfg, value in reversed(self.previous):
            cfg._attn_implementation_internal = value


def _apply(model: torch.nn.Module, excluded: list[torch.nn.Module] = ()) -> _RestoreInterface:
    """Set ``config._attn_implementation`` to ours on the model and every sub-model's config;
    mark the ``excluded`` attention modules so that they keep the eager attention."""
    previous: list[tuple[object, str | None]] = []
    for sub in _interface_models(model):
        cfg = sub.config
        if all(cfg is not seen for seen, _ in previous):
            previous.append((cfg, cfg._attn_implementation_internal))
            cfg._attn_implementation_internal = NAME
    marked = list(excluded)
    for m in marked:
        object.__setattr__(m, EXCLUDED_ATTR, True)
    return _RestoreInterface(previous, marked)


def _check(model: torch.nn.Module) -> list[str]:
    cls = type(model)
    if not _uses_interface(cls):
        return [f"{cls.__name__} picks its attention at construction, not through AttentionInterface"]
    bad = _unservable_call_args(cls)
    if bad:
        return [f"{cls.__name__} passes {', '.join(_UNSERVABLE_CALL_ARGS[a] for a in bad)} to its attention, "
                "which the kernel cannot apply (left on its own attention implementation)"]
    return []


HF_INTERFACE = register_adapter(Adapter(
    name="hf_interface",
    kind=AdapterKind.INTERFACE,
    classes=("transformers.modeling_utils:PreTrainedModel",),
    apply=_apply,
    support=Support(notes="anything unsupported runs the model's eager attention, exactly"),
    checks=(_check,),
    inner_modules=attention_modules,
))
