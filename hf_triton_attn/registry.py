"""Registry: which adapter serves which attention module class, and what each adapter supports.

An adapter routes a module's q/k/v into ``flash_attention``. Three kinds exist:

- ``interface``: models that pick their attention through transformers' ``AttentionInterface``
  (BERT, GPT-2, Llama, ...); patching switches ``config._attn_implementation``.
- ``forward``: modules that compute attention themselves (GPT-Neo, Bloom, Falcon,
  ``torch.nn.MultiheadAttention``); patching replaces the module's ``forward``.
- ``model``: whole-model rewrites (e.g. unpadding a BERT encoder once for all layers).

Classes are named by import path (``"transformers.models.bert.modeling_bert:BertSelfAttention"``)
so this module never imports transformers; lookup walks the MRO, so subclasses are served by
their parent's adapter unless they register their own. Users add their own with
``register_adapter``.
"""

from __future__ import annotations

import enum
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["Adapter", "AdapterKind", "Support", "register_adapter", "lookup_adapter", "registered_adapters"]

_ALL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


class AdapterKind(str, enum.Enum):
    INTERFACE = "interface"
    FORWARD = "forward"
    MODEL = "model"


@dataclass(frozen=True)
class Support:
    """What an adapter can serve. Anything outside it is reported by ``not_supported_reasons``."""

    dtypes: frozenset = _ALL_DTYPES
    head_dims: tuple[int, int] = (1, 256)
    padding_masks: bool = True
    dropout: bool = True
    kv_cache: bool = True
    backward: bool = True
    torch_compile: bool = True
    notes: str = ""


@dataclass
class Adapter:
    """How to serve one family of attention modules.

    ``apply(module)`` patches the module in place and returns a callable that undoes exactly that
    patch (with ``inner_modules``: ``apply(module, excluded=modules)``); ``checks`` are extra
    per-module tests returning reasons it cannot be served (empty =
    servable). ``head_dim_of`` reads a module's head dim (None = unknown, not checked).
    """

    name: str
    kind: AdapterKind
    classes: tuple[str, ...]
    apply: Callable[[torch.nn.Module], Callable[[], None]]
    support: Support = field(default_factory=Support)
    checks: tuple[Callable[[torch.nn.Module], list[str]], ...] = ()
    head_dim_of: Callable[[torch.nn.Module], int | None] | None = None
    # Model-wide adapters (interface, model kinds): the attention modules inside a patched model
    # that include/exclude select one by one; ``apply(model, excluded=[...])`` then keeps the
    # excluded ones on their original attention.
    inner_modules: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]] | None = None

    def not_supported_reasons(self, module: torch.nn.Module) -> list[str]:
        """Why this adapter cannot serve ``module`` (empty when it can)."""
        reasons: list[str] = []
        dtypes = {p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()}
        bad = sorted(str(d) for d in dtypes - set(self.support.dtypes))
        if bad:
            reasons.append(f"parameter dtype {', '.join(bad)} not in {sorted(str(d) for d in self.support.dtypes)}")
        if self.head_dim_of is not None:
            head_dim = self.head_dim_of(module)
            lo, hi = self.support.head_dims
            if head_dim is not None and not lo <= head_dim <= hi:
                reasons.append(f"head dim {head_dim} outside {lo}..{hi}")
        for check in self.checks:
            reasons.extend(check(module))
        return reasons


_lock = threading.Lock()
_by_class_path: dict[str, Adapter] = {}


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(path: str) -> type | None:
    """The class named ``"module:QualName"``, or None if its module is not installed."""
    module_name, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Make ``adapter`` serve its classes (and their subclasses without an adapter of their own).

    Raises ValueError if a class already has an adapter, unless ``replace=True``.
    """
    if not adapter.classes:
        raise ValueError(f"register_adapter: adapter {adapter.name!r} names no class")
    with _lock:
        for path in adapter.classes:
            if ":" not in path:
                raise ValueError(f"register_adapter: class {path!r} must be 'module.path:ClassName'")
            current = _by_class_path.get(path)
            if current is not None and current is not adapter and not replace:
                raise ValueError(f"register_adapter: {path} is already served by adapter {current.name!r} "
                                 "(pass replace=True to override)")
        for path in adapter.classes:
            _by_class_path[path] = adapter
    return adapter


def unregister_adapter(adapter: Adapter) -> None:
    with _lock:
        for path in adapter.classes:
            if _by_class_path.get(path) is adapter:
                del _by_class_path[path]


def lookup_adapter(module_or_class: torch.nn.Module | type) -> Adapter | None:
    """The adapter for a module (or class): its own class first, then its bases in MRO order."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    for klass in cls.__mro__:
        adapter = _by_class_path.get(class_path(klass))
        if adapter is not None:
            return adapter
    return None


def registered_adapters() -> list[tuple[str, Adapter]]:
    """(class path, adapter) for every registered class, sorted: the README's supported-models table."""
    with _lock:
        return sorted(_by_class_path.items())


def supported_classes_markdown() -> str:
    """A markdown table of the registry (generated into the README)."""
    rows = ["| class | adapter | kind | dtypes | head dims | padding | dropout | KV cache | backward | compile |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    yes = lambda b: "yes" if b else "no"
    for path, a in registered_adapters():
        s = a.support
        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in s.dtypes))
        lo, hi = s.head_dims
        rows.append(f"| `{path.split(':')[1]}` | {a.name} | {a.kind.value} | {dtypes} | {lo}..{hi} "
                    f"| {yes(s.padding_masks)} | {yes(s.dropout)} | {yes(s.kv_cache)} | {yes(s.backward)} "
                    f"| {yes(s.torch_compile)} |")
    return "\n".join(rows)
