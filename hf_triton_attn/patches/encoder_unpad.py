"""Encoder unpadding: a model-level adapter for BERT-style encoders (``BertEncoder``,
``RobertaEncoder``, ``XLMRobertaEncoder``, ``CamembertEncoder``, ``ElectraEncoder``,
``Data2VecTextEncoder``, ``ErnieEncoder``, DistilBERT's ``Transformer``; transformers 5.17 and 5.24).

What. Every op of these encoder layers except attention works token by token (linear layers,
GELU, dropout, residual adds, LayerNorm), so the padding tokens of a batch need not be computed at
all. The adapter replaces the encoder module's ``forward``: it removes the padding ONCE at the
encoder's input, ``(B, S, H) -> (1, T, H)`` with the T real tokens packed, runs every layer on the
packed tokens with the attention told where each sequence starts (``cu_seq_lens_q/k``,
``max_length_q/k``, which the layers forward through ``**kwargs`` to the attention interface,
whose ``hf_triton_attn`` function runs the kernel's varlen mode), and scatters the result back to
``(B, S, H)`` at the output. Attention work is then sum(len^2) and every other op sum(len) instead
of B * S: for a batch 64% full, about a third of the linear-layer work is saved.

Why a model-level adapter. The interface adapter alone already skips padded keys and queries in
the attention, but the linear layers around it still run on B * S tokens; only the encoder sees
all layers at once, so only it can pack the tokens once for all of them.

The one host sync. The number of real tokens T (and the longest sequence, the kernel's grid size)
must be Python ints to allocate the packed tensor, so each model forward reads two numbers from
the device once (``.tolist()`` in ``_pack``); the indices of the real tokens then come from
``torch.nonzero_static`` without a second sync. The mask function of the ``hf_triton_attn``
implementation already syncs once (transformers' ``flash_attention_mask`` tests
``attention_mask.all()``), so a padded forward costs two syncs in all, no matter how many layers.

Padding rows. The encoder's output is ZERO at padding positions. Eager attention fills those rows
with values computed from the pad tokens (which nothing real depends on); HF's FlashAttention-2
path and our interface adapter also differ from eager there. Compare only real positions; models
that read position 0 (BERT's pooler reads the [CLS] token) need right padding, as with any
FlashAttention path. ``output_hidden_states`` gets the same treatment: the embedding output (entry
0) is the model's own padded tensor, every later entry is zero at padding positions.

Exactness. Unpadding runs only when it is exactly the padded computation, and the original forward
runs otherwise (silently where the situation is ordinary, warned once where it is unexpected):
- the model's ``config._attn_implementation`` is not ``hf_triton_attn`` (the layers would not call
  our varlen attention), or ``hf_triton_attn`` no longer names our attention function;
- an attention module inside is excluded by ``patch_model(include/exclude)`` (its eager attention
  knows no ``cu_seq_lens`` and would mix the sequences);
- decoders and anything that is not plain self-attention: ``is_decoder``, causal or
  cross-attention modules, ``encoder_hidden_states``, a cache, ``use_cache``;
- ``output_attentions`` (weights come from the eager path), a mask that is not a 2-D padding
  mask (a user's 4-D mask), no padding mask (``None``: nothing to remove) or no padding in it;
- what the kernel would hand to the eager fallback anyway (dtype other than fp16/bf16/fp32, head
  dim > 256), chunked feed-forward (``chunk_size_feed_forward`` splits the sequence dimension
  into equal chunks), an encoder subclass that overrides ``forward``, extra positional or unknown
  keyword arguments, and ``torch.compile`` tracing (the data-dependent token count breaks a
  fullgraph trace; a compiled encoder takes the padded interface path, which traces).
Forward hooks a user registers on the layers see the packed ``(1, T, H)`` tensors.

Lean layers. Where nothing needs transformers' own layer modules (no hooks on them, no output
capture, a reviewed transformers source: ``encoder_layers.py``), the packed tokens go through the
layers as one function of the same leaf modules, bitwise the same outputs and gradients with less
host time per layer; otherwise the encoder's own forward runs the layers on the packed tokens.

Host cost. These checks run on every forward, so the attention modules inside the encoder are found
once and cached until the module tree may have changed (a global module-registration hook, installed
on the first forward of a patched encoder, counts registrations); configs are read once per forward. H100
host, BERT-base: 203-219 -> 29-30 us per forward for the checks, and the encoder's entry (checks,
``_pack`` with its sync, the gather) 0.73-0.75 -> 0.41 ms (benchmarks/host_unpad.py,
results/2026-11-27_h100_session15_run3_4_host_unpad.log).
"""

from __future__ import annotations

import sys
import weakref

import torch

from ..registry import Adapter, AdapterKind, Support, class_path, register_adapter
from . import encoder_layers
from .forward_common import fallback_warning, install_forward

__all__ = ["ENCODER_UNPAD", "ENCODER_CLASSES"]

ENCODER_CLASSES = (
    "transformers.models.bert.modeling_bert:BertEncoder",
    "transformers.models.roberta.modeling_roberta:RobertaEncoder",
    "transformers.models.xlm_roberta.modeling_xlm_roberta:XLMRobertaEncoder",
    "transformers.models.camembert.modeling_camembert:CamembertEncoder",
    "transformers.models.electra.modeling_electra:ElectraEncoder",
    "transformers.models.data2vec.modeling_data2vec_text:Data2VecTextEncoder",
    "transformers.models.ernie.modeling_ernie:ErnieEncoder",
    "transformers.models.distilbert.modeling_distilbert:Transformer",
)
_NAME = "encoder_unpad"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# Arguments that make the encoder something other than bidirectional self-attention over the given
# tokens (a decoder, cross-attention, a cache) or that need the eager path (attention weights).
_BLOCKING = ("encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache", "use_cache",
             "output_attentions")
# Passed to the layers unchanged: flags and Trainer's loss normaliser, which no per-token op reads
# (the attention interface treats them as harmless too).
_PASSED = frozenset({"output_hidden_states", "return_dict", "num_items_in_batch"})
# (B, S)-shaped inputs the embeddings already consumed; their layout no longer matches the packed
# tokens, and the layers of these families do not read them (the attention ignores position_ids).
_DROPPED = frozenset({"position_ids", "token_type_ids"})
# Already a padding-free batch (DataCollatorWithFlattening): nothing to unpad, and ours would clash.
_VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_warned: set[str] = set()
_nonzero_static_ok: dict[str, bool] = {}


# ----------------------------------------------------------------------------------------------
# when unpadding is exact
# ----------------------------------------------------------------------------------------------

class _Ordinary(str):
    """A fallback reason that is part of normal use (no padding, a decoder, eager attention...):
    taken silently. Every other reason is warned once."""


# made once here: torch 2.11's dynamo cannot trace ``str.__new__`` (a fullgraph trace of the encoder
# failed on building this reason inside it; torch 2.13 traces it)
_COMPILE_TRACING = _Ordinary("torch.compile tracing")


def _hf_interface():
    """The interface adapter module, imported on first use (only it imports transformers at import)."""
    from . import hf_interface

    return hf_interface


def _attention_modules(encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The attention modules inside the encoder that call the attention interface (patch_model's
    include/exclude select among them, as for the interface adapter)."""
    return _hf_interface().attention_modules(encoder)


def _served_class(encoder: torch.nn.Module) -> type | None:
    """The registered class ``encoder`` is served as (itself or the nearest registered base)."""
    return next((k for k in type(encoder).__mro__ if class_path(k) in ENCODER_CLASSES), None)


def _config_values(config) -> tuple:
    """The config attributes ``_attention_reason`` reads, in its order. Read once per config and call:
    a transformers 5 config attribute costs ~3 us (``__getattribute__``), ``_attn_implementation``
    ~6 us (2-core CPU box), and the 12 layers of BERT-base share one config."""
    return (getattr(config, "_attn_implementation", None), getattr(config, "is_decoder", False),
            getattr(config, "add_cross_attention", False), getattr(config, "chunk_size_feed_forward", 0))


def _calls_our_function(cls: type, hf) -> bool:
    """Whether the attention modules of class ``cls`` would call ``hf_triton_attn``'s function."""
    functions = getattr(sys.modules.get(cls.__module__), "ALL_ATTENTION_FUNCTIONS", None)
    return functions is not None and functions.get(hf.NAME) is hf.attention_forward


def _attention_reason(m: torch.nn.Module, hf, config_values: tuple, calls_ours: bool) -> str | None:
    """Why attention module ``m`` would not run the varlen kernel on packed tokens (None = it would).
    Mirrors what sends ``hf_interface.attention_forward`` to its eager fallback, which knows no
    ``cu_seq_lens`` and would attend across the packed sequences. ``config_values`` and ``calls_ours``:
    ``_config_values`` of ``m``'s config and ``_calls_our_function`` of its class (``_module_reason``
    computes them once per config and class)."""
    if m.__dict__.get(hf.EXCLUDED_ATTR, False):
        return _Ordinary("an attention module is excluded by patch_model")
    attn_implementation, config_is_decoder, cross_attention, chunked = config_values
    if attn_implementation != hf.NAME:
        return _Ordinary("the attention implementation is not hf_triton_attn")
    if getattr(m, "is_causal", False) or getattr(m, "is_decoder", False) or config_is_decoder:
        return _Ordinary("a decoder (causal self-attention)")
    if "Cross" in type(m).__name__ or cross_attention:
        return _Ordinary("cross-attention layers")
    if not calls_ours:
        return f"{type(m).__name__} would not call hf_triton_attn's attention function"
    head_dim = getattr(m, "attention_head_size", None)
    if not isinstance(head_dim, int) or not 0 < head_dim <= _MAX_HEAD_DIM:
        return f"head dim {head_dim} (the kernel serves 1..{_MAX_HEAD_DIM})"
    if chunked:
        return "chunked feed-forward (chunk_size_feed_forward > 0 splits the sequence dimension)"
    return None


# Bumped by a global module-registration hook (installed on the first forward of a patched encoder,
# when the first list is cached) whenever any module anywhere gets a submodule (``setattr``,
# ``add_module``, ``ModuleList.append``...): the attention modules found inside an encoder are cached
# per encoder until the module tree may have changed, instead of walking it on every forward
# (``named_modules`` over BERT-base: 225 us per call on the 2-core CPU box, 479 us for the whole
# fallback check; now ~35 us).
_tree_version = 0
_tree_hook = None
_callers_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_module_registered(module, name, submodule) -> None:
    global _tree_version
    _tree_version += 1


def _tree_key(encoder: torch.nn.Module) -> tuple:
    """What invalidates the cached callers: any module registration, and a removal from the encoder's
    children or from their children (``del encoder.layer[i]`` rebuilds ``layer._modules`` without
    registering anything). A removal deeper down leaves a stale module in the list, which can only
    send a call to the original forward, never unpad one that should not be."""
    children = tuple(encoder._modules.values())
    return (_tree_version, len(children),
            *((id(c), id(c._modules), len(c._modules)) if c is not None else (0, 0, 0) for c in children))


def _interface_callers(encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules inside the encoder that call the interface and hold the config
    (BertSelfAttention, not its BertAttention wrapper): the ones the attention function reads the
    exclusion mark from."""
    global _tree_hook
    if _tree_hook is None:
        _tree_hook = torch.nn.modules.module.register_module_module_registration_hook(_on_module_registered)
    key = _tree_key(encoder)
    cached = _callers_cache.get(encoder)
    if cached is not None and cached[0] == key:
        return cached[1]
    callers = [m for _, m in _attention_modules(encoder) if "config" in m.__dict__]
    _callers_cache[encoder] = (key, callers)
    return callers


def _module_reason(encoder: torch.nn.Module) -> str | None:
    served = _served_class(encoder)
    if served is None or type(encoder).forward is not served.forward:
        return f"{type(encoder).__name__} overrides the forward of {served.__name__ if served else 'its class'}"
    callers = _interface_callers(encoder)
    if not callers:
        return "no attention module found inside the encoder"
    hf = _hf_interface()
    per_config: dict[int, tuple] = {}
    per_class: dict[type, bool] = {}
    for m in callers:
        config = m.__dict__["config"]
        values = per_config.get(id(config))
        if values is None:
            values = per_config[id(config)] = _config_values(config)
        ours = per_class.get(type(m))
        if ours is None:
            ours = per_class[type(m)] = _calls_our_function(type(m), hf)
        reason = _attention_reason(m, hf, values, ours)
        if reason is not None:
            return reason
    return None


def _call_reason(hidden_states, mask, extra_args: tuple, kwargs: dict) -> str | None:
    if extra_args:
        return f"{len(extra_args)} extra positional argument(s)"
    for name in _BLOCKING:
        if kwargs.get(name) is not None and kwargs.get(name) is not False:
            return _Ordinary(f"{name} given")
    if any(kwargs.get(name) is not None for name in _VARLEN):
        return _Ordinary("an already packed batch (cu_seq_lens given)")
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in _PASSED and k not in _DROPPED and k not in _BLOCKING)
    if unknown:
        return f"unsupported argument(s) {', '.join(unknown)}"
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        return f"hidden states of shape {tuple(getattr(hidden_states, 'shape', ()))}"
    if hidden_states.dtype not in _KERNEL_DTYPES:
        return f"dtype {hidden_states.dtype}"
    if mask is None:
        return _Ordinary("no padding mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return _Ordinary(f"a {getattr(mask, 'dim', lambda: '?')()}-D attention mask")
    if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        return f"a padding mask of shape {tuple(mask.shape)} for hidden states {tuple(hidden_states.shape)}"
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        return f"a padding mask of dtype {mask.dtype}"
    return None


# ----------------------------------------------------------------------------------------------
# transformers' output capturing (output_hidden_states)
# ----------------------------------------------------------------------------------------------

_UNKNOWN = object()


def _active_capture():
    """The dict transformers' ``capture_outputs`` collects layer outputs into during this forward
    (None or {} when nothing is collected); ``_UNKNOWN`` when this transformers has no such thing.

    The layers' forward hooks append their (here: packed) outputs to it, so the adapter re-pads
    what they appended. Looked up in ``sys.modules``: the model's forward already imported it."""
    capturing = sys.modules.get(encoder_layers.CAPTURE_MODULE)
    collector = getattr(capturing, "_active_collector", None)
    if collector is None or not callable(getattr(collector, "get", None)):
        return _UNKNOWN
    return collector.get()


def _capture_reason(collected) -> str | None:
    if collected is _UNKNOWN:
        return "transformers' output capturing was not found (output_hidden_states could not be re-padded)"
    if collected is not None and not isinstance(collected, dict):
        return "an unfamiliar output collector"
    extra = sorted(k for k in (collected or {}) if k not in ("hidden_states", "_hidden_states_layers"))
    if extra:
        return _Ordinary(f"output_attentions (collecting {', '.join(extra)})")
    return None


def _repad_captured(collected: dict | None, start: int, packed_input: torch.Tensor, padded_input: torch.Tensor,
                    plan: _Plan) -> None:
    """Re-pad the hidden states the layers' hooks appended since index ``start``: the packed input
    (entry 0 of ``hidden_states``) becomes the padded input it came from, every packed layer output
    is scattered back with zeros at padding positions; ``None`` (layers not selected) stays."""
    if not collected or "hidden_states" not in collected:
        return
    states = collected["hidden_states"]
    for i in range(start, len(states)):
        s = states[i]
        if s is packed_input:
            states[i] = padded_input
        elif isinstance(s, torch.Tensor) and s.dim() == 3 and s.shape[:2] == (1, plan.total):
            states[i] = plan.repad(s)


# ----------------------------------------------------------------------------------------------
# unpad / re-pad
# ----------------------------------------------------------------------------------------------

class _Plan:
    """Where the real tokens of a (B, S) padding mask are, in the kernel's varlen terms."""

    def __init__(self, indices: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, total: int,
                 batch: int, seqlen: int) -> None:
        self.indices, self.cu_seqlens, self.max_seqlen = indices, cu_seqlens, max_seqlen
        self.total, self.batch, self.seqlen = total, batch, seqlen

    def varlen_kwargs(self) -> dict:
        return dict(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (1, T, H), the real tokens in row-major order (a gather; its backward is an
        index_add, deterministic on CUDA under ``torch.use_deterministic_algorithms``)."""
        return x.reshape(self.batch * self.seqlen, -1).index_select(0, self.indices).unsqueeze(0)

    def repad(self, x: torch.Tensor) -> torch.Tensor:
        """(1, T, H) -> (B, S, H) with zeros at padding positions. ``index_put`` (not ``index_copy``,
        which has no deterministic CUDA kernel); its gradient for ``x`` is the exact gather."""
        flat = x.new_zeros(self.batch * self.seqlen, x.shape[-1])
        return flat.index_put((self.indices,), x[0]).view(self.batch, self.seqlen, -1)


def _real_indices(keep: torch.Tensor, total: int) -> torch.Tensor:
    """Flat indices of the ``total`` nonzero entries of ``keep``. ``nonzero_static`` needs no host
    sync (the size is known); where a device lacks it (CUDA before torch 2.6), ``nonzero`` does."""
    device = keep.device.type
    if _nonzero_static_ok.get(device, True):
        try:
            return torch.nonzero_static(keep, size=total).flatten()
        except (NotImplementedError, RuntimeError):
            _nonzero_static_ok[device] = False
    return keep.nonzero().flatten()


def _pack(mask: torch.Tensor) -> _Plan | None:
    """The varlen plan of a (B, S) padding mask (nonzero = real token), or None when there is no
    padding (nothing to gain) or no real token at all (the padded path handles empty rows)."""
    batch, seqlen = mask.shape
    keep = mask.bool()
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = seqlens.new_zeros(batch + 1)
    torch.cumsum(seqlens, 0, dtype=torch.int32, out=cu_seqlens[1:])
    # The one host sync of the unpadded forward: T and the longest sequence as Python ints.
    total, longest = torch.stack((cu_seqlens[-1], seqlens.max())).tolist()
    if total == batch * seqlen or total == 0:
        return None
    return _Plan(_real_indices(keep.flatten(), total), cu_seqlens, int(longest), int(total), batch, seqlen)


def _set_last_hidden_state(out, value: torch.Tensor):
    if hasattr(out, "last_hidden_state"):
        out.last_hidden_state = value  # a ModelOutput: updates the mapping and the tuple view too
        return out
    if isinstance(out, tuple):
        return (value, *out[1:])
    raise TypeError(f"hf_triton_attn: {_NAME}: unexpected encoder output {type(out).__name__}")


# ----------------------------------------------------------------------------------------------
# the installed forward
# ----------------------------------------------------------------------------------------------

def _split(args: tuple, kwargs: dict) -> tuple[object, object, tuple, dict]:
    """(hidden_states, attention_mask, extra positional args, other kwargs) of an encoder call."""
    rest = dict(kwargs)
    args = list(args)
    hidden = args.pop(0) if args else rest.pop("hidden_states", None)
    mask = args.pop(0) if args else rest.pop("attention_mask", None)
    return hidden, mask, tuple(args), rest


def _fallback_reason(encoder: torch.nn.Module, hidden, mask, extra_args: tuple, rest: dict) -> str | None:
    if torch.compiler.is_compiling():
        return _COMPILE_TRACING
    return (_call_reason(hidden, mask, extra_args, rest) or _module_reason(encoder)
            or _capture_reason(_active_capture()))


def unpadded_forward(encoder: torch.nn.Module, original, *args, **kwargs):
    """The encoder's forward on packed real tokens (see the module docstring), or ``original``."""
    hidden, mask, extra_args, rest = _split(args, kwargs)
    reason = _fallback_reason(encoder, hidden, mask, extra_args, rest)
    plan = _pack(mask) if reason is None else None
    if plan is None:
        if reason is not None and not isinstance(reason, _Ordinary):
            fallback_warning(_warned, _NAME, reason)
        return original(*args, **kwargs)
    collected = _active_capture()
    start = len(collected["hidden_states"]) if collected and "hidden_states" in collected else 0
    packed = plan.unpad(hidden)
    # transformers' layers where they collect outputs (output_hidden_states), else the lean runner
    runner = None if collected else encoder_layers.lean_layers(
        encoder, _tree_key(encoder), _hf_interface().packed_attention)
    if runner is not None:
        out = runner(packed, plan.cu_seqlens, plan.max_seqlen)
    else:
        layer_kwargs = {k: v for k, v in rest.items() if k not in _DROPPED}
        out = original(packed, attention_mask=None, **layer_kwargs, **plan.varlen_kwargs())
    out = _set_last_hidden_state(out, plan.repad(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    _repad_captured(collected, start, packed, hidden, plan)
    return out


def _apply(encoder: torch.nn.Module, excluded: list[torch.nn.Module] = ()) -> object:
    """Install the unpadding forward. ``excluded`` attention modules (include/exclude) carry the
    interface adapter's exclusion mark, which makes every call take the original forward."""
    return install_forward(encoder, unpadded_forward)


ENCODER_UNPAD = register_adapter(Adapter(
    name=_NAME,
    kind=AdapterKind.MODEL,
    classes=ENCODER_CLASSES,
    apply=_apply,
    support=Support(kv_cache=False, torch_compile=False,
                    notes="padded batches run on packed real tokens (varlen attention); padding rows of "
                          "the output are 0; anything else runs the original forward"),
    inner_modules=_attention_modules,
))
