"""Helpers for tests and users who need to reproduce the kernels' randomness exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .ops import _INTERPRET_LOCK, _check_backend_usable, _draw_dropout_rng

__all__ = ["draw_dropout_rng", "dropout_keep_mask", "record_descriptor_encodes"]


def draw_dropout_rng(device: torch.device | str) -> torch.Tensor:
    """The int64 ``[seed, offset]`` pair that the next dropout call on ``device`` will draw.

    Call it right after restoring the generator state that the attention call saw, e.g.
    ``torch.manual_seed(s); out = flash_attention(..., dropout_p=p)`` then
    ``torch.manual_seed(s); rng = draw_dropout_rng(device)``.
    """
    return _draw_dropout_rng(torch.device(device))


def dropout_keep_mask(rng: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                      dropout_p: float, interpret: bool | None = None) -> torch.Tensor:
    """Bool keep-mask ``(batch, heads, seqlen_q, seqlen_k)`` that the kernels apply for ``rng``.

    Element (b, h, i, j) is kept with probability ``1 - dropout_p``; for varlen batches b is the
    sequence index and i, j are positions inside the sequence. Pass it to
    ``attention_reference(..., dropout_mask=mask)`` to reproduce a kernel call exactly.
    """
    if interpret is None:
        interpret = rng.device.type != "cuda"
    _check_backend_usable(interpret, rng)
    from .kernels.dropout import dropout_mask

    mask = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.int8, device=rng.device)
    if mask.numel():
        if interpret:
            with _INTERPRET_LOCK:
                dropout_mask(mask, rng, float(dropout_p))
        else:
            dropout_mask(mask, rng, float(dropout_p))
    return mask.bool()


@contextlib.contextmanager
def record_descriptor_encodes() -> Iterator[list[int]]:
    """Within the block, each TMA descriptor that a cached launch encodes (Triton's ``make_tensordesc_arg``,
    i.e. the driver's ``cuTensorMapEncodeTiled``) appends its base address to the yielded list; reused
    encodings (``kernels.launch._descriptor_plan``) append nothing.

    Only launch plans made inside the block record: a launcher that already planned a kernel keeps its
    encoder, so use fresh ``CachedLauncher``s (or a fresh process) for what should be counted.
    """
    from .kernels import launch

    real_plan = launch._descriptor_plan
    encoded: list[int] = []

    def recording_plan(kernel, num_pointers: int):
        plan = real_plan(kernel, num_pointers)
        if not plan:
            return plan
        *head, encode = plan

        def recorded(desc, meta):
            encoded.append(desc.base.data_ptr())
            return encode(desc, meta)

        return (*head, recorded)

    launch._descriptor_plan = recording_plan
    try:
        yield encoded
    finally:
        launch._descriptor_plan = real_plan
