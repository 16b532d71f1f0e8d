"""Environment switches read on every call (tests and users may change them at run time)."""

from __future__ import annotations

import os


def environ_get(name: str) -> str | None:
    """``os.environ.get(name)``, straight from CPython's ``os.environ._data`` (which every change
    through ``os.environ`` updates: setenv, monkeypatch, mock.patch.dict): ``Mapping.get`` raises and
    catches a KeyError when the variable is unset, 0.7-1.1 us per call vs 0.05-0.1 (2-core CPU box)."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's os.environ: the public way
        return os.environ.get(name)
    raw = data.get(os.environ.encodekey(name))
    return None if raw is None else os.environ.decodevalue(raw)
