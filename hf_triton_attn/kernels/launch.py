"""Host-side helpers shared by the kernel launchers: optional-tensor arguments and feature flags."""

from __future__ import annotations

import torch


def ptr_or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor; the dummy is never read (its flag is off)."""
    return t if t is not None else dummy


def mask_strides(mask: torch.Tensor | None) -> tuple[int, int]:
    return tuple(mask.stride()) if mask is not None else (0, 0)


def segment_strides(segments: torch.Tensor | None) -> tuple[int, int]:
    """(batch, start-to-end) strides of the (B, 2, S) int32 run bounds; tokens are contiguous."""
    if segments is None:
        return (0, 0)
    if segments.stride(2) != 1:
        raise ValueError("segments must be contiguous along the token dimension")
    return (segments.stride(0), segments.stride(1))


def alibi_strides(alibi: torch.Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of ALiBi slopes given as (H,) or (B, H)."""
    if alibi is None:
        return (0, 0)
    return (0, alibi.stride(0)) if alibi.dim() == 1 else (alibi.stride(0), alibi.stride(1))


def feature_flags(*, window_left: int, window_right: int, softcap: float, alibi, key_mask, query_mask,
                  segments, seqused_k, is_varlen: bool, dropout_p: float) -> dict:
    """The constexpr switches every attention kernel takes (each one a separate specialization)."""
    return dict(
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi is not None, HAS_KEY_MASK=key_mask is not None,
        HAS_QUERY_MASK=query_mask is not None, HAS_SEGMENTS=segments is not None, HAS_SEQUSED_K=seqused_k is not None,
        IS_VARLEN=is_varlen, HAS_DROPOUT=dropout_p > 0,
    )
