"""Host time of the encoder adapter's entry (``patches/encoder_unpad.py``) for BERT-base.

    python -m benchmarks.host_unpad [--reps 300] [--device cuda]

Times, per call, the checks that decide whether a forward may run on packed tokens
(``_fallback_reason``: arguments, the encoder's attention modules and their configs, output capture)
and the plan of the padding mask (``_pack``: lengths, ``cu_seqlens``, the one host sync, the real
tokens' indices), on a B32 S512 mask with random right padding (58% fill). Median and quartiles of
``reps`` calls in microseconds. Pure host work; alternate two package copies with ``HF_TRITON_ATTN_SOURCE``
(one process each) to compare them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import PACKAGE_SOURCE, padded_lengths  # noqa: E402  (imports hf_triton_attn from DIR if set)
from hf_triton_attn import patch_model  # noqa: E402
from hf_triton_attn.patches import encoder_unpad  # noqa: E402


def timed_us(fn, reps: int, sync: bool) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of ``reps`` calls of ``fn`` in microseconds."""
    samples = []
    for _ in range(reps + 10):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(samples[10:], n=4)
    return q[1], q[0], q[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig()).to(args.device).eval()
    patch_model(model)
    encoder = model.encoder
    gen = torch.Generator().manual_seed(0)
    batch, seqlen = 32, 512
    lengths = padded_lengths(batch, seqlen, 0.58, gen)  # bench_key_masks' 58% fill
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long().to(args.device)
    hidden = torch.randn(batch, seqlen, 768, device=args.device)
    sync = args.device == "cuda"
    source = PACKAGE_SOURCE or "the working tree"
    print(f"# host_unpad: BERT-base encoder, B{batch} S{seqlen}, {args.device}, package {source}; "
          f"us per call: median (quartiles) of {args.reps}")
    checks = timed_us(lambda: encoder_unpad._fallback_reason(encoder, hidden, mask, (), {}), args.reps, False)
    assert encoder_unpad._fallback_reason(encoder, hidden, mask, (), {}) is None
    plan = timed_us(lambda: encoder_unpad._pack(mask), args.reps, sync)
    for name, (med, lo, hi) in (("fallback checks", checks), ("_pack (with its sync)", plan)):
        print(f"{name:24s} {med:8.1f} ({lo:.1f}-{hi:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
