# ruff: noqa: B023  (closures run inside the loop iteration that made them)
"""Host cost of the forward's TMA descriptors per call, as in-process A/B rounds (probe).

    python -m benchmarks.host_tma [--tiny]

``--tiny`` (B1 H2 S128 D64 bf16) keeps the GPU time per call far below the host time, so a loop
without syncs measures host time; the default is the padded benchmark batch (B32 H12 S512 D64,
key and query masks). Rounds alternate, in one process (host speed drifts between processes):
- ``flash_fwd`` with TMA descriptors, launched with the descriptors expanded by this package
  (``launch._descriptor_plan``) and through Triton's own wrapper (plans switched off), and with
  pointer loads (``use_tma=False``);
- ``launch.tma_can_read`` against the generic version it replaced.
Prints the median of each over the rounds, in us per call.
"""

from __future__ import annotations

import statistics
import sys

import torch

from benchmarks.common import PACKAGE_SOURCE, padded_lengths  # noqa: F401  (PACKAGE_SOURCE first)
from benchmarks.host_backward import per_call_ms
from hf_triton_attn.kernels import forward as fwd_mod
from hf_triton_attn.kernels import launch as launch_mod


def per_call_us(fn, n: int) -> float:
    return per_call_ms(fn, n)[0] * 1e3


def generic_readable(t: torch.Tensor) -> bool:  # the version before 2026-11-26 (session 9)
    if t.dtype not in (torch.float16, torch.bfloat16) or t.data_ptr() % 16 or t.numel() == 0:
        return False
    strides = t.stride()
    if strides[-1] != 1:
        return False
    size = t.element_size()
    return all(st > 0 and st * size % 16 == 0 for st in strides[:-1])


def generic_can_read(*tensors) -> bool:
    return launch_mod._tma_usable(tensors[0].device) and all(generic_readable(t) for t in tensors)


def main() -> int:
    b, h, s, d = (1, 2, 128, 64) if "--tiny" in sys.argv else (32, 12, 512, 64)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    lengths = padded_lengths(b, s, 0.26, torch.Generator().manual_seed(260)).cuda()
    mask = torch.arange(s, device="cuda")[None, :] < lengths[:, None]

    def fwd(use_tma: bool):
        return lambda: fwd_mod.flash_fwd(q, k, v, o, lse, mask, mask, None, None, None, None, None, None,
                                         s, s, b, d ** -0.5, 0.0, -1, -1, 0.0, False, "ieee", use_tma=use_tma)

    for _ in range(3):  # compile, check Triton's specialization, then launch through the cached path
        fwd(True)()
        fwd(False)()
    launcher = fwd_mod._launch_fwd
    planned = {kern: plan for kern, plan in launcher.plans.items()}

    def plans(on: bool) -> None:
        for kern, plan in planned.items():
            launcher.plans[kern] = plan if on else False

    cases = {
        "flash_fwd TMA, descriptors expanded here": (lambda: plans(True), fwd(True), 2000),
        "flash_fwd TMA, Triton's launch wrapper": (lambda: plans(False), fwd(True), 2000),
        "flash_fwd pointer loads": (lambda: plans(True), fwd(False), 2000),
        "tma_can_read(q, k, v, o)": (None, lambda: launch_mod.tma_can_read(q, k, v, o), 20000),
        "generic tma_can_read (before)": (None, lambda: generic_can_read(q, k, v, o), 20000),
    }
    samples: dict = {name: [] for name in cases}
    for _ in range(7):
        for name, (setup, fn, n) in cases.items():
            if setup:
                setup()
            samples[name].append(per_call_us(fn, n))
    plans(True)
    print(f"# {torch.cuda.get_device_name()}: B{b} H{h} S{s} D{d} bf16, key + query masks: host us per call "
          f"(no sync), median of 7 alternating rounds [min-max]; plans {[bool(p) for p in planned.values()]}")
    for name, xs in samples.items():
        print(f"  {name:44s} {statistics.median(xs):7.2f}  [{min(xs):.2f}-{max(xs):.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
