"""Is a padded BERT forward host-bound? Host and GPU time of each stage, ours vs sdpa.

    python -m benchmarks.bert_timeline [--iters 10] [--train] [--out DIR]

Hooks on the embeddings, the encoder and every layer (and each layer's self-attention module) record,
at each stage boundary, the host clock and a CUDA event. Per stage it prints the host time spent
issuing it and the GPU time between its events; and at each boundary the *lag*: how far the GPU's
event trails the host's clock (both measured from the call's start, after a synchronize). A lag that
stays near zero through the layers means the GPU waits for the host (host-bound); a growing lag
means the host is ahead (GPU-bound). The batch and model are bench_models.py's ``bert_infer``
(B=32, S=512, fill ~0.64, bf16, random init); ``--train`` times the fine-tune forward with grad
(train mode) instead of inference. Medians over ``--iters`` calls; writes ``bert_timeline.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import _bert_inputs, build  # noqa: E402
from benchmarks.common import collect_meta, free_memory, meta_title, write_json  # noqa: E402


class Marks:
    """(name, host seconds, CUDA event) at each stage boundary of one call."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float, torch.cuda.Event]] = []

    def __call__(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.items.append((name, time.perf_counter(), event))

    def offsets(self) -> list[tuple[str, float, float]]:
        """(name, host ms, GPU ms) from the first mark."""
        _, t0, e0 = self.items[0]
        return [(name, (t - t0) * 1e3, e0.elapsed_time(e)) for name, t, e in self.items]


def add_hooks(model: torch.nn.Module, marks: Marks) -> list:
    base = getattr(model, "bert", model)
    stages = [("embeddings", base.embeddings), ("encoder", base.encoder)]
    for i, layer in enumerate(base.encoder.layer):
        stages += [(f"layer{i}", layer), (f"layer{i}.self_attn", layer.attention.self)]
    handles = []
    for name, module in stages:
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: marks(f"{n} >")))
        handles.append(module.register_forward_hook(lambda *_, n=name: marks(f"{n} <")))
    return handles


def synchronizing_calls(fn, grad: bool) -> list[str]:
    """Where ``fn`` makes the host wait for the GPU: torch's sync debug mode, one warning per
    synchronizing call, reported as the innermost stack frames outside torch."""
    import traceback
    import warnings

    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
        found.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:][::-1]))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.set_grad_enabled(grad):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def run_impl(impl: str, args, device: str, dtype: torch.dtype) -> dict[str, Any]:
    ids, mask, _ = _bert_inputs(argparse.Namespace(quick=False), device)  # bench_models' bert_infer batch
    model = build("bert_cls" if args.train else "bert", impl, False, device, dtype)
    model.train(args.train)
    marks = Marks()

    def call() -> None:
        marks("start")
        with torch.set_grad_enabled(args.train):
            model(input_ids=ids, attention_mask=mask)
        marks("end")
        torch.cuda.synchronize()

    for _ in range(3):  # compile and warm up without hooks
        with torch.set_grad_enabled(args.train):
            model(input_ids=ids, attention_mask=mask)
    torch.cuda.synchronize()
    handles = add_hooks(model, marks)
    runs = []
    for _ in range(args.iters):
        marks.items.clear()
        call()
        runs.append(marks.offsets())
    for h in handles:
        h.remove()
    if args.sync_debug:
        print(f"== {impl}: synchronizing calls in one forward")
        for where in synchronizing_calls(lambda: model(input_ids=ids, attention_mask=mask), args.train):
            print("   " + where)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(2):  # the profiled call is the second: the first may see the previous call's tail
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                with torch.set_grad_enabled(args.train):
                    model(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
        print(f"== {impl}: host ops of one forward")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.out / f"trace_{impl}_{'train' if args.train else 'infer'}.json"))
    names = [n for n, _, _ in runs[0]]
    host = [statistics.median(r[i][1] for r in runs) for i in range(len(names))]
    gpu = [statistics.median(r[i][2] for r in runs) for i in range(len(names))]
    layers = [i for i, n in enumerate(names) if n.startswith("layer") and n.endswith(" >") and "." not in n]
    attn = [(names.index(f"layer{j}.self_attn >"), names.index(f"layer{j}.self_attn <"))
            for j in range(len(layers))]
    layer_host = [host[b] - host[a] for a, b in zip(layers, layers[1:])]
    layer_gpu = [gpu[b] - gpu[a] for a, b in zip(layers, layers[1:])]
    rec = dict(impl=impl, train=args.train,
               marks=[dict(name=n, host_ms=h, gpu_ms=g) for n, h, g in zip(names, host, gpu)],
               total_ms=gpu[-1], host_total_ms=host[-1],
               layer_host_ms=statistics.median(layer_host), layer_gpu_ms=statistics.median(layer_gpu),
               self_attn_host_ms=statistics.median(host[b] - host[a] for a, b in attn),
               self_attn_gpu_ms=statistics.median(gpu[b] - gpu[a] for a, b in attn))
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--train", action="store_true", help="fine-tune forward (train mode, with grad)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sync-debug", action="store_true", help="list the synchronizing calls of one forward")
    ap.add_argument("--profile", action="store_true", help="print the host ops of one forward (torch.profiler)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bert_timeline needs a CUDA device")
    meta = collect_meta("cuda")
    print(meta_title(meta), flush=True)
    records = []
    for impl in ("hf_triton_attn", "sdpa"):
        records.append(run_impl(impl, args, "cuda", torch.bfloat16))
        free_memory()
    for rec in records:
        what = "fine-tune forward" if args.train else "inference"
        print(f"== {rec['impl']} ({what}): GPU end {rec['total_ms']:.2f} ms, "
              f"host end {rec['host_total_ms']:.2f} ms; per layer host {rec['layer_host_ms']:.3f} / GPU "
              f"{rec['layer_gpu_ms']:.3f} ms; self-attention module host {rec['self_attn_host_ms']:.3f} / GPU "
              f"{rec['self_attn_gpu_ms']:.3f} ms")
        print(f"   {'boundary':24s} {'host ms':>8s} {'GPU ms':>8s} {'lag':>7s}")
        for m in rec["marks"]:
            if ".self_attn" in m["name"]:
                continue
            print(f"   {m['name']:24s} {m['host_ms']:8.3f} {m['gpu_ms']:8.3f} {m['gpu_ms'] - m['host_ms']:7.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "bert_timeline.json", meta, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
