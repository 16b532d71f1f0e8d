#!/usr/bin/env python
"""Regenerate the README's supported-classes table from the registry (tests check it is current)."""

from pathlib import Path

import hf_triton_attn  # noqa: F401  (registers every adapter, the HF ones when transformers is installed)
from hf_triton_attn.registry import supported_classes_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- supported-classes:start -->\n", "\n<!-- supported-classes:end -->"

text = README.read_text()
head, rest = text.split(START)
_, tail = rest.split(END)
README.write_text(head + START + supported_classes_markdown() + END + tail)
print(f"updated {README}")
