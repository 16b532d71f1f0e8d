"""Where a BERT fine-tune step's time goes when our backward runs on autograd's CUDA worker thread
(the default) versus the thread that calls ``backward()`` (``torch.autograd.set_multithreading_enabled(False)``).

BERT-base classifier, the bench_models batch (B32 x 512, padded to 64% fill, bf16), AdamW; the two
settings in turn in one process, 3 warm-up + 6 timed steps each. Prints per setting the median step
and ``backward()`` call (ms), the median time spent inside our autograd Function's backward and on
which thread it ran. Session 7 (H100) measured 6 separate processes at 25-28 ms per step with the
calling thread against 40-45 ms with the worker; in one process this probe saw 30-44 ms either way.

    python -m benchmarks.backward_thread_probe
"""

import threading
import time

import torch

from benchmarks.bench_models import _bert_inputs, build
from hf_triton_attn import ops

inside = []
original = ops._FlashAttnFunction.backward


def timed_backward(ctx, *grads):
    t0 = time.perf_counter()
    out = original(ctx, *grads)
    inside.append((time.perf_counter() - t0, threading.get_ident()))
    return out


ops._FlashAttnFunction.backward = staticmethod(timed_backward)


class Args:
    quick = False


ids, mask, lengths = _bert_inputs(Args, "cuda")
labels = torch.arange(ids.shape[0], device="cuda") % 2
model = build("bert_cls", "hf_triton_attn", False, "cuda", torch.bfloat16).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
main = threading.get_ident()


def step():
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    t0 = time.perf_counter()
    loss.backward()
    t_bwd = time.perf_counter() - t0
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t_bwd


for mt in (True, False, True, False):
    torch.autograd.set_multithreading_enabled(mt)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    inside.clear()
    walls, bwds = [], []
    for _ in range(6):
        t0 = time.perf_counter()
        bwds.append(step())
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    per_call = sorted(t for t, _ in inside)
    on_main = sum(tid == main for _, tid in inside)
    print(f"multithreading={mt}: step {sorted(walls)[3] * 1e3:.1f} ms, backward() call {sorted(bwds)[3] * 1e3:.1f} ms, "
          f"our backward body {per_call[len(per_call) // 2] * 1e3:.3f} ms median ({len(per_call)} calls, "
          f"{on_main} on the main thread), sum per step {sum(per_call) / 6 * 1e3:.2f} ms", flush=True)
torch.autograd.set_multithreading_enabled(True)
