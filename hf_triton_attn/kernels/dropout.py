"""The dropout keep-mask as a tensor, for tests: the exact mask the attention kernels apply."""

import triton
import triton.language as tl

from .common import dropout_keep, program_tile
from .launch import tile_grid


@triton.jit
def _dropout_mask_kernel(
    MASK, RNG, stride_b, stride_h, stride_m, stride_n, seqlen_q, seqlen_k, num_heads, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, bh = program_tile(seqlen_q, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    b = bh // num_heads
    h = bh % num_heads
    seed = tl.load(RNG)
    rng_offset = tl.load(RNG + 1)
    base = MASK + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N)
        tl.store(base + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, keep.to(tl.int8),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def dropout_mask(mask, rng, dropout_p: float) -> None:
    """Fill ``mask`` (B, H, Sq, Sk) int8 with the keep-mask drawn from ``rng`` (int64 [seed, offset])."""
    batch, heads, sq, sk = mask.shape
    block = 32
    _dropout_mask_kernel[tile_grid(sq, block, batch * heads)](
        mask, rng, *mask.stride(), sq, sk, heads, dropout_p, BLOCK_M=block, BLOCK_N=block)
