"""One attention call per process, for Nsight Compute (``ncu``): where does a kernel's time go.

    ncu --kernel-name regex:'_fwd_kernel|flash_fwd' --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        python -m benchmarks.ncu_attention --provider ours --causal

Runs ``--calls`` forward calls (the first ones compile and warm up; skip them with ``--launch-skip``)
of B*S = 16384, H*D = 2048 in the Hugging Face layout, as bench_kernels' grid: ``ours`` or SDPA's
flash backend (``fa2``) or cuDNN backend (``cudnn``).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=("ours", "fa2", "cudnn"), default="ours")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="bf16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    b, h = 16384 // args.seqlen, 2048 // args.dim
    q, k, v = (hf_layout(b, args.seqlen, h, args.dim, DTYPES[args.dtype], "cuda") for _ in range(3))
    if args.provider == "ours":
        from hf_triton_attn import flash_attention

        def call():
            return flash_attention(q, k, v, causal=args.causal)
    else:
        backend = SDPBackend.FLASH_ATTENTION if args.provider == "fa2" else SDPBackend.CUDNN_ATTENTION

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
