#!/usr/bin/env python
"""End-to-end Hugging Face benchmarks: attention patched with hf_triton_attn vs sdpa vs eager.

Tasks (ANCHORS.md "Hugging Face end to end"; bf16 weights, random init, train mode keeps the
default dropout 0.1), each timed for every implementation in the same process on the same card:

- ``gpt2_train``: GPT-2 124M, B=8, S=1024, forward + backward + fused AdamW step.
- ``gpt2_generate``: GPT-2 124M, B=8, 512-token prompt + 128 new tokens, greedy, dynamic cache.
- ``bert_infer``: BERT-base encoder, B=32, S=512, padded (lengths uniform in [142, 512], mean ~327).
- ``bert_finetune``: BertForSequenceClassification, same batch, forward + backward + AdamW step.

Every implementation gets identical weights (one seed) and inputs. Before timing, each task checks
parity against sdpa in eval mode (dropout off) on real positions; ``gpt2_train`` is also profiled
once per implementation to report the attention kernels' share of the step's CUDA time.

    python benchmarks/bench_models.py --out OUT            # the H100 run
    python benchmarks/bench_models.py --quick --out OUT    # tiny configs on CPU (smoke test)

Writes ``OUT/models.json`` and ``OUT/models.png`` and prints a table with ratios to sdpa.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import collect_meta, fmt, free_memory, load_pyplot, meta_title, short_error, write_json  # noqa: E402

IMPLS = ("hf_triton_attn", "sdpa", "eager")
# Kernel-name fragments counted as "attention" in the profiler, per implementation.
ATTENTION_KERNELS = {
    "hf_triton_attn": ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_delta_kernel"),
    "sdpa": ("flash", "fmha", "attention", "cudnn"),
    "eager": ("softmax", "bmm", "baddbmm"),
}


# --------------------------------------------------------------------------- models and inputs


def build(kind: str, impl: str, quick: bool, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-init model with the given attention; identical weights for every impl (one seed)."""
    import transformers as T

    import hf_triton_attn

    base_impl = "sdpa" if impl == "hf_triton_attn" else impl
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = (T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=256) if quick
               else T.GPT2Config())
        model = T.GPT2LMHeadModel._from_config(cfg, attn_implementation=base_impl)
    elif kind in ("bert", "bert_cls"):
        cfg = (T.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=97, max_position_embeddings=256) if quick else T.BertConfig())
        cls = T.BertForSequenceClassification if kind == "bert_cls" else T.BertModel
        model = cls._from_config(cfg, attn_implementation=base_impl)
    else:
        raise ValueError(kind)
    model = model.to(device=device, dtype=dtype)
    if impl == "hf_triton_attn":
        report = hf_triton_attn.patch_model(model, strict=True)
        assert report.num_patched >= 1, str(report)
    return model


def padded_batch(batch: int, seqlen: int, vocab: int, device: str, seed: int = 1):
    """Token ids and a right-padded mask with lengths uniform in [0.277 S, S] (mean ~0.64 S)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.277 * seqlen), seqlen + 1, (batch,), generator=g)
    ids = torch.randint(1, vocab, (batch, seqlen), generator=g)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return ids.to(device), mask.to(device), lengths


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> tuple[float, list[float]]:
    """Median wall-clock ms of ``fn`` (synchronized), after ``warmup`` calls; also the samples."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), samples


def peak_memory(device: str, fn: Callable[[], Any]) -> dict[str, float | None]:
    """Peak allocated GB during one call of ``fn`` (CUDA only): ``peak_gb``, everything the process
    holds, and ``work_peak_gb``, the peak above what was allocated before the call (the call's own
    activations and buffers). Compare implementations by the second: the first also counts what the
    process keeps from earlier tasks and implementations (the GPT-2 step of session 10 read 10.497 GB
    for ours, run first, vs 10.493 for sdpa; ``benchmarks/memory_probe.py`` found the same step 9211.6
    MB above its start for ours and 9211.8 for sdpa, H100, 2026-11-27)."""
    if device != "cuda":
        fn()
        return dict(peak_gb=None, work_peak_gb=None)
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated()
    return dict(peak_gb=peak / 1e9, work_peak_gb=(peak - before) / 1e9)


def attention_share(fn: Callable[[], Any], impl: str, device: str) -> dict[str, float] | None:
    """CUDA time of the attention kernels / all kernels over one call of ``fn`` (torch.profiler)."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    total = attn = 0.0
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        total += t
        if any(frag in evt.key for frag in ATTENTION_KERNELS[impl]):
            attn += t
    return {"attention_ms": attn / 1e3, "kernels_ms": total / 1e3, "share": attn / total if total else 0.0}


# --------------------------------------------------------------------------- tasks


def gpt2_train_setup(impl: str, args, device: str, dtype: torch.dtype):
    """(model in train mode, token ids, fused AdamW) of the ``gpt2_train`` task (also memory_probe.py's)."""
    batch, seqlen = (2, 64) if args.quick else (8, 1024)
    model = build("gpt2", impl, args.quick, device, dtype).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=g).to(device)
    return model, ids, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")


def task_gpt2_train(impl: str, args, device: str, dtype: torch.dtype) -> dict[str, Any]:
    model, ids, opt = gpt2_train_setup(impl, args, device, dtype)
    batch, seqlen = ids.shape

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    ms, samples = time_ms(step, device, warmup=3, iters=args.iters)
    rec = dict(ms=ms, samples=samples, batch=batch, seqlen=seqlen, tokens_per_s=batch * seqlen / ms * 1e3)
    rec.update(peak_memory(device, step))
    rec["profile"] = attention_share(step, impl, device)
    return rec


def task_gpt2_generate(impls: list[str], args, device: str, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Greedy generate, every implementation timed in turn (A B C A B C ...): a generate call is
    host-bound and the device hosts drift by 10-20% over a minute, so back-to-back blocks per impl
    compared drift, not attention (samples 778-988 vs 868-992 ms in one such run, H100, 2026-11-26)."""
    batch, prompt, new = (2, 16, 8) if args.quick else (8, 512, 128)
    models = {impl: build("gpt2", impl, args.quick, device, dtype).eval() for impl in impls}
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    tokens: dict[str, torch.Tensor] = {}

    def gen_fn(impl: str) -> Callable[[], None]:
        @torch.no_grad()
        def gen() -> None:
            tokens[impl] = models[impl].generate(input_ids=ids, attention_mask=mask, **kw)
        return gen

    fns = {impl: gen_fn(impl) for impl in impls}
    for fn in fns.values():  # warm-up: compiles, allocator pools
        fn()
    sync(device)
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.gen_iters):
        for impl, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            samples[impl].append((time.perf_counter() - start) * 1e3)
    recs = {}
    for impl in impls:
        ms = statistics.median(samples[impl])
        recs[impl] = dict(ms=ms, min_ms=min(samples[impl]), samples=samples[impl], batch=batch, prompt=prompt,
                          new_tokens=new, new_tokens_per_s=batch * new / ms * 1e3,
                          **peak_memory(device, fns[impl]), tokens=tokens[impl][:, prompt:].cpu())
    return recs


def _bert_inputs(args, device):
    batch, seqlen = (4, 48) if args.quick else (32, 512)
    vocab = 97 if args.quick else 30522
    ids, mask, lengths = padded_batch(batch, seqlen, vocab, device)
    return ids, mask, lengths


def bert_infer_call(model, ids, mask) -> Callable[[], torch.Tensor]:
    """The timed call of ``bert_infer`` (also bert_lean_ab's): one no-grad forward of ``model``."""
    @torch.no_grad()
    def infer():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state
    return infer


def bert_finetune_step(model, ids, mask, labels, device: str) -> Callable[[], None]:
    """The timed step of ``bert_finetune`` (also the BERT profile's and bert_lean_ab's): forward with
    labels, backward, a fused AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

    def step():
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def task_bert_infer(impl: str, args, device: str, dtype: torch.dtype) -> dict[str, Any]:
    ids, mask, lengths = _bert_inputs(args, device)
    model = build("bert", impl, args.quick, device, dtype).eval()
    infer = bert_infer_call(model, ids, mask)
    ms, samples = time_ms(infer, device, warmup=3, iters=args.iters * 2)
    rec = dict(ms=ms, samples=samples, batch=ids.shape[0], seqlen=ids.shape[1],
               mean_length=float(lengths.float().mean()), fill=float(lengths.float().mean()) / ids.shape[1],
               **peak_memory(device, infer))
    return rec


def task_bert_finetune(impl: str, args, device: str, dtype: torch.dtype) -> dict[str, Any]:
    ids, mask, lengths = _bert_inputs(args, device)
    labels = (torch.arange(ids.shape[0], device=device) % 2)
    model = build("bert_cls", impl, args.quick, device, dtype).train()
    step = bert_finetune_step(model, ids, mask, labels, device)
    ms, samples = time_ms(step, device, warmup=3, iters=args.iters)
    rec = dict(ms=ms, samples=samples, batch=ids.shape[0], seqlen=ids.shape[1],
               mean_length=float(lengths.float().mean()), **peak_memory(device, step))
    return rec


def profile_generate(args, device: str, dtype: torch.dtype, new_tokens: int = 16) -> None:
    """Where a decode step's time goes: torch.profiler tables (CPU ops, CUDA kernels) per impl."""
    from torch.profiler import ProfilerActivity, profile

    for impl in ("hf_triton_attn", "sdpa"):
        model = build("gpt2", impl, args.quick, device, dtype).eval()
        ids = torch.randint(0, model.config.vocab_size, (8, 512 if not args.quick else 16)).to(device)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(input_ids=ids, **kw)
            sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                model.generate(input_ids=ids, **kw)
                sync(device)
        print(f"== profile: generate {new_tokens} tokens, {impl}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        if device == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10,
                                            max_name_column_width=60))
        del model
        free_memory()


def profile_bert(args, device: str, dtype: torch.dtype) -> None:
    """Where a BERT fine-tune step and a padded inference go: CUDA kernel tables per impl."""
    ids, mask, _ = _bert_inputs(args, device)
    labels = torch.arange(ids.shape[0], device=device) % 2
    for impl in ("hf_triton_attn", "sdpa"):
        _profile_bert_impl(impl, ids, mask, labels, args, device, dtype)
        free_memory()


def _profile_bert_impl(impl: str, ids, mask, labels, args, device: str, dtype: torch.dtype) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = build("bert_cls", impl, args.quick, device, dtype).train()
    step = bert_finetune_step(model, ids, mask, labels, device)

    @torch.no_grad()
    def infer():
        model.eval()
        model(input_ids=ids, attention_mask=mask)
        model.train()

    for name, fn in (("finetune step", step), ("inference", infer)):
        for _ in range(3):
            fn()
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=acts) as prof:
            fn()
            sync(device)
        wall = (time.perf_counter() - start) * 1e3
        avg = prof.key_averages()
        total = sum(getattr(e, "self_device_time_total", 0.0) for e in avg) / 1e3
        print(f"== profile: BERT {name}, {impl}: wall {wall:.2f} ms (profiled), CUDA kernels {total:.2f} ms")
        print(avg.table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total",
                        row_limit=16, max_name_column_width=70))


TASKS = {"gpt2_train": task_gpt2_train, "gpt2_generate": task_gpt2_generate,
         "bert_infer": task_bert_infer, "bert_finetune": task_bert_finetune}


# --------------------------------------------------------------------------- parity (eval mode, before timing)


@torch.no_grad()
def parity(args, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Ours vs sdpa (and eager vs sdpa, the yardstick) on real positions, identical weights, dropout off."""
    out = []
    g = torch.Generator().manual_seed(4)
    for kind in ("gpt2", "bert"):
        seqlen = 64 if args.quick else 1024 if kind == "gpt2" else 512
        batch = 2 if args.quick else 4
        models = {impl: build(kind, impl, args.quick, device, dtype).eval() for impl in IMPLS}
        vocab = models["sdpa"].config.vocab_size
        ids = torch.randint(1, vocab, (batch, seqlen), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[0, : seqlen // 3] = 0 if kind == "gpt2" else 1  # GPT-2: left padding; BERT: right padding
        if kind == "bert":
            mask[0, 2 * seqlen // 3:] = 0
        res = {}
        for impl, m in models.items():
            o = m(input_ids=ids, attention_mask=mask)
            res[impl] = (o.logits if kind == "gpt2" else o.last_hidden_state).float()
        real = mask.bool()
        scale = float(res["sdpa"][real].abs().max())
        for impl in ("hf_triton_attn", "eager"):
            err = float((res[impl][real] - res["sdpa"][real]).abs().max())
            out.append(dict(model=kind, impl=impl, vs="sdpa", max_abs_err=err, rel_err=err / scale))
        del models
        free_memory()
    return out


# --------------------------------------------------------------------------- main


def plot(records: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path | None:
    plt = load_pyplot()
    if plt is None:
        return None
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    colors = {"hf_triton_attn": "tab:red", "sdpa": "tab:blue", "eager": "tab:gray"}
    for ax, task in zip(axes.flat, tasks):
        rows = [r for r in records if r["task"] == task and r.get("ms") is not None]
        ax.bar([r["impl"] for r in rows], [r["ms"] for r in rows], color=[colors[r["impl"]] for r in rows])
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("ms (median, lower is better)")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(meta_title(meta), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--quick", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gen-iters", type=int, default=5, help="generate calls per impl, interleaved")
    ap.add_argument("--profile-generate", action="store_true", help="only print decode profiles and exit")
    ap.add_argument("--profile-bert", action="store_true", help="only print BERT fine-tune/inference profiles and exit")
    ap.add_argument("--backward-on-calling-thread", action="store_true",
                    help="torch.autograd.set_multithreading_enabled(False) for every task and impl: backward "
                         "nodes run on the thread that calls backward() instead of autograd's CUDA worker")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    meta = collect_meta(device)
    meta["dtype"] = str(dtype).replace("torch.", "")
    print(meta_title(meta), flush=True)
    if args.profile_generate:
        profile_generate(args, device, dtype)
        return 0
    if args.profile_bert:
        profile_bert(args, device, dtype)
        return 0
    records: list[dict[str, Any]] = []
    json_path = args.out / "models.json"
    if args.backward_on_calling_thread:
        torch.autograd.set_multithreading_enabled(False)  # thread-local: this (the main) thread
        meta["backward_on_calling_thread"] = True

    for row in parity(args, device, dtype):
        print(f"parity {row['model']}: {row['impl']} vs sdpa max |diff| {row['max_abs_err']:.3g} "
              f"(relative {row['rel_err']:.3g})", flush=True)
        records.append(dict(task="parity", **row))

    for task in args.tasks:
        paired: dict[str, dict[str, Any]] = {}
        if task == "gpt2_generate":
            try:
                paired = task_gpt2_generate(args.impls, args, device, dtype)
            except Exception as exc:  # record and go on: one failure must not lose the run
                paired = {impl: dict(ms=None, error=short_error(exc)) for impl in args.impls}
                print(f"{task}: FAILED {short_error(exc)}", flush=True)
        for impl in args.impls:
            try:
                rec = paired[impl] if paired else TASKS[task](impl, args, device, dtype)
            except Exception as exc:  # record and go on: one failure must not lose the run
                rec = dict(ms=None, error=short_error(exc))
                print(f"{task} {impl}: FAILED {rec['error']}", flush=True)
            rec.update(task=task, impl=impl)
            records.append(rec)
            free_memory()
            print(f"{task:14s} {impl:15s} {fmt(rec.get('ms'), '.2f'):>9s} ms"
                  + (f" (min {rec['min_ms']:.2f})" if rec.get("min_ms") else "")
                  + f"  peak {fmt(rec.get('peak_gb'), '.3f')} GB"
                  + f" ({fmt(rec.get('work_peak_gb'), '.3f')} above the start)"
                  + (f"  attention share {rec['profile']['share']:.1%} ({rec['profile']['attention_ms']:.2f} ms)"
                     if rec.get("profile") else ""), flush=True)
        gen = {r["impl"]: r.get("tokens") for r in records if r.get("task") == task == "gpt2_generate"}
        if gen.get("hf_triton_attn") is not None and gen.get("sdpa") is not None:
            same = float((gen["hf_triton_attn"] == gen["sdpa"]).float().mean())
            print(f"gpt2_generate: fraction of new tokens identical to sdpa's: {same:.4f}", flush=True)
            records.append(dict(task="parity", model="gpt2_generate", impl="hf_triton_attn", vs="sdpa",
                                identical_token_fraction=same))
        for r in records:
            r.pop("tokens", None)
        write_json(json_path, meta, records)

    print("\n| task | hf_triton_attn ms | sdpa ms | eager ms | ours / sdpa speed-up | "
          "peak GB above the call's start, ours / sdpa |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        by = {r["impl"]: r for r in records if r.get("task") == task}
        ours, sdpa, eager = (by.get(i, {}).get("ms") for i in IMPLS)
        speed = sdpa / ours if ours and sdpa else None
        mem = "/".join(fmt(by.get(i, {}).get("work_peak_gb"), ".3f") for i in ("hf_triton_attn", "sdpa"))
        print(f"| {task} | {fmt(ours, '.2f')} | {fmt(sdpa, '.2f')} | {fmt(eager, '.2f')} | "
              f"{fmt(speed, '.3f')}x | {mem} |")
    png = plot(records, meta, args.out / "models.png")
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0 if all(r.get("ms") is not None for r in records if r.get("task") in TASKS) else 1


if __name__ == "__main__":
    sys.exit(main())
