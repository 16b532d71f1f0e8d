"""Does a decode call block the host, and does the first ``do_bench`` of a process measure something else?

Session 6's quick grid and session 7's first ``decode_timing`` run measured our B1 32:8 8k decode call
at 35-61 us under ``do_bench`` against 26-27 us for CUDA-graph replays of the same call. This probe,
ours and SDPA's cuDNN backend in turn on the same tensors:

* 50 calls issued behind ~100 ms of GPU spin (``torch.cuda._sleep``): the host time stays small only
  if no call waits for the GPU;
* ``do_bench`` at rep = 10 / 100 / 300 ms, then a loop like ``do_bench``'s (256 MB memset, events
  around the call) of 100 / 1000 / 3000 calls: median, 10th and 90th percentile, us.
The whole sequence runs twice, so each provider is timed both first and later.

    python -m benchmarks.first_timing
"""

import time

import torch
import triton.testing
from torch.nn.attention import SDPBackend

from benchmarks.common import PACKAGE_SOURCE  # noqa: F401  (before hf_triton_attn: HF_TRITON_ATTN_SOURCE)
from benchmarks.decode_timing import flushed_samples_us, ours_call, sdpa_call


def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k, v = (torch.randn(1, 8, 8192, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))

    ours = ours_call(q, k, v, "auto")
    cudnn = sdpa_call(q, k, v, SDPBackend.CUDNN_ATTENTION)

    def behind_sleep_ms(fn) -> float:
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e8))
        start = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return host

    def flushed_loop_us(fn, n: int) -> tuple[float, float, float]:
        us = flushed_samples_us(fn, write=True, calls=n)
        return us[n // 2], us[n // 10], us[9 * n // 10]

    print(f"== {torch.cuda.get_device_name()}: decode B1 Hq32 Hkv8 cache 8192 D128 bf16, us")
    for name, fn in (("ours", ours), ("cudnn", cudnn), ("ours", ours), ("cudnn", cudnn)):
        for _ in range(20):
            fn()
        row = [f"{name:6s} 50 calls behind a GPU sleep: host {behind_sleep_ms(fn):.1f} ms"]
        for rep in (10, 100, 300):
            row.append(f"do_bench rep={rep}: {triton.testing.do_bench(fn, rep=rep, return_mode='median') * 1e3:.1f}")
        for n in (100, 1000, 3000):
            mid, lo, hi = flushed_loop_us(fn, n)
            row.append(f"loop {n}: {mid:.1f} ({lo:.1f}-{hi:.1f})")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
