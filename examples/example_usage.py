#!/usr/bin/env python
"""Standard attention vs ``TritonMultiHeadAttention``: correctness first, then speed.

"Standard" attention is what the seed called standard: plain PyTorch multi-head attention that
materialises ``softmax(Q K^T / sqrt(d)) V`` (an ``S x S`` matrix per head). ``torch.nn.MultiheadAttention``
runs beside it (torch's fused path, need_weights=False), and ``TritonMultiHeadAttention`` (the Triton
flash kernel, no ``S x S`` matrix). The three modules share one set of weights (same state_dict keys).
Every configuration is first checked against a float64 copy of the standard module (outputs and, with
``backward``, input gradients; where the float64 ``S x S`` matrices would not fit, on one shortened
sequence); a wrong result raises ``CorrectnessError`` before anything is timed.

    python examples/example_usage.py --quick                        # CPU: small sizes, < 1 min
    python examples/example_usage.py --quick --interpret            # CPU, the real kernels interpreted
    python examples/example_usage.py --out example_out              # GPU: the full sweep
    python examples/example_usage.py --seq-lens 512,1024 --d-models 512 --heads 8 --dtype bf16

On a CPU the Triton kernels run only through Triton's interpreter, switched on by TRITON_INTERPRET=1
before triton is imported (``--interpret`` does that); without it the CPU path times the eager
reference backend. The table, the JSON and the figures say which backend was timed.

Writes ``OUT/example_usage.json`` (metadata: device, versions, commit, date, backend; one record
per provider, configuration and mode) and ``OUT/example_usage_time.png`` /
``OUT/example_usage_speedup.png`` (time and speed-up vs sequence length, one panel per
(d_model, heads, mode)).

    from examples.example_usage import run_benchmark_suite
    result = run_benchmark_suite(seq_lens=(128, 256), d_models=(64,), num_heads=(2,), batch_size=2,
                                 dtype="fp32", out_dir="out")
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DTYPES,
    collect_meta,
    fmt,
    free_memory,
    memory_limit_bytes,
    meta_title,
    plot_lines,
    short_error,
    write_json,
)
from hf_triton_attn import TritonMultiHeadAttention  # noqa: E402
from hf_triton_attn.cli import auto_backend  # noqa: E402

__all__ = ["CorrectnessError", "StandardMultiHeadAttention", "run_benchmark_suite", "main"]

PROVIDERS = ("standard", "torch_mha", "triton")
# Same-dtype error floors relative to the output scale (the project's pass rule: error vs the
# float64 oracle <= 2 x the standard module's own error in that dtype + floor * scale).
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
METHOD = (
    "self-attention module(x, x, x), x (B, S, d_model) batch-first; fwd under torch.no_grad, fwdbwd = forward + "
    "out.backward(dout) with x.grad reset between reps; CUDA: median of triton.testing.do_bench(warmup=25, "
    "rep=100); CPU: median of wall-clock calls; correctness vs a float64 copy of the standard module first"
)
Record = dict[str, Any]


class CorrectnessError(AssertionError):
    """A provider's output or gradient differs from the float64 reference beyond the pass rule."""


class StandardMultiHeadAttention(nn.Module):
    """Plain PyTorch multi-head attention that materialises the ``(B, H, S, S)`` probabilities.

    Parameters and state_dict keys are torch's / ``TritonMultiHeadAttention``'s (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), so one checkpoint loads into all three.
    """

    def __init__(self, d_model: int, num_heads: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model, **factory)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, E)``, ``(B, S, E)``, ``(B, S, E)`` -> ``(output (B, L, E), probabilities (B, H, L, S))``."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        heads = lambda x: x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(F.linear(query, w_q, b_q)), heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, L, S), materialised
        if is_causal:
            length_q, length_k = scores.shape[-2:]
            hidden = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).triu(length_k - length_q + 1)
            scores = scores.masked_fill(hidden, float("-inf"))
        probs = scores.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], self.d_model)
        return self.out_proj(out), probs


# --------------------------------------------------------------------------- set-up


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {**DTYPES, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in aliases:
        raise ValueError(f"dtype must be a torch dtype or one of {sorted(aliases)}; got {dtype!r}")
    return aliases[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def kernel_backend(device: str) -> str:
    """The backend ``TritonMultiHeadAttention`` is timed with: compiled Triton on CUDA; on a CPU the same
    kernels through the interpreter when TRITON_INTERPRET=1 was set before import, else the reference."""
    if device == "cuda":
        return "triton"
    from hf_triton_attn.kernels import interpreted

    return "interpret" if interpreted() else "reference"



def _progress(total: int, desc: str):
    """A tqdm bar, or a stand-in with the same methods when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        class _Bar:
            def __init__(self, total: int, desc: str) -> None:
                self.n, self.total, self.desc = 0, total, desc

            def update(self, n: int = 1) -> None:
                self.n += n
                print(f"{self.desc}: {self.n}/{self.total}", flush=True)

            def set_postfix_str(self, text: str) -> None:
                pass

            def write(self, text: str) -> None:
                print(text, flush=True)

            def close(self) -> None:
                pass

        return _Bar(total, desc)
    return tqdm(total=total, desc=desc, unit="config", leave=True, dynamic_ncols=True)


def build_modules(d_model: int, heads: int, dtype: torch.dtype, device: str,
                  seed: int = 0) -> dict[str, nn.Module]:
    """The three providers with identical weights (``TritonMultiHeadAttention``'s init, loaded into the others)."""
    torch.manual_seed(seed)
    triton_mha = TritonMultiHeadAttention(d_model, heads, batch_first=True, device=device, dtype=dtype)
    standard = StandardMultiHeadAttention(d_model, heads, device=device, dtype=dtype)
    standard.load_state_dict(triton_mha.state_dict())
    torch_mha = nn.MultiheadAttention(d_model, heads, batch_first=True, device=device, dtype=dtype)
    torch_mha.load_state_dict(triton_mha.state_dict())
    return {"standard": standard, "torch_mha": torch_mha, "triton": triton_mha}


def _call(name: str, module: nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """One self-attention call of a provider, output ``(B, S, d_model)``."""
    if name == "torch_mha":
        mask = None
        if causal:  # torch's is_causal is only a hint: it needs the mask itself
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return module(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]
    return module(x, x, x, is_causal=causal)[0]


# --------------------------------------------------------------------------- correctness


def check_providers(modules: dict[str, nn.Module], x: torch.Tensor, causal: bool, backward: bool,
                    where: str) -> dict[str, dict[str, float]]:
    """Max |error| of each provider vs a float64 copy of the standard module (output, and dx with
    ``backward``); raises ``CorrectnessError`` when one breaks the pass rule."""
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    oracle_module = StandardMultiHeadAttention(modules["standard"].d_model, modules["standard"].num_heads,
                                               device=x.device, dtype=torch.float64)
    oracle_module.load_state_dict(modules["standard"].state_dict())
    x64 = x.detach().double().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        oracle = _call("standard", oracle_module, x64, causal)
        oracle_dx = torch.autograd.grad(oracle, x64, dout.double())[0] if backward else None

    results: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in modules.items():
        xi = x.detach().clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = _call(name, module, xi, causal)
            results[name] = {"out": out.detach()}
            if backward:
                results[name]["dx"] = torch.autograd.grad(out, xi, dout)[0]
    references = {"out": oracle.detach(), "dx": oracle_dx}
    errors: dict[str, dict[str, float]] = {}
    for name, tensors in results.items():
        errors[name] = {}
        for what, value in tensors.items():
            ref = references[what]
            if value.shape != ref.shape or not bool(torch.isfinite(value).all()):
                raise CorrectnessError(f"{where}: {name} {what} is wrong: shape {tuple(value.shape)} (expected "
                                       f"{tuple(ref.shape)}), finite={bool(torch.isfinite(value).all())}")
            errors[name][what] = float((value.double() - ref).abs().max())
    for name, errs in errors.items():
        for what, err in errs.items():
            scale = max(float(references[what].abs().max()), 1.0)
            bound = 2 * errors["standard"][what] + FLOOR.get(x.dtype, 1e-5) * scale
            if not err <= bound:
                raise CorrectnessError(
                    f"{where}: {name} {what} differs from the float64 reference: max |error| {err:.3e} > bound "
                    f"{bound:.3e} (the standard module's own {_dtype_name(x.dtype)} error is "
                    f"{errors['standard'][what]:.3e})")
    return errors


# --------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], Any], device: str, x: torch.Tensor, cpu_repeats: int, warmup: bool = True) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` on CUDA; on CPU ``cpu_repeats`` wall-clock calls after
    one warm-up call (``warmup=False`` skips it: interpreted kernels have nothing to warm and cost seconds)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=[x], return_mode="median"))
    if warmup:
        fn()
    samples = []
    for _ in range(max(1, cpu_repeats)):
        x.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def check_input(x: torch.Tensor, heads: int, mem_limit: float) -> torch.Tensor:
    """The input the correctness check runs on: ``x`` itself, or where the float64 oracle's ``S x S``
    matrices would take more than min(mem_limit / 4, 4 GB), its first sequence cut to a length that fits."""
    budget = min(mem_limit / 4, 4e9)
    if heads * x.shape[1] ** 2 * 8 * 6 * x.shape[0] <= budget:
        return x
    length = x.shape[1]
    while length > 16 and heads * length * length * 8 * 6 > budget:
        length //= 2
    return x[:1, :length]


def standard_bytes(batch: int, heads: int, seqlen: int, d_model: int, dtype: torch.dtype, backward: bool) -> float:
    """Rough working set of the standard module: scores + probabilities (+ their gradients) + activations."""
    matrices = batch * heads * seqlen * seqlen * dtype.itemsize * (4 if backward else 2)
    return matrices + 12 * batch * seqlen * d_model * dtype.itemsize


# --------------------------------------------------------------------------- the suite


def run_benchmark_suite(
    seq_lens: Sequence[int] = (128, 256, 512, 1024, 2048, 4096),
    d_models: Sequence[int] = (256, 512, 1024),
    num_heads: Sequence[int] = (4, 8, 16),
    batch_size: int = 4,
    dtype: torch.dtype | str = "fp16",
    device: str | None = None,
    causal: bool = False,
    backward: bool = True,
    out_dir: str | Path = "example_out",
    *,
    cpu_repeats: int = 3,
    providers: Sequence[str] = PROVIDERS,
    plots: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Check, then time, standard attention vs ``torch.nn.MultiheadAttention`` vs ``TritonMultiHeadAttention``.

    For every ``(d_model, heads)`` with ``d_model % heads == 0`` and every sequence length: build the
    three modules with one set of weights, check each against a float64 copy of the standard module
    (``CorrectnessError`` if one is wrong), then time the forward (and forward + backward with
    ``backward``). Configurations whose standard attention would not fit in memory are skipped for
    that provider; a provider that raises (e.g. out of memory) records ``null`` and the error.

    Returns ``{"meta", "records", "json", "pngs"}``; writes ``out_dir/example_usage.json`` and the
    PNG figures. ``"standard"`` must be among ``providers`` (it is the yardstick for speed-ups).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or "standard" not in providers:
        raise ValueError(f"providers must include 'standard' and be among {PROVIDERS}; got {list(providers)}")
    out_dir = Path(out_dir)
    backend = kernel_backend(device)
    meta = collect_meta(device)
    meta.update(backend=backend, dtype=_dtype_name(torch_dtype), batch_size=batch_size, causal=causal,
                backward=backward, method=METHOD, providers=list(providers),
                note={"interpret": "CPU, Triton interpreter: times show interpretation, not the kernels",
                      "reference": "CPU without TRITON_INTERPRET=1: the triton provider ran the eager reference "
                                   "backend, not the kernels"}.get(backend))
    modes = ("fwd", "fwdbwd") if backward else ("fwd",)
    configs = [(d, h, s) for d in d_models for h in num_heads if d % h == 0 for s in seq_lens]
    skipped = [(d, h) for d in d_models for h in num_heads if d % h]
    if verbose:
        print(f"== {meta_title(meta)}\n   triton provider backend: {backend}"
              + (f" ({meta['note']})" if meta["note"] else "")
              + (f"; skipped (d_model % heads != 0): {skipped}" if skipped else ""), flush=True)
    mem_limit = memory_limit_bytes(device)
    records: list[Record] = []
    json_path = out_dir / "example_usage.json"
    bar = _progress(len(configs), "example_usage") if verbose else None
    with auto_backend(backend):
        for d_model, heads, seqlen in configs:
            if bar is not None:
                bar.set_postfix_str(f"d_model={d_model} H={heads} S={seqlen}")
            records += _run_config(d_model, heads, seqlen, batch_size, torch_dtype, device, causal, backward,
                                   providers, modes, mem_limit, cpu_repeats, backend)
            write_json(json_path, meta, records)  # a partial run still leaves valid JSON
            free_memory()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    pngs = make_figures(meta, records, out_dir) if plots else []
    if verbose:
        print(table(records, meta))
        print(f"wrote {json_path}" + "".join(f", {p}" for p in pngs))
    return {"meta": meta, "records": records, "json": json_path, "pngs": pngs}


def _run_config(d_model: int, heads: int, seqlen: int, batch: int, dtype: torch.dtype, device: str, causal: bool,
                backward: bool, providers: Sequence[str], modes: Sequence[str], mem_limit: float,
                cpu_repeats: int, backend: str) -> list[Record]:
    """Check then time one (d_model, heads, S); one record per (provider, mode)."""
    where = f"d_model={d_model} heads={heads} S={seqlen} B={batch} {_dtype_name(dtype)}"
    base = dict(d_model=d_model, heads=heads, head_dim=d_model // heads, S=seqlen, B=batch,
                dtype=_dtype_name(dtype), causal=causal, backend=backend)
    modules = {name: m for name, m in build_modules(d_model, heads, dtype, device).items() if name in providers}
    too_big = standard_bytes(batch, heads, seqlen, d_model, dtype, backward) > mem_limit
    skip = {"standard"} if too_big else set()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seqlen, d_model, generator=g).to(device, dtype)
    x_check = check_input(x, heads, mem_limit)
    if x_check.shape != x.shape:
        where += f" (checked on B=1 S={x_check.shape[1]})"
    errors = check_providers(modules, x_check, causal, backward, where)  # raises CorrectnessError
    base["checked_shape"] = list(x_check.shape)
    records = []
    for mode in modes:
        times: dict[str, float | None] = {}
        for name, module in modules.items():
            rec = dict(base, provider=name, mode=mode, ms=None, check=errors.get(name))
            if name in skip:
                rec["error"] = "skipped: the S x S matrices would not fit in memory"
            else:
                try:
                    rec["ms"] = _time_provider(name, module, x, causal, mode, device, cpu_repeats, backend)
                except Exception as exc:  # e.g. out of memory: record it, time the others
                    rec["error"] = short_error(exc)
            times[name] = rec["ms"]
            records.append(rec)
        for rec in records[-len(modules):]:
            std = times.get("standard")
            rec["speedup_vs_standard"] = std / rec["ms"] if std and rec["ms"] else None
    return records


def _time_provider(name: str, module: nn.Module, x: torch.Tensor, causal: bool, mode: str, device: str,
                   cpu_repeats: int, backend: str) -> float:
    warmup = not (name == "triton" and backend == "interpret")
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return _call(name, module, x, causal)
        return time_ms(fn, device, x, cpu_repeats, warmup)
    xg = x.detach().clone().requires_grad_()
    dout = torch.randn_like(x)

    def step():
        _call(name, module, xg, causal).backward(dout)

    try:
        return time_ms(step, device, xg, cpu_repeats, warmup)
    finally:
        module.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- output


def table(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """A markdown table: ms per provider, speed-ups vs standard, the triton provider's max error."""
    rows = [f"\n{meta_title(meta)}; {meta['dtype']}, B={meta['batch_size']}, causal={meta['causal']}, "
            f"triton provider backend: {meta['backend']}",
            "| d_model | heads | S | mode | standard ms | torch_mha ms | triton ms | torch_mha speed-up | "
            "triton speed-up | triton max err (out) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["d_model"], r["heads"], r["S"], r["mode"]) for r in records))
    for key in keys:
        by = {r["provider"]: r for r in records if (r["d_model"], r["heads"], r["S"], r["mode"]) == key}
        ms = [fmt(by.get(p, {}).get("ms"), ".3f") for p in PROVIDERS]
        speed = [fmt(by.get(p, {}).get("speedup_vs_standard"), ".2f") + "x" for p in ("torch_mha", "triton")]
        err = (by.get("triton", {}).get("check") or {}).get("out")
        rows.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(ms + speed)
                    + f" | {fmt(err, '.1e')} |")
    return "\n".join(rows)


def make_figures(meta: dict[str, Any], records: Sequence[Record], out_dir: Path) -> list[Path]:
    """Time vs S and speed-up vs S, one panel per (d_model, heads, mode)."""
    groups = list(dict.fromkeys((r["d_model"], r["heads"], r["mode"]) for r in records))
    key = lambda r: (r["d_model"], r["heads"], r["mode"])
    panels = [(f"d_model={d} H={h} {mode}", [r for r in records if key(r) == (d, h, mode)]) for d, h, mode in groups]
    if not panels:
        return []
    ncols = min(len(panels), 4)
    title = (f"standard vs TritonMultiHeadAttention ({meta['backend']} backend), {meta['dtype']}, "
             f"B={meta['batch_size']}{', causal' if meta['causal'] else ''}\n{meta_title(meta)}")
    title = "\n".join(textwrap.fill(line, width=52 * ncols) for line in title.splitlines())
    written = []
    path = plot_lines(panels, x="S", y="ms", ylabel="ms (median, lower is better)", title=title,
                      path=out_dir / "example_usage_time.png", ncols=ncols)
    written += [path] if path else []
    speed_panels = [(t, [r for r in rows if r["provider"] != "standard"]) for t, rows in panels]
    path = plot_lines(speed_panels, x="S", y="speedup_vs_standard", ylabel="speed-up vs standard (x)",
                      title=title, path=out_dir / "example_usage_speedup.png", ncols=ncols)
    written += [path] if path else []
    return written


# --------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (CPU: S 64,128, d_model 64, 2 heads, fp32; GPU: S 512..2048)")
    parser.add_argument("--out", type=Path, default=Path("example_out"), help="output folder (JSON, PNGs)")
    parser.add_argument("--seq-lens", type=_ints, help="comma list of sequence lengths")
    parser.add_argument("--d-models", type=_ints, help="comma list of model dims")
    parser.add_argument("--heads", type=_ints, help="comma list of head counts")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on GPU, fp32 on CPU")
    parser.add_argument("--device", choices=("cuda", "cpu"))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--cpu-repeats", type=int, help="timed calls per measurement on CPU (default 3; --quick 1)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: run the Triton kernels through the interpreter (sets TRITON_INTERPRET=1)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        quick = dict(seq_lens=[64, 128], d_models=[64], num_heads=[2], batch_size=2, dtype="fp32", cpu_repeats=1)
        full = dict(seq_lens=[64, 128, 256], d_models=[64, 128], num_heads=[2, 4], batch_size=2, dtype="fp32",
                    cpu_repeats=3)
    else:
        quick = dict(seq_lens=[512, 1024, 2048], d_models=[512], num_heads=[8], batch_size=4, dtype="fp16",
                     cpu_repeats=3)
        full = dict(seq_lens=[128, 256, 512, 1024, 2048, 4096, 8192], d_models=[256, 512, 1024],
                    num_heads=[4, 8, 16], batch_size=4, dtype="fp16", cpu_repeats=3)
    chosen = dict(quick if args.quick else full)
    given = dict(seq_lens=args.seq_lens, d_models=args.d_models, num_heads=args.heads, batch_size=args.batch_size,
                 dtype=args.dtype, cpu_repeats=args.cpu_repeats)
    chosen.update({k: v for k, v in given.items() if v is not None})
    if device == "cpu" and kernel_backend("cpu") == "reference":
        print("note: TRITON_INTERPRET=1 was not set before import, so on CPU the triton provider runs the eager "
              "reference backend (pass --interpret, or set TRITON_INTERPRET=1, to time the interpreted kernels)")
    start = time.perf_counter()
    run_benchmark_suite(device=device, causal=args.causal, backward=not args.no_backward, out_dir=args.out,
                        plots=not args.no_plots, **chosen)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
