"""hf_triton_attn: one Triton flash-attention kernel, forward and backward, for Hugging Face models."""

from .ops import BACKENDS, flash_attention
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = ["BACKENDS", "attention_reference", "flash_attention", "__version__"]
