"""Public functional API: ``flash_attention`` — validation, backend dispatch, autograd, custom op.

Layouts (see the docstring of ``flash_attention``)::

    dense   q (B, Hq, Sq, D)   k (B, Hkv, Sk, D)   v (B, Hkv, Sk, Dv)  -> out (B, Hq, Sq, Dv)
    varlen  q (Tq, Hq, D)      k (Tk, Hkv, D)      v (Tk, Hkv, Dv)     -> out (Tq, Hq, Dv)

Causal masks are aligned bottom-right when Sq != Sk (query i sees key j iff j <= i + Sk - Sq)::

    Sq = 2, Sk = 5, causal        Sq = 5, Sk = 2, causal
        1 1 1 1 0                     0 0
        1 1 1 1 1                     0 0
                                      0 0     <- rows with no key: output 0, LSE -inf
                                      1 0
                                      1 1

The Triton kernels are imported lazily (first non-reference call); this module never imports
transformers.
"""

from __future__ import annotations

import importlib
import math
import threading
import warnings
from types import ModuleType

import torch

from ._environ import environ_get
from .reference import attention_reference

__all__ = ["flash_attention", "BACKENDS"]

BACKENDS = ("triton", "interpret", "reference")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_DECODE_MAX_SQ = 16  # dense calls with at most this many queries take the split-KV decode kernel
_warned_cpu_fallback = False


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _fail(exc: type, name: str, expected: str, got: object) -> None:
    raise exc(f"flash_attention: `{name}` must be {expected}; got {got}")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__} {t!r}"


def _check_tensor(name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", _describe(t))
    if t.device != device:
        _fail(ValueError, name, f"on the same device as q ({device})", f"device {t.device}")
    return t


def _check_mask(name: str, mask: object, shape: tuple[int, ...], device: torch.device) -> None:
    _check_tensor(name, mask, device)
    dtype = mask.dtype
    if dtype.is_floating_point or dtype.is_complex:
        _fail(TypeError, name, "a bool or integer tensor (nonzero = keep)", f"dtype {dtype}")
    if mask.shape != shape:  # a torch.Size equals the tuple of its sizes
        _fail(ValueError, name, f"of shape {shape}", f"shape {tuple(mask.shape)}")


def _values_checkable(t: torch.Tensor) -> bool:
    """Value checks read tensor contents: only on CPU or when HF_TRITON_ATTN_VALIDATE=1 (they sync),
    never while torch.compile traces. ``is_cpu`` and ``environ_get`` first: on CUDA this costs
    ~0.3 us instead of ~2.5 (``os.environ.get`` of an unset variable raises and catches a KeyError)."""
    if not (t.is_cpu or environ_get("HF_TRITON_ATTN_VALIDATE") == "1"):
        return False
    return not torch.compiler.is_compiling()


def _is_window(window_size: object) -> bool:
    """A pair (left, right) of ints >= -1 (bools are not ints here)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        return False
    left, right = window_size
    return (isinstance(left, int) and isinstance(right, int) and not isinstance(left, bool)
            and not isinstance(right, bool) and left >= -1 and right >= -1)


def _is_real(x: object) -> bool:
    """An int or float, not a bool (a float first: what every caller passes)."""
    return x.__class__ is float or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attention_mask,
                       query_mask, segment_ids, device: torch.device) -> None:
    """The varlen arguments one by one, raising for the first bad one (``_validate`` calls this only
    when its one-expression check of the valid case fails)."""
    varlen_args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    missing = [n for n, a in zip(("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
                                 varlen_args) if a is None]
    if missing:
        _fail(ValueError, ", ".join(missing), "given too (varlen needs all four cu_seqlens/max_seqlen)", "None")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            _fail(ValueError, name, "3-D (total_tokens, heads, head_dim) in varlen mode", f"shape {tuple(t.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu, device)
        if cu.dtype != torch.int32:
            _fail(TypeError, name, "an int32 tensor", f"dtype {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            _fail(ValueError, name, "1-D of length batch + 1 >= 2", f"shape {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        _fail(ValueError, "cu_seqlens_k", f"of cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)}",
              f"shape {tuple(cu_seqlens_k.shape)}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            _fail(TypeError, name, "a Python int >= 0", _describe(m))
    for name, m in (("attention_mask", attention_mask), ("query_mask", query_mask), ("segment_ids", segment_ids)):
        if m is not None:
            _fail(ValueError, name, "None in varlen mode (padding-free batches have no padding)", _describe(m))


# Host-time notes (measured on the 2-core CPU box with launches stubbed, Python 3.11): the checks
# below read each attribute once (``t.shape`` builds a new torch.Size, ``device.type`` a new str:
# ~0.1 and ~0.3 us per read) and test the valid case first, falling back to the per-argument
# checks that name the culprit only when something is wrong: 5.8 -> 3.0 us per dense call.
def _validate(q, k, v, causal, softmax_scale, dropout_p, attention_mask, query_mask, segment_ids, seqused_k,
              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, softcap,
              alibi_slopes, backend) -> tuple[bool, int, tuple[int, int], tuple[int, int], bool]:
    """Raise on any bad input. Returns (is_varlen, number of sequences, (Sq, Sk) (varlen: the
    max_seqlen arguments), (left, right) window, whether autocast casts the inputs (autocast on
    for q's device, CUDA or CPU))."""
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, "q", "a torch.Tensor", _describe(q))
    device = q.device
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.device == device
            and v.device == device):
        _check_tensor("k", k, device)
        _check_tensor("v", v, device)
    device_type = "cuda" if q.is_cuda else ("cpu" if q.is_cpu else None)  # is_cuda: 0.2 us less than .type
    autocast = torch.is_autocast_enabled(device_type) if device_type is not None else False
    q_dtype, k_dtype, v_dtype = q.dtype, k.dtype, v.dtype
    if not (q_dtype in _SUPPORTED_DTYPES and k_dtype in _SUPPORTED_DTYPES and v_dtype in _SUPPORTED_DTYPES):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype not in _SUPPORTED_DTYPES:
                _fail(TypeError, name, "float16, bfloat16 or float32", f"dtype {t.dtype}")
    if not autocast and not (q_dtype == k_dtype == v_dtype):
        _fail(TypeError, "k, v", f"of q's dtype {q_dtype} (outside autocast)", f"k {k_dtype}, v {v_dtype}")
    if backend is not None and backend not in BACKENDS:
        _fail(ValueError, "backend", f"None or one of {BACKENDS}", repr(backend))
    if not isinstance(causal, bool):
        _fail(TypeError, "causal", "a bool", _describe(causal))
    if softmax_scale is not None and not (_is_real(softmax_scale) and math.isfinite(softmax_scale)):
        _fail(TypeError, "softmax_scale", "None or a finite float", _describe(softmax_scale))
    if not (_is_real(dropout_p) and 0.0 <= dropout_p < 1.0):
        _fail(ValueError, "dropout_p", "a float in [0, 1)", _describe(dropout_p))
    if not (_is_real(softcap) and math.isfinite(softcap) and softcap >= 0):
        _fail(ValueError, "softcap", "a finite float >= 0 (0 = off)", _describe(softcap))
    if not _is_window(window_size):
        _fail(ValueError, "window_size", "a pair (left, right) of ints >= -1 (-1 = unbounded)",
              _describe(window_size))
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)

    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    is_varlen = not (cu_seqlens_q is None and cu_seqlens_k is None and max_seqlen_q is None
                     and max_seqlen_k is None)
    if is_varlen:
        # The valid case in one expression (attributes read once, as for the dense layout below);
        # _check_varlen_args names the culprit only when it fails.
        cu_shape = cu_seqlens_q.shape if isinstance(cu_seqlens_q, torch.Tensor) else None
        if not (len(q_shape) == 3 and len(k_shape) == 3 and len(v_shape) == 3 and cu_shape is not None
                and len(cu_shape) == 1 and cu_shape[0] >= 2 and cu_seqlens_q.dtype is torch.int32
                and cu_seqlens_q.device == device and isinstance(cu_seqlens_k, torch.Tensor)
                and cu_seqlens_k.shape == cu_shape and cu_seqlens_k.dtype is torch.int32
                and cu_seqlens_k.device == device and max_seqlen_q.__class__ is int and max_seqlen_q >= 0
                and max_seqlen_k.__class__ is int and max_seqlen_k >= 0
                and attention_mask is None and query_mask is None and segment_ids is None):
            _check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attention_mask,
                               query_mask, segment_ids, device)
        num_seqs = cu_seqlens_q.shape[0] - 1
        total_q, hq, d = q_shape
        total_k, hkv, _ = k_shape
        sq, sk = max_seqlen_q, max_seqlen_k
        batch_shape: tuple[int, ...] = ()
        if _values_checkable(cu_seqlens_q):
            for name, cu, total, mx in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
                c = cu.cpu().long()
                lens = c[1:] - c[:-1]
                if c[0] != 0 or (lens < 0).any() or c[-1] != total:
                    _fail(ValueError, name, f"non-decreasing prefix sums from 0 to {total} (the token count)",
                          c.tolist())
                if int(lens.max()) > mx:
                    _fail(ValueError, name.replace("cu_seqlens", "max_seqlen"),
                          f">= the longest sequence ({int(lens.max())})", mx)
    else:
        if not (len(q_shape) == 4 and len(k_shape) == 4 and len(v_shape) == 4):
            for name, t in (("q", q), ("k", k), ("v", v)):
                if t.dim() != 4:
                    _fail(ValueError, name, "4-D (batch, heads, seqlen, head_dim)", f"shape {tuple(t.shape)}")
        num_seqs, hq, sq, d = q_shape
        _, hkv, sk, _ = k_shape
        if k_shape[0] != num_seqs or v_shape[0] != num_seqs:
            _fail(ValueError, "k, v", f"of q's batch size {num_seqs}", f"k {tuple(k_shape)}, v {tuple(v_shape)}")
        batch_shape = (num_seqs,)
    seq_dim = 0 if is_varlen else 2  # heads are dim 1 in both layouts, head dim the last
    if v_shape[seq_dim] != k_shape[seq_dim]:
        _fail(ValueError, "v", f"of k's sequence length {k_shape[seq_dim]}", f"shape {tuple(v_shape)}")
    if v_shape[1] != hkv:
        _fail(ValueError, "v", f"of k's number of heads {hkv}", f"shape {tuple(v_shape)}")
    if k_shape[-1] != d:
        _fail(ValueError, "k", f"of q's head dim {d}", f"shape {tuple(k_shape)}")
    if hkv == 0 or hq % hkv != 0:
        _fail(ValueError, "k", f"a number of heads dividing q's {hq} (GQA/MQA)", f"{hkv} heads")
    dv = v_shape[-1]
    if not (1 <= d <= _MAX_HEAD_DIM and 1 <= dv <= _MAX_HEAD_DIM):
        for name, dim in (("q", d), ("v", dv)):
            if not 1 <= dim <= _MAX_HEAD_DIM:
                _fail(ValueError, name, f"a head dim in 1..{_MAX_HEAD_DIM}", dim)

    if attention_mask is not None:
        _check_mask("attention_mask", attention_mask, batch_shape + (sk,), device)
    if query_mask is not None:
        _check_mask("query_mask", query_mask, batch_shape + (sq,), device)
    if segment_ids is not None:
        _check_tensor("segment_ids", segment_ids, device)
        if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
            _fail(TypeError, "segment_ids", "an integer tensor", f"dtype {segment_ids.dtype}")
        if tuple(segment_ids.shape) != batch_shape + (sq,):
            _fail(ValueError, "segment_ids", f"of shape {batch_shape + (sq,)}", f"shape {tuple(segment_ids.shape)}")
        if sq != sk:
            _fail(ValueError, "segment_ids", "used with Sq == Sk (packed self-attention)", f"Sq {sq}, Sk {sk}")
    if seqused_k is not None:
        _check_tensor("seqused_k", seqused_k, device)
        if seqused_k.dtype != torch.int32:
            _fail(TypeError, "seqused_k", "an int32 tensor", f"dtype {seqused_k.dtype}")
        if tuple(seqused_k.shape) != (num_seqs,):
            _fail(ValueError, "seqused_k", f"of shape ({num_seqs},)", f"shape {tuple(seqused_k.shape)}")
        if _values_checkable(seqused_k) and not is_varlen:
            bad = (seqused_k < 0) | (seqused_k > sk)
            if bool(bad.any()):
                _fail(ValueError, "seqused_k", f"values in [0, {sk}]", seqused_k.tolist())
    if alibi_slopes is not None:
        _check_tensor("alibi_slopes", alibi_slopes, device)
        if not alibi_slopes.dtype.is_floating_point:
            _fail(TypeError, "alibi_slopes", "a float tensor", f"dtype {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((hq,), (num_seqs, hq)):
            _fail(ValueError, "alibi_slopes", f"of shape ({hq},) or ({num_seqs}, {hq})",
                  f"shape {tuple(alibi_slopes.shape)}")
    return is_varlen, num_seqs, (sq, sk), (left, right), autocast


# ----------------------------------------------------------------------------------------------
# kernel launch (eager autograd.Function and torch.library custom op share these)
# ----------------------------------------------------------------------------------------------

def _empty_out(q: torch.Tensor, head_dim_v: int, is_varlen: bool) -> torch.Tensor:
    """Output in q's memory layout: BSHD memory viewed as BHSD when q is a transposed BSHD tensor."""
    if is_varlen:
        return q.new_empty(q.shape[0], q.shape[1], head_dim_v)
    b, h, s, _ = q.shape
    stride = q.stride()
    if stride[1] < stride[2]:
        # new_empty(b, s, h, dv).transpose(1, 2) in one op (strides as torch gives a contiguous
        # (b, s, h, dv), sizes 0 counted as 1): 2.0 -> 1.1 us on the 2-core CPU box.
        row = (h or 1) * head_dim_v
        return q.new_empty_strided((b, h, s, head_dim_v), ((s or 1) * row, head_dim_v, row, 1))
    return q.new_empty(b, h, s, head_dim_v)


def _empty_lse(q: torch.Tensor, is_varlen: bool) -> torch.Tensor:
    if is_varlen:
        shape = (q.shape[1], q.shape[0])
    else:
        b, h, s, _ = q.shape
        shape = (b, h, s)  # a tuple of ints: torch parses the torch.Size q.shape[:3] 0.9 us slower
    return q.new_empty(shape, dtype=torch.float32)


def _empty_grad(t: torch.Tensor) -> torch.Tensor:
    """Gradient buffer with t's strides when t is dense (non-overlapping), else contiguous."""
    return torch.empty_like(t)


# What reading torch.backends.cuda.matmul.allow_tf32 calls (its module __getattr__ dispatches on
# the name): 0.65 -> 0.05 us per fp32 call on the 2-core CPU box.
_get_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def _dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """fp32 dots follow torch.backends.cuda.matmul.allow_tf32 (IEEE when off), like torch matmuls."""
    if dtype is torch.float32 and not interpret:
        allow_tf32 = _get_allow_tf32() if _get_allow_tf32 is not None else torch.backends.cuda.matmul.allow_tf32
        if allow_tf32:
            return "tf32"
    return "ieee"


def _launch_args(q, k, v, num_seqs, is_varlen, key_mask, query_mask, segments, seqused_k, cu_seqlens_q,
                 cu_seqlens_k, alibi, rng, max_seqlen_q, max_seqlen_k, sm_scale, softcap,
                 window_left, window_right, dropout_p, interpret) -> dict:
    """flash_fwd's / flash_bwd's keyword arguments after the tensors (benchmarks and scripts; the
    launch paths here pass them positionally)."""
    return dict(
        key_mask=key_mask, query_mask=query_mask, segments=segments, seqused_k=seqused_k, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, alibi=alibi, rng=rng, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, num_seqs=num_seqs, sm_scale=sm_scale, softcap=softcap,
        window_left=window_left, window_right=window_right, dropout_p=dropout_p,
        is_varlen=is_varlen, dot_precision=_dot_precision(q.dtype, interpret))


def _num_seqs(q: torch.Tensor, cu_seqlens_q: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1


# Triton's interpreter patches triton.language globally during a launch and keeps the program id in
# one global builder: interpreted launches from several threads must not overlap.
_INTERPRET_LOCK = threading.Lock()


def _serialized_if_interpreted(launch, args: tuple):
    """``launch(*args)``; under the lock when ``args[-1]`` (``interpret``) is true."""
    if args[-1]:
        with _INTERPRET_LOCK:
            return launch(*args)
    return launch(*args)


def _forward_impl(*args):
    return _serialized_if_interpreted(_forward_launch, args)


_KERNEL_MODULES: dict[str, ModuleType] = {}


def _kernels(name: str) -> ModuleType:
    """``hf_triton_attn.kernels.<name>``, imported on first use (importing Triton is slow). A
    function-level ``from .kernels.decode import flash_decode`` costs 0.6 us per call on the 2-core
    CPU box, this 0.1 us. Callers still read the launcher from the module per call (tests replace it)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f"{__package__}.kernels.{name}")
    return module


def _forward_launch(q, k, v, key_mask, query_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi, rng,
                    max_seqlen_q, max_seqlen_k, sm_scale, softcap, window_left, window_right,
                    dropout_p, deterministic, interpret, need_lse: bool = True):
    """Allocate ``out`` and ``lse`` and launch the forward: (out, lse). ``need_lse=False`` (no
    autograd, no ``return_lse``): the decode kernel writes no LSE and lse is None."""
    _check_backend_usable(interpret, q)
    is_varlen = cu_seqlens_q is not None
    num_seqs = _num_seqs(q, cu_seqlens_q)
    out = _empty_out(q, v.shape[-1], is_varlen)
    decode = (not is_varlen and dropout_p == 0.0 and segments is None and query_mask is None
              and max_seqlen_q <= _DECODE_MAX_SQ)  # dense: max_seqlen_q is Sq
    # Nobody reads the LSE without autograd or return_lse: the decode kernel then skips it, one
    # allocation less (1.8 us on the 2-core CPU box; CUDA allocations cost more).
    lse = _empty_lse(q, is_varlen) if need_lse or not decode else None
    if out.numel() == 0:
        return out, (lse.fill_(float("-inf")) if lse is not None else None)
    if decode:
        # Decode (a few new tokens against a cache): the split-KV kernel packs a GQA group's query
        # heads into one tile and spreads long caches over the SMs. It writes the same O and LSE, so
        # the backward below serves it unchanged.
        # Positional (in flash_decode's order, same names): its 11 keywords cost 0.4 us per call.
        _kernels("decode").flash_decode(
            q, k, v, out, lse, key_mask, seqused_k, alibi, max_seqlen_q, max_seqlen_k, num_seqs, sm_scale,
            softcap, window_left, window_right, _dot_precision(q.dtype, interpret))
        return out, lse
    # Positional, in flash_fwd's order (the same names): its 18 keywords, built by _launch_args
    # and unpacked, cost 1.7 us per call (2-core CPU box, launches stubbed).
    _kernels("forward").flash_fwd(
        q, k, v, out, lse, key_mask, query_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi, rng,
        max_seqlen_q, max_seqlen_k, num_seqs, sm_scale, softcap, window_left, window_right, dropout_p, is_varlen,
        _dot_precision(q.dtype, interpret))
    return out, lse


def _backward_impl(*args):
    return _serialized_if_interpreted(_backward_launch, args)


def _backward_launch(dout, q, k, v, out, lse, key_mask, query_mask, segments, seqused_k, cu_seqlens_q,
                     cu_seqlens_k, alibi, rng, max_seqlen_q, max_seqlen_k, sm_scale, softcap,
                     window_left, window_right, dropout_p, deterministic, interpret):
    is_varlen = cu_seqlens_q is not None
    num_seqs = _num_seqs(q, cu_seqlens_q)
    # _empty_grad, not torch.empty_like directly: the tests' poison fixture fills what it returns
    # with NaN, so a gradient element the kernels never write fails
    dq, dk, dv = _empty_grad(q), _empty_grad(k), _empty_grad(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # Positional, in flash_bwd's order (the same names): 19 keywords cost 1.9 us per call (2-core
    # CPU box, launches stubbed).
    _kernels("backward").flash_bwd(
        dout, q, k, v, out, lse, torch.empty_like(lse), dq, dk, dv, key_mask, query_mask, segments, seqused_k,
        cu_seqlens_q, cu_seqlens_k, alibi, rng, max_seqlen_q, max_seqlen_k, num_seqs, sm_scale, softcap,
        window_left, window_right, dropout_p, is_varlen, _dot_precision(q.dtype, interpret), None, None, None,
        deterministic or torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv


class _FlashAttnFunction(torch.autograd.Function):
    """Eager path: calls the launchers directly (cheaper than the custom op's dispatch).

    ``apply(q, k, v, rest)``: ``rest`` is the tuple of _forward_impl's 17 other arguments. Function.apply
    costs per argument (functorch's unwrap, the C++ input scan): 20 arguments 12.6 us, 4 arguments 7.2 us
    (2-core CPU box). The tensors in ``rest`` (masks, cu_seqlens, ALiBi slopes, the dropout seed) got no
    gradient as arguments either, and are still saved with ``save_for_backward`` (in-place changes
    before the backward are still caught). Saves exactly what the custom op's autograd registration
    saves (``_op_setup_context``)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rest: tuple):
        args = (q, k, v, *rest)
        out, lse = _serialized_if_interpreted(_forward_launch, args)
        _op_setup_context(ctx, args, (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        dq, dk, dv = _serialized_if_interpreted(_backward_launch, (dout, q, k, v, out, lse, *tensors, *ctx.scalars))
        return dq, dk, dv, None


# torch.library custom op: what torch.compile sees (opaque to the tracer, with a fake impl).
@torch.library.custom_op("hf_triton_attn::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
    query_mask: torch.Tensor | None, segments: torch.Tensor | None, seqused_k: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    alibi: torch.Tensor | None, rng: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    sm_scale: float, softcap: float, window_left: int, window_right: int, dropout_p: float,
    deterministic: bool, interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, key_mask, query_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi,
                         rng, max_seqlen_q, max_seqlen_k, sm_scale, softcap, window_left, window_right,
                         dropout_p, deterministic, interpret)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, key_mask, query_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi, rng, max_seqlen_q,
      max_seqlen_k, sm_scale, softcap, window_left, window_right, dropout_p, deterministic, interpret):
    is_varlen = cu_seqlens_q is not None
    return _empty_out(q, v.shape[-1], is_varlen), _empty_lse(q, is_varlen)


@torch.library.custom_op("hf_triton_attn::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_mask: torch.Tensor | None, query_mask: torch.Tensor | None,
    segments: torch.Tensor | None, seqused_k: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, alibi: torch.Tensor | None, rng: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, sm_scale: float, softcap: float, window_left: int,
    window_right: int, dropout_p: float, deterministic: bool, interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, key_mask, query_mask, segments, seqused_k, cu_seqlens_q,
                          cu_seqlens_k, alibi, rng, max_seqlen_q, max_seqlen_k, sm_scale, softcap,
                          window_left, window_right, dropout_p, deterministic, interpret)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, *args):
    return _empty_grad(q), _empty_grad(k), _empty_grad(v)


def _op_setup_context(ctx, inputs, output):
    (q, k, v, key_mask, query_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi, rng, *scalars) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, query_mask, segments, seqused_k, cu_seqlens_q,
                          cu_seqlens_k, alibi, rng)
    ctx.scalars = tuple(scalars)
    ctx.mark_non_differentiable(lse)
    # The LSE never gets a gradient: without this, autograd passed the backward a zero-filled tensor
    # of its shape on every call (one allocation and one fill launch per attention backward).
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, *tensors, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 17


_flash_attn_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------
# backend choice and the public function
# ----------------------------------------------------------------------------------------------

_BACKEND_ENV = "HF_TRITON_ATTN_BACKEND"


def _choose_backend(backend: str | None, t: torch.Tensor) -> str:
    """The backend for a call on ``t``'s device (a tensor: ``t.is_cuda`` is cheaper than ``device.type``)."""
    global _warned_cpu_fallback
    if backend is not None:
        return backend
    env = environ_get(_BACKEND_ENV)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"HF_TRITON_ATTN_BACKEND must be one of {BACKENDS}; got {env!r}")
        return env
    if t.is_cuda:
        return "triton"
    if not _warned_cpu_fallback and not torch.compiler.is_compiling():
        _warned_cpu_fallback = True
        warnings.warn(
            f"hf_triton_attn: tensors on {t.device.type} have no Triton GPU kernel; using the eager "
            "reference implementation (pass backend='interpret' with TRITON_INTERPRET=1 to run the "
            "Triton kernels on the CPU). This warning is shown once.", stacklevel=3)
    return "reference"


_kernels_interpreted: bool | None = None


def _check_backend_usable(interpret: bool, t: torch.Tensor) -> None:
    """Raise if the requested kernel mode cannot run on ``t``'s device. Runs where the kernels launch.

    Takes a tensor, not its device: ``t.is_cuda`` is 0.25 us cheaper than ``t.device.type``."""
    global _kernels_interpreted
    if _kernels_interpreted is None:
        from .kernels import interpreted

        _kernels_interpreted = interpreted()
    if _kernels_interpreted == interpret and (interpret or t.is_cuda):
        return
    device = t.device
    if not interpret:
        if device.type != "cuda":
            raise ValueError(f"flash_attention: backend='triton' needs CUDA tensors; got device {device} "
                             "(use backend='reference', or 'interpret' with TRITON_INTERPRET=1)")
        if _kernels_interpreted:
            raise ValueError("flash_attention: backend='triton' is unavailable because TRITON_INTERPRET=1 "
                             "was set when triton was imported (the kernels are interpreted)")
    else:
        raise ValueError("flash_attention: backend='interpret' needs the environment variable "
                         "TRITON_INTERPRET=1 set before triton and hf_triton_attn are first imported "
                         "(Triton fixes the mode at import)")


def segment_bounds(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) segment ids -> (B, 2, S) int32 ``[start, end)`` of each token's run of equal ids.

    Vectorised (cummax / reversed cummin), no host sync. A run boundary is any change of id.
    """
    batch, length = segment_ids.shape
    idx = torch.arange(length, device=segment_ids.device, dtype=torch.int32).expand(batch, length)
    boundary = torch.ones_like(segment_ids, dtype=torch.bool)
    boundary[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(boundary, idx, 0).cummax(dim=1).values
    next_start = torch.where(boundary, idx, length)  # a run ends where the next one starts
    after = torch.cat([next_start[:, 1:], next_start.new_full((batch, 1), length)], dim=1)
    end = after.flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([start, end], dim=1).to(torch.int32)


def _draw_dropout_rng(device: torch.device) -> torch.Tensor:
    """int64 [seed, offset] drawn from torch's generator on ``device``: no host sync, replayable."""
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    softmax_scale: float | None = None, dropout_p: float = 0.0,
    attention_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False, return_lse: bool = False,
    backend: str | None = None, segment_ids: torch.Tensor | None = None,
):
    """Exact attention ``softmax(q k^T * scale + bias) v`` without materialising the scores.

    Args:
        q: ``(B, Hq, Sq, D)`` dense, or ``(total_q, Hq, D)`` packed with ``cu_seqlens_q``.
        k: ``(B, Hkv, Sk, D)`` / ``(total_k, Hkv, D)``; ``Hq % Hkv == 0`` (GQA/MQA, never repeated).
        v: ``(B, Hkv, Sk, Dv)`` / ``(total_k, Hkv, Dv)``; Dv may differ from D (both 1..256).
        causal: query i sees key j iff ``j <= i + Sk - Sq`` (bottom-right aligned).
        softmax_scale: defaults to ``D ** -0.5``.
        dropout_p: dropout on the probabilities (pass 0.0 at eval); a counter-based hash seeded from torch's
            generator, so ``torch.manual_seed`` reproduces it; ``dropout_p`` is applied to 2**-15
            (each score is kept when a 14-bit draw is >= round(p * 2**14)).
        attention_mask: ``(B, Sk)`` bool/int, nonzero = real key (HF tokenizer convention).
        query_mask: ``(B, Sq)`` bool/int, nonzero = real query; padded rows are skipped, output 0.
        seqused_k: ``(B,)`` int32, only the first ``seqused_k[b]`` keys of row b exist.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 prefix sums (varlen); with
            ``max_seqlen_q``, ``max_seqlen_k`` Python ints.
        window_size: ``(left, right)``: query i sees keys in
            ``[i + Sk - Sq - left, i + Sk - Sq + right]``; -1 = unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)``: bias ``-slope * |i + Sk - Sq - j|`` after scaling.
        segment_ids: ``(B, S)`` integers (dense layout, Sq == Sk): several sequences packed in one
            row; each run of equal consecutive ids is one sequence and tokens see only their own
            run (combined with ``causal``, windows and masks). HF's packed ``position_ids``
            without ``cu_seq_lens`` arrive this way; no host sync.
        deterministic: True makes the backward bitwise reproducible (as does
            ``torch.use_deterministic_algorithms(True)``). Otherwise, at head dims <= 64 with
            ``causal``/right windows or dropout on Hopper, dq is summed over key blocks with fp32
            atomic adds (faster; the order of the additions varies run to run). dk and dv never use
            atomics.
        return_lse: also return the natural-log LSE, ``(B, Hq, Sq)`` or ``(Hq, total_q)``, -inf
            for rows with no visible key, without gradient.
        backend: None (auto: ``"triton"`` on CUDA, ``"reference"`` on CPU with a one-time warning;
            env ``HF_TRITON_ATTN_BACKEND`` overrides the auto choice), ``"triton"``, ``"interpret"``
            or ``"reference"``. An explicit backend never falls back.

    Returns:
        ``out`` ``(B, Hq, Sq, Dv)`` (in q's memory layout: BSHD memory when q is a transposed BSHD
        tensor) or ``(total_q, Hq, Dv)``; ``(out, lse)`` with ``return_lse``. Rows with no visible
        key are 0, never NaN.
    """
    # Positional, in _validate's order (the same names): 15 keywords cost 0.6 us per call.
    is_varlen, num_seqs, (max_sq, max_sk), (left, right), autocast = _validate(
        q, k, v, causal, softmax_scale, dropout_p, attention_mask, query_mask, segment_ids, seqused_k,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, softcap, alibi_slopes, backend)
    if autocast:
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sm_scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    chosen = _choose_backend(backend, q)

    if chosen == "reference":
        return attention_reference(
            q, k, v, causal=causal, softmax_scale=sm_scale, dropout_p=float(dropout_p),
            attention_mask=attention_mask, query_mask=query_mask, seqused_k=seqused_k,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, window_size=(left, right), softcap=float(softcap),
            alibi_slopes=alibi_slopes, return_lse=return_lse, segment_ids=segment_ids)

    if chosen == "interpret" and q.dtype == torch.bfloat16:
        raise ValueError("flash_attention: backend='interpret' cannot run bfloat16: Triton's CPU interpreter "
                         "multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584); use float16 or "
                         "float32 on the CPU, or the GPU")
    key_mask, qmask = attention_mask, query_mask  # bool or integer, read in place
    alibi = alibi_slopes.float() if alibi_slopes is not None else None
    rng = _draw_dropout_rng(q.device) if dropout_p > 0 else None
    if is_varlen:
        max_sq, max_sk = int(max_sq), int(max_sk)  # ints, or int subclasses
    segments = segment_bounds(segment_ids) if segment_ids is not None else None
    rest = (key_mask, qmask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi, rng, max_sq, max_sk,
            sm_scale, float(softcap), left, right, float(dropout_p), bool(deterministic), chosen == "interpret")
    # Eager calls bypass the custom op's dispatcher: host time per call with the launch stubbed,
    # measured on this project's 2-core CPU machine (2026-11-25): autograd.Function.apply 17.2 us,
    # the torch.library op 30.7 us. torch.compile traces the op (fake impl, no graph break).
    if torch.compiler.is_compiling():
        out, lse = _flash_attn_fwd_op(q, k, v, *rest)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _FlashAttnFunction.apply(q, k, v, rest)
    else:
        # Nothing to differentiate (generate, eval): no autograd node, 17 us less host time per
        # call (H200 host, 2026-11-26, benchmarks/host_overhead.py); no LSE unless returned. Not
        # through _forward_impl: its *args hop costs 0.6 us (2-core CPU box, launches stubbed).
        if chosen == "interpret":
            with _INTERPRET_LOCK:  # as _serialized_if_interpreted
                out, lse = _forward_launch(q, k, v, *rest, return_lse)
        else:
            out, lse = _forward_launch(q, k, v, *rest, return_lse)
    return (out, lse) if return_lse else out
