"""Fine-tune GPT-2 (causal LM) or BERT (sequence classification) with transformers.Trainer, one process or
many (DDP / FSDP through accelerate), with our Triton attention (``--attn hf_triton_attn``) or a built-in one.

Single process (CPU or one GPU)::

    python examples/finetune.py --model gpt2 --size tiny --steps 8 --batch-size 4 --json-out run.json

Two processes (two GPUs, or two CPU processes over gloo: the same command line)::

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune.py --model gpt2 --batch-size 2
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/finetune.py --model gpt2 --save-checkpoint

The data is synthetic and deterministic (seeded), so a 1-process run with ``--batch-size 2B`` and an
N-process run with ``--batch-size 2B/N`` see the same global batches and give the same loss curve up to
float rounding (``batches`` in the JSON lists the sample ids of every global step; dropout is 0 by default).
``--json-out`` writes losses, throughput, peak memory, and how often ``hf_triton_attn.flash_attention`` ran
(``kernel_calls``; ``varlen_calls`` counts those with ``cu_seqlens``) on rank 0.

On CPU (tests/test_distributed.py: HF_TRITON_ATTN_BACKEND=interpret TRITON_INTERPRET=1 for the real kernels),
``accelerate launch --cpu --num_processes 2`` would start ONE process (accelerate's CPU launcher needs MPI
for more); the config files above (a torchrun launch, like ``--multi_gpu``) start two, and this script
switches Trainer to ``use_cpu`` itself when CUDA is absent, so the processes form a gloo group.
accelerate 1.15 turns FSDP on only for accelerator devices; on CPU this script sets the distributed type
so that accelerate's FSDP2 path (torch ``fully_shard``, which runs on CPU with gloo) is taken anyway
(``fsdp_cpu_shim`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

COUNTS = {"kernel_calls": 0, "varlen_calls": 0, "attention_calls": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["gpt2", "bert"], default="gpt2")
    p.add_argument("--size", choices=["tiny", "base"], default="tiny",
                   help="tiny: 2 layers, 2 heads, hidden 64 (CPU); base: GPT-2 124M / BERT-base configs")
    p.add_argument("--model-path", default=None, help="load real weights (from_pretrained) instead of random init")
    p.add_argument("--attn", choices=["hf_triton_attn", "sdpa", "eager"], default="hf_triton_attn")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2, help="per device (global batch = this x world size)")
    p.add_argument("--seq-len", type=int, default=32,
                   help="GPT-2: every sequence (random lengths in [seq/4, seq] with --padding-free); "
                        "BERT: the longest of the random lengths")
    p.add_argument("--padding-free", action="store_true",
                   help="GPT-2: DataCollatorWithFlattening(return_flash_attn_kwargs=True), random lengths")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 full shard (TrainingArguments fsdp / fsdp_config)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.0, help="all dropout probabilities (0 for loss parity)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="Trainer output dir (default: a temporary one)")
    p.add_argument("--save-checkpoint", action="store_true",
                   help="save a checkpoint at the last step (sharded under --fsdp), load it into an unpatched "
                        "eager model and compare every tensor bitwise with the trained weights")
    p.add_argument("--timing-warmup", type=int, default=2, help="steps left out of the step-time median")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data: synthetic, deterministic, learnable through attention
# ----------------------------------------------------------------------------------------------

class SyntheticData(torch.utils.data.Dataset):
    """Sample i is a pure function of (seed, i).

    GPT-2: 4 random tokens, then an arithmetic progression (mod vocab) with a random step, so the next
    token depends on the previous two (attention has to learn it). BERT: random tokens of a random length,
    label = whether most of them are odd (needs attention to aggregate over the sequence).
    """

    def __init__(self, model: str, n: int, seq_len: int, vocab: int, seed: int, random_lengths: bool):
        g = torch.Generator().manual_seed(seed)
        lo = max(8, seq_len // 4)
        if random_lengths:
            self.lengths = torch.randint(lo, seq_len + 1, (n,), generator=g).tolist()
        else:
            self.lengths = [seq_len] * n
        self.model = model
        self.samples = []
        for length in self.lengths:
            if model == "gpt2":
                head = torch.randint(3, vocab, (4,), generator=g)
                step = int(torch.randint(1, 17, (1,), generator=g))
                tail = (head[-1] + step * torch.arange(1, length - 3)) % (vocab - 3) + 3
                ids = torch.cat([head, tail])[:length]
                self.samples.append({"input_ids": ids.tolist()})
            else:
                ids = torch.randint(3, vocab, (length,), generator=g)
                label = int((ids % 2).sum() * 2 > length)
                self.samples.append({"input_ids": ids.tolist(), "labels": label})
        self.index = {}
        for i, s in enumerate(self.samples):
            self.index.setdefault(tuple(s["input_ids"]), i)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return dict(self.samples[i])

    def ids_in_batch(self, inputs) -> list[int]:
        """The sample ids a collated batch holds (dense, padded or flattened)."""
        ids = inputs["input_ids"].detach().cpu()
        if "cu_seq_lens_q" in inputs:
            cu = inputs["cu_seq_lens_q"].detach().cpu().tolist()
            seqs = [ids[0, a:b] for a, b in zip(cu[:-1], cu[1:])]
        elif "attention_mask" in inputs:
            mask = inputs["attention_mask"].detach().cpu().bool()
            seqs = [row[m] for row, m in zip(ids, mask)]
        else:
            seqs = list(ids)
        return [self.index.get(tuple(s.tolist()), -1) for s in seqs]


def pad_collate(features):
    """Right-pad to the longest sequence of the batch (pad id 0), with the attention mask and labels."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, :len(f["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch


def dense_lm_collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------

def build_config(args):
    import transformers as T

    d = args.dropout
    if args.model == "gpt2":
        if args.model_path:
            cfg = T.AutoConfig.from_pretrained(args.model_path)
        elif args.size == "base":
            cfg = T.GPT2Config()  # 124M: 12 layers, 12 heads, 768 wide, 1024 positions, vocab 50257
        else:
            cfg = T.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=2, n_positions=max(64, args.seq_len),
                               bos_token_id=1, eos_token_id=2)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = d
    else:
        if args.model_path:
            cfg = T.AutoConfig.from_pretrained(args.model_path, num_labels=2)
        elif args.size == "base":
            cfg = T.BertConfig(num_labels=2)  # BERT-base: 12 layers, 12 heads, 768 wide, 512 positions
        else:
            cfg = T.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=max(64, args.seq_len), num_labels=2)
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = d
        cfg.classifier_dropout = d
    return cfg


def build_model(args, cfg, attn_implementation: str):
    import transformers as T

    auto = T.AutoModelForCausalLM if args.model == "gpt2" else T.AutoModelForSequenceClassification
    torch.manual_seed(args.seed)  # identical initial weights in every process and every run
    if args.model_path:
        return auto.from_pretrained(args.model_path, config=cfg, attn_implementation=attn_implementation)
    return auto.from_config(cfg, attn_implementation=attn_implementation)


def install_counters() -> None:
    """Count calls of the kernel entry point the interface adapter uses (a module attribute, rebound to a
    counting wrapper) and of the attention function registered as "hf_triton_attn" (re-registered through
    transformers' public AttentionInterface). attention_calls - kernel_calls = eager fallbacks."""
    from transformers import AttentionInterface

    from hf_triton_attn.patches import hf_interface

    real_kernel = hf_interface.flash_attention
    real_attention = hf_interface.attention_forward

    def counted_kernel(*a, **kw):
        COUNTS["kernel_calls"] += 1
        if kw.get("cu_seqlens_q") is not None:
            COUNTS["varlen_calls"] += 1
        return real_kernel(*a, **kw)

    def counted_attention(*a, **kw):
        COUNTS["attention_calls"] += 1
        return real_attention(*a, **kw)

    hf_interface.flash_attention = counted_kernel
    AttentionInterface.register(hf_interface.NAME, counted_attention)


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------

def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # host RSS on CPU


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "accelerate", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def gather(obj):
    """Every rank's obj, in rank order (a list of one outside distributed runs)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def compare_state_dicts(trained: dict, loaded: dict) -> dict:
    """Bitwise comparison of every tensor of ``trained`` with ``loaded``."""
    missing = sorted(set(trained) - set(loaded))
    unequal, max_diff = [], 0.0
    for k, v in trained.items():
        if k not in loaded:
            continue
        a, b = v.detach().cpu(), loaded[k].detach().cpu()
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            unequal.append(k)
            if a.shape == b.shape:
                max_diff = max(max_diff, float((a.double() - b.double()).abs().max()))
    return {"num_tensors": len(trained), "missing": missing, "unequal": unequal,
            "bitwise_equal": not missing and not unequal, "max_abs_diff": max_diff}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers as T
    from accelerate.utils import DistributedType
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if args.attn == "hf_triton_attn":
        import hf_triton_attn

        install_counters()

    use_cpu = not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # every rank must name the same directory (Trainer writes checkpoints there)
    out_dir = args.output_dir or os.path.join(tempfile.gettempdir(), f"hf_triton_attn_{args.model}_{args.attn}")

    cfg = build_config(args)
    if args.attn == "hf_triton_attn":
        model = build_model(args, cfg, "eager")  # loaded as usual, then switched by patch_model
        report = hf_triton_attn.patch_model(model, strict=True)
        if rank == 0:
            print(report, flush=True)
    else:
        report = None
        model = build_model(args, cfg, args.attn)
    if args.model == "gpt2":
        model.config.pad_token_id = model.config.eos_token_id

    global_batch = args.batch_size * world
    n = args.steps * global_batch
    random_lengths = args.model == "bert" or args.padding_free
    data = SyntheticData(args.model, n, args.seq_len, cfg.vocab_size, args.seed + 1, random_lengths)
    if args.padding_free:
        if args.model != "gpt2":
            raise SystemExit("--padding-free is for the causal LM (--model gpt2)")
        collate = T.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    else:
        collate = dense_lm_collate if args.model == "gpt2" else pad_collate

    # --fsdp, or `accelerate launch --config_file examples/accelerate/fsdp.yaml` (which sets ACCELERATE_USE_FSDP)
    fsdp_requested = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    block = "GPT2Block" if args.model == "gpt2" else "BertLayer"
    fsdp_kwargs = {}
    if fsdp_requested:
        # The layer class is named explicitly, also under fsdp.yaml: accelerate's default (the model's
        # _no_split_modules) includes BertEmbeddings for BERT, and accelerate 1.15 then calls fully_shard
        # again on its word_embeddings, whose parameters are already sharded: TypeError in _init_sharding_spec_tp.
        fsdp_kwargs = dict(fsdp=True, fsdp_config={
            "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": [block],
            "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    targs = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, report_to="none", disable_tqdm=True, seed=args.seed, data_seed=args.seed,
        save_strategy="steps" if args.save_checkpoint else "no", save_steps=args.steps,
        save_only_model=not fsdp_requested,
        use_cpu=use_cpu, bf16=args.bf16, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        gradient_checkpointing=args.grad_checkpointing, remove_unused_columns=False, **fsdp_kwargs)

    fsdp_cpu_shim = False
    if fsdp_requested and use_cpu and world > 1:
        # accelerate 1.15 enables FSDP only for accelerator device types (AcceleratorState keeps MULTI_CPU
        # as plain DDP); torch's fully_shard itself runs on CPU with gloo. Present the (already created,
        # gloo-backed) state as MULTI_GPU so that the Accelerator Trainer creates takes its FSDP2 branch.
        from accelerate.state import PartialState

        state = PartialState()
        assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
        state.distributed_type = DistributedType.MULTI_GPU
        fsdp_cpu_shim = True

    step_times: list[float] = []
    batches: list[list[int]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

    class RecordingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append(data.ids_in_batch(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = RecordingTrainer(model=model, args=targs, train_dataset=data, data_collator=collate,
                               callbacks=[StepTimer()])
    if args.model == "bert":
        # BertForSequenceClassification.forward takes **kwargs, so Trainer believes it consumes
        # num_items_in_batch and (average_tokens_across_devices) multiplies its loss by the world size;
        # but the model's CrossEntropyLoss is a plain mean and ignores it: the gradient and the logged loss
        # come out world-size times too large under DDP/FSDP (transformers 5.17). Tell Trainer the truth.
        trainer.model_accepts_loss_kwargs = False
    accelerator = trainer.accelerator
    COUNTS.update(kernel_calls=0, varlen_calls=0, attention_calls=0)
    t0 = time.perf_counter()
    result = trainer.train()
    train_wall = time.perf_counter() - t0
    wrapped = type(trainer.model_wrapped).__name__
    attn_after = accelerator.unwrap_model(trainer.model_wrapped).config._attn_implementation
    peaks = gather(peak_memory_bytes())  # training only, before the checkpoint work below

    # -- checkpoint: load the saved files into an UNPATCHED eager model and compare bitwise
    checkpoint = None
    if args.save_checkpoint:
        trained = accelerator.get_state_dict(trainer.model_wrapped)  # full, gathered (collective)
        ckpt_dir = Path(out_dir) / f"checkpoint-{args.steps}"
        merged = None
        if (ckpt_dir / "pytorch_model_fsdp_0").is_dir():
            from accelerate.utils import merge_fsdp_weights

            merged = ckpt_dir / "merged"  # `accelerate merge-weights`; collective (ends in a barrier)
            merge_fsdp_weights(str(ckpt_dir / "pytorch_model_fsdp_0"), str(merged), safe_serialization=True)
        if accelerator.is_main_process:
            checkpoint = load_into_eager(args, cfg, ckpt_dir, merged, trained)
            print("checkpoint:", json.dumps({k: v for k, v in checkpoint.items() if k != "unequal"}), flush=True)
        accelerator.wait_for_everyone()

    counts = gather(dict(COUNTS))
    ranks_batches = gather(batches)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    grad_norms = [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h]
    accelerator.wait_for_everyone()  # the last collective; the process then ends with os._exit (see the end)
    if rank != 0:
        return 0
    steps_global = [sorted(i for rb in ranks_batches for i in rb[s]) for s in range(len(batches))]
    timed = step_times[args.timing_warmup:] or step_times
    step_time = statistics.median(timed) if timed else float("nan")
    tokens_per_step = [sum(data.lengths[i] for i in ids if i >= 0) for ids in steps_global]
    summary = {
        "model": args.model, "size": args.size, "model_path": args.model_path, "attn": args.attn,
        "padding_free": args.padding_free, "fsdp_requested": fsdp_requested,
        "fsdp": accelerator.distributed_type == DistributedType.FSDP, "fsdp_cpu_shim": fsdp_cpu_shim,
        "bf16": args.bf16, "world_size": world, "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "wrapped_model_class": wrapped, "attn_implementation_after_wrap": attn_after,
        "device": "cuda" if not use_cpu else "cpu",
        "steps": args.steps, "per_device_batch": args.batch_size, "global_batch": global_batch,
        "seq_len": args.seq_len, "lr": args.lr,
        "losses": losses, "grad_norms": grad_norms, "batches": steps_global,
        "step_times_s": step_times, "step_time_s": step_time,
        "tokens_per_s": (statistics.mean(tokens_per_step) / step_time) if tokens_per_step else None,
        "samples_per_s": global_batch / step_time,
        "train_wall_s": train_wall, "train_runtime_s": result.metrics.get("train_runtime"),
        "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_rank": peaks,
        "peak_memory_kind": "cuda max_memory_allocated" if not use_cpu else "host max RSS",
        "kernel_calls": counts[0]["kernel_calls"], "varlen_calls": counts[0]["varlen_calls"],
        "attention_calls": counts[0]["attention_calls"],
        "kernel_calls_per_rank": [c["kernel_calls"] for c in counts],
        "varlen_calls_per_rank": [c["varlen_calls"] for c in counts],
        "patch_report": str(report) if report is not None else None,
        "checkpoint": checkpoint, "versions": versions(), "ok": True,
    }
    print(f"losses: {[round(x, 5) for x in losses]}")
    print(f"{args.model} {args.attn} world={world} {summary['distributed_type']} ({wrapped}): "
          f"step {step_time * 1e3:.1f} ms, {summary['tokens_per_s']:.0f} tokens/s, kernel calls "
          f"{summary['kernel_calls']} (varlen {summary['varlen_calls']}) of {summary['attention_calls']} attention "
          "calls",
          flush=True)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    return 0


def load_into_eager(args, cfg, ckpt_dir: Path, merged: Path | None, trained: dict) -> dict:
    """Read the checkpoint Trainer wrote (safetensors, or FSDP's sharded DCP directory that
    merge_fsdp_weights turned into ``merged``) into a freshly built eager model that was never patched."""
    from safetensors.torch import load_file

    sharded = ckpt_dir / "pytorch_model_fsdp_0"
    if merged is not None:
        files = sorted(merged.glob("*.safetensors"))
        fmt = "fsdp sharded (DCP), merged with accelerate.utils.merge_fsdp_weights"
        shards = sorted(p.name for p in sharded.iterdir())
    else:
        files = sorted(ckpt_dir.glob("*.safetensors"))
        fmt = "safetensors"
        shards = [p.name for p in files]
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    fresh = build_model(args, cfg, "eager")
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
    result = compare_state_dicts(trained, fresh.state_dict())
    init = build_model(args, cfg, "eager").state_dict()  # the seeded initial weights: training changed them
    result["changed_from_init"] = sum(not torch.equal(v.cpu(), init[k]) for k, v in trained.items() if k in init)
    result.update(format=fmt, path=str(ckpt_dir), files=shards, load_missing=sorted(set(missing) - tied),
                  load_unexpected=sorted(unexpected), eager=fresh.config._attn_implementation,
                  patched=hasattr(fresh, "_hf_triton_attn_undo"))
    return result


if __name__ == "__main__":
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Skip the interpreter's teardown in distributed runs (everything is written by now). torch 2.13's gloo
        # group does not always survive it on CPU: once a rank aborted at exit ("terminate called without an
        # active exception"), and with an explicit destroy_process_group() first, a rank deadlocked (py-spy:
        # ~ProcessGroupGloo, run when DDP's Reducer is freed, joins the gloo thread while holding the GIL; that
        # thread waits for the GIL to free a finished all_gather's tensors).
        os._exit(code)
    sys.exit(code)
