#!/usr/bin/env bash
# Ahead-of-time sm_90 compile check (scripts/aot_compile.py) with two Tritons:
#   1. the installed one (the latest, what CI's environment has);
#   2. Triton 3.6.0, the GPU machine's version, installed with --no-deps into a throwaway target
#      dir that is put first on PYTHONPATH (reused when it already holds 3.6.0).
# Needs no GPU. Extra arguments go to aot_compile.py (e.g. -j 2, --filter _fwd_kernel).
# Environment: PYTHON (default python), TRITON36_DIR (default /tmp/triton36),
#   TRITON36_WHEEL (a local triton 3.6.0 wheel to install instead of asking PyPI),
#   AOT_LATEST_EVERY=N (the installed Triton compiles every N-th specialization of each kernel, the
#   3.6.0 run all of them; CI sets 3).
# Exits non-zero if either run fails.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
T36_VERSION=3.6.0
T36_DIR=${TRITON36_DIR:-/tmp/triton36}
summary=()
status=0

triton_version() {  # $1: PYTHONPATH to use ("" = as is)
    PYTHONPATH="$1" "$PY" -c 'import triton; print(triton.__version__, triton.__file__)' 2>/dev/null
}

run_check() {  # $1: label, $2: PYTHONPATH ("" = as is); rest: aot_compile.py arguments
    local label=$1 pypath=$2 start rc
    shift 2
    echo "=== aot_check: $label: $(triton_version "$pypath")"
    start=$(date +%s)
    PYTHONPATH="$pypath" "$PY" scripts/aot_compile.py "$@"
    rc=$?
    summary+=("$label: exit $rc in $(( $(date +%s) - start )) s")
    [ "$rc" -eq 0 ] || status=1
}

# 1. the installed Triton
run_check "installed triton" "${PYTHONPATH:-}" --every "${AOT_LATEST_EVERY:-1}" "$@"

# 2. Triton 3.6.0 in a target dir
t36_path="$T36_DIR${PYTHONPATH:+:$PYTHONPATH}"
have=$(triton_version "$t36_path" | cut -d' ' -f1)
if [ "$have" != "$T36_VERSION" ] || [ ! -f "$T36_DIR/triton/__init__.py" ]; then
    echo "=== aot_check: installing triton $T36_VERSION into $T36_DIR"
    rm -rf "$T36_DIR"
    if [ -n "${TRITON36_WHEEL:-}" ]; then
        "$PY" -m pip install --quiet --no-deps --target "$T36_DIR" "$TRITON36_WHEEL"
    else
        "$PY" -m pip install --quiet --no-deps --target "$T36_DIR" "triton==$T36_VERSION"
    fi || { echo "aot_check: pip could not install triton $T36_VERSION"; exit 1; }
fi
read -r have where <<< "$(triton_version "$t36_path")"
if [ "$have" != "$T36_VERSION" ] || [[ "$where" != "$T36_DIR"/* ]]; then
    echo "aot_check: expected triton $T36_VERSION from $T36_DIR, got '${have:-none}' from '${where:-?}'"
    exit 1
fi
run_check "triton $T36_VERSION" "$t36_path" "$@"

echo "=== aot_check summary"
printf '  %s\n' "${summary[@]}"
exit "$status"
