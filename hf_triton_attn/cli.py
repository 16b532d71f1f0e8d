"""The ``hf-triton-attn`` command: ``info`` and ``demo`` (more subcommands come with the HF layer)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _backend_for(device: str) -> tuple[str, str]:
    """Which backend an auto (backend=None) call takes on ``device``, and why."""
    env = os.environ.get("HF_TRITON_ATTN_BACKEND")
    if env:
        return env, "HF_TRITON_ATTN_BACKEND is set"
    if device == "cuda":
        return "triton", "CUDA tensors run the compiled Triton kernels"
    return "reference", "no GPU kernel for CPU tensors (use backend='interpret' with TRITON_INTERPRET=1)"


def cmd_info(_args: argparse.Namespace) -> int:
    import torch
    import triton

    import hf_triton_attn

    print(f"hf_triton_attn {hf_triton_attn.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers: not installed")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        print("GPU: none")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    for device in ("cuda", "cpu"):
        backend, why = _backend_for(device)
        print(f"auto backend for {device} tensors: {backend} ({why})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the kernels on a small causal GQA problem and compare with the float64 reference."""
    import torch

    from hf_triton_attn import attention_reference, flash_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if device == "cuda" else "interpret"
    if backend == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        print("CPU demo needs TRITON_INTERPRET=1 (set it, or run `python3 dev.py demo`)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 2, args.seqlen, 64
    q = torch.randn(b, s, hq, d, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hkv, d, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, hkv, d, device=device).transpose(1, 2).requires_grad_()
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1, s * 2 // 3:] = False  # right padding in the second sequence
    print(f"flash_attention on {device} ({backend} backend): B={b} Hq={hq} Hkv={hkv} S={s} D={d}, "
          "causal, GQA, padded batch")
    t0 = time.perf_counter()
    out = flash_attention(q, k, v, causal=True, attention_mask=mask, query_mask=mask, backend=backend)
    out.sum().backward()
    elapsed = time.perf_counter() - t0
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal=True, attention_mask=mask, query_mask=mask)
    ref.sum().backward()
    print(f"  forward + backward: {elapsed * 1e3:.1f} ms")
    print(f"  max |out - float64 reference| = {(out.double() - ref).abs().max().item():.2e}")
    for name, a, r in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        print(f"  max |{name} - reference|      = {(a.grad.double() - r.grad).abs().max().item():.2e}")
    print(f"  padded query rows are zero: {bool((out[1, :, s * 2 // 3:] == 0).all())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-triton-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backend calls take").set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="run the kernels and check them against the reference")
    demo.add_argument("--seqlen", type=int, default=96)
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
