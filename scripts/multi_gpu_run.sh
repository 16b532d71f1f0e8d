#!/usr/bin/env bash
# Multi-GPU training runs (2 GPUs of one host): GPT-2 124M and BERT-base, random init, synthetic data,
# examples/finetune.py under `accelerate launch` with DDP and FSDP2 (full shard), each with our attention
# (hf_triton_attn) and with sdpa, plus 1-GPU runs of the same global batch for loss parity and an FSDP
# sharded checkpoint saved, merged and loaded into an unpatched eager model (bitwise check).
#
#   OUT=/some/dir bash scripts/multi_gpu_run.sh
#
# OUT (default ./multi_gpu_out) receives one JSON per run, logs/<run>.log, status.tsv (run, exit code
# or "skipped" / "timeout", seconds) and summary.md / summary.json (printed at the end). Every run is
# recorded and the script goes on when one fails. A run is cut after RUN_TIMEOUT seconds (default 150) and no run starts
# after BUDGET seconds (default 470) from the start. STEPS (default 30) sets the GPT-2/BERT step count.
# Checkpoints go to CKPT_DIR (default /tmp/hf_triton_attn_ckpt), never under OUT, and are deleted.
# SMOKE=1 checks the plumbing on a CPU-only machine: tiny models, 4 steps, the reference attention, the
# "2-GPU" runs as 2 CPU processes (gloo).
# PYTHON (default python3) is the interpreter. Installs nothing. Exit status 0 when every run succeeded, else 1.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./multi_gpu_out}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
CKPT_DIR="${CKPT_DIR:-/tmp/hf_triton_attn_ckpt}"
RUN_TIMEOUT="${RUN_TIMEOUT:-150}"
BUDGET="${BUDGET:-470}"
STEPS="${STEPS:-30}"
START=$(date +%s)
PY="${PYTHON:-python3}"
: > "$OUT/status.tsv"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET HF_TRITON_ATTN_BACKEND  # the compiled kernels, not the interpreter / reference
# NVLink multicast stays off (the device docs: it can take the host's shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1

echo "== devices"
nvidia-smi -L || true
echo "== versions"
"$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version('triton')}, transformers {version('transformers')}, accelerate {version('accelerate')}, "
      f"GPUs {torch.cuda.device_count()}")
EOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
GSIZE="--size base --seq-len 1024"
BSIZE="--size base --seq-len 512"
FSIZE="--size base --seq-len 512"
if [ "${SMOKE:-0}" = "1" ]; then
    echo "== SMOKE=1: tiny models on the CPU, reference attention"
    export HF_TRITON_ATTN_BACKEND=reference
    NGPU=2
    STEPS=4
    GSIZE="--size tiny --seq-len 64"
    BSIZE="--size tiny --seq-len 32"
    FSIZE="--size tiny --seq-len 32"
fi

# -- process-tree handling: torchrun starts its workers in new sessions, so a timeout must walk the tree
descendants() {
    local p c
    for p in "$@"; do
        for c in $(cat /proc/"$p"/task/*/children 2>/dev/null || ps -o pid= --ppid "$p" 2>/dev/null); do
            echo "$c"
            descendants "$c"
        done
    done
}

kill_tree() {
    local pids
    pids="$1 $(descendants "$1")"
    # shellcheck disable=SC2086  # a list of pids
    kill -TERM $pids 2>/dev/null
    sleep 5
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
}

# run NAME WHERE ARGS...   WHERE: gpu0 | gpu1 (one GPU) | ddp | fsdp (accelerate launch, 2 processes)
run() {
    local name=$1 where=$2
    shift 2
    local now left limit t0 rc secs pid watchdog log="$OUT/logs/$name.log"
    now=$(date +%s)
    left=$((START + BUDGET - now))
    if [ "$left" -lt 30 ]; then
        printf '%s\tskipped\t0\n' "$name" >>"$OUT/status.tsv"
        echo "== $name: skipped (time budget spent)"
        return 0
    fi
    if [ "$where" != gpu0 ] && [ "$where" != gpu1 ] && [ "$NGPU" -lt 2 ]; then
        printf '%s\tskipped\t0\n' "$name" >>"$OUT/status.tsv"
        echo "== $name: skipped ($NGPU GPU(s))"
        return 0
    fi
    limit=$RUN_TIMEOUT
    [ "$left" -lt "$limit" ] && limit=$left
    local cmd
    case $where in
        gpu0 | gpu1) cmd=(env CUDA_VISIBLE_DEVICES="${where#gpu}" "$PY" examples/finetune.py) ;;
        ddp | fsdp)
            cmd=("$PY" -m accelerate.commands.launch --config_file "examples/accelerate/$where.yaml"
                 --num_processes 2 --main_process_port 0 examples/finetune.py)
            ;;
        *) echo "run: unknown WHERE $where" >&2; return 0 ;;
    esac
    echo "== $name ($where): ${cmd[*]} $*"
    t0=$(date +%s)
    "${cmd[@]}" "$@" --json-out "$OUT/$name.json" --output-dir "$CKPT_DIR/$name" >"$log" 2>&1 &
    pid=$!
    (
        trap 'kill "$sp" 2>/dev/null; exit 0' TERM
        sleep "$limit" &
        sp=$!
        wait "$sp"
        trap '' TERM  # from here on, finish the kill (TERM, then KILL) even when the run ends meanwhile
        echo "!! $name: timed out after ${limit}s" >>"$log"
        touch "$OUT/logs/$name.timeout"
        kill_tree "$pid"
    ) >/dev/null 2>&1 &
    watchdog=$!
    wait "$pid"
    rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    secs=$(($(date +%s) - t0))
    if [ -e "$OUT/logs/$name.timeout" ]; then
        rm -f "$OUT/logs/$name.timeout"
        printf '%s\ttimeout\t%s\n' "$name" "$secs" >>"$OUT/status.tsv"
    else
        printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >>"$OUT/status.tsv"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "!! $name failed (exit $rc, ${secs}s); last lines of logs/$name.log:"
        tail -n 15 "$log"
    else
        grep -E "^(losses|checkpoint|gpt2 |bert )" "$log" | cut -c1-300
        echo "   (${secs}s)"
    fi
    rm -rf "${CKPT_DIR:?}/$name"
    return 0
}

# two single-GPU runs side by side, one per GPU (the timings of one do not disturb the other's GPU)
pair() {  # pair NAME_A "ARGS_A" NAME_B "ARGS_B"
    if [ "$NGPU" -ge 2 ]; then
        # shellcheck disable=SC2086  # the argument strings are word lists on purpose
        run "$1" gpu0 $2 &
        # shellcheck disable=SC2086
        run "$3" gpu1 $4 &
        wait
    else
        # shellcheck disable=SC2086
        run "$1" gpu0 $2
        # shellcheck disable=SC2086
        run "$3" gpu0 $4
    fi
}

G="--model gpt2 $GSIZE --bf16 --steps $STEPS --lr 3e-4 --timing-warmup 5"
B="--model bert $BSIZE --bf16 --steps $STEPS --lr 1e-4 --timing-warmup 5"
# global batch 16 (GPT-2) / 32 (BERT): 1 GPU x 2B == 2 GPUs x B

echo "== GPT-2 124M, bf16, seq 1024"
pair gpt2_1gpu_ours "$G --attn hf_triton_attn --batch-size 16" gpt2_1gpu_sdpa "$G --attn sdpa --batch-size 16"
# shellcheck disable=SC2086
{
    run gpt2_ddp_ours ddp $G --attn hf_triton_attn --batch-size 8
    run gpt2_ddp_sdpa ddp $G --attn sdpa --batch-size 8
    run gpt2_fsdp_ours fsdp $G --attn hf_triton_attn --batch-size 8 --save-checkpoint
    run gpt2_fsdp_sdpa fsdp $G --attn sdpa --batch-size 8
}

echo "== BERT-base classifier, bf16, seq <= 512 (random lengths, padded)"
pair bert_1gpu_ours "$B --attn hf_triton_attn --batch-size 32" bert_1gpu_sdpa "$B --attn sdpa --batch-size 32"
# shellcheck disable=SC2086
{
    run bert_ddp_ours ddp $B --attn hf_triton_attn --batch-size 16
    run bert_ddp_sdpa ddp $B --attn sdpa --batch-size 16
    run bert_fsdp_ours fsdp $B --attn hf_triton_attn --batch-size 16 --save-checkpoint
    run bert_fsdp_sdpa fsdp $B --attn sdpa --batch-size 16
}

echo "== GPT-2 padding-free (DataCollatorWithFlattening, varlen kernel); fp32 parity runs (DDP, FSDP)"
P="--model gpt2 $GSIZE --bf16 --steps $STEPS --lr 3e-4 --timing-warmup 5 --padding-free"
F="--model gpt2 $FSIZE --steps 10 --lr 3e-4 --timing-warmup 3 --attn hf_triton_attn"
pair gpt2_pf_1gpu_ours "$P --attn hf_triton_attn --batch-size 16" gpt2_fp32_1gpu_ours "$F --batch-size 8"
# shellcheck disable=SC2086
{
    run gpt2_pf_ddp_ours ddp $P --attn hf_triton_attn --batch-size 8
    run gpt2_fp32_ddp_ours ddp $F --batch-size 4
    run gpt2_fp32_fsdp_ours fsdp $F --batch-size 4  # FSDP's bf16 policy casts whole layers: fp32 is the tight pair
}

echo "== summary ($(($(date +%s) - START))s)"
"$PY" examples/summarize_runs.py "$OUT" || echo "!! summarize_runs.py failed"
if awk -F'\t' '$2 != "0" { bad = 1 } END { exit !bad }' "$OUT/status.tsv"; then
    exit 1
fi
exit 0
