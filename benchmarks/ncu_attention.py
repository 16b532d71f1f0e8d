"""One attention call per process, for Nsight Compute (``ncu``): where does a kernel's time go.

    ncu --kernel-name regex:'_fwd_kernel|flash_fwd' --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        python -m benchmarks.ncu_attention --provider ours --causal

Runs ``--calls`` forward calls (the first ones compile and warm up; skip them with ``--launch-skip``)
of B*S = 16384, H*D = 2048 in the Hugging Face layout, as bench_kernels' grid: ``ours`` or SDPA's
flash backend (``fa2``) or cuDNN backend (``cudnn``). ``--decode Hq:Hkv:B:cache`` runs a decode call
instead (one query token, D = ``--dim``, K/V (B, Hkv, cache, D) contiguous, as bench_kernels' decode
section); ours launches ``_decode_split_kernel``:

    ncu --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 --set full \
        python -m benchmarks.ncu_attention --provider ours --decode 32:8:1:8192 --dim 128
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import DTYPES, hf_layout  # noqa: E402
from benchmarks.decode_timing import decode_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=("ours", "fa2", "cudnn"), default="ours")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="bf16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--decode", type=decode_case, default=None, metavar="Hq:Hkv:B:cache",
                    help="a decode call (one query token against a KV cache) instead of the grid's shape")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    if args.decode is not None:
        hq, hkv, b, cache = args.decode
        q = hf_layout(b, 1, hq, args.dim, dtype, "cuda")
        k, v = (torch.randn(b, hkv, cache, args.dim, dtype=dtype, device="cuda") for _ in range(2))
    else:
        b, h = 16384 // args.seqlen, 2048 // args.dim
        q, k, v = (hf_layout(b, args.seqlen, h, args.dim, dtype, "cuda") for _ in range(3))
    gqa = q.shape[1] != k.shape[1]
    if args.provider == "ours":
        from hf_triton_attn import flash_attention

        def call():
            return flash_attention(q, k, v, causal=args.causal)
    else:
        backend = SDPBackend.FLASH_ATTENTION if args.provider == "fa2" else SDPBackend.CUDNN_ATTENTION

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, enable_gqa=gqa)
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
