"""Backward flash-attention kernels: delta, dk/dv and dq.

P is recomputed from the saved LSE (base 2: ``p = exp2(s2 - lse2)``); the dropout mask is
regenerated from the same hashed coordinates as the forward. With ``O = (P * Z) V`` and
``Z = keep / (1 - p_drop)``:

    dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - delta),   delta_i = dO_i . O_i,

and dS is chained through softcap (``1 - tanh^2``) and the softmax scale into dQ = dS K and
dK = dS^T Q. One program owns one key block of one KV head and loops over the query heads of its
GQA group, so dk/dv are reduced over the group in registers, without atomics. dq is either a
separate kernel over query blocks (bitwise deterministic), or, where ``configs.fuse_dq`` measured it
faster (D <= 64 with causal or dropout), summed by the dk/dv programs into an fp32 buffer with one
TMA reduce-add per tile (``FUSE_DQ``): P, dP and the dropout mask are then computed once, not twice.
"""

import functools

import torch
import triton
import triton.language as tl

from .._environ import environ_get
from .common import (
    EXTENT_CHUNK,
    LOG2E,
    allowed_mask,
    clamp_to_extent,
    dropout_keep,
    key_range_for_query_block,
    load_segments,
    lse_extent,
    mask_extent,
    program_tile,
    query_range_for_key_block,
    score_transform,
    seq_bounds,
)
from .configs import INTERPRETED, block_dim, dkdv_config, dq_config, fuse_dq
from .launch import (
    FLAG_NAMES,
    CachedLauncher,
    alibi_strides,
    bhsd_strides,
    feature_flag_values,
    mask_strides,
    ptr_or,
    rows_strides,
    segment_strides,
    tile_grid,
    tma_can_read,
    tma_descriptor,
    tma_descriptors,
)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, DQ_ACC, CU_SEQLENS_Q,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_accb, stride_acch, stride_accm, stride_accd,
    seqlen_q, num_heads, head_dim, head_dim_v,
    IS_VARLEN: tl.constexpr, ZERO_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] in fp32 for the fused backward (the split
    one computes it in the dq kernel); with ZERO_ACC also zeroes the rows' fp32 dq sums (FlashAttention-2's
    preprocess does the same): one pass that reads 2 and writes 4 bytes per element instead of a separate
    memset launch."""
    start_m, bh = program_tile(seqlen_q, BLOCK_M)
    b = bh // num_heads
    h = bh % num_heads
    if IS_VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + b).to(tl.int64)
        q_len = (tl.load(CU_SEQLENS_Q + b + 1) - q_start).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        q_len = tl.zeros([], dtype=tl.int32) + seqlen_q
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_m).to(tl.int64)
    mask = (offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v)
    b64 = b.to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + rows * stride_lm, tl.sum(o * do, axis=1),
             mask=offs_m < q_len)
    if ZERO_ACC:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(DQ_ACC + b64 * stride_accb + h * stride_acch + rows[:, None] * stride_accm
                 + offs_d[None, :] * stride_accd, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                 mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim))


@triton.jit
def _load_lse2(lse_ptrs, mask):
    """Saved natural-log LSE -> base 2; rows with no visible key (-inf) become +inf so p = 0."""
    lse2 = tl.load(lse_ptrs, mask=mask, other=float("-inf")) * LOG2E
    return tl.where(lse2 == float("-inf"), float("inf"), lse2)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, key_ok,
    q_base, do_base, lse_base, delta_base, q_desc, do_desc, dq_base, dq_desc, b, h,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
    start_n, offs_n, offs_d, offs_dv, head_dim, head_dim_v,
    q_len, k_len, sm_scale, softcap, slope, window_left, window_right, seg_start, seg_end,
    seed, rng_offset, bh, dropout_p,
    start, end,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(start, end, BLOCK_M):  # clamped to the live query rows by the caller
        offs_m = start_m + offs_m0
        rows = offs_m.to(tl.int64)
        row_ok = offs_m < q_len
        lse2 = _load_lse2(lse_base + rows * stride_lm, row_ok)  # [BLOCK_M]
        if USE_TMA:  # dense layout: rows past Sq (= q_len) and columns past the head dims arrive as 0
            q = q_desc.load([b, h, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
            do = do_desc.load([b, h, start_m, 0]).reshape([BLOCK_M, BLOCK_DV])
        else:
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        delta = tl.load(delta_base + rows * stride_lm, mask=row_ok, other=0.0)
        # [BLOCK_M, BLOCK_N] scores, probabilities recomputed from the LSE
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s2, t = score_transform(qk, offs_m, offs_n, q_len, k_len, sm_scale, softcap, slope,
                                HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = allowed_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if HAS_SEGMENTS:  # query i in key j's run [seg_start_j, seg_end_j)
                ok = ok & (offs_m[:, None] >= seg_start[None, :]) & (offs_m[:, None] < seg_end[None, :])
            s2 = tl.where(ok & row_ok[:, None], s2, float("-inf"))
        if HAS_KEY_MASK:
            s2 = tl.where(key_ok[None, :], s2, float("-inf"))
        p = tl.exp2(s2 - lse2[:, None])
        if HAS_QUERY_MASK:  # padded query rows (lse2 = +inf) contribute 0 even when their score is NaN
            p = tl.where(lse2[:, None] == float("inf"), 0.0, p)
        # dP = dO V^T  [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N)
            # Z = keep / (1 - p) as one FSEL, then a multiply for P * Z and one FMA for dP * Z - delta.
            # Zeroing the 16-bit P operand in pairs as the forward does (``dropout_zero``) and masking dP
            # from the same compare took as many instructions here (sm_90 SASS, 679 -> 678 per tile)
            z = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
            pd = p * z
            dp = dp * z
        else:
            pd = p
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if FUSE_DQ != 0:
            # this key block's share of dQ / scale = dS K  [BLOCK_M, BLOCK_D], added in fp32 in memory
            dq_part = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            if FUSE_DQ == 2:  # one TMA reduce of the whole tile; rows past Sq are clipped by the descriptor
                dq_desc.atomic_add([b, h, start_m, 0], dq_part.reshape([1, 1, BLOCK_M, BLOCK_D]))
            else:
                tl.atomic_add(dq_base + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq_part,
                              mask=row_ok[:, None] & (offs_d[None, :] < head_dim), sem="relaxed")
    return dk, dv


# seqlen_q is never specialized: with Sq = 1 Triton would make it the constant 1, and ptxas 3.6
# (sm_90) then crashes (SIGSEGV) on the softcap + query-mask variant at D = 32 (found by the GPU
# fuzz, 2026-11-26; reproduced on CPU by scripts/aot_compile.py, whose matrix now has that case).
@triton.jit(do_not_specialize=["seqlen_q"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
    KEY_MASK, SEGMENTS, SEQUSED_K, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, Q_DESC, DO_DESC, DQ_DESC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm,
    stride_kmb, stride_kmn, stride_segb, stride_segk, stride_ab, stride_ah,
    seqlen_q, seqlen_k, num_heads, kv_group, head_dim, head_dim_v,
    sm_scale, softcap, window_left, window_right, dropout_p,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSE_DQ: tl.constexpr,
):
    start_n, bhk = program_tile(seqlen_k, BLOCK_N)
    num_kv_heads = num_heads // kv_group
    b = bhk // num_kv_heads
    h_kv = bhk % num_kv_heads
    q_start, q_len, k_start, k_len, k_rows = seq_bounds(
        b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k, IS_VARLEN, HAS_SEQUSED_K)
    if start_n >= k_rows:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    krows = (k_start + offs_n).to(tl.int64)
    n_ok = offs_n < k_len

    # K [BLOCK_N, BLOCK_D] and V [BLOCK_N, BLOCK_DV] stay in registers for the whole program.
    k = tl.load(K + b64 * stride_kb + h_kv * stride_kh + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    v = tl.load(V + b64 * stride_vb + h_kv * stride_vh + krows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=n_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if HAS_KEY_MASK:
        km = tl.load(KEY_MASK + b64 * stride_kmb + offs_n * stride_kmn, mask=n_ok, other=0)
        key_ok = km != 0
        live = tl.max(key_ok.to(tl.int32), axis=0) > 0
    else:
        key_ok = n_ok
        live = True
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)

    seg_start = offs_n
    seg_end = offs_n
    seg_min_start = 0
    seg_max_start = 0
    seg_min_end = 0
    seg_max_end = 0
    if HAS_SEGMENTS:  # [BLOCK_N] run bounds of the keys (dense layout, Sq == Sk)
        seg_start, seg_end, seg_min_start, seg_max_start, seg_min_end, seg_max_end = load_segments(
            SEGMENTS + b64 * stride_segb, offs_n, k_len, stride_segk)
    lo, mid_lo, mid_hi, hi = query_range_for_key_block(
        start_n, q_len, k_len, window_left, window_right,
        seg_min_start, seg_max_start, seg_min_end, seg_max_end,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SEGMENTS)
    if live:
        for g in range(0, kv_group):
            h = h_kv * kv_group + g
            bh = b * num_heads + h
            slope = 0.0
            if HAS_ALIBI:
                slope = tl.load(ALIBI + b64 * stride_ab + h * stride_ah).to(tl.float32)
            q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qm
            do_base = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dom
            lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start * stride_lm
            delta_base = DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start * stride_lm
            dq_base = DQ_ACC + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + q_start * stride_dqm
            h_lo, h_mid_lo, h_mid_hi, h_hi = lo, mid_lo, mid_hi, hi
            if HAS_QUERY_MASK:  # padded query rows: visit only blocks between the first and last live row
                q_first, q_end = lse_extent(lse_base, stride_lm, q_len, EXTENT_CHUNK)
                h_lo, h_mid_lo, h_mid_hi, h_hi = clamp_to_extent(lo, mid_lo, mid_hi, hi, q_first, q_end, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, Q_DESC, DO_DESC, dq_base, DQ_DESC, b, h,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                start_n, offs_n, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
                window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, h_lo, h_mid_lo,
                True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                HAS_KEY_MASK,
                HAS_QUERY_MASK, HAS_DROPOUT, HAS_SEGMENTS, DOT_PRECISION, FUSE_DQ)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, Q_DESC, DO_DESC, dq_base, DQ_DESC, b, h,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                start_n, offs_n, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
                window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, h_mid_lo, h_mid_hi,
                False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                HAS_KEY_MASK,
                HAS_QUERY_MASK, HAS_DROPOUT, HAS_SEGMENTS, DOT_PRECISION, FUSE_DQ)
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, Q_DESC, DO_DESC, dq_base, DQ_DESC, b, h,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                start_n, offs_n, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
                window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, h_mid_hi, h_hi,
                True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                HAS_KEY_MASK,
                HAS_QUERY_MASK, HAS_DROPOUT, HAS_SEGMENTS, DOT_PRECISION, FUSE_DQ)

    dk = dk * sm_scale
    store_ok = offs_n < k_rows
    tl.store(DK + b64 * stride_dkb + h_kv * stride_dkh + krows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=store_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(DV + b64 * stride_dvb + h_kv * stride_dvh + krows[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=store_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, k_desc, v_desc, b, h_kv, key_mask_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
    offs_m, offs_d, offs_dv, head_dim, head_dim_v,
    q_len, k_len, sm_scale, softcap, slope, window_left, window_right, seg_start, seg_end,
    seed, rng_offset, bh, dropout_p,
    start, end,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start, end, BLOCK_N):  # clamped to the key mask's extent by the caller
        offs_n = start_n + offs_n0
        if HAS_KEY_MASK:
            key_ok = tl.load(key_mask_base + offs_n * stride_kmn, mask=offs_n < k_len, other=0) != 0
        n_ok = offs_n < k_len
        rows = offs_n.to(tl.int64)
        # K [BLOCK_N, BLOCK_D], V [BLOCK_N, BLOCK_DV]
        if USE_TMA:
            # Rows in [k_len, Sk) (seqused_k) are real memory: zeroed, since ds = 0 there would not
            # cancel a NaN in K (dq += ds K) or V (dp = dO V^T) as the masked loads' zeros do. Rows
            # past Sk arrive as zeros, so without seqused_k there is nothing to zero (the selects
            # round-trip the tiles through registers).
            k = k_desc.load([b, h_kv, start_n, 0]).reshape([BLOCK_N, BLOCK_D])
            v = v_desc.load([b, h_kv, start_n, 0]).reshape([BLOCK_N, BLOCK_DV])
            if MASKED and HAS_SEQUSED_K:
                k = tl.where(n_ok[:, None], k, 0.0)
                v = tl.where(n_ok[:, None], v, 0.0)
        else:
            k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=n_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=n_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s2, t = score_transform(qk, offs_m, offs_n, q_len, k_len, sm_scale, softcap, slope,
                                HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = allowed_mask(offs_m, offs_n, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            if HAS_SEGMENTS:
                ok = ok & (offs_n[None, :] >= seg_start[:, None]) & (offs_n[None, :] < seg_end[:, None])
            s2 = tl.where(ok, s2, float("-inf"))
        if HAS_KEY_MASK:
            s2 = tl.where(key_ok[None, :], s2, float("-inf"))
        # padded query rows (lse2 = +inf; a NaN score there would give p = NaN) are zeroed once, at the end
        p = tl.exp2(s2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    KEY_MASK, SEGMENTS, SEQUSED_K, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI, RNG, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm,
    stride_kmb, stride_kmn, stride_segb, stride_segk, stride_ab, stride_ah,
    seqlen_q, seqlen_k, num_heads, kv_group, head_dim, head_dim_v,
    sm_scale, softcap, window_left, window_right, dropout_p,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m, bh = program_tile(seqlen_q, BLOCK_M)
    b = bh // num_heads
    h = bh % num_heads
    h_kv = h // kv_group
    q_start, q_len, k_start, k_len, _ = seq_bounds(
        b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k, IS_VARLEN, HAS_SEQUSED_K)
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (q_start + offs_m).to(tl.int64)
    row_ok = offs_m < q_len
    dq_ptrs = DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    dq_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)

    # delta = rowsum(O * dO) in fp32 for this block's rows, written for the dk/dv kernel that runs next
    # (the split backward launches dq first): no separate delta pass over O and dO. Every live row
    # gets it, padded ones too: the dk/dv kernel multiplies their p = 0 by (dp - delta). H200 bf16
    # fwd+bwd, 2 alternating rounds (results/2026-11-27_h200_session13_run8_ab_delta_in_dq.log):
    # non-causal D64 S1024 1.411 / 1.415 -> 1.393 / 1.389 ms, causal D128 0.922 / 0.925 -> 0.904 /
    # 0.910, non-causal D128 S4096 4.697 / 4.676 -> 4.634 / 4.629; fused-dq control unchanged.
    dv_mask = row_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    do = tl.load(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=dv_mask, other=0.0)
    o = tl.load(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=dv_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # [BLOCK_M]
    tl.store(DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + rows * stride_lm, delta, mask=row_ok)

    lse2 = _load_lse2(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + rows * stride_lm, row_ok)
    if HAS_QUERY_MASK:
        if tl.min(lse2, axis=0) == float("inf"):  # padded query rows only: gradient 0
            tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), mask=dq_mask)
            return

    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=dq_mask, other=0.0)

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

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    seg_start = offs_m
    seg_end = offs_m
    seg_min_start = 0
    seg_max_start = 0
    seg_min_end = 0
    seg_max_end = 0
    if HAS_SEGMENTS:
        seg_start, seg_end, seg_min_start, seg_max_start, seg_min_end, seg_max_end = load_segments(
            SEGMENTS + b64 * stride_segb, offs_m, q_len, stride_segk)
    lo, mid_lo, mid_hi, hi = key_range_for_query_block(
        start_m, q_len, k_len, window_left, window_right,
        seg_min_start, seg_max_start, seg_min_end, seg_max_end,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SEGMENTS)
    if HAS_KEY_MASK:  # padding: visit only the blocks between the first and the last real key
        key_first, key_end = mask_extent(key_mask_base, stride_kmn, k_len, EXTENT_CHUNK)
        lo, mid_lo, mid_hi, hi = clamp_to_extent(lo, mid_lo, mid_hi, hi, key_first, key_end, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, K_DESC, V_DESC, b, h_kv, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_m, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, lo, mid_lo,
        True, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_KEY_MASK,
        HAS_QUERY_MASK, HAS_DROPOUT, HAS_SEGMENTS, HAS_SEQUSED_K, DOT_PRECISION)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, K_DESC, V_DESC, b, h_kv, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_m, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, mid_lo, mid_hi,
        False, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_KEY_MASK,
        HAS_QUERY_MASK, HAS_DROPOUT, HAS_SEGMENTS, HAS_SEQUSED_K, DOT_PRECISION)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, K_DESC, V_DESC, b, h_kv, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_m, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, seg_start, seg_end, seed, rng_offset, bh, dropout_p, mid_hi, hi,
        True, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_KEY_MASK,
        HAS_QUERY_MASK, HAS_DROPOUT, HAS_SEGMENTS, HAS_SEQUSED_K, DOT_PRECISION)
    if HAS_QUERY_MASK:  # row i of dq depends on row i of dS only: one select per row instead of per score
        dq = tl.where(lse2[:, None] == float("inf"), 0.0, dq)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------

_launch_delta = CachedLauncher(_bwd_delta_kernel, num_pointers=5)
_launch_dkdv = CachedLauncher(_bwd_dkdv_kernel, num_pointers=19)
_launch_dq = CachedLauncher(_bwd_dq_kernel, num_pointers=17)
_DELTA_BLOCK = 64


_DQ_SPLIT, _DQ_ATOMIC, _DQ_TMA_REDUCE = 0, 1, 2  # FUSE_DQ values


def _dq_sums(q: torch.Tensor, zeroed: bool) -> torch.Tensor:
    """fp32 buffer for the fused backward's dq sums, in q's layout; zero-filled here if ``zeroed``,
    else the delta kernel zeroes it (the tests' poison fixture fills that case with NaN)."""
    return (torch.zeros_like if zeroed else torch.empty_like)(q, dtype=torch.float32)


def _dq_mode(requested: str | None, deterministic: bool, tma: bool, head_dim: int, head_dim_v: int,
             elem_size: int, diagonal: bool, dropout: bool) -> int:
    """FUSE_DQ of the dk/dv kernel: _DQ_SPLIT (the dq kernel runs), _DQ_ATOMIC or _DQ_TMA_REDUCE."""
    if deterministic:
        return _DQ_SPLIT
    if requested is None:
        requested = environ_get("HF_TRITON_ATTN_DQ") or None
    # the fp32 buffer's rows are head_dim * 4 bytes: a TMA descriptor needs a multiple of 16
    tma_reduce = tma and head_dim % 4 == 0 and not INTERPRETED
    if requested is None:
        fused = fuse_dq(block_dim(head_dim), block_dim(head_dim_v), elem_size, tma_reduce or INTERPRETED,
                        diagonal, dropout)
    elif requested in ("split", "fused"):
        fused = requested == "fused"
    else:
        raise ValueError(f"dq_mode (or HF_TRITON_ATTN_DQ) must be 'split' or 'fused'; got {requested!r}")
    if not fused:
        return _DQ_SPLIT
    return _DQ_TMA_REDUCE if tma_reduce else _DQ_ATOMIC


@functools.lru_cache(maxsize=256)
def _bwd_meta(head_dim: int, head_dim_v: int, elem_size: int, flags: tuple, dot_precision: str,
              config: tuple | None, config_dq: tuple | None, use_tma: bool, fused_dq: int) -> tuple:
    """Constexpr values (signature order) and launch options of the delta, dk/dv and dq kernels,
    computed once per feature combination."""
    block_d, block_dv = block_dim(head_dim), block_dim(head_dim_v)
    cfg = dict(config) if config else dkdv_config(block_d, block_dv, elem_size, tma=use_tma)
    cfg_dq = dict(config_dq) if config_dq else dq_config(block_d, block_dv, elem_size, tma=use_tma)
    common = dict(zip(FLAG_NAMES, flags), BLOCK_D=block_d, BLOCK_DV=block_dv, USE_TMA=use_tma,
                  DOT_PRECISION=dot_precision)
    # dense: the delta kernel zeroes the fused dq sums (varlen: rows outside every sequence would be
    # missed, so torch.zeros does it)
    delta = dict(IS_VARLEN=common["IS_VARLEN"], ZERO_ACC=bool(fused_dq) and not common["IS_VARLEN"],
                 BLOCK_M=_DELTA_BLOCK, BLOCK_D=block_d, BLOCK_DV=block_dv)
    dkdv = dict(common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FUSE_DQ=fused_dq)
    dq = dict(common, BLOCK_M=cfg_dq["BLOCK_M"], BLOCK_N=cfg_dq["BLOCK_N"])
    return (tuple(delta[n] for n in _launch_delta.constexpr_names),
            (tuple(dkdv[n] for n in _launch_dkdv.constexpr_names), cfg["BLOCK_M"], cfg["BLOCK_N"],
             cfg["num_warps"], cfg["num_stages"]),
            (tuple(dq[n] for n in _launch_dq.constexpr_names), cfg_dq["BLOCK_M"], cfg_dq["BLOCK_N"],
             cfg_dq["num_warps"], cfg_dq["num_stages"]))


def flash_bwd(do, q, k, v, o, lse, delta, dq, dk, dv, key_mask, query_mask, segments, seqused_k,
              cu_seqlens_q, cu_seqlens_k, alibi, rng, max_seqlen_q: int, max_seqlen_k: int,
              num_seqs: int, sm_scale: float, softcap: float, window_left: int, window_right: int,
              dropout_p: float, is_varlen: bool, dot_precision: str, config: dict | None = None,
              config_dq: dict | None = None, use_tma: bool | None = None, deterministic: bool = False,
              dq_mode: str | None = None) -> None:
    """Launch the backward: dq (which also writes ``delta``), then dk/dv; or, with dq fused into dk/dv,
    the delta kernel (which also zeroes the fp32 dq sums), then dk/dv. Writes ``delta``, ``dq``, ``dk``, ``dv``.

    Same layouts as ``forward.flash_fwd`` (dense 4-D or packed 3-D); ``delta`` has the layout of ``lse``.
    ``query_mask`` is only used as a flag: padded query rows carry LSE = -inf from the forward.
    ``config`` / ``config_dq`` override the launch parameters of the dk/dv and dq kernels.
    The streamed tiles (q and dO in dk/dv, k and v in dq) are read through TMA descriptors where
    ``launch.tma_can_read`` accepts all four (``use_tma`` False: never, for comparisons).
    dq: its own kernel, or, where ``configs.fuse_dq`` says it is faster, accumulated by the dk/dv
    kernel into an fp32 buffer (allocated here, then scaled into ``dq``): not bitwise reproducible,
    so never with ``deterministic``. ``dq_mode`` ("split" | "fused", else the environment variable
    ``HF_TRITON_ATTN_DQ``, else the policy) forces one, for tests and benchmarks.
    """
    # Host-time notes (2-core CPU box, launches stubbed, varlen bf16): shapes and element size read
    # once, list comprehensions instead of generator expressions (a generator fed to tuple() costs
    # ~0.8 us more for 7 items), strides in one pass: flash_bwd (called with keywords) 13.1 -> 7.2 us
    # with block_dim and _dq_mode's environment read made cheap.
    q_shape = q.shape
    num_heads, head_dim = q_shape[1], q_shape[-1]
    num_kv_heads = k.shape[1]
    head_dim_v = v.shape[-1]
    elem_size = q.element_size()
    vl = is_varlen
    flags = feature_flag_values(window_left, window_right, softcap, alibi, key_mask, query_mask, segments,
                                seqused_k, is_varlen, dropout_p)
    tma = use_tma is not False and not is_varlen and tma_can_read(q, do, k, v)
    fused = _dq_mode(dq_mode, deterministic, tma, head_dim, head_dim_v, elem_size, window_right >= 0,
                     dropout_p > 0)
    (delta_cx, (dkdv_cx, dkdv_block_m, dkdv_block_n, dkdv_warps, dkdv_stages),
     (dq_cx, dq_block_m, dq_block_n, dq_warps, dq_stages)) = _bwd_meta(
        head_dim, head_dim_v, elem_size, flags, dot_precision,
        tuple(sorted(config.items())) if config else None, tuple(sorted(config_dq.items())) if config_dq else None,
        tma, fused)
    q_desc, do_desc = tma_descriptors(q, do, dkdv_block_m) if tma else (None, None)
    dq_acc = dq_desc = None
    if fused:
        # dq / scale, summed over key blocks, in q's layout (empty_like keeps a dense q's strides): the
        # final scale into dq (same layout) is then one contiguous pass. A transposed (B, S, H, D) q
        # with a (B, H, S, D) buffer made it a strided one: 0.141 vs 0.074 ms, H100, causal B16 H32
        # S1024 D64 fp16 (benchmarks/profile_kernels.py, results/2026-11-26_h100_session6_run2_*).
        dq_acc = _dq_sums(q, zeroed=vl)
        if fused == _DQ_TMA_REDUCE:
            dq_desc = tma_descriptor(dq_acc, dkdv_block_m)
    k_desc, v_desc = tma_descriptors(k, v, dq_block_n) if tma and not fused else (None, None)
    optional = [ptr_or(t, lse) for t in (key_mask, segments, seqused_k, cu_seqlens_q, cu_seqlens_k, alibi, rng)]
    km_strides, ab_strides = mask_strides(key_mask) + segment_strides(segments), alibi_strides(alibi)
    scalars = (max_seqlen_q, max_seqlen_k, num_heads, num_heads // num_kv_heads, head_dim, head_dim_v,
               sm_scale, softcap, window_left, window_right, dropout_p)
    q_st, k_st, v_st, do_st, o_st, dk_st, dv_st = [bhsd_strides(t, vl) for t in (q, k, v, do, o, dk, dv)]
    lse_st = rows_strides(lse, vl)
    acc_st = bhsd_strides(dq_acc, vl) if fused else (0, 0, 0, 0)
    if fused:
        _launch_delta(
            tile_grid(max_seqlen_q, _DELTA_BLOCK, num_seqs * num_heads),
            (o, do, delta, ptr_or(dq_acc, lse), optional[3], *o_st, *do_st, *rows_strides(delta, vl), *acc_st,
             max_seqlen_q, num_heads, head_dim, head_dim_v), delta_cx, 4, 1)
    else:  # the dq kernel runs first and also writes delta (see _bwd_dq_kernel)
        _launch_dq(
            tile_grid(max_seqlen_q, dq_block_m, num_seqs * num_heads),
            (q, k, v, o, do, lse, delta, dq, *optional, k_desc, v_desc, *q_st, *k_st, *v_st, *o_st, *do_st,
             *bhsd_strides(dq, vl), *lse_st, *km_strides, *ab_strides, *scalars), dq_cx, dq_warps, dq_stages)
    _launch_dkdv(
        tile_grid(max_seqlen_k, dkdv_block_n, num_seqs * num_kv_heads),
        (q, k, v, do, lse, delta, dk, dv, ptr_or(dq_acc, lse), *optional, q_desc, do_desc, dq_desc, *q_st, *k_st,
         *v_st, *do_st, *dk_st, *dv_st, *acc_st, *lse_st, *km_strides, *ab_strides, *scalars),
        dkdv_cx, dkdv_warps, dkdv_stages)
    if fused:
        torch.mul(dq_acc, sm_scale, out=dq)
