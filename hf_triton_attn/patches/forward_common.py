"""Shared by the forward adapters (GPT-Neo, Bloom, Falcon, torch.nn.MultiheadAttention): reading
the 4-D causal masks HF builds for eager layers, installing an instance-level forward (picklable,
deep-copy safe, exactly undoable), fallback warnings and small checks."""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..reference import allowed_positions
from ..registry import Adapter, AdapterKind, Support, register_adapter, resolve_class

__all__ = ["CausalPadding", "read_causal_mask", "plain_expected", "fallback_warning", "forward_overridden",
           "check_hidden_states", "check_dropout", "check_key_length", "dropout_of", "model_module",
           "install_forward", "register_forward_adapter"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# shared with bloom.py and falcon.py: the 4-D causal masks HF builds for eager layers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CausalPadding:
    """What the kernel takes in place of a verified 4-D causal mask (None = no padding)."""

    key_mask: torch.Tensor | None  # (B, Sk) bool, True = real key
    query_mask: torch.Tensor | None  # (B, Sq) bool, True = real query (the query's own key slot)


# A few (mask, extra tensors) -> decoded results; every layer of a forward gets the same mask tensor.
_memo: dict[tuple, tuple[list, tuple[int, ...], CausalPadding | str]] = {}
_MEMO_SIZE = 8


def _memo_get(key: tuple, tensors: list[torch.Tensor]) -> CausalPadding | str | None:
    hit = _memo.get(key)
    if hit is None:
        return None
    refs, versions, result = hit
    if any(r() is not t for r, t in zip(refs, tensors)) or versions != tuple(t._version for t in tensors):
        return None
    return result


def _memo_put(key: tuple, tensors: list[torch.Tensor], result: CausalPadding | str) -> None:
    if len(_memo) >= _MEMO_SIZE:
        _memo.clear()
    _memo[key] = ([weakref.ref(t) for t in tensors], tuple(t._version for t in tensors), result)


def plain_expected(allowed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask HF builds from ``allowed``: bool as is (sdpa), else additive 0 / ``finfo(dtype).min``
    (``masking_utils.eager_mask``)."""
    if mask.dtype == torch.bool:
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=mask.dtype, device=mask.device),
                       torch.finfo(mask.dtype).min)


def read_causal_mask(
    mask: torch.Tensor | None, *, batch: int, sq: int, tag: str = "plain",
    expected: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = plain_expected,
    extra: Callable[[torch.Tensor], list[tuple[torch.Tensor, str]]] | None = None,
    extra_tensors: tuple[torch.Tensor, ...] = (),
) -> CausalPadding | str:
    """Read a 4-D causal mask as key/query padding masks, or say why the kernel cannot apply it.

    ``mask`` is HF's ``(B or 1, 1 or H, Sq, Sk)`` mask: bool (True = keep) or additive float
    (> -1 = keep, as ``FalconModel`` reads it). The key mask is its last row; ``expected(allowed,
    mask)`` rebuilds the mask from ``allowed = causal(bottom-right) & key mask`` and it must match
    bitwise. ``extra(key_mask)`` adds adapter-specific conditions (bool 0-d tensors + reasons),
    evaluated in the same host sync. Results are remembered per (mask, extra_tensors) identity and
    version, under ``tag`` (the adapter's reading of the mask).
    """
    if mask is None:
        return CausalPadding(None, None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return f"a {getattr(mask, 'dim', lambda: '?')()}-D attention mask"
    if mask.shape[0] not in (1, batch) or mask.shape[2] != sq:
        return f"an attention mask of shape {tuple(mask.shape)} for batch {batch}, {sq} queries"
    tensors = [mask, *extra_tensors]
    key = (tag, id(mask), *(id(t) for t in extra_tensors))
    found = _memo_get(key, tensors)
    if found is not None:
        return found
    result = _decode(mask, batch, sq, expected, extra)
    _memo_put(key, tensors, result)
    return result


def _decode(mask, batch, sq, expected, extra) -> CausalPadding | str:
    sk = mask.shape[3]
    keep = mask if mask.dtype == torch.bool else mask > -1
    # Bottom-right causal: the last query (diagonal Sk - 1) sees every key, so its row of the mask
    # is exactly the key padding mask (for every head: take head 0, the rebuild checks the others).
    key_mask = keep[:, 0, -1, :].expand(batch, sk)
    causal = allowed_positions(sq, sk, used_k=sk, causal=True, window_size=(-1, -1), device=mask.device)
    allowed = causal.view(1, 1, sq, sk) & key_mask.view(batch, 1, 1, sk)
    rebuilt = expected(allowed, mask)
    # broadcast compare: a (1, ...) mask against the batch's rebuild, a per-head mask against a shared one
    conditions = [((rebuilt == mask).all(), "a 4-D attention mask other than causal + padding"),
                  (key_mask.all(), "")]
    if extra is not None:
        conditions += extra(key_mask)
    values = torch.stack([c for c, _ in conditions]).tolist()  # the one host sync
    for ok, (_, reason) in zip(values, conditions):
        if not ok and reason:
            return reason
    if values[1]:
        return CausalPadding(None, None)
    key_mask = key_mask.contiguous()
    return CausalPadding(key_mask, key_mask[:, sk - sq:])


def fallback_warning(warned: set[str], adapter: str, reason: str) -> None:
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"hf_triton_attn: {adapter}: {reason}: this call runs the module's original forward "
                      "(warned once)", stacklevel=4)


def forward_overridden(module: torch.nn.Module, path: str) -> list[str]:
    """A reason when ``module``'s class overrides the served class's ``forward`` (FA2 subclasses)."""
    base = resolve_class(path)
    if base is not None and type(module).forward is not base.forward:
        return [f"{type(module).__name__} overrides {base.__name__}.forward (only the eager semantics are served; "
                "load the model with attn_implementation='eager')"]
    return []


def check_hidden_states(hidden_states: torch.Tensor) -> str | None:
    if hidden_states.dtype not in _KERNEL_DTYPES:
        return f"dtype {hidden_states.dtype}"
    if hidden_states.dim() != 3:
        return f"hidden states of shape {tuple(hidden_states.shape)}"
    return None


def check_key_length(mask: torch.Tensor | None, key: torch.Tensor, adapter: str) -> None:
    """After the cache update: the mask must cover the keys (eager would fail on a mismatch too)."""
    if mask is not None and mask.shape[-1] != key.shape[2]:
        raise ValueError(f"hf_triton_attn: {adapter}: the attention mask covers {mask.shape[-1]} keys but the "
                         f"layer has {key.shape[2]} (cache and mask disagree)")


class InstalledForward:
    """The ``forward`` a forward adapter installs on one module instance: ``impl(module, original,
    *args, **kwargs)``.

    An object holding the module, not a closure over it: ``copy.deepcopy`` of a patched model
    rebinds the copy to the copied module (a closure would keep running the ORIGINAL module's
    weights), and ``torch.save``/pickle work (``impl`` is a module-level function). ``previous`` is
    an instance-level forward that was there before (e.g. accelerate's hook), called as the
    original; otherwise the class's own ``forward``.
    """

    def __init__(self, module: torch.nn.Module, impl: Callable, previous: Callable | None) -> None:
        self.module, self.impl, self.previous = module, impl, previous

    def __call__(self, *args, **kwargs):
        module = self.module
        original = self.previous
        if original is None:
            cls_forward = type(module).forward

            def original(*a, **kw):  # the class's forward bound to this module (torch.compile traces it)
                return cls_forward(module, *a, **kw)
        return self.impl(module, original, *args, **kwargs)


class RemoveForward:
    """Undo of ``install_forward``: restores exactly what was there (nothing, or the previous
    instance-level forward), only if our forward is still the installed one. Picklable, like it."""

    def __init__(self, installed: InstalledForward) -> None:
        self.installed = installed

    def __call__(self) -> None:
        module = self.installed.module
        if module.__dict__.get("forward") is not self.installed:
            return
        if self.installed.previous is None:
            del module.forward
        else:
            module.forward = self.installed.previous


def install_forward(module: torch.nn.Module, impl: Callable) -> Callable[[], None]:
    """Replace ``module``'s forward by ``impl(module, original, ...)``; returns the exact undo."""
    installed = InstalledForward(module, impl, module.__dict__.get("forward"))
    module.forward = installed
    return RemoveForward(installed)


def model_module(module: torch.nn.Module):
    """The transformers module that defines ``module``'s class (already imported: no new import)."""
    return sys.modules[type(module).__module__]


def dropout_of(module: torch.nn.Module, dropout: torch.nn.Dropout) -> float:
    """The attention dropout the kernel applies: the module's p in training, 0 in eval."""
    return float(dropout.p) if module.training else 0.0


def check_dropout(module: torch.nn.Module, dropout: torch.nn.Dropout) -> str | None:
    p = dropout_of(module, dropout)
    return None if 0.0 <= p < 1.0 else f"attention dropout {p} (the kernel takes [0, 1))"


class _InstallWith:
    """``apply`` of a forward adapter: installs ``impl`` (picklable, unlike a lambda)."""

    def __init__(self, impl: Callable) -> None:
        self.impl = impl

    def __call__(self, module: torch.nn.Module) -> Callable[[], None]:
        return install_forward(module, self.impl)


class _NotOverridden:
    """Default check: subclasses that override ``forward`` (e.g. FlashAttention-2 classes) are skipped."""

    def __init__(self, class_path: str) -> None:
        self.class_path = class_path

    def __call__(self, module: torch.nn.Module) -> list[str]:
        return forward_overridden(module, self.class_path)


def register_forward_adapter(name: str, class_path: str, impl: Callable, notes: str,
                             checks: tuple[Callable[[torch.nn.Module], list[str]], ...] | None = None) -> Adapter:
    """Register a forward adapter for an HF attention class with a ``head_dim`` attribute; its checks
    default to "the class's own forward is the one we replace"."""
    return register_adapter(Adapter(
        name=name, kind=AdapterKind.FORWARD, classes=(class_path,), apply=_InstallWith(impl),
        support=Support(torch_compile=False, notes=notes),
        checks=checks if checks is not None else (_NotOverridden(class_path),),
        head_dim_of=lambda m: m.head_dim,
    ))
