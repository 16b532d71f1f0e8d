"""Patched models under ``accelerate launch``: DDP and FSDP with two CPU processes (gloo), against one process.

Each test runs examples/finetune.py (transformers.Trainer, synthetic seeded data, tiny GPT-2 / BERT, dropout 0)
in subprocesses with the real Triton kernels through the interpreter (HF_TRITON_ATTN_BACKEND=interpret,
TRITON_INTERPRET=1): at these sizes (2 layers, 2 heads, 32 tokens) an interpreted step costs 0.3-1.5 s, and
the whole file takes 1.5 minutes on 2 idle cores (3.5 under a load of 5), testing the kernel itself, not
the eager reference.

Launch: ``accelerate launch --config_file examples/accelerate/{ddp,fsdp}.yaml`` (run as
``python -m accelerate.commands.launch`` to pin this interpreter). ``accelerate launch --cpu --num_processes 2``
would start ONE process (accelerate's CPU launcher needs MPI for more); the config files' torchrun launch
works on CPU because the script itself switches Trainer to ``use_cpu`` when CUDA is absent.

Loss parity: a 1-process run with per-device batch 2B and a 2-process run with B each see the same global
batches (asserted from the sample ids the script records) from the same initial weights, so their per-step
losses differ only by how fp32 sums are grouped (DDP's gradient all-reduce adds two half-batch sums, FSDP
reduce-scatters them, the logged loss is a mean of per-rank means). Each regrouping costs a few ulps, and
AdamW carries the weight difference into later steps: the bound is 16 ulps of the loss per step, growing
linearly (``_assert_same_curve``). Measured: at most 1 ulp (4.8e-7 at a loss of 5.4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hf_triton_attn  # noqa: E402

from .helpers import ON_GPU  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(ON_GPU, reason="the CPU (gloo) path; scripts/multi_gpu_run.sh runs these scripts on GPUs"),
]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune.py"
CONFIGS = ROOT / "examples" / "accelerate"
STEPS = 4
B = 2  # per-device batch of the 2-process runs; the 1-process runs take 2 * B
EPS32 = torch.finfo(torch.float32).eps
TIMEOUT_S = 300


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_TRITON_ATTN_BACKEND="interpret", TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    # the subprocesses import the same hf_triton_attn as this test process
    pkg_root = str(Path(hf_triton_attn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run(out_dir: Path, name: str, *script_args: str, nproc: int, config: str = "ddp") -> dict:
    """Run examples/finetune.py with ``nproc`` processes; return its JSON summary (rank 0)."""
    json_out = out_dir / f"{name}.json"
    args = [str(SCRIPT), "--steps", str(STEPS), "--seq-len", "32", "--json-out", str(json_out),
            "--output-dir", str(out_dir / name), *script_args]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
               "--num_processes", str(nproc), "--main_process_port", "0", *args]
    _launch(cmd)
    if not json_out.exists():
        pytest.fail(f"{' '.join(cmd)}\nwrote no {json_out.name}")
    return json.loads(json_out.read_text())


def _launch(cmd: list[str]) -> None:
    """Run ``cmd``; on failure or timeout fail with the tail of its output. torchrun starts its workers in
    new sessions, so a timeout kills the whole process tree (psutil comes with accelerate)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        import psutil

        try:
            tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = [proc]
        for p in tree:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)}\ntimed out after {TIMEOUT_S} s:\n{out[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexit {proc.returncode} after {time.perf_counter() - t0:.0f} s:\n{out[-6000:]}")


def _assert_same_curve(single: list[float], multi: list[float]) -> None:
    assert len(single) == len(multi) == STEPS
    for step, (a, b) in enumerate(zip(single, multi)):
        tol = 16 * (step + 1) * EPS32 * max(abs(a), 1.0)
        assert abs(a - b) <= tol, f"step {step}: 1 process {a!r} vs 2 processes {b!r} (|diff| > {tol:.2e})"


def _assert_kernel_ran_everywhere(run: dict, layers: int = 2) -> None:
    """Every attention call of every step ran our kernel, on every rank (no eager fallback)."""
    summary = {k: run[k] for k in ("attn", "world_size", "attention_calls", "kernel_calls", "kernel_calls_per_rank")}
    assert run["attention_calls"] == STEPS * layers, summary
    assert run["kernel_calls"] == run["attention_calls"], (
        f"only {run['kernel_calls']} of {run['attention_calls']} attention calls ran the kernel, the rest the "
        f"eager fallback (an argument Trainer passes, e.g. num_items_in_batch, taken as unknown?): {summary}")
    assert run["kernel_calls_per_rank"] == [STEPS * layers] * run["world_size"], summary


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def gpt2_single(out_dir) -> dict:
    return _run(out_dir, "gpt2_1proc", "--model", "gpt2", "--batch-size", str(2 * B), nproc=1)


def test_ddp_gpt2_matches_one_process(out_dir, gpt2_single):
    ddp = _run(out_dir, "gpt2_ddp", "--model", "gpt2", "--batch-size", str(B), nproc=2)
    assert ddp["world_size"] == 2 and ddp["distributed_type"] == "MULTI_CPU"
    assert ddp["wrapped_model_class"] == "DistributedDataParallel"
    assert ddp["global_batch"] == gpt2_single["global_batch"] == 2 * B
    assert ddp["batches"] == gpt2_single["batches"], "the global batches must be the same sets of samples"
    assert len({i for b in ddp["batches"] for i in b}) == STEPS * 2 * B  # one epoch, every sample once
    _assert_kernel_ran_everywhere(gpt2_single)
    _assert_kernel_ran_everywhere(ddp)
    _assert_same_curve(gpt2_single["losses"], ddp["losses"])
    assert "patched by hf_interface" in ddp["patch_report"]


def test_ddp_bert_classifier_matches_one_process(out_dir):
    """Random lengths, right padding, labels. Also guards the world-size loss scaling that transformers
    5.17 applies to BertForSequenceClassification (examples/finetune.py sets model_accepts_loss_kwargs)."""
    single = _run(out_dir, "bert_1proc", "--model", "bert", "--batch-size", str(2 * B), nproc=1)
    ddp = _run(out_dir, "bert_ddp", "--model", "bert", "--batch-size", str(B), nproc=2)
    assert ddp["distributed_type"] == "MULTI_CPU" and ddp["wrapped_model_class"] == "DistributedDataParallel"
    assert ddp["batches"] == single["batches"]
    _assert_kernel_ran_everywhere(single)
    _assert_kernel_ran_everywhere(ddp)
    _assert_same_curve(single["losses"], ddp["losses"])


def test_fsdp_gpt2_trains_and_sharded_checkpoint_loads_into_eager_model(out_dir, gpt2_single):
    """FSDP2 full shard through accelerate (examples/accelerate/fsdp.yaml): the patch survives wrapping (the
    kernel runs on every rank after fully_shard), the loss curve matches one process, and the sharded (DCP)
    checkpoint Trainer writes loads into a never-patched eager model with bitwise identical weights."""
    fsdp = _run(out_dir, "gpt2_fsdp", "--model", "gpt2", "--batch-size", str(B), "--save-checkpoint",
                nproc=2, config="fsdp")
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp"], fsdp["distributed_type"]
    assert fsdp["wrapped_model_class"].startswith("FSDP"), fsdp["wrapped_model_class"]  # fully_shard's class
    assert fsdp["attn_implementation_after_wrap"] == "hf_triton_attn"
    _assert_kernel_ran_everywhere(fsdp)
    assert fsdp["batches"] == gpt2_single["batches"]
    _assert_same_curve(gpt2_single["losses"], fsdp["losses"])
    ck = fsdp["checkpoint"]
    assert ck["format"].startswith("fsdp sharded"), ck
    assert sorted(f for f in ck["files"] if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"], ck
    assert ck["eager"] == "eager" and not ck["patched"]
    assert not ck["load_missing"] and not ck["load_unexpected"], ck
    assert ck["bitwise_equal"] and not ck["unequal"] and ck["num_tensors"] > 0, ck
    assert ck["changed_from_init"] > 0, "the checkpoint must hold the trained weights, not the initial ones"


def test_padding_free_ddp_takes_the_varlen_path(out_dir):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) under DDP: every attention call on every
    rank reaches the kernel with cu_seqlens (not merely "it runs"), and the curve matches one process."""
    single = _run(out_dir, "gpt2_pf_1proc", "--model", "gpt2", "--padding-free", "--batch-size", str(2 * B),
                  nproc=1)
    ddp = _run(out_dir, "gpt2_pf_ddp", "--model", "gpt2", "--padding-free", "--batch-size", str(B), nproc=2)
    for run in (single, ddp):
        _assert_kernel_ran_everywhere(run)
        assert run["varlen_calls_per_rank"] == run["kernel_calls_per_rank"], run
    assert ddp["batches"] == single["batches"]
    _assert_same_curve(single["losses"], ddp["losses"])


FORWARD_ADAPTER_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import hf_triton_attn
from hf_triton_attn.patches import torch_mha

calls = [0]
real = torch_mha.flash_attention
def counted(*a, **k):
    calls[0] += 1
    return real(*a, **k)
torch_mha.flash_attention = counted  # the kernel entry point the forward adapter calls

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)
        self.ff = torch.nn.Linear(32, 32)
    def forward(self, x):
        return x + self.ff(self.attn(x, x, x, need_weights=False, is_causal=False)[0])

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(32, 1)
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).square().mean()

def make():
    torch.manual_seed(0)
    net = Net()
    report = hf_triton_attn.patch_model(net)
    assert report.patched == {"torch_mha": ["blocks.0.attn", "blocks.1.attn"]}, str(report)
    return net

def train(net, chunks):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for x in chunks:
        loss = net(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
data = torch.randn(3, 4, 16, 32, generator=torch.Generator().manual_seed(1))  # 3 steps, global batch 4
net = make()
for b in net.blocks:
    fully_shard(b.attn)  # the patched module itself becomes an FSDP unit (class swapped) ...
    fully_shard(b)       # ... inside a sharded block
fully_shard(net)
classes = sorted({type(m).__name__ for m in net.modules() if type(m).__name__.startswith("FSDP")})
losses = train(net, [x.chunk(world)[rank] for x in data])
for l in losses:
    dist.all_reduce(l)
sharded = [float(l) / world for l in losses]
sharded_calls = calls[0]
counts = [None] * world
dist.all_gather_object(counts, sharded_calls)
if rank == 0:
    single = [float(l) for l in train(make(), list(data))]  # one process, whole global batch, unsharded
    with open(sys.argv[1], "w") as f:
        json.dump({"classes": classes, "calls_per_rank": counts, "sharded": sharded, "single": single}, f)
dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # no interpreter teardown: torch 2.13's gloo group can hang or abort in it (examples/finetune.py)
"""


def test_fsdp_keeps_forward_adapters(tmp_path):
    """A forward adapter (torch.nn.MultiheadAttention's instance-level forward) survives fully_shard, the
    FSDP2 wrapping accelerate applies, also when the patched module is itself an FSDP unit: every call
    on every rank reaches the kernel, and the sharded losses match one unsharded process."""
    script = tmp_path / "fsdp_forward_adapter.py"
    script.write_text(FORWARD_ADAPTER_SCRIPT)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out)]
    _launch(cmd)
    res = json.loads(out.read_text())
    assert "FSDPMultiheadAttention" in res["classes"] and "FSDPBlock" in res["classes"], res["classes"]
    assert res["calls_per_rank"] == [3 * 2, 3 * 2], res  # 3 steps x 2 patched modules, no fallback
    for step, (a, b) in enumerate(zip(res["single"], res["sharded"])):
        assert abs(a - b) <= 16 * (step + 1) * EPS32 * max(abs(a), 1.0), (step, res["single"], res["sharded"])


def test_summarize_runs_pairs_runs_and_reports_failures(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import summarize_runs
    finally:
        sys.path.remove(str(ROOT / "examples"))
    base = {"model": "gpt2", "size": "tiny", "model_path": None, "padding_free": False, "bf16": False,
            "global_batch": 4, "seq_len": 32, "steps": 3, "lr": 1e-3, "ok": True, "step_time_s": 0.1,
            "peak_memory_bytes": 2**30, "kernel_calls": 6, "varlen_calls": 0, "attention_calls": 6}
    runs = {
        "ours_1": {**base, "attn": "hf_triton_attn", "world_size": 1, "losses": [5.0, 4.0, 3.0], "tokens_per_s": 200},
        "ours_ddp": {**base, "attn": "hf_triton_attn", "world_size": 2, "losses": [5.0, 4.0, 3.001],
                     "tokens_per_s": 400},
        "sdpa_ddp": {**base, "attn": "sdpa", "world_size": 2, "losses": [5.0, 4.0, 3.0], "tokens_per_s": 320},
    }
    for name, r in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "status.tsv").write_text("ours_1\t0\t10\nours_ddp\t0\t20\nsdpa_ddp\t0\t20\nbroken\t1\t5\n")
    assert summarize_runs.main([str(tmp_path)]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert rows["broken"]["status"] == "FAILED rc=1"
    assert rows["ours_ddp"]["parity_ref"] == "ours_1"
    assert rows["ours_ddp"]["loss_max_abs_diff"] == pytest.approx(1e-3)
    assert rows["ours_ddp"]["speed_vs_sdpa"] == pytest.approx(1.25)
    assert "| ours_ddp | ok | DDP |" in (tmp_path / "summary.md").read_text()
