"""Triton kernels (no torch-level logic, no transformers). Imported lazily by ops.py.

Triton decides between compiling for the GPU and its CPU interpreter when ``triton`` itself and
each ``@triton.jit`` function are first imported (it reads TRITON_INTERPRET then), so one process
runs either compiled kernels or interpreted ones; ``interpreted()`` says which.
"""

from __future__ import annotations


def interpreted() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .forward import _fwd_kernel

    return isinstance(_fwd_kernel, InterpretedFunction)
