"""The launch order of ``common.program_tile``: every (block, head) tile exactly once, in the order its
docstring gives (head-major; the causal forward's long sequences: longest tiles first, block-major
inside groups of heads)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hf_triton_attn.kernels.common import TILE_GROUP_MIN_BLOCKS, TILE_GROUP_PROGRAMS, program_tile
from hf_triton_attn.kernels.launch import tile_grid

from .helpers import DEVICE


@triton.jit
def _tile_order_kernel(OUT, seqlen, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    start, bh = program_tile(seqlen, BLOCK, LONGEST_FIRST)
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, start // BLOCK)
    tl.store(OUT + 2 * pid + 1, bh)


def expected_order(num_blocks: int, num_bh: int, longest_first: bool) -> list[tuple[int, int]]:
    """(block, head) per program id, written out from the docstring's rule."""
    if not longest_first or num_blocks < int(TILE_GROUP_MIN_BLOCKS):
        return [(block, bh) for bh in range(num_bh) for block in range(num_blocks)]
    group = min(-(-int(TILE_GROUP_PROGRAMS) // num_blocks), num_bh)
    order = []
    for first in range(0, num_bh, group):
        heads = range(first, min(first + group, num_bh))
        for rank in range(num_blocks):
            order += [(num_blocks - 1 - rank, bh) for bh in heads]
    return order


GROUP = int(TILE_GROUP_PROGRAMS)
MIN_BLOCKS = int(TILE_GROUP_MIN_BLOCKS)
# (blocks per head, heads): below the grouping threshold, one group, several equal groups, a smaller
# last group, one head per group
CASES = [(1, 1), (MIN_BLOCKS - 1, 3), (MIN_BLOCKS, 1), (MIN_BLOCKS, 7), (GROUP // 2, 5), (GROUP // 4 + 1, 11),
         (GROUP + 3, 3), (max(MIN_BLOCKS, 5), 2 * GROUP + 1)]


@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("num_blocks,num_bh", CASES)
def test_program_tile_visits_every_tile_once_in_the_documented_order(num_blocks, num_bh, longest_first):
    block = 16
    seqlen = num_blocks * block - 5  # a partial last block
    grid = tile_grid(seqlen, block, num_bh)
    out = torch.full((grid[0], 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_order_kernel[grid](out, seqlen, BLOCK=block, LONGEST_FIRST=longest_first)
    got = [tuple(row) for row in out.cpu().tolist()]
    want = expected_order(num_blocks, num_bh, longest_first)
    assert sorted(got) == sorted((b, h) for h in range(num_bh) for b in range(num_blocks)), (
        f"tiles missed or repeated: {got}")
    assert got == want, f"launch order {got} != documented {want}"
    if longest_first and num_blocks >= MIN_BLOCKS:
        assert got[0][0] == num_blocks - 1 and got[-1][0] == 0, "longest tiles first, shortest last"
