"""Forward time with a key padding mask: hole-free (right padding, as HF tokenizers give) or with holes.

    python -m benchmarks.bench_key_masks [--reps 3] [--graph] [--backward]

The padded benchmark shape of issue 5 (B32 H12 S512 D64 bf16, random lengths averaging 26 / 58 / 100%
of S, ``query_mask`` = the key mask) and a causal one (B8 H12 S1024 D64), each with the mask as is and
with 10% of the real keys masked out (holes). Prints median ms of ``do_bench`` for ours and for SDPA's
cuDNN backend given the same boolean mask; for masks without holes also ours on the packed tokens
(varlen), and at full fill ours without a mask. ``--backward`` times forward + backward (the gradients of
q, k and v by ``torch.autograd.grad``). Alternate two package copies with ``HF_TRITON_ATTN_SOURCE``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import PACKAGE_SOURCE, hf_layout, pack_padded, padded_lengths  # noqa: E402  (imports hf_triton_attn from DIR if set)
from benchmarks.decode_timing import graph_of  # noqa: E402
from hf_triton_attn import flash_attention  # noqa: E402


def lengths_mask(batch: int, seqlen: int, fill: float, holes: bool, seed: int) -> torch.Tensor:
    """(B, S) bool: right padding with lengths uniform in fill * S * [0.5, 1.5]; ``holes`` drops 10%
    of the real keys (never a row's first key)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = padded_lengths(batch, seqlen, fill, gen)
    mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(batch, seqlen, generator=gen) > 0.1
        mask[:, 0] = True
    return mask.cuda()


def packed_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool):
    """Ours on the real tokens only (``common.pack_padded``), packing outside timing; also the packed
    (T, H, D) inputs."""
    qp, kp, vp, cu, longest = pack_padded(q, k, v, mask)
    return functools.partial(flash_attention, qp, kp, vp, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu,
                             max_seqlen_q=longest, max_seqlen_k=longest), (qp, kp, vp)


def with_backward(fn, inputs: tuple):
    """``fn`` followed by the gradients of ``inputs`` for an all-ones output gradient."""
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def cudnn_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays of each call: GPU time without the host's launch cost, "
                         "which these 0.03-0.1 ms calls can exceed on a slow host")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    args = ap.parse_args(argv)
    cases = [(32, 12, 512, False, fill) for fill in (0.26, 0.58, 1.0)] + [(8, 12, 1024, True, 0.58)]
    timed = ("fwd+bwd" if args.backward else "fwd") + " ms" + (" (CUDA-graph replays)" if args.graph else "")
    print(f"# {torch.cuda.get_device_name()}, bf16 D64, package {PACKAGE_SOURCE or 'from the working tree'}; "
          f"{timed}: ours (samples) | sdpa_cudnn with the same mask")
    for b, h, s, causal, fill in cases:
        for holes in (False, True):
            mask = lengths_mask(b, s, fill, holes, seed=int(fill * 1000))
            q, k, v = (hf_layout(b, s, h, 64, torch.bfloat16, "cuda", args.backward) for _ in range(3))
            query_mask = None if causal else mask
            sdpa_mask = mask[:, None, None, :]
            if causal:
                sdpa_mask = sdpa_mask & torch.ones(s, s, dtype=torch.bool, device="cuda").tril()

            fns = {"ours": functools.partial(flash_attention, q, k, v, causal=causal, attention_mask=mask,
                                             query_mask=query_mask),
                   "cudnn": functools.partial(cudnn_sdpa, q, k, v, sdpa_mask)}
            inputs = {"ours": (q, k, v), "cudnn": (q, k, v), "nomask": (q, k, v)}
            if not holes:  # the same batch packed (varlen, packing outside timing), and unmasked at full fill
                fns["varlen"], inputs["varlen"] = packed_call(q, k, v, mask, causal)
                if fill >= 1.0:
                    fns["nomask"] = functools.partial(flash_attention, q, k, v, causal=causal)
            if args.backward:
                fns = {name: with_backward(fn, inputs[name]) for name, fn in fns.items()}
            if args.graph:
                fns = {name: graph_of(fn).replay for name, fn in fns.items()}
            samples: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.reps):
                for name, fn in fns.items():
                    do_bench(fn, warmup=1, rep=10)  # discarded (see common.bench_ms)
                    samples[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            med = {name: statistics.median(xs) for name, xs in samples.items()}
            label = f"B{b} S{s} {'causal' if causal else 'noncausal'} fill {fill:.2f} {'holes' if holes else 'dense'}"
            extra = "".join(f" | {name} {med[name]:.4f}" for name in ("varlen", "nomask") if name in med)
            print(f"{label:42s} ours {med['ours']:.4f} ({' '.join(f'{x:.4f}' for x in samples['ours'])}) | "
                  f"cudnn {med['cudnn']:.4f} | {med['cudnn'] / med['ours']:.2f}x cudnn{extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
