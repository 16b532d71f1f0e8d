"""Forward flash-attention kernel: fp32 online softmax in the exp2 domain.

One program computes BLOCK_M query rows of one (sequence, query head). Key blocks are visited in
three phases: masked edge blocks of the left window, the mask-free steady state, and the masked
edge blocks of the causal diagonal / right window / sequence end, so the steady-state loop never
evaluates a position mask. The same kernel serves dense (B, H, S, D) tensors with any strides and
packed varlen tensors (``IS_VARLEN``: batch stride 0, row offsets from ``cu_seqlens``).
"""

import functools

import triton
import triton.language as tl

from .common import (
    EXTENT_CHUNK,
    LN2,
    LOG2E,
    allowed_mask,
    clamp_to_extent,
    dot_operand_in_registers,
    dropout_hash,
    dropout_threshold,
    dropout_zero,
    key_range_for_query_block,
    load_kv_tiles,
    load_segments,
    mask_extent,
    program_tile,
    score_transform,
    seq_bounds,
)
from .configs import block_dim, fwd_config, key_tier, short_varlen_rows
from .launch import (
    FLAG_NAMES,
    CachedLauncher,
    alibi_strides,
    bhsd_strides,
    feature_flag_values,
    mask_strides,
    packed_tma_descriptor,
    ptr_or,
    rows_strides,
    segment_strides,
    tile_grid,
    tma_can_read,
    tma_descriptors,
)


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q,
    k_base, v_base, k_desc, v_desc, b, h_kv, k_row0, key_mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
    offs_m, offs_d, offs_dv, head_dim, head_dim_v,
    q_len, k_len, sm_scale, softcap, slope, window_left, window_right, seg_start, seg_end,
    seed, rng_offset, bh, dropout_p,
    start, end,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, USE_TMA: tl.constexpr, FUSED_SCALE: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    # log2(e) * sm_scale, applied once per element (FUSED_SCALE: inside the exp2's FMA)
    scale2 = sm_scale * LOG2E
    # No per-block "any live key?" branch here: it made the body an scf.if, which stops software
    # pipelining; the caller clamps [start, end) to the mask's extent instead (common.mask_extent).
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        if HAS_KEY_MASK:
            key_ok = tl.load(key_mask_base + offs_n * stride_kmn, mask=offs_n < k_len, other=0) != 0
        if USE_TMA:
            # Tensor-memory-accelerator copies of the (1, 1, BLOCK_N, BLOCK_D) boxes: rows past the
            # stored keys and columns past head_dim arrive as zeros; rows in [k_len, Sk) (seqused_k)
            # are real memory, so V is zeroed there (p is 0, but 0 * NaN would not be). Rows past Sk
            # need nothing, and the select takes V from shared memory through registers and back: a
            # causal / windowed kernel, whose every diagonal tile is masked, skips it without seqused_k
            # (causal D64 fp16, sm_90 SASS: 528 -> 432 instructions per thread per masked tile).
            # It stays where masked tiles are rare (no window: only a partial last block), since ptxas
            # then schedules the steady loop as before: skipping it there too measured 1.7% slower
            # at D64 S1024 non-causal (H100, 3 alternating rounds, results/2026-11-26_h100_session6_
            # run6_ab_configs.log); and for unequal head dims, where ptxas 3.6 crashes (SIGSEGV)
            # without it on D/Dv = 40/256, 128/256, 256/16 (scripts/aot_compile.py).
            # Packed (varlen) tensors are described as (1, H, T, D): the sequence's rows start at
            # k_row0, and rows past its k_len are the next sequence's keys (real memory, as with
            # seqused_k), so V is zeroed there too.
            kT = tl.trans(k_desc.load([b, h_kv, k_row0 + start_n, 0]).reshape([BLOCK_N, BLOCK_D]))
            v = v_desc.load([b, h_kv, k_row0 + start_n, 0]).reshape([BLOCK_N, BLOCK_DV])
            if MASKED and (HAS_SEQUSED_K or IS_VARLEN or BLOCK_D != BLOCK_DV or not (HAS_LEFT or HAS_RIGHT)):
                v = tl.where(offs_n[:, None] < k_len, v, 0.0)
        else:  # K^T tile [BLOCK_D, BLOCK_N] and V tile [BLOCK_N, BLOCK_DV]
            kT, v = load_kv_tiles(k_base, v_base, offs_n, offs_d, offs_dv, stride_kn, stride_kd, stride_vn,
                                  stride_vd, k_len, head_dim, head_dim_v, MASKED, EVEN_D, EVEN_DV)
        # [BLOCK_M, BLOCK_N] raw q.k
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        if FUSED_SCALE:
            # Plain scores, sm_scale > 0: mask the raw dot, take the row max of the raw values
            # (scaling by a positive number commutes with max), and form p = exp2(qk * scale2 - m)
            # with one FMA per element, as the Triton tutorial and FlashAttention-2 do. The FMA
            # subtracts m from the exact product, so the row max's exponent is m's rounding error
            # (<= ulp(m) / 2) instead of 0: harmless below |m| ~ 2**28 (see the epilogue).
            s2 = qk
        else:
            s2, _ = score_transform(qk, offs_m, offs_n, q_len, k_len, sm_scale, softcap, slope,
                                    HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = allowed_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if HAS_SEGMENTS:  # key j in row i's run [seg_start_i, seg_end_i)
                ok = ok & (offs_n[None, :] >= seg_start[:, None]) & (offs_n[None, :] < seg_end[:, None])
            s2 = tl.where(ok, s2, float("-inf"))
        if HAS_KEY_MASK:
            s2 = tl.where(key_ok[None, :], s2, float("-inf"))
        # Online softmax. A row with no visible key so far keeps m = -inf; m_safe = 0 then
        # makes p = exp2(-inf) = 0 and alpha = exp2(-inf) = 0 instead of NaN.
        # s2 * s2_scale is the base-2 score: raw dots times scale2 (FUSED_SCALE) or already scaled
        s2_scale = scale2 if FUSED_SCALE else 1.0
        m_new = tl.maximum(m_i, tl.max(s2, axis=1) * s2_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 * s2_scale - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Two spellings of one update: converting p before ``acc * alpha`` in the plain case too (one line
        # for both) reorders its IR and changed the non-dropout SASS; this keeps it byte for byte.
        if HAS_DROPOUT:  # the kept entries of p's matmul operand; 1 / (1 - p) is applied once at the end
            y = dropout_hash(seed, rng_offset, bh, offs_m, start_n, BLOCK_N)
            acc = acc * alpha[:, None] + tl.dot(
                dropout_zero(p.to(v.dtype), y, dropout_threshold(dropout_p), BLOCK_N), v,
                input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    KEY_MASK, QUERY_MASK, SEGMENTS, SEQUSED_K, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, K_DESC, V_DESC, Q_DESC, O_DESC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_kmb, stride_kmn, stride_qmb, stride_qmm, stride_segb, stride_segk, stride_ab, stride_ah,
    seqlen_q, seqlen_k, num_heads, kv_group, head_dim, head_dim_v,
    sm_scale, softcap, window_left, window_right, dropout_p,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, USE_TMA: tl.constexpr, FUSED_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m, bh = program_tile(seqlen_q, BLOCK_M, HAS_RIGHT)  # causal: longest query blocks first at long S
    b = bh // num_heads
    h = bh % num_heads
    h_kv = h // kv_group
    q_start, q_len, k_start, k_len, _ = seq_bounds(
        b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k, IS_VARLEN, HAS_SEQUSED_K)
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len

    b64 = b.to(tl.int64)
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_om
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od
    o_mask = row_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    lse_ptrs = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + (q_start + offs_m) * stride_lm

    if HAS_QUERY_MASK:
        qm = tl.load(QUERY_MASK + b64 * stride_qmb + offs_m * stride_qmm, mask=row_ok, other=0)
        row_ok = row_ok & (qm != 0)
        if tl.max(row_ok.to(tl.int32), axis=0) == 0:
            # Every query row of this block is padding: write zeros, skip all the work.
            tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_DV], dtype=O.dtype.element_ty), mask=o_mask)
            tl.store(lse_ptrs, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=offs_m < q_len)
            return

    # TMA box coordinates: (b, row) of the dense layout, (0, start + row) of the packed one
    tma_b = 0 if IS_VARLEN else b
    q_row0 = q_start.to(tl.int32) if IS_VARLEN else 0
    k_row0 = k_start.to(tl.int32) if IS_VARLEN else 0
    # Q tile [BLOCK_M, BLOCK_D], loaded once.
    if USE_TMA:
        # Dense layout: rows past Sq (= q_len) and columns past head_dim arrive as 0. One TMA copy
        # instead of 64x64 masked pointer loads and their address math (prologue -48 SASS
        # instructions): causal D64 S1024 forward -2.1% bf16 / -2.2% fp16 (H100, 5 alternating
        # rounds, results/2026-11-26_h100_session8_run13_14_ab_qtma.log); non-causal within noise.
        # Packed (varlen) tensors: (1, H, T, D) boxes from the sequence's first row; rows past q_len
        # are the next sequence's queries, computed and never stored (O is written by pointers).
        q = Q_DESC.load([tma_b, h, q_row0 + start_m, 0]).reshape([BLOCK_M, BLOCK_D])
    else:
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
        q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim), other=0.0)
    if Q.dtype.element_ty != tl.float32 and BLOCK_D <= 128 and BLOCK_DV <= 128:
        # Q as the register operand of every Q K^T wgmma instead of a shared-memory one: with both
        # operands in shared memory a 64x64x16 wgmma reads 128 bytes per clock, all of Hopper's
        # shared-memory bandwidth, beside the TMA writes of K and V. H100 bf16, 2 alternating rounds
        # (4 samples with Q in registers; results/2026-11-27_h100_session10_run1_ab_qreg.log): causal
        # D64 S1024 forward 0.2445-0.2457 -> 0.2194-0.2207 ms (-10%), D128 non-causal 0-4% faster, the
        # others within noise. Not at head dims past 128 (Q alone would take 64 registers per thread: sm_90 spills went 5 -> 27
        # at D = 256) nor fp32 (tf32 dots).
        q = dot_operand_in_registers(q)

    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh + k_start * stride_kn
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh + k_start * stride_vn
    key_mask_base = KEY_MASK + b64 * stride_kmb
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b64 * stride_ab + h * stride_ah).to(tl.float32)
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    seg_start = offs_m
    seg_end = offs_m
    seg_min_start = 0
    seg_max_start = 0
    seg_min_end = 0
    seg_max_end = 0
    if HAS_SEGMENTS:  # [BLOCK_M] run bounds of the query rows (dense layout, Sq == Sk)
        seg_start, seg_end, seg_min_start, seg_max_start, seg_min_end, seg_max_end = load_segments(
            SEGMENTS + b64 * stride_segb, offs_m, q_len, stride_segk)
    lo, mid_lo, mid_hi, hi = key_range_for_query_block(
        start_m, q_len, k_len, window_left, window_right,
        seg_min_start, seg_max_start, seg_min_end, seg_max_end,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SEGMENTS)
    if HAS_KEY_MASK:  # padding: visit only the blocks between the first and the last real key
        key_first, key_end = mask_extent(key_mask_base, stride_kmn, k_len, EXTENT_CHUNK)
        lo, mid_lo, mid_hi, hi = clamp_to_extent(lo, mid_lo, mid_hi, hi, key_first, key_end, BLOCK_N)
    # phase 1: masked blocks at the left window edge
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, K_DESC, V_DESC, tma_b, h_kv, k_row0, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_m, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, lo, mid_lo,
        True, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, USE_TMA, FUSED_SCALE,
        HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        HAS_KEY_MASK, HAS_DROPOUT, HAS_SEGMENTS, HAS_SEQUSED_K, IS_VARLEN, DOT_PRECISION)
    # phase 2: steady state, every position visible
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, K_DESC, V_DESC, tma_b, h_kv, k_row0, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_m, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, mid_lo, mid_hi,
        False, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, USE_TMA, FUSED_SCALE,
        HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        HAS_KEY_MASK, HAS_DROPOUT, HAS_SEGMENTS, HAS_SEQUSED_K, IS_VARLEN, DOT_PRECISION)
    # phase 3: masked blocks at the diagonal / right window edge / sequence end
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, K_DESC, V_DESC, tma_b, h_kv, k_row0, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_m, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, mid_hi, hi,
        True, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, USE_TMA, FUSED_SCALE,
        HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        HAS_KEY_MASK, HAS_DROPOUT, HAS_SEGMENTS, HAS_SEQUSED_K, IS_VARLEN, DOT_PRECISION)

    # Rows with no visible key and padded query rows: output 0, LSE -inf. (A row with a NaN score
    # keeps l = NaN and comes out NaN.)
    empty = ((m_i == float("-inf")) & (l_i == 0.0)) | (row_ok == 0)
    # A row that sees keys has l >= p_max. With FUSED_SCALE, p = exp2(fma(qk, scale2, -m)) where m is
    # the *rounded* product of the row's max, so p_max = exp2(that rounding error), up to
    # exp2(+-ulp(m) / 2): ~1 for any realistic score, but past |m| ~ 2**28 (fp16 P, whose normal range
    # ends at 2**-14) or 2**31 (bf16 / fp32 P, where exp2 leaves fp32) the row's weights underflow or
    # overflow. Overflow gives inf / NaN by itself; an underflowed row is made NaN here instead of a
    # silent 0. (Compiled only: the interpreter rounds qk * scale2 before subtracting m.)
    L_MIN: tl.constexpr = 2.0**-9 if V.dtype.element_ty == tl.float16 else 0.0
    lost = (m_i != float("-inf")) & (l_i <= L_MIN)
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = tl.where(lost, float("nan"), 1.0 / l_safe)  # per row: no per-element select for `lost`
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    if USE_TMA and not IS_VARLEN:
        # One TMA copy; rows past Sq and columns past head_dim are clipped. The epilogue's masked
        # pointer stores and their address math go (causal D64: -48 SASS instructions, 127 -> 116
        # registers, shared memory unchanged: the store reuses the loop's buffers). H100 bf16, 3
        # alternating rounds: non-causal D64 S1024 forward 0.3650-0.3674 -> 0.3576-0.3608 ms (-1.8%),
        # causal S1024 and D128 within noise (results/2026-11-26_h100_session9_run1_ab_otma_tree.log).
        O_DESC.store([b, h, start_m, 0], out.to(O.dtype.element_ty).reshape([1, 1, BLOCK_M, BLOCK_DV]))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    lse = tl.where(lost, float("nan"), lse)
    tl.store(lse_ptrs, lse, mask=offs_m < q_len)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

_launch_fwd = CachedLauncher(_fwd_kernel, num_pointers=17)


@functools.lru_cache(maxsize=256)
def _fwd_meta(head_dim: int, head_dim_v: int, elem_size: int, flags: tuple, dot_precision: str,
              config: tuple | None, use_tma: bool, fused_scale: bool, keys: int, short_rows: bool) -> tuple:
    """(constexpr values in signature order, BLOCK_M, BLOCK_N, num_warps, num_stages): computed once
    per feature combination, so a decode step pays a dict lookup instead of rebuilding them."""
    block_d, block_dv = block_dim(head_dim), block_dim(head_dim_v)
    values = dict(zip(FLAG_NAMES, flags))
    cfg = dict(config) if config else fwd_config(block_d, block_dv, elem_size, tma=use_tma,
                                                 diagonal=values["HAS_RIGHT"], keys=keys,
                                                 dropout=values["HAS_DROPOUT"], short_rows=short_rows)
    values.update(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_DV=block_dv,
                  EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, USE_TMA=use_tma,
                  FUSED_SCALE=fused_scale, DOT_PRECISION=dot_precision)
    return (tuple(values[n] for n in _launch_fwd.constexpr_names), cfg["BLOCK_M"], cfg["BLOCK_N"],
            cfg["num_warps"], cfg["num_stages"])


def flash_fwd(q, k, v, o, lse, key_mask, query_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k,
              alibi, rng, max_seqlen_q: int, max_seqlen_k: int, num_seqs: int, sm_scale: float,
              softcap: float, window_left: int, window_right: int, dropout_p: float,
              is_varlen: bool, dot_precision: str, config: dict | None = None,
              use_tma: bool | None = None) -> None:
    """Launch the forward kernel. Writes ``o`` and ``lse``; allocates nothing.

    q, k, v, o are ``(B, H, S, D)`` with any strides, or packed ``(T, H, D)`` when ``is_varlen``;
    lse is ``(B, H, S)`` / ``(H, T)``. Optional tensors are None when absent.
    Q, K and V tiles are read through host-built TMA descriptors where the tensors allow it
    (``tma_can_read``: 16-bit, 16-byte strides; ``use_tma`` None = wherever
    possible, False = never, for comparisons); O too in the dense layout. Packed (varlen) forward on an
    H200, B32 H12 S512 D64 bf16, CUDA-graph replays, 3 alternating rounds: 58% fill 0.0598 -> 0.0576 ms,
    full 0.0984 -> 0.0927, causal B8 S1024 0.0465 -> 0.0388
    (benchmarks/results/2026-11-27_h200_session14_run5_ab_varlen_tma.log).
    """
    num_heads, head_dim = q.shape[1], q.shape[-1]
    head_dim_v = v.shape[-1]
    flags = feature_flag_values(window_left, window_right, softcap, alibi, key_mask, query_mask, segments,
                                seqused_k, is_varlen, dropout_p)
    if use_tma is False:
        tma = False
    elif is_varlen:
        tma = tma_can_read(q, k, v, packed=True)
    else:
        tma = tma_can_read(q, k, v, o)
    constexprs, block_m, block_n, num_warps, num_stages = _fwd_meta(
        head_dim, head_dim_v, q.element_size(), flags, dot_precision,
        tuple(sorted(config.items())) if config else None, tma,
        softcap == 0.0 and alibi is None and sm_scale > 0.0, key_tier(max_seqlen_k),
        is_varlen and short_varlen_rows(q.shape[0], num_seqs))
    if not tma:
        k_desc = v_desc = q_desc = o_desc = None
    elif is_varlen:  # O is written by pointers: a box past a sequence's end would hit the next one
        k_desc, v_desc = packed_tma_descriptor(k, block_n), packed_tma_descriptor(v, block_n)
        q_desc, o_desc = packed_tma_descriptor(q, block_m), None
    else:
        k_desc, v_desc = tma_descriptors(k, v, block_n)
        q_desc, o_desc = tma_descriptors(q, o, block_m)
    args = (q, k, v, o, lse,
            ptr_or(key_mask, lse), ptr_or(query_mask, lse), ptr_or(segments, lse), ptr_or(seqused_k, lse),
            ptr_or(cu_seqlens_q, lse), ptr_or(cu_seqlens_k, lse), ptr_or(alibi, lse), ptr_or(rng, lse),
            k_desc, v_desc, q_desc, o_desc,
            *bhsd_strides(q, is_varlen), *bhsd_strides(k, is_varlen), *bhsd_strides(v, is_varlen),
            *bhsd_strides(o, is_varlen), *rows_strides(lse, is_varlen),
            *mask_strides(key_mask), *mask_strides(query_mask), *segment_strides(segments), *alibi_strides(alibi),
            max_seqlen_q, max_seqlen_k, num_heads, num_heads // k.shape[1], head_dim, head_dim_v,
            sm_scale, softcap, window_left, window_right, dropout_p)
    grid = tile_grid(max_seqlen_q, block_m, num_seqs * num_heads)
    _launch_fwd(grid, args, constexprs, num_warps, num_stages)
