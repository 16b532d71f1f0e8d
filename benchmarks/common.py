"""Helpers shared by the benchmarks: metadata, FLOP counts, inputs, timing, JSON and plots.

Everything here is importable without a GPU and without matplotlib; plotting returns ``None``
(after printing a note) when matplotlib is missing.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

# HF_TRITON_ATTN_SOURCE=DIR: the benchmarks import hf_triton_attn from DIR (an older copy of the package,
# timed beside the current one by scripts/gpu_run.sh BASE=DIR). Every benchmark script imports this
# module before hf_triton_attn; the scripts put the repository root first on sys.path, so this comes
# before it.
PACKAGE_SOURCE = os.environ.get("HF_TRITON_ATTN_SOURCE") or None
if PACKAGE_SOURCE:
    sys.path.insert(0, os.path.abspath(PACKAGE_SOURCE))

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Line style per provider, so every figure uses the same colours.
PROVIDER_STYLE: dict[str, dict[str, str]] = {
    "ours": {"color": "tab:red", "marker": "o"},
    "sdpa_cudnn": {"color": "tab:green", "marker": "s"},
    "sdpa_flash": {"color": "tab:blue", "marker": "^"},
    "sdpa_efficient": {"color": "tab:gray", "marker": "v"},
    "sdpa_math": {"color": "tab:purple", "marker": "x"},
    "flex": {"color": "tab:orange", "marker": "D"},
}


# --------------------------------------------------------------------------- metadata


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when it is absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """Commit under test: env ``HF_TRITON_ATTN_COMMIT``, else ``git rev-parse HEAD``, else "unknown".

    A ``-dirty`` suffix marks a working tree with uncommitted changes.
    """
    env = os.environ.get("HF_TRITON_ATTN_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def collect_meta(device: str) -> dict[str, Any]:
    """Metadata block: card, SM count, library versions, commit and UTC date."""
    import triton

    meta: dict[str, Any] = {
        "device": device,
        "gpu": None,
        "sm_count": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": package_version("transformers"),
        "commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "package_source": PACKAGE_SOURCE,  # None: the package of this checkout
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["sm_count"] = props.multi_processor_count
        meta["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    return meta


def meta_title(meta: dict[str, Any]) -> str:
    """One-line description of the run for figure titles and printed headers."""
    card = f"{meta['gpu']} ({meta['sm_count']} SMs)" if meta.get("gpu") else "CPU (Triton interpreter)"
    versions = f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers'] or '-'}"
    commit = str(meta["commit"])[:12]
    if meta.get("package_source"):
        commit += f" (package from {meta['package_source']})"
    return f"{card} | {versions} | commit {commit} | {meta['date_utc']}"


# --------------------------------------------------------------------------- arithmetic


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool, mode: str) -> float:
    """Attention FLOPs as 4*B*H*Sq*Sk*D, halved when causal, x3.5 for forward+backward."""
    flops = 4.0 * b * h * sq * sk * d
    if causal:
        flops *= 0.5
    if mode == "fwdbwd":
        flops *= 3.5
    return flops


def tflops(flops: float, ms: float | None) -> float | None:
    """TFLOP/s achieved by ``flops`` work in ``ms`` milliseconds (None stays None)."""
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float | None) -> float | None:
    """GB/s of moving ``nbytes`` in ``ms`` milliseconds (None stays None)."""
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- tensors and memory


def padded_lengths(batch: int, seqlen: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Random right-padding lengths averaging ``fill * seqlen`` (uniform in fill*S*[0.5, 1.5], int64);
    ``fill >= 1`` gives full rows without drawing from ``gen``."""
    if fill >= 1.0:
        return torch.full((batch,), seqlen, dtype=torch.int64)
    return (fill * seqlen * (0.5 + torch.rand(batch, generator=gen))).round().long().clamp(1, seqlen)


def pack_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The real tokens of a right-padded batch, packed for varlen calls: ``(B, H, S, D)`` views of
    ``(B, S, H, D)`` memory and a ``(B, S)`` bool mask -> ``(T, H, D)`` q, k, v (new leaves that require
    grad where the inputs do), ``cu_seqlens`` ``(B + 1,)`` int32 and the longest length (host syncs:
    call it outside timing)."""
    b, h, s, d = q.shape
    mask = mask.to(q.device)
    lengths = mask.sum(1)
    real = mask.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu[1:] = lengths.cumsum(0).to(torch.int32)

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(b * s, h, d).index_select(0, real).detach().requires_grad_(t.requires_grad)

    return pack(q), pack(k), pack(v), cu, int(lengths.max())


def hf_layout(
    b: int, s: int, h: int, d: int, dtype: torch.dtype, device: str, requires_grad: bool = False
) -> torch.Tensor:
    """A (B, H, S, D) tensor laid out as Hugging Face makes it: (B, S, H, D) contiguous, transposed.

    With ``requires_grad`` the returned view is itself a leaf, so ``.grad`` keeps its strides.
    """
    t = torch.randn(b, s, h, d, dtype=dtype, device=device).transpose(1, 2)
    return t.requires_grad_(requires_grad)


def memory_limit_bytes(device: str, cap: float = 60e9) -> float:
    """Largest working set a config may need: ``cap`` or 85% of the card, whichever is smaller."""
    if device != "cuda":
        return cap
    return min(cap, 0.85 * torch.cuda.get_device_properties(0).total_memory)


def free_memory() -> None:
    """Drop unreferenced tensors and hand cached blocks back between configs."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def max_abs_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """max |a - b| in float32; NaN when either holds NaN; None when a tensor is missing."""
    if a is None or b is None:
        return None
    return (a.float() - b.float()).abs().max().item()


def short_error(exc: BaseException, limit: int = 300) -> str:
    """Type, first and last message lines of the exception's root cause, cut to ``limit`` characters.

    Triton's CompilationError is a source excerpt whose first line is a position and whose last
    line (or chained cause) says what went wrong; other errors are usually one line.
    """
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    parts = [] if root is exc else [_summary(exc), "caused by"]
    return " ".join(parts + [_summary(root)])[:limit]


def _summary(exc: BaseException) -> str:
    """``Type: first line ... last line`` of the message (blank lines and the caret line dropped)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^"]
    return f"{type(exc).__name__}: " + " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))


# --------------------------------------------------------------------------- timing


def bench_ms(fn: Callable[[], Any], device: str, grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, a short wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        # A short discarded run first: the first do_bench of a decode call in a process measured
        # 48.5-60.8 us where every later one measured 25.5-26.6 (H100, session 7 calls 3 and 5,
        # benchmarks/first_timing.py), so whichever provider was timed first paid for it.
        triton.testing.do_bench(fn, warmup=1, rep=10, grad_to_none=grad_to_none)
        return float(
            triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        )
    samples = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# --------------------------------------------------------------------------- results


def write_json(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write ``{"meta": ..., "records": [...]}`` atomically (a partial run still leaves valid JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Inverse of :func:`write_json`."""
    data = json.loads(path.read_text())
    return data["meta"], data["records"]


def fmt(value: float | None, spec: str = ".0f") -> str:
    """Format a number for a table; ``-`` for a missing value."""
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------- plotting


@functools.cache
def load_pyplot() -> Any | None:
    """matplotlib.pyplot with the Agg backend, or None (with a printed note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; PNG figures skipped (JSON has every number)")
        return None
    return plt


def plot_lines(
    panels: Sequence[tuple[str, Iterable[dict[str, Any]]]],
    *,
    x: str,
    y: str,
    ylabel: str,
    title: str,
    path: Path,
    ncols: int,
    logx: bool = True,
) -> Path | None:
    """A grid of line plots, one line per ``provider`` in each panel's records; returns the PNG path.

    ``panels`` is a sequence of (panel title, records); records missing ``y`` are left out.
    """
    plt = load_pyplot()
    if plt is None:
        return None
    nrows = max(1, -(-len(panels) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (panel_title, records) in zip(axes.flat, panels):
        _draw_panel(ax, list(records), x=x, y=y, logx=logx)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = _legend_entries(axes)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_panel(ax: Any, records: list[dict[str, Any]], *, x: str, y: str, logx: bool) -> None:
    """One line per provider, points sorted by ``x``; providers in PROVIDER_STYLE order."""
    providers = sorted(
        {r["provider"] for r in records},
        key=lambda p: list(PROVIDER_STYLE).index(p) if p in PROVIDER_STYLE else len(PROVIDER_STYLE),
    )
    for provider in providers:
        points = sorted((r[x], r[y]) for r in records if r["provider"] == provider and r.get(y) is not None)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=provider, **PROVIDER_STYLE.get(provider, {}))
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def _legend_entries(axes: Any) -> tuple[list[Any], list[str]]:
    """Unique legend handles across all panels."""
    seen: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)
