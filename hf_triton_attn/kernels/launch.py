"""Host-side helpers shared by the kernel launchers: optional-tensor arguments and feature flags."""

from __future__ import annotations

import os
import threading

import torch

# At module level: imported inside tma_descriptor it cost 2.1 us per descriptor (3.5 -> 1.4 us per
# build, 2-core CPU box, 2026-11-27; the forward builds three or four per call).
from .configs import block_dim


def ptr_or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor; the dummy is never read (its flag is off)."""
    return t if t is not None else dummy


def bhsd_strides(t: torch.Tensor, is_varlen: bool) -> tuple:
    """Strides of ``t`` seen as (B, H, S, D): dense tensors as they are; packed (T, H, D) tensors
    with batch stride 0 and token stride as S stride (rows are offset by ``cu_seqlens`` in-kernel).
    Computing them here instead of building expanded views saves three view ops per tensor."""
    st = t.stride()
    return (0, st[1], st[0], st[2]) if is_varlen else st


def rows_strides(t: torch.Tensor, is_varlen: bool) -> tuple:
    """Strides of an LSE / delta buffer seen as (B, H, S): dense (B, H, S) as is, varlen (H, T)
    with batch stride 0."""
    st = t.stride()
    return (0, st[0], st[1]) if is_varlen else st


def mask_strides(mask: torch.Tensor | None) -> tuple[int, int]:
    return tuple(mask.stride()) if mask is not None else (0, 0)


def segment_strides(segments: torch.Tensor | None) -> tuple[int, int]:
    """(batch, start-to-end) strides of the (B, 2, S) int32 run bounds; tokens are contiguous."""
    if segments is None:
        return (0, 0)
    if segments.stride(2) != 1:
        raise ValueError("segments must be contiguous along the token dimension")
    return (segments.stride(0), segments.stride(1))


def alibi_strides(alibi: torch.Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of ALiBi slopes given as (H,) or (B, H)."""
    if alibi is None:
        return (0, 0)
    return (0, alibi.stride(0)) if alibi.dim() == 1 else (alibi.stride(0), alibi.stride(1))


def tile_grid(seqlen: int, block: int, num_bh: int) -> tuple[int, int, int]:
    """The 1-D launch grid that ``common.program_tile`` reads: ``cdiv(seqlen, block)`` tiles for each
    of the ``num_bh`` (sequence, head) rows, on grid x (up to 2**31 - 1 programs; y and z stop at 65535)."""
    return (-(-seqlen // block) * num_bh, 1, 1)


_TMA_DTYPES = (torch.float16, torch.bfloat16)
_tma_by_device: dict = {}


def _tma_usable(device: torch.device) -> bool:
    """Host-built TMA descriptors work here: Hopper or newer (or the interpreter), Triton's
    ``TensorDescriptor`` importable, and ``HF_TRITON_ATTN_TMA`` not set to 0 (``force``: on any
    device, for scripts/aot_compile.py, which records sm_90 launches from CPU tensors)."""
    key = (device.type, device.index)
    usable = _tma_by_device.get(key)
    if usable is None:
        import os

        setting = os.environ.get("HF_TRITON_ATTN_TMA", "1")
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
        except ImportError:
            setting = "0"
        if setting in ("0", "force"):
            usable = setting == "force"
        elif device.type == "cuda":
            usable = torch.cuda.get_device_capability(device)[0] >= 9
        else:
            usable = os.environ.get("TRITON_INTERPRET", "0") == "1"
        _tma_by_device[key] = usable
    return usable


def _tma_readable(t: torch.Tensor) -> bool:
    """A TMA descriptor can describe the 4-D ``t`` as it is: fp16 / bf16 (2-byte elements), 16-byte
    aligned base, unit last stride, every other stride a positive multiple of 8 elements (16 bytes),
    no empty dimension. Unrolled for the 4-D case: ``tma_can_read(q, k, v, o)`` 5.1 -> 3.1 us on an
    H100 host against the generic form (``all()`` over a generator, ``numel()``, ``element_size()``;
    results/2026-11-26_h100_session9_run14_host_tma.log)."""
    if t.dtype not in _TMA_DTYPES or t.data_ptr() % 16:
        return False
    s0, s1, s2, s3 = t.stride()
    return (s3 == 1 and s0 > 0 and s1 > 0 and s2 > 0 and not (s0 | s1 | s2) & 7
            and 0 not in t.shape)


def _tma_readable_packed(t: torch.Tensor) -> bool:
    """``_tma_readable`` for a packed (varlen) 3-D (T, H, D) tensor."""
    if t.dtype not in _TMA_DTYPES or t.data_ptr() % 16:
        return False
    s0, s1, s2 = t.stride()
    return s2 == 1 and s0 > 0 and s1 > 0 and not (s0 | s1) & 7 and 0 not in t.shape


def tma_can_read(*tensors: torch.Tensor, packed: bool = False) -> bool:
    """Whether ``tma_descriptor`` may describe each of these 4-D (B, H, S, D) tensors, or with
    ``packed`` ``packed_tma_descriptor`` each of these (T, H, D) ones (one device)."""
    if not _tma_usable(tensors[0].device):
        return False
    readable = _tma_readable_packed if packed else _tma_readable
    for t in tensors:
        if not readable(t):
            return False
    return True


def packed_tma_descriptor(t: torch.Tensor, block_rows: int):
    """Descriptor of (1, 1, block_rows, padded head dim) boxes of a packed (T, H, D) tensor seen as
    (1, H, T, D), the layout of a one-sequence dense batch in BSHD memory: a kernel reads a sequence's
    rows from its ``cu_seqlens`` offset. Boxes past T or D read as 0 (rows past a sequence's end are the
    next sequence's). No view ops: the shape and strides go to the descriptor as lists."""
    total, heads, dim = t.shape
    s0, s1, _ = t.stride()
    return _tma_box_class()(t, [1, heads, total, dim], [total * s0, s1, s0, 1], [1, 1, block_rows, block_dim(dim)])


def tma_descriptor(t: torch.Tensor, block_rows: int):
    """Descriptor of (1, 1, block_rows, padded head dim) boxes of a 4-D (B, H, S, D) tensor whose
    layout ``_tma_readable`` accepts. Boxes past S or D read as 0 and are clipped on writes."""
    return _tma_box_class()(t, list(t.shape), list(t.stride()), [1, 1, block_rows, block_dim(t.shape[3])])


def tma_descriptors(a: torch.Tensor, b: torch.Tensor, block_rows: int) -> tuple:
    """Descriptors of (1, 1, block_rows, padded head dim) boxes of two tensors, e.g. K and V
    (``tma_can_read`` first)."""
    return tma_descriptor(a, block_rows), tma_descriptor(b, block_rows)


_TMA_BOX = None


def _tma_box_class():
    """Triton's ``TensorDescriptor`` without its per-construction checks (``_tma_readable`` made
    them): construction 2.1 -> 0.6 us per descriptor on the 2-core CPU machine (2026-11-26)."""
    global _TMA_BOX
    if _TMA_BOX is None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        class _TmaBox(TensorDescriptor):
            def __post_init__(self) -> None:
                pass

        _TMA_BOX = _TmaBox
    return _TMA_BOX


FLAG_NAMES = ("HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_KEY_MASK", "HAS_QUERY_MASK",
              "HAS_SEGMENTS", "HAS_SEQUSED_K", "IS_VARLEN", "HAS_DROPOUT")


def feature_flag_values(window_left: int, window_right: int, softcap: float, alibi, key_mask, query_mask,
                        segments, seqused_k, is_varlen: bool, dropout_p: float) -> tuple:
    """The constexpr switches every attention kernel takes, in ``FLAG_NAMES`` order (each
    combination is a separate specialization)."""
    return (window_left >= 0, window_right >= 0, softcap > 0, alibi is not None, key_mask is not None,
            query_mask is not None, segments is not None, seqused_k is not None, is_varlen, dropout_p > 0)


# ----------------------------------------------------------------------------------------------
# cached launches
# ----------------------------------------------------------------------------------------------

_I32 = (-(2**31), 2**31)
_TENSOR = torch.Tensor  # plain tensors take the inline branch of the raw key (no function call)
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                  torch.uint8: "u8", torch.bool: "u1"}


def _is_descriptor(a) -> bool:
    """A host TMA descriptor (Triton's ``TensorDescriptor`` or our ``_TmaBox``), told apart by its fields."""
    return hasattr(a, "block_shape") and hasattr(a, "base")


def _pointer_class(a):
    """Class of a pointer-like argument: a tensor's dtype and 16-byte alignment, a TMA descriptor's
    dtype and box shape (Triton types it ``tensordesc<dtype[box]>``), or None (a constexpr)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if a is None:
        return None
    return ("desc", a.base.dtype, tuple(a.block_shape))


def _arg_class(a):
    """What Triton (3.6) specializes a runtime argument on; equal classes -> the same compiled kernel.

    Tensors: dtype and 16-byte alignment of the data pointer. TMA descriptors: dtype and box shape.
    Ints: the value 1 (a constexpr), else the integer type (i32 / i64 / u64) and divisibility by 16.
    Floats, bools and None: their type.
    """
    if isinstance(a, torch.Tensor) or _is_descriptor(a):
        return _pointer_class(a)
    if isinstance(a, bool):
        return "u1"
    if isinstance(a, int):
        if a == 1:
            return 1
        kind = "i32" if _I32[0] <= a < _I32[1] else ("i64" if a < 2**63 else "u64")
        return (kind, a % 16 == 0)
    if isinstance(a, float):
        return "fp32"
    if a is None:
        return None
    return type(a).__name__  # never cached: the check below rejects the kernel's fast path


def _unspecialized_class(a):
    """Class of an argument declared ``do_not_specialize``: only its type (ints: i32 / i64 / u64)."""
    if isinstance(a, int) and not isinstance(a, bool):
        return ("nospec", "i32" if _I32[0] <= a < _I32[1] else ("i64" if a < 2**63 else "u64"))
    return _arg_class(a)


def _predicted_triton_spec(cls) -> tuple:
    """The (type, attribute) pair Triton's binder gives an argument of class ``cls``."""
    if isinstance(cls, tuple) and cls[0] == "nospec":
        return (cls[1], None)
    if isinstance(cls, tuple) and isinstance(cls[0], torch.dtype):
        return ("*" + _TRITON_DTYPES.get(cls[0], "?"), "D" if cls[1] else "")
    if isinstance(cls, tuple) and cls[0] == "desc":
        return (f"tensordesc<{_TRITON_DTYPES.get(cls[1], '?')}[{', '.join(map(str, cls[2]))}]>", None)
    if cls == 1:
        return ("constexpr", 1)
    if cls is None:
        return ("constexpr", None)
    if cls in ("u1", "fp32"):
        return (cls, None)
    if isinstance(cls, tuple):
        return (cls[0], "D" if cls[1] else "")
    return ("?", None)


# Whether the launcher takes pointer arguments as ints: None until the first cached launch tells.
_INT_POINTERS: list = [None]
# Set on a thread once its CUDA context is known to be current (see _make_context_current).
_thread_state = threading.local()


def _make_context_current(t: torch.Tensor) -> None:
    """Make the CUDA context current on this thread, once per thread.

    Host tensor descriptors are encoded by the driver API (``cuTensorMapEncodeTiled``, Triton's
    ``fill_tma_descriptor``) before Triton's launcher makes a context current (its
    ``ensureCudaContext`` runs at the launch itself). On a thread that has run no CUDA work yet, torch
    does not touch the runtime either (``set_device(0)`` is skipped when ``cudaGetDevice`` already says
    0, and cached allocations make no CUDA call), so the encode failed with "invalid device context"
    when our kernel was a thread's first CUDA work (H100, 2026-11-27: ``benchmarks/host_backward.py``'s
    thread probe). ``cudaMemGetInfo`` is a runtime call without a sync: it makes the device's primary
    context current."""
    torch.cuda.mem_get_info(t.device)
    _thread_state.ready = True


class CachedLauncher:
    """Launch one ``@triton.jit`` kernel with little host time per call.

    ``kernel[grid](...)`` re-binds and re-specializes every argument on every call: Triton 3.6 spent
    about 45 us of host time per launch of our 60-argument forward at a decode shape (H200 host,
    2026-11-26, benchmarks/host_overhead.py) for 12 us of GPU time. Here the compiled kernel is
    cached under the arguments' specialization classes (``_arg_class``), which is all Triton's own
    cache key depends on besides the constexprs and launch options, and launched directly.

    Computing those classes in Python costs about as much as Triton's native binder, so a second,
    cheaper key comes first: the raw scalar arguments plus each pointer's class (``_pointer_class``;
    pointers, TMA descriptors and absent optionals are the first ``num_pointers`` arguments). A
    training loop or the layers of one decode step repeat it exactly; a new one (the cache grew by
    a token) computes the classes once. The first call of each class goes through Triton (compiling if needed) and checks that
    Triton's specialization agrees with the predicted one; if it ever does not (another Triton
    version), this launcher keeps using ``kernel[grid](...)`` for good: slower, never wrong. The
    interpreter always takes the plain path.
    """

    _MAX_RAW_KEYS = 4096

    def __init__(self, fn, num_pointers: int) -> None:
        import inspect

        import triton.language as tl

        self.fn = fn
        self.num_pointers = num_pointers
        params = list(inspect.signature(getattr(fn, "fn", fn)).parameters.values())
        is_constexpr = [p.annotation is tl.constexpr for p in params]
        self.constexpr_names = tuple(p.name for p, c in zip(params, is_constexpr) if c)
        self.num_runtime = len(params) - len(self.constexpr_names)
        suffix = all(is_constexpr[self.num_runtime:])  # constexprs last: Triton's argument order is ours
        self.fast = suffix and _fast_launch_available()
        if self.fast:
            # Bound once: ``from triton import knobs`` and ``from triton.runtime.driver import driver``
            # inside __call__ cost 0.3 + 0.6 us per launch (Triton 3.6, 2-core CPU box).
            from triton import knobs
            from triton.runtime.driver import driver

            self._knobs, self._driver = knobs, driver
        # parameters declared do_not_specialize: Triton types them without value classes
        kernel_params = getattr(fn, "params", None) or []
        unspecialized = {i for i, kp in enumerate(kernel_params) if getattr(kp, "do_not_specialize", False)}
        self.classifiers = tuple(_unspecialized_class if i in unspecialized else _arg_class
                                 for i in range(self.num_runtime))
        self.kernels: dict = {}  # class key -> compiled kernel
        self.by_raw: dict = {}  # raw key -> compiled kernel
        self.plans: dict = {}  # compiled kernel -> _descriptor_plan (False: launch through kernel.run)

    def __call__(self, grid: tuple, args: tuple, constexprs: tuple, num_warps: int, num_stages: int) -> None:
        if not _thread_state.__dict__ and args[0].is_cuda:
            _make_context_current(args[0])
        if self.fast and args[0].is_cuda:
            runtime = self._knobs.runtime
            if _hooks_idle(runtime.launch_enter_hook) and _hooks_idle(runtime.launch_exit_hook):
                device = torch.cuda.current_device()
                n = self.num_pointers
                # Tensors go to the launcher as their addresses: given an int, Triton 3.6's launcher
                # skips its own data_ptr() call and cuPointerGetAttribute per pointer argument
                # (H100 host, 2026-11-26, host_overhead.py A/B: decode-shape call 33.3 -> 30.6 us,
                # varlen call 55.9 -> 52.5 us).
                pointers = [t.data_ptr() if t.__class__ is _TENSOR else t for t in args[:n]]
                raw = (device, num_warps, num_stages, constexprs, args[n:],
                       tuple([(t.dtype, p % 16 == 0) if t.__class__ is _TENSOR else _pointer_class(t)
                              for t, p in zip(args[:n], pointers)]))
                kernel = self.by_raw.get(raw)
                if kernel is None:
                    key = (device, num_warps, num_stages, constexprs,
                           tuple([f(a) for f, a in zip(self.classifiers, args)]))
                    kernel = self.kernels.get(key)
                    if kernel is None:
                        kernel = self._slow(grid, args, constexprs, num_warps, num_stages)
                        self._remember(key, kernel, device, args, constexprs, num_warps, num_stages)
                        return
                    if len(self.by_raw) >= self._MAX_RAW_KEYS:
                        self.by_raw.clear()
                    self.by_raw[raw] = kernel
                gx, gy, gz = grid[0], grid[1], grid[2] if len(grid) > 2 else 1
                stream = self._driver.active.get_current_stream(device)
                if not _INT_POINTERS[0]:
                    launch = (gx, gy, gz, stream, kernel.function, kernel.packed_metadata, None, None, None)
                    self._first_int_launch(kernel, launch, args, pointers, constexprs)
                    return
                plan = self.plans.get(kernel)
                if plan is None:
                    plan = self.plans[kernel] = _descriptor_plan(kernel, n)
                if plan:
                    raw, coop, pdl, slots, encode = plan
                    for pos, meta, encoded in slots:  # last slot first: expanding one shifts the later ones
                        desc = pointers[pos]
                        key = (desc.base.data_ptr(), desc.padding, *desc.shape, *desc.strides)
                        args_of_desc = encoded.get(key)
                        if args_of_desc is None:
                            args_of_desc = encode(desc, meta)
                            if len(encoded) >= _MAX_ENCODED:
                                encoded.clear()
                            encoded[key] = args_of_desc
                        pointers[pos:pos + 1] = args_of_desc
                    raw(gx, gy, gz, stream, kernel.function, coop, pdl, None, None, kernel.packed_metadata,
                        None, None, None, *pointers, *args[n:], *constexprs)
                else:
                    kernel.run(gx, gy, gz, stream, kernel.function, kernel.packed_metadata, None, None, None,
                               *pointers, *args[n:], *constexprs)
                return
        self._slow(grid, args, constexprs, num_warps, num_stages)

    @staticmethod
    def _first_int_launch(kernel, launch: tuple, args: tuple, pointers: list, constexprs: tuple) -> None:
        """Launch with the pointers as ints if this Triton's launcher takes them (checked once per
        process: a launcher that wants tensors raises TypeError before launching), else as tensors."""
        if _INT_POINTERS[0] is not False:
            try:
                kernel.run(*launch, *pointers, *args[len(pointers):], *constexprs)
                _INT_POINTERS[0] = True
                return
            except TypeError:
                if _INT_POINTERS[0]:  # ints worked before: a real error
                    raise
                _INT_POINTERS[0] = False
        kernel.run(*launch, *args, *constexprs)

    def _slow(self, grid, args, constexprs, num_warps, num_stages):
        return self.fn[grid](*args, **dict(zip(self.constexpr_names, constexprs)),
                             num_warps=num_warps, num_stages=num_stages)

    def _remember(self, key, kernel, device, args, constexprs, num_warps, num_stages) -> None:
        """Cache ``kernel`` under ``key`` if Triton's own specialization of ``args`` is the predicted one
        (and the pointers are exactly the first ``num_pointers`` arguments, as the raw key assumes)."""
        try:
            n = self.num_pointers
            layout_ok = (all(a is None or isinstance(a, torch.Tensor) or _is_descriptor(a) for a in args[:n])
                         and not any(isinstance(a, torch.Tensor) or _is_descriptor(a) for a in args[n:]))
            binder = self.fn.device_caches[device][4]
            kwargs = dict(zip(self.constexpr_names, constexprs), num_warps=num_warps, num_stages=num_stages)
            _, specialization, _ = binder(*args, **kwargs)
            actual = [tuple(s) for s in specialization[:self.num_runtime]]
            predicted = [_predicted_triton_spec(c) for c in key[4]]
            ok = (layout_ok and actual == predicted and hasattr(kernel, "function")
                  and hasattr(kernel, "packed_metadata"))
        except Exception:  # an API this code does not know: plain launches from now on
            ok = False
        if ok:
            self.kernels[key] = kernel
        else:
            self.fast = False
            self.kernels.clear()
            self.by_raw.clear()


# Entries per descriptor parameter before its encoded tensor maps are dropped (a bound, not a tuning knob:
# a training loop or inference at one shape uses one entry per layer).
_MAX_ENCODED = 256


def _descriptor_plan(kernel, num_pointers: int):
    """How to launch ``kernel`` (one with TMA descriptor parameters) without Triton's generic wrapper.

    Triton 3.6 wraps the launcher of such a kernel in a Python loop over every argument (83 for the
    forward) that expands each descriptor into its encoded tensor map, shape and strides. Expanding
    only the descriptors here took a forward call's host time from 42.0 to 35.6 us (B1 H2 S128) and
    from 41.4 to 34.8 us (B32 H12 S512), median of 7 in-process rounds on an H100 host (2026-11-26,
    results/2026-11-26_h100_session9_run14_host_tma.log; pointer loads: 17.6 us). The plan is
    (bare launcher, cooperative flag, PDL flag, ((position, metadata, encoded), ...) of the descriptors
    among the first ``num_pointers`` arguments, last first, Triton's own per-descriptor encoder), read
    from that wrapper's closure; False (launch through ``kernel.run``) wherever the wrapper is not the
    one this was written against or the kernel needs scratch memory.

    ``encoded`` (one dict per descriptor parameter) keeps the encoder's results, the tensor map and the
    shape and strides that follow it, keyed by (base address, padding, shape, strides). The rest of what the
    tensor map encodes (dtype, box, swizzle) is fixed per parameter of one compiled kernel, so an equal
    key is an equal tensor map: a reused entry is exact even when the memory it names now belongs to
    another tensor. A training loop at one shape meets the same keys every step where the caching
    allocator hands the same blocks back: a GPT-2 124M train loop (``benchmarks/descriptor_reuse.py``,
    B8 S1024 bf16) encoded 84 descriptors per step without this and none from its third step with it
    (H200, 2026-11-28, results/2026-11-28_h200_session21_run4_descriptor_cache.log). The host time
    that saves (the driver's ``cuTensorMapEncodeTiled`` and Triton's Python wrapper around it, 7-8 per
    fwd+bwd call) was within that host's noise."""
    try:
        from triton.backends.nvidia.driver import make_tensordesc_arg

        run = kernel.run
        inner = run.launch
        if getattr(inner, "__name__", "") != "inner" or not inner.__closure__:
            return False
        cells = dict(zip(inner.__code__.co_freevars, (c.cell_contents for c in inner.__closure__)))
        raw, indices, metas = cells["launcher"], cells["tensordesc_indices"], cells["tensordesc_meta"]
        slots = sorted(indices)
        if (not slots or len(slots) != len(metas) or any(m is None for m in metas) or slots[-1] >= num_pointers
                or list(metas) != list(getattr(kernel.metadata, "tensordesc_meta", None) or ())
                or run.global_scratch_size or run.profile_scratch_size):
            return False
        return (raw, run.launch_cooperative_grid, run.launch_pdl,
                tuple(reversed([(slot, meta, {}) for slot, meta in zip(slots, metas)])), make_tensordesc_arg)
    except Exception:  # another Triton: its own launch path
        return False


def _hooks_idle(hook) -> bool:
    """No launch hook installed: None (older Tritons) or an empty ``HookChain`` (Triton 3.6: the knob is
    always a chain, called with the launch metadata when it holds hooks, e.g. under proton)."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


def _fast_launch_available() -> bool:
    """Cached launches rely on Triton 3.x's compiled-kernel API (``CompiledKernel.run`` with the
    launcher's argument order, ``JITFunction.device_caches``); never under the interpreter."""

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("HF_TRITON_ATTN_PLAIN_LAUNCH") == "1":
        return False
    try:
        import triton
        from triton import knobs  # noqa: F401
    except ImportError:
        return False
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 4) and torch.cuda.is_available()
