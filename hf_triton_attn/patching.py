"""patch_model / unpatch_model / patched(): apply registry adapters to a model's modules.

Patching never touches parameters, buffers or state_dict keys: forward adapters install an
instance-level ``forward``, the interface adapter switches configs, and each patched module keeps the
object that undoes exactly its patch in its own ``__dict__`` (``_hf_triton_attn_undo``), so
``unpatch_model`` of any module containing it — the model, a PEFT wrapper around it, or the model
``merge_and_unload()`` returns — restores it. The undo records are plain picklable objects, not
closures: ``copy.deepcopy`` and ``torch.save`` of a patched model give an independent patched model.
Attributes are read from ``__dict__``, never with ``getattr`` (PEFT wrappers forward unknown
attributes to the wrapped model).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from . import patches  # noqa: F401  (registers the built-in adapters)
from .registry import AdapterKind, lookup_adapter

__all__ = ["PatchReport", "patch_model", "unpatch_model", "patched"]

_UNDO_ATTR = "_hf_triton_attn_undo"
_MARK_ATTR = "_hf_triton_attn_adapter"


@dataclass
class PatchReport:
    """What ``patch_model`` did: patched module names by adapter, skipped ones with the reason."""

    patched: dict[str, list[str]] = field(default_factory=dict)
    already_patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def num_patched(self) -> int:
        return sum(len(v) for v in self.patched.values())

    def __str__(self) -> str:
        lines = [f"PatchReport: {self.num_patched} module(s) patched, {len(self.already_patched)} already "
                 f"patched, {len(self.skipped)} skipped"]
        for adapter, names in sorted(self.patched.items()):
            lines.append(f"  patched by {adapter}: {len(names)} (" + ", ".join(names[:4])
                         + (", ..." if len(names) > 4 else "") + ")")
        for name, reason in sorted(self.skipped.items()):
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


def _matches(name: str, module: torch.nn.Module, patterns: Iterable[str | type]) -> bool:
    for p in patterns:
        if isinstance(p, type) and isinstance(module, p):
            return True
        if isinstance(p, str) and (fnmatch.fnmatchcase(name, p) or type(module).__name__ == p):
            return True
    return False


def patch_model(model: torch.nn.Module, *, strict: bool = False,
                include: Iterable[str | type] | None = None,
                exclude: Iterable[str | type] | None = None) -> PatchReport:
    """Route the attention of every servable module of ``model`` through ``flash_attention``.

    Args:
        model: any ``nn.Module``; its submodules are looked up in the registry by class.
        strict: raise ValueError listing every module an adapter exists for but cannot serve.
        include / exclude: module-name glob patterns (``"encoder.layer.1*"``), class names or
            classes; a module is patched when it matches ``include`` (default: all) and not
            ``exclude``. Inside a Hugging Face model switched as a whole (the interface adapter),
            the patterns select its attention modules one by one (``"model.layers.0.self_attn"``,
            ``"LlamaAttention"``); the unselected ones keep running the model's eager attention.
    Returns:
        A ``PatchReport``. Patching twice is a no-op (modules already patched are listed as such).
    """
    include = list(include) if include is not None else None
    exclude = list(exclude) if exclude is not None else []
    report = PatchReport()
    newly: list[torch.nn.Module] = []
    covered: list[tuple[str, object]] = []  # (name prefix, adapter) of whole-model patches
    model_wide_skips: list[tuple[str, str]] = []  # (name, label) of models a model-wide adapter skipped
    patched_names: list[str] = []
    for name, module in model.named_modules():
        adapter = lookup_adapter(module)
        if adapter is None:
            continue
        if any(a is adapter and (not prefix or name.startswith(prefix + ".")) for prefix, a in covered):
            continue  # inside a model this adapter already switched as a whole (e.g. LlamaModel in ForCausalLM)
        label = name or type(module).__name__
        if module.__dict__.get(_MARK_ATTR) is not None:
            report.already_patched.append(label)
            if adapter.kind is not AdapterKind.FORWARD:
                covered.append((name, adapter))
            continue
        if _matches(name, module, exclude):
            report.skipped[label] = "matched by exclude"
            continue
        excluded: list[torch.nn.Module] | None = None
        if adapter.inner_modules is not None:
            # A model-wide switch: include/exclude pick the attention modules inside it.
            whole = include is None or _matches(name, module, include)
            inner = [(f"{name}.{n}" if name else n, m) for n, m in adapter.inner_modules(module)]
            excluded = []
            for inner_name, m in inner:
                if _matches(inner_name, m, exclude):
                    report.skipped[inner_name] = "matched by exclude"
                    excluded.append(m)
                elif not whole and not _matches(inner_name, m, include):
                    report.skipped[inner_name] = "not matched by include"
                    excluded.append(m)
            if inner and len(excluded) == len(inner):
                for inner_name, _ in inner:
                    report.skipped.pop(inner_name, None)
                report.skipped[label] = "every attention module excluded" if whole else "not matched by include"
                continue
        elif include is not None and not _matches(name, module, include):
            report.skipped[label] = "not matched by include"
            continue
        reasons = adapter.not_supported_reasons(module)
        if reasons:
            report.skipped[label] = f"{adapter.name}: " + "; ".join(reasons)
            if adapter.kind is not AdapterKind.FORWARD:
                model_wide_skips.append((name, label))
            continue
        restore = adapter.apply(module) if excluded is None else adapter.apply(module, excluded=excluded)
        if adapter.kind is not AdapterKind.FORWARD:
            covered.append((name, adapter))
        object.__setattr__(module, _MARK_ATTR, adapter.name)  # plain attributes: not submodules, not state
        object.__setattr__(module, _UNDO_ATTR, restore)
        newly.append(module)
        report.patched.setdefault(adapter.name, []).append(label)
        patched_names.append(name)
    if strict:
        unservable = {n: r for n, r in report.skipped.items()
                      if not r.startswith(("not matched", "matched by", "every attention module excluded"))}
        for name, label in model_wide_skips:
            # A model that bypasses the interface is served when forward adapters patched its attention.
            if any(not name or p.startswith(name + ".") for p in patched_names):
                unservable.pop(label, None)
        if unservable:
            _undo_modules(newly)
            raise ValueError("patch_model(strict=True): cannot serve "
                             + "; ".join(f"{n} ({r})" for n, r in sorted(unservable.items())))
    return report


def _undo_modules(modules: Iterable[torch.nn.Module]) -> None:
    """Undo the patches of ``modules``, last patched first."""
    for module in reversed(list(modules)):
        restore = module.__dict__.pop(_UNDO_ATTR, None)
        if restore is not None:
            restore()
        module.__dict__.pop(_MARK_ATTR, None)


def _patched_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if _UNDO_ATTR in m.__dict__]


def unpatch_model(model: torch.nn.Module) -> None:
    """Undo every patch inside ``model`` (applied by ``patch_model`` to it, to a model it wraps, or to a
    wrapper it was taken out of), in reverse order. Unpatched models are left as they are."""
    _undo_modules(_patched_modules(model))


@contextlib.contextmanager
def patched(model: torch.nn.Module, **kwargs) -> Iterator[PatchReport]:
    """``with patched(model) as report: ...`` patches on entry; on exit undoes what it patched."""
    before = {id(m) for m in _patched_modules(model)}
    report = patch_model(model, **kwargs)
    try:
        yield report
    finally:
        _undo_modules(m for m in _patched_modules(model) if id(m) not in before)
