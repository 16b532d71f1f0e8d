"""A list-scheduling model of a causal kernel's grid: how much of its time the launch order wastes.

The GPU hands programs to free slots (2-3 programs per SM, 132 SMs on the H100) roughly in launch
order. In a causal forward or dq kernel query block i sees i + 1 key blocks, so its program's work
grows with the block index. This model gives every program ``blocks seen + FIXED`` units of work
(``FIXED``: the prologue / epilogue, in tiles), schedules the grid greedily in a given order and
prints the makespan over the ideal (total work / slots) for:

* ``head-major``: heads in turn, blocks ascending (what ``program_tile`` does by default);
* ``reversed``: heads in turn, blocks descending (tried in session 3: within noise on an H200);
* ``grouped``: longest first, block-major inside groups of ``cdiv(target, blocks)`` heads
  (``program_tile(..., LONGEST_FIRST=True)``).

It has no memory-system term: session 18 measured the grouped order 7% SLOWER at S = 1024 D = 128
where the model promised 6% faster, and 3-6% faster at S = 8192-16384 (benchmarks/NOTES.md). It is
a guide to where a tail can exist, not a prediction of time.

    python -m benchmarks.launch_order_model [--target 512]
"""

from __future__ import annotations

import argparse
import heapq
from collections.abc import Iterable

FIXED = 2.0


def makespan(works: Iterable[float], slots: int) -> float:
    """Finish time of the last program when each goes to the earliest free slot, in order."""
    free = [0.0] * slots
    for work in works:
        heapq.heappush(free, heapq.heappop(free) + work + FIXED)
    return max(free)


def orders(num_blocks: int, num_bh: int, target: int) -> dict[str, list[int]]:
    """Work (key blocks seen) per program, in launch order, for each order."""
    seen = [block + 1 for block in range(num_blocks)]
    group = min(-(-target // num_blocks), num_bh)
    grouped = []
    for first in range(0, num_bh, group):
        heads = min(group, num_bh - first)
        for rank in range(num_blocks):
            grouped += [seen[num_blocks - 1 - rank]] * heads
    return {
        "head-major": seen * num_bh,
        "reversed": seen[::-1] * num_bh,
        "grouped": grouped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, default=512, help="programs per group of heads")
    args = parser.parse_args(argv)
    print(f"makespan / ideal, B*S = 16384, H*D = 2048, groups of cdiv({args.target}, blocks) heads")
    print(f"{'S':>6} {'D':>4} {'BLOCK_M':>7} {'slots':>5}  head-major  reversed  grouped")
    for s in (1024, 2048, 4096, 8192, 16384):
        for d, block_m, slots in ((64, 64, 396), (64, 128, 396), (128, 64, 264), (128, 128, 264)):
            num_blocks, num_bh = s // block_m, (16384 // s) * (2048 // d)
            runs = orders(num_blocks, num_bh, args.target)
            ideal = (sum(runs["head-major"]) + FIXED * len(runs["head-major"])) / slots
            cells = "  ".join(f"{makespan(w, slots) / ideal:>8.3f}" for w in runs.values())
            print(f"{s:>6} {d:>4} {block_m:>7} {slots:>5}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
