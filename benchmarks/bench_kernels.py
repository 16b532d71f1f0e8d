"""Kernel benchmark: hf_triton_attn's Triton kernels beside PyTorch SDPA (and FlexAttention).

Usage::

    python benchmarks/bench_kernels.py --out DIR [--quick] [--dtypes fp16,bf16] [--flex]
    python benchmarks/bench_kernels.py --out DIR --quick --cpu     # no GPU: Triton interpreter
    python benchmarks/bench_kernels.py --out DIR --replot          # figures + summary from DIR/kernels.json

Three sections, every provider measured side by side in this one process:

* ``kernels``: dense attention, D in {64, 128}, causal or not, fwd or fwd+bwd, B*S = 16384 tokens,
  H*D = 2048; q/k/v laid out as Hugging Face makes them ((B, S, H, D) contiguous, transposed).
* ``padded``: a BERT-like right-padded batch; ours skips padding through ``attention_mask`` and
  ``query_mask``, SDPA gets a boolean (B, 1, 1, S) mask (flash: no mask, dense work).
* ``decode``: one query token against a KV cache, GQA 32:8 and MHA 32:32.
* ``dropout``: fwd+bwd at B=16, H=32, S=1024, D=64, dropout 0 and 0.1 (ours and SDPA with the same p).

``--sections padded,decode`` runs a subset.

Times are medians of ``triton.testing.do_bench``. Before timing a config, ours is checked against
SDPA (flash, else math) in the same dtype; the max abs errors go in the JSON. A provider that
raises records ``null`` and its error; the suite goes on. Writes ``DIR/kernels.json`` (meta +
records) and PNG figures, and prints a compact summary.
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # the interpreter must be on before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DTYPES,
    attention_flops,
    bench_ms,
    collect_meta,
    fmt,
    free_memory,
    gbps,
    hf_layout,
    max_abs_err,
    memory_limit_bytes,
    meta_title,
    pack_padded,
    padded_lengths,
    plot_lines,
    read_json,
    short_error,
    tflops,
    write_json,
)

Record = dict[str, Any]
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
# Loose sanity bounds (max abs error / max(1, reference magnitude)) for the "ok" flag; the test
# suite, not this benchmark, owns the real accuracy criteria.
CHECK_TOL: dict[str, float] = {"fp16": 2e-2, "bf16": 8e-2, "fp32": 1e-2}
METHOD = (
    "median of triton.testing.do_bench(warmup=25, rep=100); fwdbwd = forward + out.backward(dout), input "
    "grads reset to None between reps (no accumulation kernel timed); TFLOP = 4*B*H*Sq*Sk*D, x0.5 causal, "
    "x3.5 fwdbwd; q/k/v = (B, S, H, D) contiguous .transpose(1, 2), decode K/V (B, Hkv, cache, D) contiguous"
)
MODES = ("fwd", "fwdbwd")
PADDED_SHAPE = {"B": 32, "H": 12, "S": 512, "D": 64}
PADDED_FILLS = (0.25, 0.6, 1.0)
DECODE_CACHES = ((1, 8192), (1, 131072), (16, 8192), (64, 2048), (8, 32768))
DECODE_HEADS = ((32, 8), (32, 32))
DROPOUT_SHAPE = {"B": 16, "H": 32, "S": 1024, "D": 64}
DROPOUT_PS = (0.0, 0.1)
SECTIONS = ("kernels", "padded", "decode", "dropout")


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class GridCase:
    """One dense-attention config of the kernels grid."""

    dtype: str
    d: int
    causal: bool
    mode: str
    s: int
    b: int
    h: int

    @property
    def flops(self) -> float:
        """FLOPs of this config (see :func:`attention_flops`)."""
        return attention_flops(self.b, self.h, self.s, self.s, self.d, self.causal, self.mode)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything one run measures."""

    grid: list[GridCase]
    padded_shape: dict[str, int]
    padded_fills: tuple[float, ...]
    padded_dtype: str
    decode: list[tuple[int, int, int, int]]  # (Hq, Hkv, B, cache)
    decode_d: int
    decode_dtype: str


def make_plan(args: argparse.Namespace) -> Plan:
    """Sizes for a full GPU run, ``--quick``, or the tiny ``--cpu`` pipeline check."""
    if args.cpu:
        dtypes = args.dtypes or ["fp16"]
        grid = grid_cases(dtypes, (64,), (64, 128), lambda s, d: (1, 2))
        return Plan(
            grid,
            {"B": 2, "H": 2, "S": 64, "D": 64},
            PADDED_FILLS,
            dtypes[0],
            [(4, 2, 1, 256), (2, 2, 2, 128)],
            64,
            dtypes[0],
        )
    dtypes = args.dtypes or (["fp16"] if args.quick else ["fp16", "bf16"])
    seqlens = (1024, 4096) if args.quick else (512, 1024, 2048, 4096, 8192, 16384)
    grid = grid_cases(dtypes, (64, 128), seqlens, lambda s, d: (16384 // s, 2048 // d))
    caches = DECODE_CACHES  # cheap (bandwidth-bound, ~1 ms each): the full list even with --quick
    decode = [(hq, hkv, b, n) for hq, hkv in DECODE_HEADS for b, n in caches]
    return Plan(grid, PADDED_SHAPE, PADDED_FILLS, "bf16", decode, 128, "bf16")


def grid_cases(
    dtypes: Sequence[str],
    head_dims: Sequence[int],
    seqlens: Sequence[int],
    batch_heads: Callable[[int, int], tuple[int, int]],
) -> list[GridCase]:
    """The dense grid; dtypes other than fp16 get only S in {1024, 4096, 16384} (and tiny S)."""
    cases = []
    for dtype in dtypes:
        dtype_seqlens = [s for s in seqlens if dtype == "fp16" or s in (1024, 4096, 16384) or s < 512]
        for d in head_dims:
            for causal in (False, True):
                for mode in MODES:
                    for s in dtype_seqlens:
                        b, h = batch_heads(s, d)
                        cases.append(GridCase(dtype, d, causal, mode, s, b, h))
    return cases


# --------------------------------------------------------------------------- providers


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A provider bound to its inputs: ``forward()`` runs one attention call."""

    name: str
    forward: Callable[[], torch.Tensor] | None
    sdpa_backend: SDPBackend | None = None
    error: str | None = None
    note: str | None = None
    inputs: tuple[torch.Tensor, ...] | None = None  # its own inputs (ours_varlen), else the config's

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """The SDPA backend restriction this provider runs under (none for ours and flex)."""
        return sdpa_kernel(self.sdpa_backend) if self.sdpa_backend is not None else contextlib.nullcontext()


@dataclasses.dataclass
class Bench:
    """Run-wide state: device, our backend, limits, and the records written so far."""

    device: str
    ours_backend: str
    flex: bool
    out: Path
    meta: dict[str, Any]
    records: list[Record] = dataclasses.field(default_factory=list)
    mem_limit: float = 60e9

    def save(self) -> None:
        """Rewrite DIR/kernels.json with everything measured so far."""
        write_json(self.out / "kernels.json", self.meta, self.records)


def build(name: str, factory: Callable[[], Candidate]) -> Candidate:
    """Call ``factory``; a failure becomes a candidate that records the error instead of running."""
    try:
        return factory()
    except Exception as exc:  # any provider failure is data, not a crash
        return Candidate(name, None, error=short_error(exc))


@functools.cache
def ours_function() -> Callable[..., torch.Tensor]:
    """``hf_triton_attn.flash_attention`` (imported lazily so SDPA still runs if it is missing)."""
    from hf_triton_attn import flash_attention

    return flash_attention


def ours(bench: Bench, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Candidate:
    """Our kernel through the public API, with the backend forced (triton on GPU, interpret on CPU)."""
    fn = ours_function()
    return Candidate("ours", functools.partial(fn, q, k, v, backend=bench.ours_backend, **kwargs))


def sdpa(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Candidate:
    """``F.scaled_dot_product_attention`` restricted to one backend."""
    return Candidate(
        name, functools.partial(F.scaled_dot_product_attention, q, k, v, **kwargs), SDPA_BACKENDS[name]
    )


@functools.cache
def compiled_flex() -> Callable[..., torch.Tensor]:
    """``torch.compile``d flex_attention, static shapes, with room for one compile per config."""
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 256)
    return torch.compile(flex_attention, dynamic=False)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Candidate:
    """FlexAttention; causal through a block mask built once, outside timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, sq, sk, device=q.device)
    return Candidate("flex", functools.partial(compiled_flex(), q, k, v, block_mask=block_mask))


def sdpa_names(bench: Bench) -> list[str]:
    """SDPA providers timed on this device (math only on CPU, where it is the only one)."""
    if bench.device == "cpu":
        return ["sdpa_math"]
    return ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]


def reference_names(bench: Bench, masked: bool = False) -> list[str]:
    """SDPA backends the check tries, in order, as the same-dtype reference (math alone on CPU)."""
    if bench.device == "cpu":
        return ["sdpa_math"]
    return ["sdpa_efficient", "sdpa_math"] if masked else ["sdpa_flash", "sdpa_math"]


# --------------------------------------------------------------------------- check and timing


def run_with_grads(
    cand: Candidate, inputs: Sequence[torch.Tensor], dout: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Output of one call and, when ``dout`` is given, the gradients of ``inputs``."""
    if cand.forward is None:
        raise RuntimeError(cand.error)
    with cand.context():
        out = cand.forward()
        if dout is None:
            return out.detach(), ()
        grads = torch.autograd.grad(out, list(inputs), dout)
    return out.detach(), tuple(grads)


def check(
    candidate: Candidate,
    references: Sequence[Candidate],
    inputs: Sequence[torch.Tensor],
    dout: torch.Tensor | None,
    dtype: str,
    row_mask: torch.Tensor | None = None,
) -> Record:
    """Max abs error of ``candidate`` vs the first reference that runs: output and dq, dk, dv.

    ``row_mask`` (broadcastable to the output) zeroes rows excluded from the comparison.
    """
    try:
        out, grads = run_with_grads(candidate, inputs, dout)
    except Exception as exc:
        return {"error": short_error(exc), "ok": False}
    errors = []
    for ref in references:
        try:
            ref_out, ref_grads = run_with_grads(ref, inputs, dout)
            break
        except Exception as exc:
            errors.append(f"{ref.name}: {short_error(exc, 120)}")
    else:
        return {"error": "no reference ran: " + "; ".join(errors), "ok": None}
    if row_mask is not None:
        out, ref_out = out * row_mask, ref_out * row_mask
    result: Record = {"ref": ref.name}
    pairs = [("out", out, ref_out)] + list(zip(("dq", "dk", "dv"), grads, ref_grads))
    for key, mine, theirs in pairs:
        result[key] = max_abs_err(mine, theirs)
        result[key + "_scale"] = theirs.float().abs().max().item()
    result["ok"] = all(
        math.isfinite(result[key]) and result[key] <= CHECK_TOL[dtype] * max(1.0, result[key + "_scale"])
        for key, _, _ in pairs
    )
    return result


def time_candidate(
    bench: Bench, cand: Candidate, mode: str, inputs: Sequence[torch.Tensor], dout: torch.Tensor | None
) -> tuple[float | None, str | None]:
    """(median ms, None) or (None, error). fwd+bwd is forward then ``out.backward(dout)``."""
    if cand.forward is None:
        return None, cand.error
    forward = cand.forward
    if cand.inputs is not None:
        inputs = cand.inputs
        if dout is not None:
            dout = torch.randn(inputs[0].shape[:-1] + (inputs[2].shape[-1],), dtype=dout.dtype, device=dout.device)
    fn = forward if mode == "fwd" else (lambda: forward().backward(dout))
    try:
        with cand.context():
            return bench_ms(fn, bench.device, grad_to_none=list(inputs) if mode == "fwdbwd" else None), None
    except Exception as exc:
        return None, short_error(exc)
    finally:
        for t in inputs:
            t.grad = None


def measure_all(
    bench: Bench,
    base: Record,
    candidates: Sequence[Candidate],
    checked: Record,
    mode: str,
    inputs: Sequence[torch.Tensor],
    dout: torch.Tensor | None,
) -> list[Record]:
    """One record per candidate; ours carries the correctness check. Ours is not timed if it failed."""
    records = []
    for cand in candidates:
        if (
            cand.name == "ours"
            and cand.forward is not None
            and checked.get("ok") is False
            and "ref" not in checked
        ):
            ms, error = None, "check raised: " + str(checked["error"])
        else:
            ms, error = time_candidate(bench, cand, mode, inputs, dout)
        record = dict(base, provider=cand.name, ms=ms, error=error)
        if cand.note:
            record["note"] = cand.note
        if cand.name == "ours":
            record["check"] = checked
        records.append(record)
    return records


def skipped(base: Record, names: Sequence[str], need: float) -> list[Record]:
    """Records for a config left out because it would need more than the memory limit."""
    reason = f"skipped: needs ~{need / 1e9:.0f} GB"
    return [dict(base, provider=name, ms=None, error=reason) for name in names]


# --------------------------------------------------------------------------- section: kernels grid


def run_grid_case(bench: Bench, case: GridCase) -> list[Record]:
    """Check then time every provider on one dense config."""
    base: Record = {
        "bench": "kernels",
        "dtype": case.dtype,
        "D": case.d,
        "causal": case.causal,
        "mode": case.mode,
        "S": case.s,
        "B": case.b,
        "H": case.h,
        "flops": case.flops,
    }
    names = ["ours", *sdpa_names(bench)] + (["flex"] if bench.flex else [])
    need = 16 * case.b * case.h * case.s * case.d * DTYPES[case.dtype].itemsize
    if need > bench.mem_limit:
        return skipped(base, names, need)
    grad = case.mode == "fwdbwd"
    q, k, v = (
        hf_layout(case.b, case.s, case.h, case.d, DTYPES[case.dtype], bench.device, grad) for _ in range(3)
    )
    kw = {"is_causal": case.causal}
    candidates = [build("ours", lambda: ours(bench, q, k, v, causal=case.causal))]
    candidates += [build(name, functools.partial(sdpa, name, q, k, v, **kw)) for name in sdpa_names(bench)]
    if bench.flex:
        candidates.append(build("flex", lambda: flex(q, k, v, case.causal)))
    dout = torch.randn_like(q) if grad else None
    references = [sdpa(name, q, k, v, **kw) for name in reference_names(bench)]
    checked = check(candidates[0], references, (q, k, v), dout, case.dtype)
    records = measure_all(bench, base, candidates, checked, case.mode, (q, k, v), dout)
    for record in records:
        record["tflops"] = tflops(case.flops, record["ms"])
    return records


# --------------------------------------------------------------------------- section: padded batch


def run_padded_case(bench: Bench, shape: dict[str, int], dtype: str, fill: float, mode: str) -> list[Record]:
    """Ours with attention_mask + query_mask vs SDPA with a boolean key mask (flash: dense)."""
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    lengths = padded_lengths(b, s, fill, torch.Generator().manual_seed(int(fill * 1000)))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).to(bench.device)
    base: Record = {
        "bench": "padded",
        "dtype": dtype,
        "B": b,
        "H": h,
        "S": s,
        "D": d,
        "mode": mode,
        "fill_target": fill,
        "fill": lengths.sum().item() / (b * s),
        "work": (lengths.double() ** 2).sum().item() / (b * s * s),
    }
    grad = mode == "fwdbwd"
    q, k, v = (hf_layout(b, s, h, d, DTYPES[dtype], bench.device, grad) for _ in range(3))
    key_mask = mask[:, None, None, :]
    candidates = [build("ours", lambda: ours(bench, q, k, v, attention_mask=mask, query_mask=mask))]
    candidates.append(build("ours_varlen", lambda: ours_varlen(bench, q, k, v, lengths)))
    for name in sdpa_names(bench):
        kwargs = {} if name == "sdpa_flash" else {"attn_mask": key_mask}
        cand = build(name, functools.partial(sdpa, name, q, k, v, **kwargs))
        candidates.append(cand if kwargs else dataclasses.replace(cand, note="dense, no mask"))
    row_mask = mask[:, None, :, None].to(DTYPES[dtype])
    dout = torch.randn_like(q) * row_mask if grad else None  # pad rows carry no gradient
    references = [sdpa(name, q, k, v, attn_mask=key_mask) for name in reference_names(bench, masked=True)]
    checked = check(candidates[0], references, (q, k, v), dout, dtype, row_mask=row_mask)
    return measure_all(bench, base, candidates, checked, mode, (q, k, v), dout)


def ours_varlen(bench: Bench, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> Candidate:
    """Ours on the same batch packed (padding-free, cu_seqlens); the packing is outside timing."""
    s = q.shape[2]
    qp, kp, vp, cu, max_len = pack_padded(q, k, v, torch.arange(s)[None, :] < lengths[:, None])
    fn = ours_function()
    call = functools.partial(fn, qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                             max_seqlen_k=max_len, backend=bench.ours_backend)
    return Candidate("ours_varlen", call, note="packed tokens (T, H, D); inputs differ, not checked",
                     inputs=(qp, kp, vp))


# --------------------------------------------------------------------------- section: decode


def sdpa_gqa(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    repeated: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> Candidate:
    """SDPA on grouped k/v: ``enable_gqa=True`` if this backend takes it, else k/v repeated beforehand."""
    if q.shape[1] == k.shape[1]:
        return sdpa(name, q, k, v)
    native = sdpa(name, q, k, v, enable_gqa=True)
    try:
        with warnings.catch_warnings():  # SDPA explains at length why a backend declines
            warnings.simplefilter("ignore")
            run_with_grads(native, (), None)
        return dataclasses.replace(native, note="enable_gqa")
    except Exception:  # this backend (or torch) has no native GQA
        k_rep, v_rep = repeated()
        return dataclasses.replace(sdpa(name, q, k_rep, v_rep), note="repeat_interleave outside timing")


def run_decode_case(bench: Bench, hq: int, hkv: int, b: int, cache: int, d: int, dtype: str) -> list[Record]:
    """One new query token against a (B, Hkv, cache, D) contiguous KV cache."""
    torch_dtype = DTYPES[dtype]
    kv_bytes = 2 * b * hkv * cache * d * torch_dtype.itemsize
    base: Record = {
        "bench": "decode",
        "dtype": dtype,
        "Hq": hq,
        "Hkv": hkv,
        "B": b,
        "cache": cache,
        "D": d,
        "mode": "fwd",
        "kv_bytes": kv_bytes,
    }
    names = ["ours", *sdpa_names(bench)]
    need = kv_bytes * (1 + hq // hkv) + 16 * b * hq * cache
    if need > bench.mem_limit:
        return skipped(base, names, need)
    q = hf_layout(b, 1, hq, d, torch_dtype, bench.device)
    k, v = (torch.randn(b, hkv, cache, d, dtype=torch_dtype, device=bench.device) for _ in range(2))
    repeated = functools.cache(lambda: (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)))
    candidates = [build("ours", lambda: ours(bench, q, k, v))]
    candidates += [build(name, functools.partial(sdpa_gqa, name, q, k, v, repeated)) for name in names[1:]]
    references = [sdpa_gqa(name, q, k, v, repeated) for name in reference_names(bench)]
    checked = check(candidates[0], references, (q, k, v), None, dtype)
    records = measure_all(bench, base, candidates, checked, "fwd", (q, k, v), None)
    for cand, record in zip(candidates, records):
        record["gbps"] = gbps(kv_bytes, record["ms"])
        if record["ms"] is not None and bench.device == "cuda":
            record["graph_ms"], graph_error = graph_replay_ms(bench, cand)
            if graph_error is not None:
                record["graph_error"] = graph_error
    return records


def graph_replay_ms(bench: Bench, cand: Candidate) -> tuple[float | None, str | None]:
    """(median ms, None) of ``do_bench`` over a CUDA-graph replay of the candidate's call: its GPU time
    after do_bench's L2 flush, without the host time that an eager call's ``do_bench`` also times when
    the host issues the call more slowly than the flush runs (a decode call is 0.02-0.5 ms of GPU work
    against 15-80 us of host time; session 22, results/2026-11-28_h200_session22_run1_decode_timing.log).
    (None, error) if the call cannot be captured: the record keeps the error, the table shows "-"."""
    from benchmarks.decode_timing import graph_of

    try:
        with cand.context():
            graph = graph_of(cand.forward)
        return bench_ms(graph.replay, bench.device), None
    except Exception as exc:
        return None, short_error(exc)


# --------------------------------------------------------------------------- section: dropout


def run_dropout_case(bench: Bench, shape: dict[str, int], dtype: str, p: float) -> list[Record]:
    """fwd+bwd with attention dropout ``p`` for ours and each SDPA backend (checked at p = 0 only:
    with p > 0 the masks are random and differ between implementations)."""
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    base: Record = {"bench": "dropout", "dtype": dtype, "B": b, "H": h, "S": s, "D": d, "mode": "fwdbwd",
                    "dropout_p": p}
    q, k, v = (hf_layout(b, s, h, d, DTYPES[dtype], bench.device, True) for _ in range(3))
    candidates = [build("ours", lambda: ours(bench, q, k, v, dropout_p=p))]
    candidates += [build(name, functools.partial(sdpa, name, q, k, v, dropout_p=p)) for name in sdpa_names(bench)]
    dout = torch.randn_like(q)
    if p == 0:
        references = [sdpa(name, q, k, v) for name in reference_names(bench)]
        checked = check(candidates[0], references, (q, k, v), dout, dtype)
    else:
        checked = {"ok": None, "note": "random masks: not comparable"}
    return measure_all(bench, base, candidates, checked, "fwdbwd", (q, k, v), dout)


def dropout_summary(records: Sequence[Record]) -> list[str]:
    """Dropout: fwd+bwd ms at each p per provider, and the relative cost of p > 0."""
    rows = [r for r in records if r["bench"] == "dropout"]
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"== dropout fwd+bwd B{r0['B']} H{r0['H']} S{r0['S']} D{r0['D']} {r0['dtype']}: ms at p = "
             + " / ".join(str(p) for p in sorted({r["dropout_p"] for r in rows})) + " (overhead) =="]
    for provider in dict.fromkeys(r["provider"] for r in rows):
        times = [r.get("ms") for r in sorted(rows, key=lambda r: r["dropout_p"]) if r["provider"] == provider]
        over = f"{(times[-1] / times[0] - 1) * 100:+.0f}%" if None not in times and times[0] else "-"
        lines.append(f"  {provider:16s} " + " / ".join(fmt(t, ".3f") for t in times) + f"  ({over})")
    return lines


# --------------------------------------------------------------------------- driver


def run_section(bench: Bench, title: str, jobs: Sequence[Callable[[], list[Record]]]) -> None:
    """Run ``jobs``, freeing memory and saving the JSON after each; print one line for the section."""
    start = time.perf_counter()
    for job in jobs:
        bench.records.extend(job())
        free_memory()
        bench.save()
    bench.meta.setdefault("elapsed_s", {})[title] = round(time.perf_counter() - start, 1)
    print(f"[{title}] {len(jobs)} configs in {bench.meta['elapsed_s'][title]:.0f} s", flush=True)


def run_all(bench: Bench, plan: Plan, sections: Sequence[str] = SECTIONS) -> None:
    """The sections, in order."""
    if "kernels" in sections:
        run_section(bench, "kernels", [functools.partial(run_grid_case, bench, case) for case in plan.grid])
    if "padded" in sections:
        padded = functools.partial(run_padded_case, bench, plan.padded_shape, plan.padded_dtype)
        run_section(
            bench,
            "padded",
            [functools.partial(padded, fill, mode) for fill in plan.padded_fills for mode in MODES],
        )
    if "decode" in sections:
        decode = [
            functools.partial(run_decode_case, bench, hq, hkv, b, n, plan.decode_d, plan.decode_dtype)
            for hq, hkv, b, n in plan.decode
        ]
        run_section(bench, "decode", decode)
    if "dropout" in sections:
        shape = plan.padded_shape if bench.device == "cpu" else DROPOUT_SHAPE
        run_section(bench, "dropout", [functools.partial(run_dropout_case, bench, shape, plan.decode_dtype, p)
                                       for p in DROPOUT_PS])


# --------------------------------------------------------------------------- figures and summary


def make_figures(meta: dict[str, Any], records: Sequence[Record], out: Path) -> list[Path]:
    """kernels_<dtype>.png (TFLOP/s vs S, D x mode x causal panels) and padded.png (ms vs fill)."""
    written = []
    kernels = [r for r in records if r["bench"] == "kernels"]
    for dtype in sorted({r["dtype"] for r in kernels}):
        panels = []
        for d in sorted({r["D"] for r in kernels if r["dtype"] == dtype}):
            for mode in MODES:
                for causal in (False, True):
                    rows = [
                        r
                        for r in kernels
                        if (r["dtype"], r["D"], r["mode"], r["causal"]) == (dtype, d, mode, causal)
                    ]
                    panels.append((f"D={d} {mode} {'causal' if causal else 'non-causal'}", rows))
        path = plot_lines(
            panels,
            x="S",
            y="tflops",
            ylabel="TFLOP/s",
            ncols=4,
            path=out / f"kernels_{dtype}.png",
            title=f"hf_triton_attn kernels, {dtype}\n{meta_title(meta)}",
        )
        written += [path] if path else []
    padded = [r for r in records if r["bench"] == "padded"]
    if padded:
        r0 = padded[0]
        panels = [(mode, [r for r in padded if r["mode"] == mode]) for mode in MODES]
        shape = f"B={r0['B']} H={r0['H']} S={r0['S']} D={r0['D']} {r0['dtype']}"
        title = f"padded batch {shape}, ms\n{meta_title(meta)}"
        path = plot_lines(
            panels, x="fill", y="ms", ylabel="ms", ncols=2, logx=False, path=out / "padded.png", title=title
        )
        written += [path] if path else []
    return written


def ratio(a: float | None, b: float | None) -> str:
    """a / b to two decimals, ``-`` when either is missing."""
    return "-" if a is None or not b else f"{a / b:.2f}"


def kernels_summary(records: Sequence[Record], peers: Sequence[str]) -> list[str]:
    """Per (dtype, D, causal, mode): ours TFLOP/s at each S and its ratio to each of ``peers``."""
    index = {
        (r["dtype"], r["D"], r["causal"], r["mode"], r["S"], r["provider"]): r
        for r in records
        if r["bench"] == "kernels"
    }
    groups = sorted(
        {key[:4] for key in index}, key=lambda g: (g[0] != "fp16", g[0], g[1], g[2], g[3] != "fwd")
    )
    ratios = " ".join(f"ours/{p.removeprefix('sdpa_')}" for p in peers)
    lines = [f"== kernels: ours TFLOP/s ({ratios}); ! = check failed, x = ours failed =="]
    for group in groups:
        cells = []
        for s in sorted({key[4] for key in index if key[:4] == group}):
            mine = index.get((*group, s, "ours"), {})
            value = mine.get("tflops")
            flag = "!" if mine.get("check", {}).get("ok") is False else ""
            shown = "x" if value is None else fmt(value, ".0f" if value >= 10 else ".2g")
            ratios = " ".join(ratio(value, index.get((*group, s, p), {}).get("tflops")) for p in peers)
            cells.append(f"{s}:{shown}{flag}({ratios})")
        dtype, d, causal, mode = group
        lines.append(f"{dtype} D{d:<3} {'c ' if causal else 'nc'} {mode:6s}| " + " ".join(cells))
    return lines


def padded_summary(records: Sequence[Record]) -> list[str]:
    """Padded batch: ms of each provider per (fill, mode)."""
    rows = [r for r in records if r["bench"] == "padded"]
    if not rows:
        return []
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    r0 = rows[0]
    lines = [
        f"== padded B{r0['B']} H{r0['H']} S{r0['S']} D{r0['D']} {r0['dtype']}: ms "
        "(SDPA with key mask; flash dense) ==",
        f"{'fill':>5} {'work':>5} {'mode':6s} " + " ".join(f"{p:>14s}" for p in providers),
    ]
    for fill in sorted({r["fill_target"] for r in rows}):
        for mode in MODES:
            cells = {r["provider"]: r for r in rows if r["fill_target"] == fill and r["mode"] == mode}
            if not cells:
                continue
            first = next(iter(cells.values()))
            lines.append(
                f"{first['fill']:5.2f} {first['work']:5.2f} {mode:6s} "
                + " ".join(f"{fmt(cells.get(p, {}).get('ms'), '.3f'):>14s}" for p in providers)
            )
    return lines


def decode_summary(records: Sequence[Record]) -> list[str]:
    """Decode: ms (GB/s of K+V) of each provider per (Hq:Hkv, B, cache); then, where recorded, the
    CUDA-graph replay ms (GPU time without the eager call's host time)."""
    rows = [r for r in records if r["bench"] == "decode"]
    if not rows:
        return []
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    graphs = any(r.get("graph_ms") is not None for r in rows)
    lines = [
        f"== decode D{rows[0]['D']} {rows[0]['dtype']}: ms (GB/s of K+V)"
        + (" | CUDA-graph replay ms" if graphs else "") + " ==",
        f"{'heads':>6} {'B':>3} {'cache':>6} " + " ".join(f"{p:>16s}" for p in providers)
        + (" | " + " ".join(f"{p:>12s}" for p in providers) if graphs else ""),
    ]
    keys = list(dict.fromkeys((r["Hq"], r["Hkv"], r["B"], r["cache"]) for r in rows))
    for hq, hkv, b, cache in keys:
        cells = {
            r["provider"]: r for r in rows if (r["Hq"], r["Hkv"], r["B"], r["cache"]) == (hq, hkv, b, cache)
        }
        text = [
            f"{fmt(c.get('ms'), '.3f')} ({fmt(c.get('gbps'))})" for c in (cells.get(p, {}) for p in providers)
        ]
        line = f"{hq:>3}:{hkv:<2} {b:>3} {cache:>6} " + " ".join(f"{t:>16s}" for t in text)
        if graphs:
            line += " | " + " ".join(f"{fmt(cells.get(p, {}).get('graph_ms'), '.4f'):>12s}" for p in providers)
        lines.append(line)
    return lines


def check_summary(records: Sequence[Record]) -> list[str]:
    """How many checks passed, the worst errors, and the first few failing configs."""
    checks = [(r, r["check"]) for r in records if r.get("provider") == "ours" and "check" in r]
    if not checks:
        return []
    bad = [(r, c) for r, c in checks if c.get("ok") is False]
    worst = {
        key: max((c[key] for _, c in checks if c.get(key) is not None), default=None)
        for key in ("out", "dq", "dk", "dv")
    }
    lines = [
        f"== checks vs SDPA: {len(checks) - len(bad)}/{len(checks)} ok; worst max abs err "
        + " ".join(f"{k}={fmt(v, '.1e')}" for k, v in worst.items())
        + " =="
    ]
    for r, c in bad[:5]:
        where = {
            k: r[k]
            for k in ("bench", "dtype", "D", "causal", "mode", "S", "fill_target", "Hq", "B", "cache")
            if k in r
        }
        detail = c.get("error") or " ".join(f"{k}={fmt(c.get(k), '.1e')}" for k in ("out", "dq", "dk", "dv"))
        lines.append(f"  FAIL {where}: {detail}"[:240])
    return lines


def error_summary(records: Sequence[Record]) -> list[str]:
    """Distinct provider errors (first 8), each with how many configs it hit."""
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        if r.get("error"):
            key = (r["provider"], r["error"][:150])
            counts[key] = counts.get(key, 0) + 1
    lines = [f"  {provider} x{n}: {error}" for (provider, error), n in list(counts.items())[:8]]
    return (["== provider errors (null in JSON) =="] + lines) if lines else []


def summary(meta: dict[str, Any], records: Sequence[Record]) -> str:
    """The compact text printed at the end of a run."""
    header = [
        f"== {meta_title(meta)} =="
        + (" [CPU: Triton interpreter, timings meaningless]" if meta["device"] == "cpu" else "")
    ]
    parts = [
        header,
        kernels_summary(records, ["sdpa_cudnn", "sdpa_flash"] if meta["device"] == "cuda" else ["sdpa_math"]),
        padded_summary(records),
        decode_summary(records),
        dropout_summary(records),
        check_summary(records),
        error_summary(records),
    ]
    return "\n".join(line for part in parts for line in part)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder for kernels.json and PNGs")
    parser.add_argument("--quick", action="store_true", help="small grid (S 1024/4096, fp16) for smoke tests")
    parser.add_argument(
        "--dtypes",
        type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
        help="comma list of fp16,bf16,fp32 (default fp16,bf16; --quick/--cpu: fp16); "
        "dtypes other than fp16 run S in {1024, 4096, 16384} only",
    )
    parser.add_argument("--flex", action="store_true", help="also time torch.compile'd FlexAttention")
    parser.add_argument(
        "--sections",
        type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
        default=list(SECTIONS),
        help=f"comma list of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="no GPU: tiny sizes, ours through the Triton interpreter vs SDPA math",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw figures and reprint the summary from OUT/kernels.json",
    )
    args = parser.parse_args(argv)
    for section in args.sections:
        if section not in SECTIONS:
            parser.error(f"--sections: unknown section {section!r}, expected some of {list(SECTIONS)}")
    for dtype in args.dtypes or ():
        if dtype not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {dtype!r}, expected some of {sorted(DTYPES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or replot) and print the summary; returns the process exit code."""
    args = parse_args(argv)
    if args.replot:
        meta, records = read_json(args.out / "kernels.json")
    else:
        if not args.cpu and not torch.cuda.is_available():
            print(
                "no CUDA device: run with --quick --cpu for the interpreter pipeline check", file=sys.stderr
            )
            return 2
        device = "cpu" if args.cpu else "cuda"
        bench = Bench(
            device,
            "interpret" if args.cpu else "triton",
            args.flex,
            args.out,
            collect_meta(device),
            mem_limit=memory_limit_bytes(device),
        )
        bench.meta["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        bench.meta["method"] = METHOD
        torch.manual_seed(0)
        run_all(bench, make_plan(args), args.sections)
        meta, records = bench.meta, bench.records
        bench.save()
    for path in make_figures(meta, records, args.out):
        print(f"wrote {path}")
    print(summary(meta, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
