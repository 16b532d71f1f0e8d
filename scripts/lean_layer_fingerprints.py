"""Print the source fingerprints of the BERT-family layers of the installed transformers
(``hf_triton_attn.patches.encoder_layers``): a fingerprint not in ``_KNOWN_SOURCES`` means the
encoder adapter runs transformers' own layers for that family until the lean runner is reviewed
against the new source and the fingerprint added.

    python scripts/lean_layer_fingerprints.py
"""

from __future__ import annotations

import importlib

import transformers

from hf_triton_attn.patches import encoder_layers, encoder_unpad


def main() -> None:
    print("transformers", transformers.__version__)
    for path in encoder_unpad.ENCODER_CLASSES:
        module_name, name = path.split(":")
        family = encoder_layers.FAMILIES.get(name)
        if family is None:
            print(f"{name:24s} (no lean layers)")
            continue
        cls = getattr(importlib.import_module(module_name), name)
        fingerprint = encoder_layers.source_fingerprint(cls, family)
        known = "known" if fingerprint in encoder_layers._KNOWN_SOURCES else "NEW"
        print(f"{name:24s} {fingerprint} {known}")


if __name__ == "__main__":
    main()
