"""Summarize the JSON files examples/finetune.py wrote (``--json-out``) into one table.

    python examples/summarize_runs.py OUT_DIR [--status OUT_DIR/status.tsv] [--out OUT_DIR/summary]

For every run: mode (1 process / DDP / FSDP), attention, step time, tokens/s, peak memory, how many
attention calls ran our kernel (and how many took the varlen path), the final loss, the largest loss
difference from the matching 1-process run (same model, attention, precision, data and global batch),
ours-vs-sdpa throughput for the same configuration, and the checkpoint check. Runs listed in the status
file (name, exit code or a word such as "skipped", seconds; tab-separated) without a JSON are reported as
failed (or with that word).
Writes ``<out>.md`` and ``<out>.json``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Loss-parity flags: fp32 runs differ from the 1-process run only by the grouping of float sums
# (tests/test_distributed.py bounds that by ulps on CPU); GPU GEMMs may pick other kernels for another
# batch shape, and bf16 rounds every matmul input, so the flags are looser there.
PARITY_RTOL = {False: 1e-3, True: 3e-2}


def load_runs(directory: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted(directory.glob("*.json")):
        if path.stem.startswith("summary"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            runs[path.stem] = {"ok": False, "error": f"unreadable JSON: {exc}"}
            continue
        if isinstance(data, dict) and "losses" in data:
            runs[path.stem] = data
    return runs


def load_status(path: Path | None) -> dict[str, tuple[int | str, float]]:
    """run -> (exit code, or a word such as "skipped"; seconds)."""
    status = {}
    if path is None or not path.exists():
        return status
    for line in path.read_text().splitlines():
        parts = line.strip().split("\t")
        if len(parts) < 2 or not parts[0]:
            continue
        code = int(parts[1]) if parts[1].lstrip("-").isdigit() else parts[1]
        try:
            secs = float(parts[2]) if len(parts) > 2 else float("nan")
        except ValueError:
            secs = float("nan")
        status[parts[0]] = (code, secs)
    return status


def mode(run: dict) -> str:
    if run.get("world_size", 1) == 1:
        return "1 proc"
    return "FSDP" if run.get("fsdp") else "DDP"


def data_key(run: dict) -> tuple:
    """Runs with the same key saw the same global batches (and the same initial weights)."""
    return (run.get("model"), run.get("size"), run.get("model_path"), bool(run.get("padding_free")),
            bool(run.get("bf16")), run.get("global_batch"), run.get("seq_len"), run.get("steps"), run.get("lr"))


def loss_diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / |b|) over the common steps; nan when there is nothing to compare."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs or len(a) != len(b):
        return float("nan"), float("nan")
    return max(abs(x - y) for x, y in pairs), max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def summarize(runs: dict[str, dict], status: dict[str, tuple[int | str, float]]) -> list[dict]:
    rows = []
    singles = {}
    for name, r in runs.items():
        if r.get("ok") and r.get("world_size", 1) == 1:
            singles.setdefault((data_key(r), r.get("attn")), name)
    by_cfg = {(data_key(r), mode(r), r.get("attn")): r for r in runs.values() if r.get("ok")}
    for name in sorted(set(runs) | set(status)):
        r = runs.get(name)
        rc, secs = status.get(name, (None, float("nan")))
        if r is None or not r.get("ok"):
            if isinstance(rc, str):
                state = rc
            else:
                state = f"FAILED rc={rc}" if rc not in (None, 0) else "no JSON"
            rows.append({"run": name, "status": state, "seconds": secs, "error": (r or {}).get("error")})
            continue
        row = {
            "run": name, "status": "ok", "seconds": secs, "model": r["model"], "size": r.get("size"),
            "attn": r["attn"], "mode": mode(r), "world": r.get("world_size"), "bf16": bool(r.get("bf16")),
            "padding_free": bool(r.get("padding_free")), "global_batch": r.get("global_batch"),
            "seq_len": r.get("seq_len"), "steps": len(r["losses"]),
            "step_ms": 1e3 * r["step_time_s"] if r.get("step_time_s") else float("nan"),
            "tokens_per_s": r.get("tokens_per_s") or float("nan"), "samples_per_s": r.get("samples_per_s"),
            "peak_mem_gib": (r.get("peak_memory_bytes") or 0) / 2**30,
            "kernel_calls": r.get("kernel_calls"), "varlen_calls": r.get("varlen_calls"),
            "attention_calls": r.get("attention_calls"),
            "fallback_calls": (r["attention_calls"] - r["kernel_calls"]) if r.get("attn") == "hf_triton_attn"
            and r.get("attention_calls") is not None and r.get("kernel_calls") is not None else None,
            "first_loss": r["losses"][0] if r["losses"] else float("nan"),
            "final_loss": r["losses"][-1] if r["losses"] else float("nan"),
        }
        ref_name = singles.get((data_key(r), r["attn"]))
        if ref_name is not None and ref_name != name:
            diff, rel = loss_diff(r["losses"], runs[ref_name]["losses"])
            row.update(parity_ref=ref_name, loss_max_abs_diff=diff, loss_max_rel_diff=rel,
                       parity_ok=bool(rel <= PARITY_RTOL[row["bf16"]]) if not math.isnan(rel) else None)
        if r["attn"] == "hf_triton_attn":
            sdpa = by_cfg.get((data_key(r), mode(r), "sdpa"))
            if sdpa and sdpa.get("tokens_per_s"):
                row["speed_vs_sdpa"] = row["tokens_per_s"] / sdpa["tokens_per_s"]
        ck = r.get("checkpoint")
        if ck:
            row["checkpoint_bitwise_equal"] = ck.get("bitwise_equal")
            row["checkpoint_format"] = ck.get("format")
        rows.append(row)
    return rows


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return format(v, spec or ".4g")
    return str(v)


COLUMNS = [
    ("run", "run", ""), ("status", "status", ""), ("mode", "mode", ""), ("attn", "attn", ""),
    ("bf16", "bf16", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ".0f"),
    ("speed_vs_sdpa", "vs sdpa", ".2f"), ("peak_mem_gib", "peak GiB", ".2f"),
    ("kernel_calls", "kernel", ""), ("varlen_calls", "varlen", ""), ("fallback_calls", "eager fallback", ""),
    ("final_loss", "final loss", ".5f"),
    ("loss_max_abs_diff", "max |dloss| vs 1 proc", ".2e"), ("parity_ok", "parity", ""),
    ("checkpoint_bitwise_equal", "ckpt bitwise", ""), ("seconds", "wall s", ".0f"),
]


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), spec) for k, _, spec in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--status", type=Path, default=None, help="tab-separated name, exit code, seconds")
    p.add_argument("--out", type=Path, default=None, help="prefix for .md and .json (default DIR/summary)")
    args = p.parse_args(argv)
    status_path = args.status if args.status is not None else args.directory / "status.tsv"
    rows = summarize(load_runs(args.directory), load_status(status_path))
    table = markdown(rows)
    print(table)
    out = args.out if args.out is not None else args.directory / "summary"
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    failed = [r["run"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"failed or missing: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
