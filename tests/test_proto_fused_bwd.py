"""The prototype fused backward of benchmarks/proto_fused_bwd.py (not the package's kernel): its gradients
match an fp32 reference in the CPU interpreter, so the timings recorded for it time a correct kernel."""

import pytest
import torch

from hf_triton_attn.reference import attention_reference
from tests.helpers import DEVICE, ON_GPU

proto = pytest.importorskip("benchmarks.proto_fused_bwd")


def _reference(q, k, v, do, causal):
    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(qr, kr, vr, causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, (qr, kr, vr), do.float())
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("causal,split", [(False, False), (True, False), (True, True)])
def test_prototype_gradients_match_the_reference(causal, split):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 128, 64, dtype=torch.float16) for _ in range(4))
    out, lse, grads = _reference(q, k, v, do, causal)
    q, k, v, do, out, lse = (t.to(DEVICE) for t in (q, k, v, do, out.half(), lse))
    # the interpreter has no TMA reduce: dq by pointer atomics there
    got = proto.proto_backward(q, k, v, out, do, lse, causal, (32, 64, 4, 1), dq_tma=ON_GPU, split_causal=split)
    for name, g, r in zip(("dq", "dk", "dv"), (t.cpu() for t in got), grads):
        # fp16 operands (rounding 2**-11 relative) over 128 keys: well inside 1e-2 of the largest entry
        err = float((g.float() - r).abs().max() / r.abs().max())
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
