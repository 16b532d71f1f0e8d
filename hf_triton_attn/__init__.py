"""hf_triton_attn: one Triton flash-attention kernel, forward and backward, for Hugging Face models."""

from .modules import FlashAttention, TritonMultiHeadAttention
from .ops import BACKENDS, flash_attention
from .patching import PatchReport, patch_model, patched, unpatch_model
from .reference import attention_reference
from .registry import Adapter, AdapterKind, Support, register_adapter

__version__ = "0.1.0"

try:  # the Hugging Face integration is the only module that imports transformers
    import transformers as _transformers  # noqa: F401
except ImportError:
    pass
else:
    from .patches import hf_interface as _hf_interface

    _hf_interface.register()

__all__ = [
    "BACKENDS", "Adapter", "AdapterKind", "FlashAttention", "PatchReport", "Support", "TritonMultiHeadAttention",
    "attention_reference", "flash_attention",
    "patch_model", "patched", "register_adapter", "unpatch_model", "__version__",
]
