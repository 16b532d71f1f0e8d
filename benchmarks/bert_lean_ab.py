"""The encoder adapter's lean layers against transformers' own layers, in ONE process, interleaved.

BERT-base (``bench_models``' padded batch: B=32, S=512, ~58% fill, bf16) with ``hf_triton_attn``: each
sample times, in turn, the lean runner (``patches/encoder_layers.py``), the same model with transformers'
layers (an idle pre-hook on one composite module sends the packed tokens through them) and sdpa. The
host speed of the lent machines moves 2x between processes (benchmarks/NOTES.md, session 15), so only
samples taken side by side compare packages; each sample is synchronised.

    python -m benchmarks.bert_lean_ab --iters 30 [--train]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import _bert_inputs, bert_finetune_step, bert_infer_call, build  # noqa: E402
from benchmarks.common import collect_meta, meta_title  # noqa: E402


def _idle(module, args):
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--train", action="store_true", help="fine-tune step (BertForSequenceClassification, AdamW)")
    ap.add_argument("--quick", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--profile", action="store_true", help="also print the host ops of 3 lean calls (torch.profiler)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(meta_title(collect_meta(device)), flush=True)
    ids, mask, _ = _bert_inputs(args, device)
    kind = "bert_cls" if args.train else "bert"
    ours = build(kind, "hf_triton_attn", args.quick, device, dtype)
    sdpa = build(kind, "sdpa", args.quick, device, dtype)
    labels = torch.arange(ids.shape[0], device=device) % 2

    def runner(model):
        if args.train:
            return bert_finetune_step(model.train(), ids, mask, labels, device)
        return bert_infer_call(model.eval(), ids, mask)

    encoder = ours.bert.encoder if args.train else ours.encoder
    composite = encoder.layer[0].attention
    run_ours, run_sdpa = runner(ours), runner(sdpa)

    def layers():
        handle = composite.register_forward_pre_hook(_idle)
        try:
            run_ours()
        finally:
            handle.remove()

    variants = {"lean": run_ours, "layers": layers, "sdpa": run_sdpa}
    for fn in variants.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    host: dict[str, list[float]] = {k: [] for k in variants}  # until the call returned (GPU may trail)
    for _ in range(args.iters):
        for name, fn in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            host[name].append((time.perf_counter() - start) * 1e3)
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) * 1e3)
    med = {k: statistics.median(v) for k, v in samples.items()}
    task = "fine-tune step" if args.train else "inference"
    for name, v in samples.items():
        print(f"{task:14s} {name:7s} median {med[name]:7.2f} ms  min {min(v):7.2f}  max {max(v):7.2f}  "
              f"host {statistics.median(host[name]):7.2f}  sdpa / this {med['sdpa'] / med[name]:.3f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                run_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
