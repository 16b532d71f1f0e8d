"""Host time of one padded fwd+bwd call (B32 H12 S512 D64 bf16, key+query mask at 26% fill):
wall time per call of a loop (sync at the end) beside the GPU kernel time, and a cProfile of the loop.

    python -m benchmarks.host_backward
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch


def main() -> int:
    from hf_triton_attn import flash_attention

    b, h, s, d = 32, 12, 512, 64
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_() for _ in range(3))
    gen = torch.Generator().manual_seed(260)
    lens = (0.26 * s * (0.5 + torch.rand(b, generator=gen))).round().long().clamp(1, s)
    mask = (torch.arange(s)[None] < lens[:, None]).to(dev)
    dout = torch.randn_like(q)

    def step():
        flash_attention(q, k, v, attention_mask=mask, query_mask=mask).backward(dout)
        q.grad = k.grad = v.grad = None

    def fwd():
        with torch.no_grad():
            flash_attention(q, k, v, attention_mask=mask, query_mask=mask)

    for name, fn in (("fwd (no grad)", fwd), ("fwd+bwd", step)):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        print(f"{name}: host {host:.3f} ms per call (loop without sync), wall {wall:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
