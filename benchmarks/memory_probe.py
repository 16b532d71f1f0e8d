#!/usr/bin/env python
"""Where a training step's memory goes, per attention implementation (the "peak memory <= sdpa" target).

    python -m benchmarks.memory_probe [--impls hf_triton_attn sdpa] [--out DIR]   # GPU: GPT-2 124M, B8 S1024 bf16
    python -m benchmarks.memory_probe --quick --device cpu                        # smoke test

For each implementation, on the model and batch of ``bench_models.py``'s ``gpt2_train`` task (train mode,
dropout 0.1, fused AdamW), after two warm-up steps:
- the allocated bytes after the forward and the peak of each phase (forward, backward, optimizer step),
  from ``torch.cuda.max_memory_allocated`` reset between phases;
- the tensors autograd saves in the forward (``saved_tensors_hooks``), one row per (shape, dtype,
  strides, creator), bytes counted once per storage: what stays alive from the forward to the backward;
- the blocks the backward of ONE attention call allocates, from the CUDA caching allocator's history
  (``torch.cuda.memory._record_memory_history``) around that call: its transient memory.
Prints a table and writes ``memory_probe.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import gpt2_train_setup  # noqa: E402
from benchmarks.common import collect_meta, meta_title, write_json  # noqa: E402

MB = 1 << 20


def _saved_tensors(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The forward's loss and one row per distinct saved storage (shape, dtype, strides, grad_fn)."""
    rows: dict[int, dict[str, Any]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in rows:
            rows[key] = dict(shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""), stride=tuple(t.stride()),
                             storage_bytes=storage.nbytes(), creator=type(t.grad_fn).__name__ if t.grad_fn else "leaf")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, list(rows.values())


def _group(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "MB": 0.0})
    for r in rows:
        key = f"{r['dtype']} {r['shape']} stride {r['stride']} from {r['creator']}"
        groups[key]["count"] += 1
        groups[key]["MB"] += r["storage_bytes"] / MB
    return dict(groups)


def _phase_peaks(model, opt, ids, cuda: bool) -> dict[str, float]:
    """Allocated MB after each phase and each phase's peak (CUDA only; zeros on CPU)."""
    def now() -> float:
        return torch.cuda.memory_allocated() / MB if cuda else 0.0

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / MB if cuda else 0.0

    def reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    out = {"start_MB": now()}
    reset()
    loss = model(input_ids=ids, labels=ids).loss
    out.update(forward_peak_MB=peak(), after_forward_MB=now())
    reset()
    loss.backward()
    out.update(backward_peak_MB=peak(), after_backward_MB=now())
    reset()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out.update(optimizer_peak_MB=peak(), after_step_MB=now())
    return out


def _attention_backward_blocks(model, ids) -> list[dict[str, Any]]:
    """Allocator events while the LAST layer's attention backward runs (CUDA only): a gradient hook on
    the attention output (c_proj's input) starts the allocator's history, one on c_attn's output (the
    q/k/v projections, whose gradient is complete once the attention backward is done) snapshots it."""
    attn = model.transformer.h[-1].attn
    record = torch.cuda.memory._record_memory_history
    taken: list[dict] = []

    def on(_grad):
        record(max_entries=100000)

    def off(_grad):
        if not taken:
            taken.append(torch.cuda.memory._snapshot())
            record(enabled=None)

    def pre_hook(_module, inputs):
        if inputs[0].requires_grad:
            inputs[0].register_hook(on)

    def post_hook(_module, _inputs, output):
        if output.requires_grad:
            output.register_hook(off)

    handles = (attn.c_proj.register_forward_pre_hook(pre_hook), attn.c_attn.register_forward_hook(post_hook))
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
    finally:
        record(enabled=None)
        for h in handles:
            h.remove()
    events: list[dict[str, Any]] = []
    for trace in (taken[0].get("device_traces", []) if taken else []):
        for e in trace:
            if e.get("action") in ("alloc", "free_requested"):
                frames = e.get("frames", [])
                where = next((f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames
                              if "hf_triton_attn" in f["filename"] or "transformers" in f["filename"]), "?")
                events.append(dict(action=e["action"], MB=e["size"] / MB, where=where))
    return events


def probe(impl: str, args, device: str, dtype: torch.dtype) -> dict[str, Any]:
    model, ids, opt = gpt2_train_setup(impl, args, device, dtype)
    cuda = device == "cuda"
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    rec: dict[str, Any] = {"phases": _phase_peaks(model, opt, ids, cuda)}
    loss, saved = _saved_tensors(model, ids)
    rec["saved_MB"] = sum(r["storage_bytes"] for r in saved) / MB
    rec["saved"] = _group(saved)
    loss.backward()
    opt.zero_grad(set_to_none=True)
    rec["attention_backward_events"] = _attention_backward_blocks(model, ids) if cuda else None
    opt.zero_grad(set_to_none=True)
    del model, opt
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", nargs="+", default=["hf_triton_attn", "sdpa"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    meta = collect_meta(args.device)
    print(meta_title(meta))
    records = {impl: probe(impl, args, args.device, dtype) for impl in args.impls}
    for impl, rec in records.items():
        print(f"== {impl}: " + ", ".join(f"{k} {v:.1f}" for k, v in rec["phases"].items())
              + f"; saved by autograd {rec['saved_MB']:.1f} MB")
    # Saved tensors that differ between implementations.
    keys = sorted(set().union(*(rec["saved"] for rec in records.values())))
    print("saved tensors that differ (count x MB per implementation):")
    for key in keys:
        cells = [records[i]["saved"].get(key, {"count": 0, "MB": 0.0}) for i in args.impls]
        if len({(c["count"], round(c["MB"], 3)) for c in cells}) > 1:
            print("  " + key + ": " + " | ".join(f"{i} {c['count']} x {c['MB'] / max(c['count'], 1):.2f}"
                                                  for i, c in zip(args.impls, cells)))
    for impl, rec in records.items():
        events = rec["attention_backward_events"]
        if events:
            print(f"== {impl}: allocations during the last layer's attention backward")
            for e in events:
                if e["action"] == "alloc" and e["MB"] >= 0.25:
                    print(f"  {e['MB']:8.2f} MB  {e['where']}")
    if args.out is not None:
        write_json(args.out / "memory_probe.json", meta, [dict(impl=impl, **rec) for impl, rec in records.items()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
