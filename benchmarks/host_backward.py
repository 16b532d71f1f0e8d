"""Host time of training-shaped attention calls (fwd+bwd), ours beside SDPA, and where it goes.

Shapes: the padded benchmark batch (B32 H12 S512 D64 bf16, key + query mask at 26% fill) and the
BERT fine-tune layer after unpadding (varlen, 32 sequences of 142..511 tokens, H12 D64 bf16).
For each: wall and host time per call of a loop (sync only at the end; host = wall means the call
is host-bound), with the autograd engine's CUDA worker thread (the default) and with the backward
on the calling thread; the same for SDPA and for an identity ``autograd.Function`` (the engine's
own floor); ours with the kernel launches stubbed out (our Python alone); then a cProfile of our
loop with the backward on the calling thread (cProfile cannot see into the worker thread).

    python -m benchmarks.host_backward
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from benchmarks.common import PACKAGE_SOURCE, padded_lengths  # noqa: F401  (PACKAGE_SOURCE: before hf_triton_attn)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def per_call_ms(fn, n: int = 200) -> tuple[float, float]:
    """(host, wall) ms per call of a loop of n calls without syncs, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e3


def _cases():
    from hf_triton_attn import flash_attention

    dev, dt = "cuda", torch.bfloat16
    b, h, s, d = 32, 12, 512, 64
    gen = torch.Generator().manual_seed(260)
    lens = padded_lengths(b, s, 0.26, gen)
    mask = (torch.arange(s)[None] < lens[:, None]).to(dev)
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    sdpa_mask = mask[:, None, None, :]
    padded = dict(
        ours=lambda: flash_attention(q, k, v, attention_mask=mask, query_mask=mask).backward(dout),
        sdpa=lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask).backward(dout))
    lens = torch.randint(142, 512, (32,), generator=gen)
    cu = torch.zeros(33, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu, total, longest = cu.to(dev), int(cu[-1]), int(lens.max())
    qp, kp, vp = (torch.randn(total, h, d, device=dev, dtype=dt).requires_grad_() for _ in range(3))
    doutp = torch.randn_like(qp)
    qs, ks, vs = (torch.randn(1, h, total // 8, d, device=dev, dtype=dt).requires_grad_() for _ in range(3))
    varlen = dict(
        ours=lambda: flash_attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                     max_seqlen_k=longest).backward(doutp),
        sdpa=lambda: F.scaled_dot_product_attention(qs, ks, vs).backward(torch.ones_like(qs)))
    x = torch.randn(8, device=dev, requires_grad=True)
    identity = lambda: _Identity.apply(x).sum().backward()
    return {"padded 26% fill": padded, "varlen BERT layer": varlen, "identity Function": {"ours": identity}}


def _thread_probe(cases) -> None:
    """Is the worker-thread cost the engine's hand-off, or does our code run slower off the main
    thread? The same loops (backward on the calling thread) on the main thread and on a fresh
    Python thread, and forward-only (launch path, no autograd) loops likewise."""
    import threading

    from hf_triton_attn import flash_attention

    varlen = cases["varlen BERT layer"]["ours"]
    qp = torch.randn(4096, 12, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 1024, 2048, 3072, 4096], device="cuda", dtype=torch.int32)

    def fwd_only():
        with torch.no_grad():
            flash_attention(qp, qp, qp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1024, max_seqlen_k=1024)

    def on_this_thread(out: list, fn) -> None:
        # autograd's multithreading switch is thread-local: a fresh thread has it on again, and its
        # backward would run on the engine's worker (session 5 found the old probe measured that)
        torch.autograd.set_multithreading_enabled(False)
        assert not torch._C._is_multithreading_enabled()
        out.append(per_call_ms(fn)[0])

    from hf_triton_attn.kernels import launch

    real_call = launch.CachedLauncher.__call__
    torch.autograd.set_multithreading_enabled(False)
    try:
        # Launches stubbed too: pure host time (a loop of real launches turns GPU-bound at this shape).
        for stubbed in (False, True):
            launch.CachedLauncher.__call__ = (lambda self, *a, **k: None) if stubbed else real_call
            for name, fn in (("varlen fwd+bwd", varlen), ("varlen fwd only", fwd_only)):
                res: list = []
                for _ in range(2):  # main, thread, main, thread
                    res.append(per_call_ms(fn)[0])
                    t = threading.Thread(target=on_this_thread, args=(res, fn))
                    t.start()
                    t.join()
                label = f"{name}{', stubbed' if stubbed else ''}"
                print(f"  thread probe, {label:26s}: host {res[0]:.3f} / {res[2]:.3f} ms on the main thread, "
                      f"{res[1]:.3f} / {res[3]:.3f} ms on a fresh Python thread")
    finally:
        launch.CachedLauncher.__call__ = real_call
        torch.autograd.set_multithreading_enabled(True)


def _thread_profile(cases) -> None:
    """``--thread-profile``: cProfile of the varlen fwd+bwd loop, backward on the calling thread, on
    the main thread and on a fresh Python thread: which entry takes the extra time off the main one."""
    import threading

    varlen = cases["varlen BERT layer"]["ours"]

    def profiled(out: list) -> None:
        torch.autograd.set_multithreading_enabled(False)  # thread-local: set in every thread
        for _ in range(20):
            varlen()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            varlen()
        torch.cuda.synchronize()
        prof.disable()
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(14)
        out.append(stream.getvalue())

    res: list = []
    profiled(res)
    t = threading.Thread(target=profiled, args=(res,))
    t.start()
    t.join()
    torch.autograd.set_multithreading_enabled(True)
    for where, text in zip(("main thread", "fresh thread"), res):
        print(f"== cProfile, varlen fwd+bwd x300, backward on the calling thread, {where}")
        print(text[:3500])


def _thread_parts() -> None:
    """Host time of each piece of our backward path on the main thread and on another Python thread
    (``python -m benchmarks.host_backward --parts``): which piece is slower off the main thread."""
    import threading

    from triton.runtime.driver import driver

    from hf_triton_attn import ops
    from hf_triton_attn.kernels.backward import flash_bwd

    dev, dt = "cuda", torch.bfloat16
    # Tiny tensors: each kernel takes a few us, so a loop of calls is bound by host time (at the BERT
    # shape B32 H12 S512 the backward's kernels take ~0.3 ms and the loop measured the GPU, H100 run 1
    # of 2026-11-26 session 3).
    b, h, s, d = 1, 2, 64, 64
    q, k, v, out, dout = (torch.randn(b, h, s, d, device=dev, dtype=dt) for _ in range(5))
    lse = torch.randn(b, h, s, device=dev)
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    args = ops._launch_args(q, k, v, b, False, None, None, None, None, None, None, None, None, s, s, d ** -0.5,
                            0.0, -1, 0, 0.0, False)
    scalars = (None,) * 8 + (s, s, d ** -0.5, 0.0, -1, 0, 0.0, False, False)  # optionals, then the scalars
    pieces = {
        "4x empty_like": lambda: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                                  torch.empty_like(lse)),
        "current_device + stream": lambda: driver.active.get_current_stream(torch.cuda.current_device()),
        "flash_bwd (all launches)": lambda: flash_bwd(dout, q, k, v, out, lse, delta, dq, dk, dv, **args),
        "_backward_impl": lambda: ops._backward_impl(dout, q, k, v, out, lse, *scalars),
    }

    def run(fn, res):
        res.append(per_call_ms(fn, 500)[0] * 1e3)

    for name, fn in pieces.items():
        res: list = []
        run(fn, res)
        t = threading.Thread(target=run, args=(fn, res))
        t.start()
        t.join()
        print(f"  part {name:26s}: {res[0]:7.1f} us main thread, {res[1]:7.1f} us other thread")


def main() -> int:
    import sys

    if "--parts" in sys.argv:
        _thread_parts()
        return 0
    if "--thread-profile" in sys.argv:
        _thread_profile(_cases())
        return 0
    from hf_triton_attn.kernels import launch

    cases = _cases()
    print("per call, ms: host (loop without sync) / wall; 'calling thread' = "
          "torch.autograd.set_multithreading_enabled(False)")
    for name, fns in cases.items():
        for impl, fn in fns.items():
            for threads in (True, False):
                torch.autograd.set_multithreading_enabled(threads)
                host, wall = per_call_ms(fn)
                where = "worker thread " if threads else "calling thread"
                print(f"  {name:18s} {impl:5s} backward on {where}: host {host:.3f} / wall {wall:.3f}")
    torch.autograd.set_multithreading_enabled(True)
    real_call = launch.CachedLauncher.__call__
    launch.CachedLauncher.__call__ = lambda self, *a, **k: None  # our Python alone
    try:
        for name in ("padded 26% fill", "varlen BERT layer"):
            for threads in (True, False):
                torch.autograd.set_multithreading_enabled(threads)
                host, _ = per_call_ms(cases[name]["ours"])
                print(f"  {name:18s} ours, launches stubbed, {'worker' if threads else 'calling'} thread: "
                      f"host {host:.3f}")
    finally:
        launch.CachedLauncher.__call__ = real_call
        torch.autograd.set_multithreading_enabled(True)
    _thread_probe(cases)
    torch.autograd.set_multithreading_enabled(False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        cases["varlen BERT layer"]["ours"]()
    torch.cuda.synchronize()
    prof.disable()
    torch.autograd.set_multithreading_enabled(True)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(24)
    print(out.getvalue()[:7000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
