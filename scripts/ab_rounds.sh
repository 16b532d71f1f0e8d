#!/usr/bin/env bash
# Alternating A/B rounds of package copies on one GPU machine: for each round, for each package DIR
# (a copy of hf_triton_attn/ under DIR, or "tree" for the working tree), one process of
# benchmarks.ab_configs and, with KEY_MASKS=1, one of benchmarks.bench_key_masks (KEY_MASKS_ARGS=--graph:
# timed as CUDA-graph replays, without the host's launch cost).
#
#   ROUNDS=2 CONFIGS=64:1024:c:fwd,128:1024:nc:fwd DTYPE=bf16 KEY_MASKS=1 bash scripts/ab_rounds.sh .base tree
#
# Timings are comparable only within one call (one machine); every process reps once per round.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton_cache}"
for round in $(seq 1 "${ROUNDS:-2}"); do
    for src in "$@"; do
        if [ "$src" = tree ]; then unset HF_TRITON_ATTN_SOURCE; else export HF_TRITON_ATTN_SOURCE="$src"; fi
        echo "== round $round src=$src"
        if [ -n "${CONFIGS:-}" ]; then
            python -m benchmarks.ab_configs --configs "$CONFIGS" --dtype "${DTYPE:-bf16}" --reps 1 2>&1 | grep -v "^#"
        fi
        if [ "${KEY_MASKS:-0}" = 1 ]; then
            python -m benchmarks.bench_key_masks --reps 1 ${KEY_MASKS_ARGS:-} 2>&1 | grep -v "^#"
        fi
    done
done
