"""Lean layers for the encoder adapter: the packed tokens of a BERT-family or DistilBERT encoder go
through its layers as one function of the same modules, instead of through transformers' layer modules.

Why. BERT inference with the encoder adapter is host-bound: the GPU work of a packed BERT-base layer
is ~0.4 ms, and transformers' layer code takes 0.56-1.4 ms of host time per layer on the lent H100
hosts (benchmarks/NOTES.md, sessions 14-15): six nested module calls with keyword plumbing,
``apply_chunking_to_forward``'s ``inspect.signature`` on every layer, the attention interface's lookup
and checks. The leaves (the Linear, LayerNorm, Dropout and activation modules) are what does the work.

What. ``lean_layers(encoder, key, packed_attention)`` gives a runner when the encoder is one of the
families in ``FAMILIES``, else None (the adapter then calls the encoder's own forward on the
packed tokens, as before). The runner does exactly what transformers' encoder forward and the layer's
composite modules (``{Bert}Layer`` -> ``{Bert}Attention`` -> ``{Bert}SelfAttention`` /
``{Bert}SelfOutput`` -> ``{Bert}Intermediate`` -> ``{Bert}Output``; DistilBERT's ``TransformerBlock``
-> ``DistilBertSelfAttention`` / ``FFN``) do on packed self-attention: the same leaf ops in the same
order (so the same dropout draws from torch's generator: outputs and gradients are bitwise those of
transformers' layers, in eval and in train mode), and the attention through
``hf_interface.packed_attention``, the call ``hf_interface.attention_forward`` makes. A leaf that is
exactly ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Dropout`` without hooks of its own runs as its
forward's functional op; any other leaf (PEFT's LoRA layers, a quantized linear, a hooked leaf, the
activation) is called as a module.

When. Only where skipping the composite modules changes nothing:
- the sources of the encoder class and of its composite classes are, up to formatting, comments,
  docstrings and annotations, ones this module was written against (``_KNOWN_SOURCES``: fingerprints
  of transformers 5.17 and 5.24; ``scripts/lean_layer_fingerprints.py`` prints them); a transformers
  release that changes them runs transformers' layers until they are reviewed;
- every layer holds exactly those classes (checked on every forward: a ``__class__`` assignment
  registers nothing), no hook, instance-level ``forward`` (accelerate's device hooks) or
  ``module.compile()`` on any composite module (transformers' own output-capturing hooks
  excepted while they collect nothing: the adapter already sends ``output_hidden_states`` to
  transformers' layers), no global module hook, no gradient checkpointing in a training layer, no
  TorchScript tracing.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import textwrap
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

__all__ = ["lean_layers", "source_fingerprint", "FAMILIES"]


class _Family(NamedTuple):
    """One layer structure the runner replicates."""

    prefix: str  # the family's class-name prefix, replaced by ``Bert`` in fingerprints ("" for none)
    composites: tuple[tuple[str, str], ...]  # (attribute path from the layer, class name); "" = the layer
    output_class: str  # what the encoder's forward returns
    layer: Callable  # the layer function: (layer, hidden [T, E], T, attend) -> [T, E]


def _bert_family(prefix: str) -> _Family:
    names = (("", "Layer"), ("attention", "Attention"), ("attention.self", "SelfAttention"),
             ("attention.output", "SelfOutput"), ("intermediate", "Intermediate"), ("output", "Output"))
    return _Family(prefix, tuple((path, prefix + name) for path, name in names),
                   "BaseModelOutputWithPastAndCrossAttentions", _bert_layer)


# Encoder class name -> its family (filled below the layer functions).
FAMILIES: dict[str, _Family] = {}
# ``source_fingerprint`` of the encoder class and its composite classes (whole class sources, so
# ``feed_forward_chunk`` and ``__init__`` count too) that the layer functions were written against:
# BERT-style families (all seven identical once the prefix is normalised) and DistilBERT, transformers
# 5.17.0 and 5.24.0 (5.24 renamed ``past_key_values`` to ``cache``, which the packed path never passes).
_KNOWN_SOURCES = frozenset({
    "4db21a2fed49af4f",  # BERT-style, transformers 5.17.0
    "ccf4c9977461f620",  # BERT-style, transformers 5.24.0
    "5e97f09786850d63",  # DistilBERT, transformers 5.17.0 and 5.24.0
})
# transformers' output capturing (output_hidden_states): its hooks here, its collector in encoder_unpad
CAPTURE_MODULE = "transformers.utils.output_capturing"
_ACTIVATIONS = "transformers.activations"


# ----------------------------------------------------------------------------------------------
# the recipe check (once per encoder class, and per module tree)
# ----------------------------------------------------------------------------------------------

def _normalised_source(obj) -> str:
    """``obj``'s source without comments, docstrings, annotations or formatting (``ast.unparse``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.Constant(None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def _family_classes(encoder_class: type, family: _Family) -> list | None:
    """The family's composite classes in the encoder's module, or None where one is missing."""
    model = sys.modules.get(encoder_class.__module__)
    found = [getattr(model, name, None) for _, name in family.composites] + [getattr(model, family.output_class, None)]
    return found if all(isinstance(c, type) for c in found) else None


def source_fingerprint(encoder_class: type, family: _Family) -> str:
    """sha256 (16 hex digits) of the normalised sources of the encoder class and of the family's
    composite classes in its module, the family prefix replaced by ``Bert``."""
    classes = _family_classes(encoder_class, family)
    if classes is None:
        raise TypeError(f"{encoder_class.__module__} lacks the classes of a {family.prefix or 'DistilBERT'} layer")
    text = "\n".join(_normalised_source(c) for c in [encoder_class, *classes[:-1]])
    if family.prefix:
        text = text.replace(family.prefix, "Bert")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_class_verdicts: dict[type, str | None] = {}


def _class_reason(encoder_class: type, family: _Family) -> str | None:
    """Why the runner does not replicate ``encoder_class`` (None: it does). Once per class."""
    if encoder_class in _class_verdicts:
        return _class_verdicts[encoder_class]
    try:
        fingerprint = source_fingerprint(encoder_class, family)
    except (OSError, TypeError, SyntaxError) as exc:
        reason = f"the source of {encoder_class.__name__}'s layers is unavailable ({exc})"
    else:
        reason = None if fingerprint in _KNOWN_SOURCES else \
            f"{encoder_class.__name__} of an unreviewed transformers version (fingerprint {fingerprint})"
    _class_verdicts[encoder_class] = reason
    return reason


def _resolve(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
    m = layer
    for name in filter(None, path.split(".")):
        m = m._modules.get(name) if isinstance(m, torch.nn.Module) else None
    return m


class _Structure:
    """The checked module structure of one encoder: its layers, their composite modules (and the
    classes those must keep), the family."""

    def __init__(self, family: _Family, layers: tuple, composites: tuple, output_class: type) -> None:
        self.family, self.layers, self.composites, self.output_class = family, layers, composites, output_class
        self.classes = tuple(type(m) for m in composites)


def _structure(encoder: torch.nn.Module) -> _Structure | str:
    """The encoder's layers when every one is exactly the family's layer, with exactly the family's
    composite classes inside (a subclass may override a forward); else the reason."""
    cls = next((k for k in type(encoder).__mro__ if k.__name__ in FAMILIES and
                k.__module__.startswith("transformers.models.")), None)
    if cls is None:
        return f"{type(encoder).__name__} has no lean layers"
    family = FAMILIES[cls.__name__]
    reason = _class_reason(cls, family)
    if reason is not None:
        return reason
    classes = _family_classes(cls, family)
    layers = encoder._modules.get("layer")
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return "no layer list"
    composites = []
    for layer in layers:
        for (path, _), want in zip(family.composites, classes):
            m = _resolve(layer, path)
            if type(m) is not want:
                return f"layer module {path or 'layer'} is {type(m).__name__}, not {want.__name__}"
            composites.append(m)
    return _Structure(family, tuple(layers), tuple(composites), classes[-1])


_structures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_structure(encoder: torch.nn.Module, key: tuple) -> _Structure | str:
    cached = _structures.get(encoder)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _structure(encoder)
    _structures[encoder] = (key, found)
    return found


# ----------------------------------------------------------------------------------------------
# per-forward checks (hooks, checkpointing, tracing)
# ----------------------------------------------------------------------------------------------

def _is_idle_capture_hook(hook) -> bool:
    """transformers' output-capturing hook, a no-op while its collector collects nothing (the
    adapter sends a forward that collects to transformers' layers)."""
    return getattr(hook, "__module__", None) == CAPTURE_MODULE and \
        getattr(hook, "__name__", None) == "output_capturing_hook"


def _call_changed(m: torch.nn.Module) -> bool:
    """Whether calling ``m`` does more than its class's forward, forward hooks aside: a pre- or
    backward hook, a forward set on the instance (accelerate's device-placement hooks wrap
    ``module.forward``), ``module.compile()``."""
    return bool(m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or "forward" in m.__dict__
                or m._compiled_call_impl is not None)


def _hooked(m: torch.nn.Module) -> bool:
    """A composite module whose call does more than its class's forward (transformers' idle
    output-capturing hooks aside)."""
    if _call_changed(m):
        return True
    hooks = m._forward_hooks
    return bool(hooks) and not all(_is_idle_capture_hook(h) for h in hooks.values())


def _plain(m: torch.nn.Module) -> bool:
    """A leaf whose call is exactly its class's forward (the global hooks were checked for this forward)."""
    return not (m._forward_hooks or _call_changed(m))


def _global_hooks() -> bool:
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)


def _call_reason(structure: _Structure) -> str | None:
    if torch.jit.is_tracing():
        return "TorchScript tracing"
    if _global_hooks():
        return "a global module hook"
    for m, cls in zip(structure.composites, structure.classes):
        if type(m) is not cls:  # a __class__ assignment registers nothing: checked on every forward
            return f"{type(m).__name__} in place of {cls.__name__}"
        if _hooked(m):
            return f"a hook on {type(m).__name__}"
    for layer in structure.layers:
        if layer.training and getattr(layer, "gradient_checkpointing", False):
            return "gradient checkpointing"
    return None


# ----------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------

# Leaves of these exact classes without hooks of their own are called as their forward's functional op
# (the module call's hook dispatch skipped); anything else (a subclass, PEFT's LoRA layer, a quantized
# linear, a hooked leaf) is called as a module.
_Linear, _LayerNorm, _Dropout = torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Dropout


# The runner works on [T, E] rows: a linear layer on [1, T, E] is a view, the same addmm and a view
# back (aten::linear's flatten path for contiguous 3-D input), so the rows give bitwise the same values
# with two view ops and two ViewBackward nodes less per linear layer (12 per BERT layer). Leaves called
# as modules still get transformers' [1, T, E] (their hooks see what transformers' layers give them).

def _as_module_call(m: Callable, x: torch.Tensor) -> torch.Tensor:
    return m(x.unsqueeze(0)).squeeze(0)


def _linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is _Linear and _plain(m):
        return F.linear(x, m.weight, m.bias)  # nn.Linear.forward
    return _as_module_call(m, x)


def _layer_norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is _LayerNorm and _plain(m):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)  # nn.LayerNorm.forward
    return _as_module_call(m, x)


def _dropout(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m) is _Dropout and _plain(m):
        # nn.Dropout.forward; in eval F.dropout returns its input, so the call is skipped
        return F.dropout(x, m.p, True, m.inplace) if m.training else x
    return _as_module_call(m, x)


def _activation(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """transformers' own activation modules (``ACT2FN``: elementwise) take the rows; anything else
    (a user's callable, a hooked module) gets transformers' [1, T, E]."""
    if isinstance(fn, torch.nn.Module) and type(fn).__module__ == _ACTIVATIONS and _plain(fn):
        return fn(x)
    return _as_module_call(fn, x)


def _attend(sa: torch.nn.Module, projections: tuple, hidden: torch.Tensor, total: int,
            attend: Callable) -> torch.Tensor:
    """The self-attention module ``sa``'s q / k / v ``projections`` of ``hidden`` [T, E], attended:
    [T, E] before any output projection, as transformers' self-attention forward returns it."""
    head_dim = sa.attention_head_size
    # [T, H, D] views of the projections: the layout hf_interface._packed gives the kernel
    q, k, v = (_linear(p, hidden).view(total, -1, head_dim) for p in projections)
    out = attend(q, k, v, sa.scaling, sa.dropout.p if sa.training else 0.0)
    # [T, E]: transformers' reshape + contiguous, a view of the kernel's contiguous [T, H, D] output
    return out.reshape(total, -1).contiguous()


def _bert_layer(layer: torch.nn.Module, hidden: torch.Tensor, total: int, attend: Callable) -> torch.Tensor:
    """transformers' {Bert}Layer on packed self-attention: [T, E] rows -> [T, E], the same leaf ops in
    the same order (so the same dropout draws)."""
    attention, feed_in, feed_out = layer.attention, layer.intermediate, layer.output
    sa, so = attention.self, attention.output
    attended = _attend(sa, (sa.query, sa.key, sa.value), hidden, total, attend)
    x = _layer_norm(so.LayerNorm, _dropout(so.dropout, _linear(so.dense, attended)) + hidden)
    y = _linear(feed_out.dense, _activation(feed_in.intermediate_act_fn, _linear(feed_in.dense, x)))
    return _layer_norm(feed_out.LayerNorm, _dropout(feed_out.dropout, y) + x)


def _distilbert_layer(layer: torch.nn.Module, hidden: torch.Tensor, total: int, attend: Callable) -> torch.Tensor:
    """transformers' DistilBERT ``TransformerBlock`` on packed self-attention, as ``_bert_layer``."""
    sa, ffn = layer.attention, layer.ffn
    attended = _linear(sa.out_lin, _attend(sa, (sa.q_lin, sa.k_lin, sa.v_lin), hidden, total, attend))
    x = _layer_norm(layer.sa_layer_norm, attended + hidden)
    y = _dropout(ffn.dropout, _linear(ffn.lin2, _activation(ffn.activation, _linear(ffn.lin1, x))))
    return _layer_norm(layer.output_layer_norm, y + x)


FAMILIES.update({f"{prefix}Encoder": _bert_family(prefix) for prefix in
                 ("Bert", "Roberta", "XLMRoberta", "Camembert", "Electra", "Data2VecText", "Ernie")})
FAMILIES["Transformer"] = _Family(  # DistilBERT
    "", (("", "TransformerBlock"), ("attention", "DistilBertSelfAttention"), ("ffn", "FFN")), "BaseModelOutput",
    _distilbert_layer)


class _Runner:
    """Runs the checked layers on the packed tokens of one forward."""

    def __init__(self, structure: _Structure, packed_attention: Callable) -> None:
        self.structure, self.packed_attention = structure, packed_attention

    def __call__(self, packed: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
        attention = self.packed_attention

        def attend(q, k, v, scaling, dropout):
            # hf_interface.attention_forward's packed call for a bidirectional module without window or softcap
            return attention(q, k, v, False, scaling, float(dropout), (-1, -1), 0.0, cu_seqlens, cu_seqlens,
                             max_seqlen, max_seqlen)

        # [1, T, E] -> [T, E] rows (a squeeze: its backward is a view, a select's would copy)
        hidden, total, layer_fn = packed.squeeze(0), packed.shape[1], self.structure.family.layer
        for layer in self.structure.layers:
            hidden = layer_fn(layer, hidden, total, attend)
        return self.structure.output_class(last_hidden_state=hidden.unsqueeze(0))


def lean_layers(encoder: torch.nn.Module, key: tuple, packed_attention: Callable) -> _Runner | None:
    """A runner when the encoder's layers may run as one function for this forward, else None (the
    structure's or the call's reason, a string, is kept internally: ``_cached_structure`` /
    ``_call_reason``). ``key``: the encoder adapter's module-tree key (changes whenever the tree may
    have); ``packed_attention``: ``hf_interface.packed_attention``, the interface's own varlen call."""
    found = _cached_structure(encoder, key)
    if isinstance(found, str) or _call_reason(found) is not None:
        return None
    return _Runner(found, packed_attention)
