#!/usr/bin/env python
"""Instruction mix of each loop in a SASS dump (``aot_compile.py --dump DIR`` writes them).

A loop is a backward branch ``BRA `(.L_x_N)`` to a label above it; its body is every instruction
between the label and the branch (inner loops included). For each loop the script prints the
number of HGMMA instructions and the count of every other opcode class, so two variants of a kernel
can be compared statically on a machine without a GPU: e.g. the integer instructions a dropout
keep-mask adds per score tile (``per tile`` = per HGMMA group of one BLOCK_M x BLOCK_N score tile).

    python scripts/sass_loops.py DUMP/_fwd_kernel_*.sass [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")

# opcode families: the unit that executes them on Hopper
_CLASSES = {
    "tensor": ("HGMMA", "WARPGROUP"),
    "mufu": ("MUFU",),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSET"),
    "int": ("IMAD", "IADD", "LOP3", "SHF", "SHL", "SHR", "ISETP", "IMNMX", "SEL", "LEA", "VIADD", "IABS",
            "PRMT", "IMUL", "VIMNMX", "PLOP3", "P2R", "R2P", "POPC", "FLO", "BMSK", "SGXT", "LOP"),
    "convert": ("F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP"),
    "memory": ("LDS", "STS", "LDSM", "STSM", "LDG", "STG", "LDGSTS", "UTMALDG", "UTMASTG", "SYNCS", "LDC",
               "ATOM", "RED", "UBLKCP"),
    "move": ("MOV", "SHFL", "CS2R", "S2R", "S2UR", "R2UR", "UMOV"),
}


def _family(op: str) -> str:
    base = op.split(".")[0]
    if base.startswith("U") and base not in ("UTMALDG", "UTMASTG", "UBLKCP", "UMOV"):
        return "uniform"
    for name, prefixes in _CLASSES.items():
        if base in prefixes:
            return name
    return "other"


def parse(path: str) -> tuple[list[tuple[int, str]], dict[str, int], list[tuple[int, str]]]:
    """(instructions as (index, opcode), label -> instruction index, branches as (index, target))."""
    insns: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    branches: list[tuple[int, str]] = []
    with open(path) as f:
        for line in f:
            m = _LABEL.match(line.strip())
            if m:
                labels[m.group(1)] = len(insns)
                continue
            m = _INSN.match(line)
            if not m:
                continue
            op = m.group(3)
            b = _BRANCH.search(line)
            if b:
                branches.append((len(insns), b.group(1)))
            insns.append((len(insns), op))
    return insns, labels, branches


def loops(path: str) -> list[tuple[int, int, collections.Counter]]:
    insns, labels, branches = parse(path)
    found = []
    for at, target in branches:
        start = labels.get(target)
        if start is None or start > at:
            continue
        ops = collections.Counter(op for _, op in insns[start:at + 1])
        found.append((start, at, ops))
    return found


def summarize(ops: collections.Counter) -> dict[str, int]:
    fam: dict[str, int] = collections.Counter()
    for op, n in ops.items():
        fam[_family(op)] += n
    return dict(fam)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sass", nargs="+")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent opcodes of the main loop")
    a = ap.parse_args()
    for path in a.sass:
        with open(path) as f:
            header = f.readline().strip()
        print(f"{path}\n  {header[:220]}")
        found = loops(path)
        if not found:
            print("  no loops")
            continue
        for start, end, ops in found:
            hgmma = sum(n for op, n in ops.items() if op.startswith("HGMMA"))
            fam = summarize(ops)
            print(f"  loop [{start}, {end}] {end - start + 1} insns, HGMMA {hgmma}: "
                  + " ".join(f"{k} {v}" for k, v in sorted(fam.items(), key=lambda kv: -kv[1])))
        if a.top:
            start, end, ops = max(found, key=lambda t: sum(n for op, n in t[2].items() if op.startswith("HGMMA")))
            print("  main loop opcodes: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
