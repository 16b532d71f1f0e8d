#!/usr/bin/env bash
# The one script run on the GPU machine: GPU tests, the GPU fuzz run, host overhead per call,
# then the kernel and model benchmarks.
#
#   OUT=/some/dir BENCH_ARGS="--quick" bash scripts/gpu_run.sh
#
# TEST_PATHS (default tests) limits the GPU test stage; TEST_STAGES (default "small large fuzz") picks its
# parts: "small" (the suite but the fuzz and the gpu-marked tests, in parallel), "large" (the gpu-marked
# tests, serially) and "fuzz" (tests/test_fuzz.py: FUZZ_CASES random cases, default 100, spread over
# FUZZ_WORKERS processes with distinct seeds, each case a new kernel specialisation to compile;
# FUZZ_TIMEOUT seconds, default none, stops it at a deadline and the cases logged so far still count).
# One 10-minute device call fits one part: on a fresh machine "small" with the fuzz inside took 7 min
# (H100, session 17) and over 9.8 min (H200, session 20: without the fuzz 1.5 min warm), "large" over
# 6 min. Compiled kernels go to TRITON_CACHE_DIR (default ./.triton_cache, git-ignored), so a second
# call on the same machine skips most compiling.
# OUT (default ./gpu_out) receives gpu_tests.log, fuzz.log / fuzz_cases.txt, host_overhead.json, bench.log,
# kernels.json, models.json/log and the PNGs (and sweep.json/sweep.log with SWEEP=1). TEST_ARGS /
# FUZZ_ARGS / BENCH_ARGS / MODELS_ARGS / SWEEP_ARGS pass options on; TESTS=0 / HOST=0 / BENCH=0 /
# MODELS=0 skip a stage (FUZZ=1 runs the fuzz part even with TESTS=0); HOST_BACKWARD=1 adds
# benchmarks/host_backward.py --parts; BASE=DIR benchmarks an older copy of the package first, on the
# same machine. On a multi-GPU host, HF_TRITON_ATTN_TEST_GPUS=N spreads the test workers over N GPUs.
# Installs nothing. Exit status: the tests' when they failed, else the benchmark's.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # a leftover interpreter switch would turn every GPU number into a CPU one
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton_cache}"

# Every process this script starts carries this token in its environment, xdist workers too (they
# inherit it even after a timed-out pytest leaves them to init), so reap kills only this run's
# leftovers. A plain `pgrep -f pytest` also killed unrelated runs: a caller whose command line said
# "pytest" (a device call that ran a test before this script), and on the CPU box a CI run beside a
# local try of this script (session 17).
export HF_TRITON_ATTN_GPU_RUN="$$.$RANDOM"

reap() {  # xdist workers outlive a timed-out pytest and would skew every later timing
    local pid
    for pid in $(pgrep -f "pytest|execnet"); do
        [ "$pid" = "$$" ] && continue
        if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "HF_TRITON_ATTN_GPU_RUN=$HF_TRITON_ATTN_GPU_RUN"; then
            kill -9 "$pid" 2>/dev/null
        fi
    done
    true
}

echo "== devices"
nvidia-smi -L
echo "== versions"
python - <<'EOF'
import importlib.metadata as md
import platform

import torch
import triton

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, transformers {version('transformers')}")
EOF

echo "== tests on the GPU (the whole suite compiled, plus the gpu-marked large/bf16/sync tests)"
export HF_TRITON_ATTN_TEST_DEVICE=cuda
tests_rc=0
stages=" ${TEST_STAGES:-small large fuzz} "
if [ "${TESTS:-1}" = "1" ]; then
    # small tests in parallel (compilation is the cost), then the large gpu-marked ones alone, then
    # the fuzz. The fuzz has a part of its own: in the small part, even in one shard per worker, its
    # 100 cases kept the part running past 450 s after the other 727 tests had finished in 92 s
    # (H200, warm Triton cache, session 20).
    for stage in $stages; do
        case "$stage" in
            small | large | fuzz) ;;
            *) echo "TEST_STAGES: expected words 'small', 'large' and/or 'fuzz', got '${TEST_STAGES}'" >&2; exit 2 ;;
        esac
    done
    : > "$OUT/gpu_tests.log"
    stage_done() {  # $1 = stage name, $2 = pytest's exit status; 5 (nothing collected) counts as passed
        reap
        tail -1 "$OUT/gpu_tests.log"; grep -E "^FAILED" "$OUT/gpu_tests.log" | cut -c1-300 | head
        if [ "$2" -eq 5 ]; then
            echo "(stage $1: no tests collected)"
        elif [ "$tests_rc" -eq 0 ]; then
            tests_rc=$2
        fi
    }
    # shellcheck disable=SC2086  # TEST_PATHS / TEST_ARGS are lists of words on purpose
    if [[ "$stages" == *" small "* ]]; then
        python -m pytest ${TEST_PATHS:-tests} -m "not gpu" -q -rf -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
            --ignore tests/test_fuzz.py ${TEST_ARGS:-} >> "$OUT/gpu_tests.log" 2>&1
        stage_done small $?
    fi
    # shellcheck disable=SC2086
    if [[ "$stages" == *" large "* ]]; then
        python -m pytest ${TEST_PATHS:-tests} -m gpu -q -rf -p no:cacheprovider ${TEST_ARGS:-} >> "$OUT/gpu_tests.log" 2>&1
        stage_done large $?
    fi
fi

if [ "${FUZZ:-0}" = "1" ] || { [ "${TESTS:-1}" = "1" ] && [[ "$stages" == *" fuzz "* ]]; }; then
    echo "== fuzz on the GPU: ${FUZZ_CASES:-100} random cases vs the float64 reference"
    # shellcheck disable=SC2086
    HF_TRITON_ATTN_FUZZ_LOG="$OUT/fuzz_cases.txt" \
    HF_TRITON_ATTN_FUZZ_EXAMPLES="${FUZZ_CASES:-100}" HF_TRITON_ATTN_FUZZ_SHARDS="${FUZZ_WORKERS:-16}" \
        timeout "${FUZZ_TIMEOUT:-0}" python -m pytest tests/test_fuzz.py -q -rf -p no:cacheprovider \
        -n "${FUZZ_WORKERS:-16}" --timeout 1200 --hypothesis-show-statistics ${FUZZ_ARGS:-} > "$OUT/fuzz.log" 2>&1
    fuzz_rc=$?
    reap
    if [ "$fuzz_rc" -eq 124 ]; then
        echo "fuzz stopped at the FUZZ_TIMEOUT deadline (${FUZZ_TIMEOUT}s); counting the cases it logged"
        n_fail=$(grep -c '^FAIL' "$OUT/fuzz_cases.txt" 2>/dev/null)
        fuzz_rc=$([ "${n_fail:-0}" -eq 0 ] && echo 0 || echo 1)
    fi
    tail -3 "$OUT/fuzz.log"
    n_pass=$(grep -vc '^FAIL' "$OUT/fuzz_cases.txt" 2>/dev/null)
    n_fail=$(grep -c '^FAIL' "$OUT/fuzz_cases.txt" 2>/dev/null)
    echo "fuzz: ${n_pass:-0} cases passed, ${n_fail:-0} failed (incl. hypothesis shrinking; fuzz_cases.txt)"
    [ "$tests_rc" -eq 0 ] && tests_rc=$fuzz_rc
fi

if [ "${HOST:-1}" = "1" ]; then
    echo "== host time per attention call (decode shape)"
    python -m benchmarks.host_overhead --out "$OUT" 2>&1 | head -40
fi

if [ "${HOST_BACKWARD:-0}" = "1" ]; then
    echo "== host time of training calls, each piece on the main thread and on another thread"
    python -m benchmarks.host_backward --parts 2>&1 | tail -60
fi

# BASE=DIR (a copy of an older hf_triton_attn package, e.g. `git archive REV hf_triton_attn | tar -x -C DIR`):
# the kernel and model benchmarks run for it first, on the same machine (OUT/base, bench_base.log).
bench_rc=0
if [ -n "${BASE:-}" ] && [ "${BENCH:-1}" = "1" ]; then
    echo "== kernel benchmark, BASE package $BASE"
    # shellcheck disable=SC2086
    HF_TRITON_ATTN_SOURCE="$BASE" python benchmarks/bench_kernels.py --out "$OUT/base" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/bench_base.log"
fi
if [ "${BENCH:-1}" = "1" ]; then
    echo "== kernel benchmark"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    python benchmarks/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi

models_rc=0
if [ -n "${BASE:-}" ] && [ "${MODELS:-1}" = "1" ]; then
    echo "== Hugging Face end-to-end benchmark, BASE package $BASE"
    # shellcheck disable=SC2086
    HF_TRITON_ATTN_SOURCE="$BASE" python benchmarks/bench_models.py --out "$OUT/base" ${MODELS_ARGS:-} 2>&1 \
        | tee "$OUT/models_base.log"
fi
if [ "${MODELS:-1}" = "1" ]; then
    echo "== Hugging Face end-to-end benchmark (patched vs sdpa vs eager)"
    # shellcheck disable=SC2086
    python benchmarks/bench_models.py --out "$OUT" ${MODELS_ARGS:-} 2>&1 | tee "$OUT/models.log"
    models_rc=${PIPESTATUS[0]}
    [ "$bench_rc" -eq 0 ] && bench_rc=$models_rc
fi

if [ "${SWEEP:-0}" = "1" ]; then
    echo "== launch-config sweep"
    python benchmarks/sweep_configs.py --out "$OUT" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log"
fi

echo "== exit: tests rc=$tests_rc, benchmark rc=$bench_rc"
if [ "$tests_rc" -ne 0 ]; then
    exit "$tests_rc"
fi
exit "$bench_rc"
