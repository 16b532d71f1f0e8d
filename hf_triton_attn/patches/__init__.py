"""Adapters, one module per family. Importing this package registers the built-in adapters."""

from . import torch_mha  # noqa: F401
