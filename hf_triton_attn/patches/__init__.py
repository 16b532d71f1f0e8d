"""Adapters, one module per family. Importing this package registers the built-in adapters.

The Hugging Face forward adapters (GPT-Neo, Bloom, Falcon) name their classes by import path and
never import transformers themselves; they are registered only where transformers is installed
(found without importing it), so the registry, like the README's table, lists them exactly there.
"""

import importlib.util

from . import torch_mha  # noqa: F401

if importlib.util.find_spec("transformers") is not None:
    from . import bloom, encoder_unpad, falcon, gpt_neo  # noqa: F401
