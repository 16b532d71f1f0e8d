#!/usr/bin/env python
"""Ahead-of-time compile check: every kernel specialization the launchers produce, for sm_90.

CI runs the kernels through Triton's CPU interpreter, which accepts programs the GPU compiler
rejects (a ``tl.dot`` with K < 16, a non-constexpr global, ...). This script closes that gap on a
CPU-only machine:

1. With ``TRITON_INTERPRET`` unset (so ``kernels/configs.py`` picks the GPU block configs), it
   calls the public ``flash_attention`` (forward and autograd backward), ``dropout_mask`` and the
   split-KV decode launcher ``flash_decode`` with small CPU tensors over a matrix of cases: every
   constexpr flag on its own, realistic combinations, and every dtype x head dim for the plain case.
2. ``JITFunction.__getitem__`` is patched so that ``kernel[grid](*args, **kwargs)`` records the
   launch instead of running it: nothing is launched, no device is touched.
3. Each launch is specialized the way ``JITFunction.run`` would do it on the GPU (Triton's own
   binder: pointer dtypes, 16-byte alignment, ints equal to 1 as constexpr), deduplicated, and
   compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to a
   cubin (ptxas ships in the triton wheel), in a process pool.

Prints one line per failure (kernel, specialization, error) and ``N compiled, M failed``; exits 1
if anything failed. Run it with the Triton to check first on PYTHONPATH (see aot_check.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("common", "forward", "backward", "dropout", "decode")
TARGET = ("cuda", 90, 32)  # H100: sm_90, warp size 32
# H100 opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin). Triton checks it
# only when it loads the cubin on a device, so a compile alone would not catch an oversized tile.
MAX_SHARED_BYTES = 232448
# launch keyword arguments that are compile options, not kernel parameters
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "debug")


def _prepare_env() -> None:
    """Must run before triton is imported (in the parent and in each worker)."""
    import warnings

    # Triton 3.9 warns that its fp-fusion default will change; both versions fuse by default.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_compile: ignoring TRITON_INTERPRET (this check compiles for the GPU)", flush=True)
    # the launchers build TMA descriptors for dense 16-bit K/V on Hopper: record those launches too
    os.environ.setdefault("HF_TRITON_ATTN_TMA", "force")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------------------------
# the matrix of cases
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str = "float16"  # float16 | bfloat16 | float32
    tf32: bool = False  # fp32 only: torch.backends.cuda.matmul.allow_tf32 -> DOT_PRECISION "tf32"
    d: int = 64
    dv: int | None = None  # None: = d
    batch: int = 2
    hq: int = 4
    hkv: int = 4
    sq: int = 64
    sk: int = 64
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None | "h" (Hq,) | "bh" (B, Hq)
    key_mask: str | None = None  # None | bool | int64 | int32 (HF masks are int64)
    query_mask: str | None = None
    seqused_k: bool = False
    varlen: bool = False
    dropout: float = 0.0
    segments: bool = False  # packed sequences in the dense layout (segment_ids, Sq == Sk)
    bshd: bool = False  # q, k, v as transposed (B, S, H, D) memory
    backward: bool = True
    deterministic: bool = False  # True: dq's own kernel where the default sums dq in the dk/dv kernel

    def label(self) -> str:
        defaults = Case()
        parts = [f"{self.dtype}{'/tf32' if self.tf32 else ''}", f"D={self.d}"]
        if self.dv is not None and self.dv != self.d:
            parts.append(f"Dv={self.dv}")
        for f in dataclasses.fields(self):
            if f.name in ("dtype", "tf32", "d", "dv"):
                continue
            val = getattr(self, f.name)
            if val != getattr(defaults, f.name):
                parts.append(f"{f.name}={val}")
        return " ".join(parts)


PRECISIONS = (("float16", False), ("bfloat16", False), ("float32", False), ("float32", True))
# fp16: BLOCK_D 16..256 with EVEN_D true (16, 32, 64, 128, 256) and false (1, 40, 80/96)
HEAD_DIMS = (1, 16, 32, 40, 64, 80, 96, 128, 256)
# other dtypes: each BLOCK_D 16..256 once, EVEN_D both ways (fp32 IEEE dots compile slowest)
HEAD_DIMS_SHORT = (1, 32, 40, 80, 256)
HEAD_DIM_PAIRS = ((64, 128), (128, 64), (40, 256), (256, 16))  # Dv != D


def build_cases() -> list[Case]:
    """Every constexpr branch, dtype, BLOCK_D/BLOCK_DV and block config at least once per kernel.

    Identical specializations (same signature, constexprs, alignment and options) are compiled
    once, whichever cases produce them.
    """
    cases: list[Case] = []
    # the plain case (no flag) in every dtype x head dim: every BLOCK_D/BLOCK_DV, EVEN_D, config
    for dtype, tf32 in PRECISIONS:
        for d in HEAD_DIMS if dtype == "float16" else HEAD_DIMS_SHORT:
            cases.append(Case(dtype=dtype, tf32=tf32, d=d))
    for d, dv in HEAD_DIM_PAIRS:
        cases.append(Case(d=d, dv=dv))
    cases.append(Case(dtype="float32", tf32=True, d=40, dv=256))
    # each flag on its own (fp16, D=64)
    single = [
        dict(causal=True),                              # HAS_RIGHT
        dict(window=(16, -1)),                          # HAS_LEFT
        dict(window=(16, 8)),                           # HAS_LEFT + HAS_RIGHT
        dict(softcap=30.0),                             # HAS_SOFTCAP
        dict(alibi="h"),                                # HAS_ALIBI
        dict(key_mask="bool"), dict(key_mask="int64"),  # HAS_KEY_MASK (HF masks are int64)
        dict(query_mask="bool"),                        # HAS_QUERY_MASK
        dict(seqused_k=True),                           # HAS_SEQUSED_K
        dict(varlen=True),                              # IS_VARLEN (short sequences: 64-row forward blocks)
        dict(varlen=True, sq=512, sk=512, backward=False),  # varlen sequences >= 384 rows: 128-row blocks
        dict(dropout=0.1),                              # HAS_DROPOUT
        dict(dropout=0.1, d=128, dtype="bfloat16"),     # dropout with dq's own kernel (D=128)
        dict(sq=1, sk=64, causal=True, key_mask="int64"),  # decode step
        # Sq = 1 backward with softcap + query mask at D = 32: ptxas 3.6 crashed on it while
        # seqlen_q was specialized to the constant 1 (GPU fuzz, 2026-11-26)
        dict(sq=1, sk=63, d=32, softcap=2.0, query_mask="bool"),
        dict(sq=17, sk=97, causal=True),                # Sq != Sk
        dict(sq=64, sk=1024),                           # 1024-2047 keys: the 64x64 TMA forward tile
        dict(sq=64, sk=2048),                           # >= 2048 keys: the 128x128 TMA forward tile
        dict(sq=64, sk=1024, d=128, dtype="bfloat16"),
        dict(causal=True, d=128, dtype="bfloat16"),     # the grid's causal D=128 (its own dk/dv config)
        dict(segments=True, causal=True),               # HAS_SEGMENTS (HF packed position_ids)
        # the dq kernel where the default backward sums dq in the dk/dv kernel (configs.fuse_dq)
        dict(causal=True, deterministic=True), dict(dropout=0.1, deterministic=True),
        dict(causal=True, dtype="bfloat16", deterministic=True),
        dict(causal=True, d=34),                        # D = 34: fp32 dq rows not TMA-describable, split
    ]
    for kw in single:
        cases.append(Case(**kw))
    # realistic combinations (MQA/GQA and (B, S, H, D) memory only appear here)
    combos = [
        dict(causal=True, key_mask="int64", query_mask="int64", hkv=1),        # HF padded batch, MQA
        dict(key_mask="bool", query_mask="bool", dtype="bfloat16"),            # padded encoder batch (bench_key_masks)
        dict(causal=True, key_mask="int32", hkv=2, bshd=True),                 # HF sdpa layout, GQA
        dict(varlen=True, window=(32, 0), hkv=2),                              # varlen + sliding window
        dict(varlen=True, causal=True, seqused_k=True),
        dict(softcap=50.0, alibi="h", causal=True),                            # softcap + alibi
        dict(dropout=0.1, causal=True, key_mask="bool"),                       # training step
        dict(varlen=True, dropout=0.1),                                        # BERT fine-tune, unpadded
        dict(segments=True, causal=True, window=(16, 0), dropout=0.1, hkv=2, bshd=True),  # packed Mistral
    ]
    every_dense = dict(causal=True, window=(16, -1), softcap=30.0, alibi="bh", key_mask="bool",
                       query_mask="bool", seqused_k=True, dropout=0.2, hkv=2)
    every_varlen = dict(varlen=True, window=(16, 4), softcap=30.0, alibi="h", seqused_k=True,
                        dropout=0.2, hkv=2)
    for kw in combos:
        cases.append(Case(**kw))
    # every flag at once, dense and varlen, across dtypes and block sizes
    for dtype, tf32, d, kw in (("float16", False, 64, every_dense), ("float16", False, 64, every_varlen),
                               ("bfloat16", False, 80, every_dense), ("float32", False, 40, every_dense),
                               ("float32", True, 256, every_varlen)):
        cases.append(Case(dtype=dtype, tf32=tf32, d=d, **kw))
    cases.append(Case(dtype="bfloat16", d=128, dv=256, causal=True, key_mask="int64", hkv=2))
    cases.append(Case(sq=1, sk=1, batch=1, hq=1, hkv=1, d=1, window=(1, 1)))  # every int == 1
    return cases


def _mask(kind: str, shape: tuple[int, ...]):
    import torch

    m = torch.ones(shape, dtype=torch.bool)
    m[..., -1] = False
    return m if kind == "bool" else m.to(getattr(torch, kind))


def run_case(case: Case) -> None:
    """Call flash_attention (+ backward) like a GPU user would; launches are recorded, not run."""
    import torch

    from hf_triton_attn import flash_attention

    dtype = getattr(torch, case.dtype)
    dv = case.dv if case.dv is not None else case.d
    b, hq, hkv, sq, sk = case.batch, case.hq, case.hkv, case.sq, case.sk
    kw: dict = dict(causal=case.causal, window_size=case.window, softcap=case.softcap,
                    dropout_p=case.dropout, deterministic=case.deterministic, backend="triton")
    if case.varlen:  # b sequences of unequal lengths, about sq (sk) tokens each
        lens_q = [sq - 3 + 5 * (i % 2) for i in range(b)]
        lens_k = [sk + 4 - 7 * (i % 2) for i in range(b)]
        cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        q = torch.zeros(sum(lens_q), hq, case.d, dtype=dtype)
        k = torch.zeros(sum(lens_k), hkv, case.d, dtype=dtype)
        v = torch.zeros(sum(lens_k), hkv, dv, dtype=dtype)
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    elif case.bshd:
        q = torch.zeros(b, sq, hq, case.d, dtype=dtype).transpose(1, 2)
        k = torch.zeros(b, sk, hkv, case.d, dtype=dtype).transpose(1, 2)
        v = torch.zeros(b, sk, hkv, dv, dtype=dtype).transpose(1, 2)
    else:
        q = torch.zeros(b, hq, sq, case.d, dtype=dtype)
        k = torch.zeros(b, hkv, sk, case.d, dtype=dtype)
        v = torch.zeros(b, hkv, sk, dv, dtype=dtype)
    if case.alibi == "h":
        kw["alibi_slopes"] = torch.full((hq,), 0.5)
    elif case.alibi == "bh":
        kw["alibi_slopes"] = torch.full((b, hq), 0.5)
    if case.key_mask:
        kw["attention_mask"] = _mask(case.key_mask, (b, sk))
    if case.query_mask:
        kw["query_mask"] = _mask(case.query_mask, (b, sq))
    if case.seqused_k:
        kw["seqused_k"] = torch.full((b,), max(1, sk // 2), dtype=torch.int32)
    if case.segments:
        kw["segment_ids"] = (torch.arange(sq) // 7).expand(b, sq)
    for t in (q, k, v):
        t.requires_grad_(case.backward)
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    out = flash_attention(q, k, v, **kw)
    if case.backward:
        out.backward(torch.zeros_like(out))


DROPOUT_MASK_SHAPES = ((2, 4, 64, 64), (1, 3, 17, 97), (1, 1, 1, 1))


def run_dropout_mask_case(shape: tuple[int, ...]) -> None:
    """The test helper's launcher: (B, H, Sq, Sk) int8 keep-mask from an int64 [seed, offset]."""
    import torch

    from hf_triton_attn.kernels.dropout import dropout_mask

    dropout_mask(torch.empty(shape, dtype=torch.int8), torch.tensor([1234, 5678], dtype=torch.int64), 0.1)


# Split-KV decode (kernels/decode.py), called directly: dtype x head dims x features, one split
# (the kernel writes O/LSE itself) and several (fp32 workspace, arrival counters, and the merge by
# the last split, whose MERGE_M / MERGE_S follow the rows and Dv).
DECODE_CASES = (
    dict(dtype="float16", d=128, hq=32, hkv=8, sq=1, sk=8192, splits=(1, 32)),       # Llama-3-8B step
    dict(dtype="bfloat16", d=64, hq=8, hkv=2, sq=4, sk=300, causal=True, key_mask="int64", splits=(1, 3)),
    dict(dtype="float16", d=256, hq=8, hkv=4, sq=1, sk=500, window=(127, 0), softcap=50.0, splits=(1, 8)),
    dict(dtype="float32", d=40, dv=24, hq=4, hkv=1, sq=2, sk=97, alibi="h", seqused_k=True, splits=(1, 5)),
    dict(dtype="float32", tf32=True, d=256, hq=2, hkv=2, sq=1, sk=1000, alibi="bh", splits=(1, 64)),
    dict(dtype="bfloat16", d=128, dv=256, hq=71, hkv=1, sq=1, sk=400, bshd=True, splits=(1, 2)),  # MQA, 2 row blocks
    dict(dtype="float16", d=1, hq=4, hkv=2, sq=1, sk=33, key_mask="bool", splits=(1, 2)),
    dict(dtype="float16", d=64, hq=16, hkv=2, sq=3, sk=700, causal=True, window=(255, 0), softcap=30.0,
         alibi="bh", key_mask="bool", seqused_k=True, bshd=True, splits=(1, 16)),      # every flag
    dict(dtype="bfloat16", d=80, hq=8, hkv=8, sq=1, sk=100, causal=True, key_mask="int32", seqused_k=True,
         splits=(1, 4)),
    dict(dtype="float16", d=1, hq=1, hkv=1, sq=1, sk=1, window=(1, 1), splits=(1, 2)),  # every int == 1
    dict(dtype="bfloat16", d=128, hq=4, hkv=2, sq=1, sk=600, causal=True, splits=(1, 4)),  # deep: 3 stages
)


def _decode_label(kw: dict) -> str:
    return "decode " + " ".join(f"{k}={v}" for k, v in kw.items())


def run_decode_case(kw: dict) -> None:
    """flash_decode as ops would call it (causal = window_right 0), for each split count, with and
    without the LSE (None: a no-grad call without return_lse, the kernels' STORE_LSE off)."""
    import torch

    from hf_triton_attn.kernels import decode
    from hf_triton_attn.kernels.decode import flash_decode

    # As on a GPU with the shared memory for it: whole launches with at most one program per "SM" (4 for
    # CPU tensors) record the deep tile variants too.
    decode._deep_tiles_fit = lambda device: True
    dtype = getattr(torch, kw["dtype"])
    b, hq, hkv, sq, sk, d = 2, kw["hq"], kw["hkv"], kw["sq"], kw["sk"], kw["d"]
    dv = kw.get("dv", d)
    if kw.get("d") == 1 and sk == 1:
        b = 1
    if kw.get("bshd"):
        q = torch.zeros(b, sq, hq, d, dtype=dtype).transpose(1, 2)
        k = torch.zeros(b, sk, hkv, d, dtype=dtype).transpose(1, 2)
        v = torch.zeros(b, sk, hkv, dv, dtype=dtype).transpose(1, 2)
        o = torch.empty(b, sq, hq, dv, dtype=dtype).transpose(1, 2)
    else:
        q = torch.zeros(b, hq, sq, d, dtype=dtype)
        k = torch.zeros(b, hkv, sk, d, dtype=dtype)
        v = torch.zeros(b, hkv, sk, dv, dtype=dtype)
        o = torch.empty(b, hq, sq, dv, dtype=dtype)
    lse = torch.empty(b, hq, sq, dtype=torch.float32)
    left, right = kw.get("window", (-1, -1))
    if kw.get("causal"):
        right = 0 if right < 0 else min(right, 0)
    alibi = {None: None, "h": torch.full((hq,), 0.5), "bh": torch.full((b, hq), 0.5)}[kw.get("alibi")]
    key_mask = _mask(kw["key_mask"], (b, sk)) if kw.get("key_mask") else None
    seqused_k = torch.full((b,), max(1, sk // 2), dtype=torch.int32) if kw.get("seqused_k") else None
    for splits in kw["splits"]:
        for out_lse in (lse, None):
            flash_decode(q, k, v, o, out_lse, key_mask=key_mask, seqused_k=seqused_k, alibi=alibi, max_seqlen_q=sq,
                         max_seqlen_k=sk, num_seqs=b, sm_scale=d ** -0.5, softcap=kw.get("softcap", 0.0),
                         window_left=left, window_right=right, dot_precision="tf32" if kw.get("tf32") else "ieee",
                         num_splits=splits)


# ----------------------------------------------------------------------------------------------
# recording launches and turning them into compile jobs
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    module: str  # module of the kernel, e.g. hf_triton_attn.kernels.forward
    name: str  # the kernel's function name
    signature: dict  # parameter name -> "*fp16" | "i32" | "fp32" | "constexpr" | ...
    constexprs: dict  # (param index,) -> value
    attrs: dict  # (param index,) -> [["tt.divisibility", 16]]
    options: dict  # num_warps, num_stages
    cases: list  # labels of the cases that produced it

    def key(self) -> tuple:
        return (self.module, self.name, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        """The specialization in one line: pointer dtypes, true flags, block sizes, options."""
        names = list(self.signature)
        consts = {names[k[0]]: v for k, v in self.constexprs.items()}
        ptrs = sorted({v for v in self.signature.values() if v.startswith("*")})
        flags = [n for n, v in consts.items() if n.isupper() and v is True]
        sizes = [f"{n}={v}" for n, v in consts.items() if n.isupper() and not isinstance(v, bool)]
        ones = [n for n, v in consts.items() if not n.isupper() and v == 1]
        parts = ["ptrs " + ",".join(ptrs), "flags " + (",".join(flags) or "-"), " ".join(sizes),
                 f"warps={self.options.get('num_warps')} stages={self.options.get('num_stages')}"]
        if ones:
            parts.append("=1: " + ",".join(ones))
        return "; ".join(p for p in parts if p)


_TORCH_TO_TRITON = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int8": "i8",
    "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "u1",
}


def _manual_specialization(fn, args, kwargs):
    """Fallback when Triton's binder internals are unavailable: plain types, no alignment attrs."""
    import torch

    bound = fn.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        val = bound.arguments[p.name]
        if p.is_constexpr or val is None:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = val
        elif isinstance(val, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[str(val.dtype).replace("torch.", "")]
        elif isinstance(val, bool):
            signature[p.name] = "i1"
        elif isinstance(val, int):
            signature[p.name] = "i32" if -2**31 <= val < 2**31 else "i64"
        elif isinstance(val, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={val!r}")
    return signature, constexprs, {}


def _triton_binder(fn):
    """Triton's own argument binder for ``fn`` on sm_90 (what JITFunction.run uses), or None."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget(*TARGET))
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        if not hasattr(fn, "_pack_args"):
            raise AttributeError("JITFunction._pack_args")
        return backend, binder
    except (ImportError, AttributeError, TypeError) as exc:
        print(f"aot_compile: Triton's binder is unavailable ({exc!r}); typing arguments by hand", flush=True)
        return None


def specialize(fn, args, kwargs, manual: bool):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run builds them on the GPU."""
    params = {k: v for k, v in kwargs.items() if k not in OPTION_KEYS}
    options = {k: v for k, v in kwargs.items() if k in OPTION_KEYS}
    options.setdefault("debug", False)
    binder = None if manual else _triton_binder(fn)
    if binder is None:
        return (*_manual_specialization(fn, args, params), options)
    backend, bind = binder
    bound_args, spec, _ = bind(*args, **params, **options)
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(params, **options), bound_args, spec, options)
    return signature, constexprs, attrs, options


class Recorder:
    """Patches JITFunction.__getitem__: ``kernel[grid](...)`` appends a launch instead of running."""

    def __init__(self):
        self.launches: list = []  # (fn, args, kwargs, case label)
        self.label = ""

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._cls, self._orig = JITFunction, JITFunction.__dict__.get("__getitem__")
        recorder = self

        def __getitem__(fn, grid):
            def launch(*args, **kwargs):
                recorder.launches.append((fn, args, kwargs, recorder.label))
            return launch

        JITFunction.__getitem__ = __getitem__
        return self

    def __exit__(self, *exc):
        if self._orig is None:
            del self._cls.__getitem__
        else:
            self._cls.__getitem__ = self._orig


def collect_jobs(manual: bool) -> tuple[list[Job], list[str]]:
    """Run every case under the recorder. Returns deduplicated jobs and setup errors."""
    import torch

    from hf_triton_attn import ops
    from hf_triton_attn.kernels import configs, interpreted

    if configs.INTERPRETED or interpreted():
        raise SystemExit("aot_compile: kernels were imported for the interpreter; unset TRITON_INTERPRET")
    errors: list[str] = []
    recorder = Recorder()
    calls = [(case.label(), run_case, case) for case in build_cases()]
    calls += [(f"dropout_mask shape={shape}", run_dropout_mask_case, shape) for shape in DROPOUT_MASK_SHAPES]
    calls += [(_decode_label(kw), run_decode_case, kw) for kw in DECODE_CASES]
    # The only CPU obstacle on the public path: backend="triton" insists on CUDA tensors.
    check_backend, allow_tf32 = ops._check_backend_usable, torch.backends.cuda.matmul.allow_tf32
    ops._check_backend_usable = lambda interpret, t: None
    try:
        with recorder:
            for label, func, arg in calls:
                recorder.label = label
                try:
                    func(arg)
                except Exception as exc:  # a launcher bug: report, keep going
                    errors.append(f"SETUP {label}: {type(exc).__name__}: {exc}")
    finally:
        ops._check_backend_usable = check_backend
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32

    jobs: dict[tuple, Job] = {}
    for fn, args, kwargs, label in recorder.launches:
        try:
            signature, constexprs, attrs, options = specialize(fn, args, kwargs, manual)
        except Exception as exc:  # the launcher's arguments do not fit the kernel's parameters
            errors.append(f"SETUP {fn.__name__} launched by {label}: {type(exc).__name__}: {exc}")
            continue
        job = Job(fn.fn.__module__, fn.__name__, signature, constexprs, attrs, options, [label])
        if job.key() in jobs:
            jobs[job.key()].cases.append(label)
        else:
            jobs[job.key()] = job
    return list(jobs.values()), errors


# ----------------------------------------------------------------------------------------------
# compiling (in worker processes)
# ----------------------------------------------------------------------------------------------

def _worker_init() -> None:
    _prepare_env()


def _jit_functions() -> dict:
    import importlib

    from triton.runtime.jit import JITFunction

    found = {}
    for mod in KERNEL_MODULES:
        m = importlib.import_module(f"hf_triton_attn.kernels.{mod}")
        for name, obj in vars(m).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == m.__name__:
                found[name] = obj
    return found


def _where(exc: BaseException) -> str:
    """'file:line in fn' for the innermost CompilationError of a chain."""
    import inspect

    inner = None
    e: BaseException | None = exc
    while e is not None:
        if getattr(e, "src", None) is not None and hasattr(getattr(e, "node", None), "lineno"):
            inner = e
        e = e.__cause__ or e.__context__
    if inner is None:
        return ""
    m = re.match(r"def\s+(\w+)", inner.src)
    fn = _jit_functions().get(m.group(1)) if m else None
    if fn is None:
        return f"line {inner.node.lineno} of {m.group(1) if m else '?'}"
    lines, start = inspect.getsourcelines(fn.fn)
    def_line = start + next(i for i, s in enumerate(lines) if re.match(r"\s*def\s", s))
    path = os.path.relpath(fn.fn.__code__.co_filename, REPO)
    return f"{path}:{def_line + inner.node.lineno - 1} in {fn.__name__}"


def _one_line_error(exc: BaseException, diagnostics: str) -> str:
    """The root cause of a compile error (plus MLIR/ptxas diagnostics) on one line."""
    chain = []
    e: BaseException | None = exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    root = chain[-1]
    msg = getattr(root, "error_message", None) or str(root)
    if getattr(root, "src", None) is not None and not getattr(root, "error_message", None):
        msg = str(root).splitlines()[-1]
    text = f"{type(root).__name__}: {msg}"
    where = _where(exc)
    if where:
        text = f"{where}: {text}"
    diag = [ln.strip() for ln in diagnostics.splitlines() if "error" in ln.lower()]
    if diag:
        text += " | " + " | ".join(diag[:4])
    return re.sub(r"\s+", " ", text).strip()


def compile_job(job: Job) -> tuple[bool, str, float, str]:
    """Compile one specialization to a cubin. Returns (ok, one-line error, seconds, full log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_functions()[job.name]
    start = time.perf_counter()
    # MLIR and ptxas write their diagnostics to fd 2: capture them for the report.
    with tempfile.TemporaryFile(mode="w+b") as err_file:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err_file.fileno(), 2)
        try:
            src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
            kernel = triton.compile(src, target=GPUTarget(*TARGET), options=dict(job.options))
            ok, err, log = True, "", ""
            if os.environ.get("AOT_STATS") == "1":
                err = _code_stats(kernel)
            if os.environ.get("AOT_DUMP"):
                _dump_code(kernel, job, os.environ["AOT_DUMP"])
            if not kernel.asm.get("cubin"):
                ok, err = False, "no cubin produced"
            elif kernel.metadata.shared > MAX_SHARED_BYTES:
                ok, err = False, (f"OutOfResources: shared memory {kernel.metadata.shared} B > "
                                  f"{MAX_SHARED_BYTES} B, the H100 limit per block (fails at launch)")
        except Exception as exc:
            ok, log = False, traceback.format_exc()
            err_file.flush()
            err_file.seek(0)
            diagnostics = err_file.read().decode(errors="replace")
            err = _one_line_error(exc, diagnostics)
            log += diagnostics
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    return ok, err, time.perf_counter() - start, log


def _code_stats(kernel) -> str:
    """One line on what the compiler made of a kernel (``--stats``): registers, spills, shared memory,
    and how many TMA copies, async copies, global loads, wgmma ops and layout conversions it has."""
    ptx, ttgir = kernel.asm.get("ptx", ""), kernel.asm.get("ttgir", "")
    counts = dict(tma=ptx.count("cp.async.bulk.tensor"), cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                  ld_global=ptx.count("ld.global"), wgmma=ptx.count("wgmma.mma_async"),
                  mma_sync=ptx.count("mma.sync"), convert_layout=ttgir.count("ttg.convert_layout"))
    md = kernel.metadata
    regs = getattr(kernel, "n_regs", None)
    spills = getattr(kernel, "n_spills", None)
    import hashlib

    # A hash of the PTX instructions alone: without the debug sections, line markers, comments and
    # labels, which move when code moves between files or lines (two sources compile to the same
    # instructions iff their hashes agree; used to check refactors of the kernels).
    code = ptx.split(".section\t.debug")[0].split(".section .debug")[0]
    body = "\n".join(ln for ln in code.splitlines()
                     if not re.match(r"\s*(//|\.loc\b|\.file\b|\$L__\w+:)", ln))
    return (f"regs {regs} spills {spills} shared {md.shared} | "
            + " ".join(f"{k} {v}" for k, v in counts.items())
            + f" | ptx {hashlib.sha1(body.encode()).hexdigest()[:12]}")


def _dump_code(kernel, job: Job, out_dir: str) -> None:
    """Write the TTGIR, PTX and SASS (``nvdisasm`` of the cubin) of one specialization (``--dump``),
    named by kernel and a hash of its description, with the description on the first line."""
    import hashlib
    import subprocess

    import triton

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{job.name}_{hashlib.sha1(job.describe().encode()).hexdigest()[:8]}")
    header = f"// {job.name} [{job.describe()}] <- {job.cases[0]}\n"
    for ext in ("ttgir", "ptx"):
        with open(f"{stem}.{ext}", "w") as f:
            f.write(header + kernel.asm.get(ext, ""))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([nvdisasm, "-c", "-hex", cubin.name], capture_output=True, text=True).stdout
    with open(f"{stem}.sass", "w") as f:
        f.write(header + sass)


def _expected_cost(job: Job) -> float:
    """Rough relative compile time: fp32 IEEE dots and big tiles are the slow ones."""
    names = list(job.signature)
    consts = {names[k[0]]: v for k, v in job.constexprs.items()}
    cost = {"_fwd_kernel": 3.0, "_bwd_dkdv_kernel": 3.0, "_bwd_dq_kernel": 2.0,
            "_decode_split_kernel": 2.0}.get(job.name, 0.1)
    if consts.get("DOT_PRECISION") == "ieee" and job.signature.get("Q") == "*fp32":
        cost *= 3
    return cost * (1 + sum(v for k, v in consts.items() if k.startswith("BLOCK_D")) / 256)


# ----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=min(len(os.sched_getaffinity(0)), 8),
                    help="compile processes (default: the usable cores, at most 8)")
    ap.add_argument("--list", action="store_true", help="print the specializations, compile nothing")
    ap.add_argument("--filter", default="",
                    help="only specializations whose kernel name, description or case label contains this")
    ap.add_argument("--every", type=int, default=1, metavar="N",
                    help="only every N-th specialization of each kernel (after --filter, in the listing's "
                         "order): a deterministic sample of every kernel, for a quicker second-Triton check")
    ap.add_argument("--manual-signature", action="store_true",
                    help="type the arguments by hand instead of using Triton's binder")
    ap.add_argument("--cache-dir", default=None,
                    help="Triton cache dir (default: a fresh temporary one, so everything is compiled)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print full logs of failures and every compile time")
    ap.add_argument("--stats", action="store_true",
                    help="print registers, spills, shared memory and TMA / wgmma / layout-conversion counts per kernel")
    ap.add_argument("--dump", default="", metavar="DIR",
                    help="write each specialization's TTGIR, PTX and SASS (nvdisasm) to DIR")
    a = ap.parse_args()
    if a.dump:
        os.environ["AOT_DUMP"] = os.path.abspath(a.dump)  # read by the workers
    if a.stats:
        os.environ["AOT_STATS"] = "1"  # read by the workers (spawned after this)

    _prepare_env()
    import triton

    import hf_triton_attn

    print(f"aot_compile: triton {triton.__version__} from {os.path.dirname(triton.__file__)}; "
          f"hf_triton_attn from {os.path.dirname(hf_triton_attn.__file__)}; "
          f"target {TARGET[0]} sm_{TARGET[1]}", flush=True)
    if os.environ.get("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "0") not in ("", "0"):
        print("aot_compile: WARNING: TRITON_ALLOW_NON_CONSTEXPR_GLOBALS is set, so non-constexpr globals "
              "compile here; they do not on a GPU machine without it", flush=True)
    t0 = time.perf_counter()
    jobs, setup_errors = collect_jobs(a.manual_signature)
    jobs = [j for j in jobs if any(a.filter in t for t in [j.name, j.describe()] + j.cases)]
    if a.every < 1:
        ap.error(f"--every must be >= 1; got {a.every}")
    seen: dict[str, int] = {}
    sampled = []
    for j in jobs:  # per kernel: the listing interleaves the kernels of each case
        seen[j.name] = seen.get(j.name, -1) + 1
        if seen[j.name] % a.every == 0:
            sampled.append(j)
    jobs = sampled
    for line in setup_errors:
        print(line, flush=True)
    by_kernel: dict[str, int] = {}
    for j in jobs:
        by_kernel[j.name] = by_kernel.get(j.name, 0) + 1
    print(f"aot_compile: {len(jobs)} specializations ({', '.join(f'{k} {v}' for k, v in by_kernel.items())})"
          f" from {len({c for j in jobs for c in j.cases})} cases in {time.perf_counter() - t0:.1f} s",
          flush=True)
    if a.list:
        for j in jobs:
            print(f"{j.name} [{j.describe()}] <- {j.cases[0]}")
        return 0

    tmp = None
    if a.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = a.cache_dir
    elif "TRITON_CACHE_DIR" not in os.environ:
        tmp = tempfile.TemporaryDirectory(prefix="aot_triton_cache_")
        os.environ["TRITON_CACHE_DIR"] = tmp.name

    jobs.sort(key=_expected_cost, reverse=True)  # longest first, so the pool drains evenly
    n_ok = n_fail = 0
    secs_by_kernel: dict[str, float] = {}
    timings: list[tuple[float, Job]] = []
    t1 = time.perf_counter()
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork after torch's threads started
    with ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=ctx, initializer=_worker_init) as pool:
        for job, (ok, err, secs, log) in zip(jobs, pool.map(compile_job, jobs)):
            secs_by_kernel[job.name] = secs_by_kernel.get(job.name, 0.0) + secs
            timings.append((secs, job))
            if ok:
                n_ok += 1
                if a.stats:
                    print(f"STATS {job.name} [{job.describe()}] <- {job.cases[0]} :: {err}", flush=True)
                continue
            n_fail += 1
            more = f" (+{len(job.cases) - 1} more)" if len(job.cases) > 1 else ""
            print(f"FAIL {job.name} [{job.describe()}] case: {job.cases[0]}{more} :: {err}", flush=True)
            if a.verbose:
                print(log, flush=True)
    if tmp is not None:
        tmp.cleanup()
    n_fail += len(setup_errors)
    print("aot_compile: compile seconds per kernel: "
          + ", ".join(f"{k} {v:.0f}" for k, v in secs_by_kernel.items()), flush=True)
    if a.verbose:
        for secs, job in sorted(timings, key=lambda t: -t[0]):
            print(f"  {secs:6.1f} s {job.name} [{job.describe()}] <- {job.cases[0]}")
    print(f"aot_compile: compiling took {time.perf_counter() - t1:.1f} s on {a.jobs} processes; "
          f"total {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{n_ok} compiled, {n_fail} failed (triton {triton.__version__})", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
