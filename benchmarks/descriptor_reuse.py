"""How often a training loop re-encodes its TMA descriptors: GPT-2 124M train steps (B8 S1024 bf16,
random init, fused AdamW) with the package's attention, counting the driver encodes
(``cuTensorMapEncodeTiled`` through Triton's ``make_tensordesc_arg``) that
``kernels.launch._descriptor_plan`` makes per step.

``launch._descriptor_plan`` keeps each descriptor parameter's encoded tensor maps by (address, padding,
shape, strides); this shows whether the caching allocator hands the same blocks back step after step, so that
a steady loop encodes nothing.

    python -m benchmarks.descriptor_reuse [--steps 6]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import PACKAGE_SOURCE  # noqa: F401  (before hf_triton_attn: HF_TRITON_ATTN_SOURCE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_triton_attn import patch_model
    from hf_triton_attn.testing import record_descriptor_encodes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to("cuda", torch.bfloat16).train()
    patch_model(model)
    ids = torch.randint(0, model.config.vocab_size, (8, 1024), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    with record_descriptor_encodes() as encoded:  # a fresh process: every launch plan is made in the block
        for step in range(args.steps):
            before = len(encoded)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            print(f"step {step}: {len(encoded) - before} descriptor encodes "
                  "(12 layers; 7-8 descriptors per layer's fwd+bwd)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
