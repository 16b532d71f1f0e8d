"""scripts/gpu_run.sh on the CPU box: argument checks and the clean-up of its own leftovers.

The script's ``reap`` kills pytest / xdist processes left behind by a timed-out stage. It once
matched every process named like pytest on the machine and killed a CI run beside a local try of
the script (session 17); it now kills only processes that carry the run's token in their environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ON_GPU

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.sh"

pytestmark = pytest.mark.skipif(
    ON_GPU or not sys.platform.startswith("linux") or shutil.which("bash") is None or shutil.which("pgrep") is None,
    reason="runs the GPU script's test stage on the CPU box (Linux, bash, pgrep)")


def _run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OUT=str(tmp_path / "out"), HOST="0", BENCH="0", MODELS="0", **env)
    # `python` in the script must be this interpreter (the venv's)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=600)


def test_bad_test_stages_value_is_named(tmp_path):
    result = _run_script(tmp_path, TEST_STAGES="small lrage")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "TEST_STAGES: expected words 'small', 'large' and/or 'fuzz', got 'small lrage'" in result.stderr


def test_reap_leaves_other_pytest_processes_alone(tmp_path):
    # A process named like a pytest run that is not the script's (a CI run on the same machine).
    bystander = subprocess.Popen(["bash", "-c", "exec -a pytest-bystander sleep 300"])
    try:
        # The large stage over a file without gpu-marked tests: nothing collected, then reap.
        result = _run_script(tmp_path, TEST_STAGES="large", TEST_PATHS="tests/test_cli.py")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "(stage large: no tests collected)" in result.stdout
        assert "== fuzz" not in result.stdout, "the fuzz part ran although TEST_STAGES did not name it"
        assert bystander.poll() is None, "gpu_run.sh's reap killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
