"""Per-kernel GPU time of a few attention calls (torch.profiler), to see where a fwd+bwd goes.

    python -m benchmarks.profile_kernels [--out DIR] [--cases SUBSTRING,...]

Cases: the BERT-like padded batch of bench_kernels (B=32, H=12, S=512, D=64, bf16) dense, with a
key+query mask at 26% and 100% fill, and packed (varlen) at 26%; the dropout shapes (B=16, H=32,
S=1024, D=64 and B=16, H=16, S=1024, D=128) at p = 0 and 0.1; causal B=16, H=32, S=1024, D=64 fp16
for ours and SDPA's flash backend (FA2) in the Hugging Face layout ((B, S, H, D) transposed) and
contiguous (B, H, S, D). For each: CUDA time per iteration of every kernel and the host time
per iteration (every input's .grad is reset each step, so no gradient-accumulation kernel shows; before
2026-11-26 session 6 only q's was, and k/v's accumulation showed as ``aten::add_``). Writes
profile_kernels.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import hf_layout, padded_lengths


def cases():
    from hf_triton_attn import flash_attention

    dev, dt = "cuda", torch.bfloat16

    def hf(b, s, h, d):
        return hf_layout(b, s, h, d, dt, dev, True)

    b, h, s, d = 32, 12, 512, 64
    q, k, v = hf(b, s, h, d), hf(b, s, h, d), hf(b, s, h, d)
    yield "dense B32 H12 S512 D64", lambda: flash_attention(q, k, v), (q, k, v)
    for fill in (0.26, 1.0):
        lens = padded_lengths(b, s, fill, torch.Generator().manual_seed(int(fill * 1000)))
        mask = (torch.arange(s)[None] < lens[:, None]).to(dev)
        yield (f"padded fill {fill}", lambda mask=mask: flash_attention(q, k, v, attention_mask=mask, query_mask=mask),
               (q, k, v))
    lens = padded_lengths(b, s, 0.26, torch.Generator().manual_seed(260))
    real = (torch.arange(s)[None] < lens[:, None]).reshape(-1).nonzero().squeeze(1).to(dev)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    cu[1:] = lens.cumsum(0).to(torch.int32)
    packed = [t.detach().transpose(1, 2).reshape(b * s, h, d).index_select(0, real).requires_grad_() for t in (q, k, v)]
    mx = int(lens.max())
    yield ("varlen fill 0.26", lambda: flash_attention(*packed, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                                       max_seqlen_k=mx), tuple(packed))
    b, s = 16, 1024
    for h, d in ((32, 64), (16, 128)):  # H * D = 2048
        qkv = tuple(hf(b, s, h, d) for _ in range(3))
        for p in (0.0, 0.1):
            yield (f"dropout {p} B{b} H{h} S{s} D{d}", lambda p=p, qkv=qkv: flash_attention(*qkv, dropout_p=p), qkv)
    yield from layout_cases()


def layout_cases():
    """Causal D=64 S=1024 fp16 fwd+bwd, ours and FA2, in both layouts: where does each spend its time."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_triton_attn import flash_attention

    b, h, s, d = 16, 32, 1024, 64
    for layout in ("hf", "bhsd"):
        if layout == "hf":
            q, k, v = (hf_layout(b, s, h, d, torch.float16, "cuda", True) for _ in range(3))
        else:
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16, requires_grad=True)
                       for _ in range(3))
        leaves = (q, k, v)

        def fa2(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        def ours(q=q, k=k, v=v):
            return flash_attention(q, k, v, causal=True)
        yield f"causal S1024 D64 fp16 {layout} ours", ours, leaves
        yield f"causal S1024 D64 fp16 {layout} sdpa_flash", fa2, leaves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cases", default="", help="comma list of substrings: only cases whose name has one")
    args = parser.parse_args(argv)
    wanted = [w for w in args.cases.split(",") if w]
    lines = [f"{torch.cuda.get_device_name()} | torch {torch.__version__}"]
    for name, fn, leaves in cases():
        if wanted and not any(w in name for w in wanted):
            continue
        leaves = leaves if isinstance(leaves, tuple) else (leaves,)

        def step(fn=fn, leaves=leaves):
            out = fn()
            out.backward(torch.ones_like(out))
            for leaf in leaves:
                leaf.grad = None
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                  or getattr(e, "self_device_time_total", 0) > 0]
        rows = sorted(((getattr(e, "self_device_time_total", 0) / args.iters, e.key) for e in events), reverse=True)
        total = sum(t for t, _ in rows)
        lines.append(f"== {name}: GPU {total / 1000:.3f} ms per fwd+bwd")
        lines += [f"   {t / 1000:8.3f} ms  {key[:90]}" for t, key in rows[:8] if t > 0]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_kernels.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
