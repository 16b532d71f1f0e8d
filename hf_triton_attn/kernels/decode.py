"""Split-KV decode forward: few query tokens against a long KV cache.

The regular forward launches one program per (sequence, query head, query block): at decode
(Sq = 1 or a few tokens) that is only B * Hq programs, each streaming every key, and the GPU sits
mostly idle (B = 1, Hq = 32: 32 programs on 132 SMs). Here the keys are split instead:

1. ``_decode_split_kernel``, grid (B * Hkv, num_splits, row blocks), ONE launch. One program owns
   one KV head and ALL its ``group = Hq // Hkv`` query heads times Sq query rows, packed as
   M = group * Sq rows (row r -> query head ``h_kv * group + r // Sq``, query index ``r % Sq``), so
   each K/V tile is read once per KV head and feeds every query head of the group (GQA never
   materialises repeated k/v). It runs the fp32 exp2-domain online softmax of forward.py over its
   split of the keys and writes a normalised partial output and a partial LSE.
2. The combine, in the same launch: each program then adds 1 to its (sequence, KV head, row
   block)'s arrival counter; the program that arrives last merges that block's splits,
   ``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``, in split order (so the
   result does not depend on which program came last: bitwise reproducible), writes O (output
   dtype, any strides) and the natural-log LSE with exactly ``_fwd_kernel``'s semantics (-inf
   and output 0 for rows with no visible key), so the regular backward works from them
   unchanged, and sets the counter back to 0. No program ever waits for another.
   Measured against the former separate combine kernel (H100, 2026-11-26, B = 1, GQA 32:8, 8k
   cache, benchmarks/decode_timing.py): host time per call 53-58 -> 33-36 us, GPU time (CUDA-graph
   replay) 26.1 -> 27.2 us: the merge in the last program plus every program's barrier and atomic
   cost about what the second kernel did; the launch it saves is host time.

With one split, the program writes O and LSE directly (``SPLIT`` off): no workspace, no counter.

Splits are taken over each sequence's own visible key range (after ``seqused_k``, the left window
and the first/last real key of ``key_mask``), computed in the kernel, so a static cache whose used
length is far below its capacity, a sliding window over a long cache or a left-padded row still
spreads its real work evenly over the splits. A split
with no key (more splits than key blocks) writes o = 0 and lse = -inf, which the combine weighs 0.

Workspace, only when num_splits > 1:
  one fp32 buffer per call (torch.empty), R = B * Hq * Sq rows:
    o_part   [R, num_splits, Dv]  partial outputs, each normalised by its own sum
    lse_part [R, num_splits]      partial LSE in the base-2 domain (m2 + log2 l), after o_part
  int32 arrival counters, one per (sequence, KV head, row block): zero between calls (the last
  program resets its own), so they are kept per (device, stream) and reused; launches on one
  stream never overlap. A call captured into a CUDA graph (which may be replayed on any stream)
  takes counters of its own instead, from a per-device pool zeroed once (``arrival_counters``).

Not served here (the caller keeps the regular kernel): varlen, dropout, segments, query_mask.
"""

import functools
import threading

import torch
import triton
import triton.language as tl

from .common import (
    EXTENT_CHUNK,
    LN2,
    allowed_mask,
    clamp_to_extent,
    load_kv_tiles,
    mask_extent,
    score_transform,
    seq_bounds,
)
from .configs import INTERPRETED, block_dim
from .launch import CachedLauncher, alibi_strides, mask_strides


@triton.jit
def _decode_key_range(
    q_len, k_len, window_left, window_right,
    BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Key ranges visible to any query row 0..q_len-1 of a sequence with k_len used keys.

    Returns (lo, mid_lo, mid_hi, hi): keys in [lo, hi) may be visible; blocks in [mid_lo, mid_hi)
    are visible to every row (no position mask needed). lo, mid_lo, mid_hi are multiples of
    BLOCK_N. Row i's diagonal is diag_i = i + k_len - q_len, so row 0 bounds the right edge of
    the mask-free middle and row q_len - 1 its left edge (the last row's diagonal is k_len - 1,
    so a right window never shortens [lo, hi)).
    """
    shift = k_len - q_len
    hi = tl.maximum(k_len, 0)
    full_hi = hi
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, shift + window_right + 1)
    lo = tl.zeros([], dtype=tl.int32)
    full_lo = tl.zeros([], dtype=tl.int32)
    if HAS_LEFT:
        lo = tl.maximum(lo, shift - window_left)
        full_lo = tl.maximum(full_lo, q_len - 1 + shift - window_left)
    lo = tl.minimum((lo // BLOCK_N) * BLOCK_N, hi)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    mid_hi = tl.maximum(tl.minimum((tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _decode_inner(
    acc, m_i, l_i, q,
    k_base, v_base, key_mask_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
    offs_i, offs_d, offs_dv, head_dim, head_dim_v,
    q_len, k_len, sm_scale, softcap, slope, window_left, window_right,
    start, end,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [start, end) (start a multiple of BLOCK_N).

    MASKED: evaluate the position mask (window edges, causal diagonal, keys >= k_len);
    otherwise every key of every block is visible to every row and exists.
    offs_i are the packed rows' query indices (for the diagonal and ALiBi distance).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    # No per-block "any live key?" branch (as in forward.py): it would stop software pipelining;
    # the caller clamps the key range to the mask's extent instead (common.mask_extent).
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        if HAS_KEY_MASK:
            key_ok = tl.load(key_mask_base + offs_n * stride_kmn, mask=offs_n < k_len, other=0) != 0
        # K^T tile [BLOCK_D, BLOCK_N] and V tile [BLOCK_N, BLOCK_DV]
        kT, v = load_kv_tiles(k_base, v_base, offs_n, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd,
                              k_len, head_dim, head_dim_v, MASKED, EVEN_D, EVEN_DV)
        # [BLOCK_M, BLOCK_N] raw q.k, then base-2 scores (softcap, ALiBi with per-row slopes)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        s2, _ = score_transform(qk, offs_i, offs_n, q_len, k_len, sm_scale, softcap, slope,
                                HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = allowed_mask(offs_i, offs_n, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            s2 = tl.where(ok, s2, float("-inf"))
        if HAS_KEY_MASK:
            s2 = tl.where(key_ok[None, :], s2, float("-inf"))
        # Online softmax. A row with no visible key so far keeps m = -inf; m_safe = 0 then
        # makes p = exp2(-inf) = 0 and alpha = exp2(-inf) = 0 instead of NaN.
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))  # [BLOCK_M]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)  # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # [BLOCK_M, BLOCK_DV] += P V, P rounded to the input dtype as in the regular forward
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_final(O, LSE, out, lse2, b64, offs_h, offs_i64, offs_dv, row_ok, head_dim_v,
                 stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                 STORE_LSE: tl.constexpr):
    """O rows (output dtype, any strides) and, with STORE_LSE, the natural-log LSE the backward
    reads, from a [BLOCK_M, BLOCK_DV] output and its [BLOCK_M] base-2 LSE."""
    o_ptrs = (O + b64 * stride_ob + offs_h[:, None] * stride_oh + offs_i64[:, None] * stride_om
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    if STORE_LSE:
        tl.store(LSE + b64 * stride_lb + offs_h * stride_lh + offs_i64 * stride_lm, lse2 * LN2, mask=row_ok)


@triton.jit
def _merge_splits(WORKSPACE, O, LSE, b, h_kv, row_start, kv_group, q_len, seqlen_q, num_heads, head_dim_v,
                  num_splits, lse_part_offset,
                  stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                  MERGE_M: tl.constexpr, MERGE_S: tl.constexpr, BLOCK_DV: tl.constexpr, STORE_LSE: tl.constexpr):
    """Merge the num_splits partials of packed rows [row_start, row_start + MERGE_M) into O / LSE.

    Partial LSEs are base 2: with M = max_s lse_s, w_s = 2^(lse_s - M) (0 for empty splits),
    o = sum_s w_s o_s / sum_s w_s, lse = M + log2 sum_s w_s. Every o_s is normalised by its own
    sum, so the weights stay in [0, 1] and nothing overflows. The splits are read MERGE_S at a
    time as one [MERGE_M, MERGE_S, BLOCK_DV] tile (many loads in flight, not one round trip to L2
    per split) in split order, so the result does not depend on which program came last. Loads
    bypass L1 (".cg"): the partials were written by other SMs.
    MERGE_M is the real packed rows rounded up to a power of 2 (the split kernel's BLOCK_M is at
    least 16 for tl.dot; at GQA 32:8, Sq = 1 only 4 rows are real).
    """
    offs_r = row_start + tl.arange(0, MERGE_M)  # [MERGE_M] packed rows
    row_ok = offs_r < kv_group * q_len
    offs_i = (offs_r % q_len).to(tl.int64)
    offs_h = (h_kv * kv_group + offs_r // q_len).to(tl.int64)
    b64 = b.to(tl.int64)
    rows = (b64 * num_heads + offs_h) * seqlen_q + offs_i  # [MERGE_M] workspace rows
    offs_s = tl.arange(0, MERGE_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < head_dim_v
    m = tl.full([MERGE_M], float("-inf"), tl.float32)
    total = tl.zeros([MERGE_M], dtype=tl.float32)
    acc = tl.zeros([MERGE_M, BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_S):
        split = s0 + offs_s  # [MERGE_S]
        ok = row_ok[:, None] & (split[None, :] < num_splits)  # [MERGE_M, MERGE_S]
        slot = rows[:, None] * num_splits + split[None, :]  # [MERGE_M, MERGE_S]
        lse_s = tl.load(WORKSPACE + lse_part_offset + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o_ptrs = WORKSPACE + slot[:, :, None] * head_dim_v + offs_dv[None, None, :]
        o_s = tl.load(o_ptrs, mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0,
                      cache_modifier=".cg")  # [MERGE_M, MERGE_S, BLOCK_DV]
        m_new = tl.maximum(m, tl.max(lse_s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key so far: weights 0, not NaN
        rescale = tl.exp2(m - m_safe)  # [MERGE_M]
        w = tl.exp2(lse_s - m_safe[:, None])  # [MERGE_M, MERGE_S]
        acc = acc * rescale[:, None] + tl.sum(o_s * w[:, :, None], axis=1)
        total = total * rescale + tl.sum(w, axis=1)
        m = m_new
    empty = total == 0.0  # no visible key in any split
    total_safe = tl.where(empty, 1.0, total)
    out = acc / total_safe[:, None]  # [MERGE_M, BLOCK_DV]
    lse = tl.where(empty, float("-inf"), m + tl.log2(total_safe))
    _store_final(O, LSE, out, lse, b64, offs_h, offs_i, offs_dv, row_ok, head_dim_v,
                 stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm, STORE_LSE)


@triton.jit
def _decode_split_kernel(
    Q, K, V, O, LSE, WORKSPACE, COUNTERS,
    KEY_MASK, SEQUSED_K, ALIBI,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_kmb, stride_kmn, stride_ab, stride_ah,
    seqlen_q, seqlen_k, num_heads, num_kv_heads, kv_group, head_dim, head_dim_v, num_splits, lse_part_offset,
    sm_scale, softcap, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    SPLIT: tl.constexpr, STORE_LSE: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, key split, block of packed rows); with SPLIT, the last of a block's
    splits to finish also merges them into O and LSE.

    O: (B, Hq, Sq, Dv) output dtype, any strides; LSE: (B, Hq, Sq) fp32 natural log, written only
    with STORE_LSE (otherwise a dummy: nobody reads the LSE). SPLIT off (one split): the program
    writes O and LSE itself; WORKSPACE and COUNTERS are dummies. SPLIT on: WORKSPACE is the fp32
    o_part [R, num_splits, Dv] followed (at element lse_part_offset) by lse_part [R, num_splits],
    row = (b * Hq + h) * Sq + i; COUNTERS one int32 per (b * Hkv + h_kv) * row blocks + row block,
    0 at entry and left 0.
    """
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = bkv // num_kv_heads
    h_kv = bkv % num_kv_heads
    # dense only: the cu_seqlens pointers are never read (IS_VARLEN False)
    _, q_len, _, k_len, _ = seq_bounds(b, SEQUSED_K, SEQUSED_K, SEQUSED_K, seqlen_q, seqlen_k, False, HAS_SEQUSED_K)

    # Packed rows r = g * Sq + i: query head h_kv * group + g, query index i.
    offs_r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = offs_r < kv_group * q_len
    offs_i = offs_r % q_len
    offs_h = (h_kv * kv_group + offs_r // q_len).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)

    # Q tile [BLOCK_M, BLOCK_D], gathered over the group's heads, loaded once.
    q_ptrs = (Q + b64 * stride_qb + offs_h[:, None] * stride_qh + offs_i[:, None].to(tl.int64) * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    k_base = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh
    key_mask_base = KEY_MASK + b64 * stride_kmb
    slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)  # [BLOCK_M, 1]: one ALiBi slope per row's head
    if HAS_ALIBI:
        slope = slope + tl.load(ALIBI + b64 * stride_ab + offs_h[:, None] * stride_ah, mask=row_ok[:, None],
                                other=0.0).to(tl.float32)

    # This split's keys: the visible range [lo, hi) cut into num_splits runs of whole blocks.
    lo, mid_lo, mid_hi, hi = _decode_key_range(q_len, k_len, window_left, window_right,
                                               BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_KEY_MASK:  # padding: split only the blocks between the first and the last real key
        key_first, key_end = mask_extent(key_mask_base, stride_kmn, k_len, EXTENT_CHUNK)
        lo, mid_lo, mid_hi, hi = clamp_to_extent(lo, mid_lo, mid_hi, hi, key_first, key_end, BLOCK_N)
        hi = tl.maximum(hi, lo)  # no real key in the window: an empty range, every split empty
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits) * BLOCK_N
    start = tl.minimum(lo + split * per_split, hi)
    end = tl.minimum(start + per_split, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # phase 1: masked blocks at the left window edge
    acc, m_i, l_i = _decode_inner(
        acc, m_i, l_i, q, k_base, v_base, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_i, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, start, tl.minimum(end, mid_lo),
        True, BLOCK_N, EVEN_D, EVEN_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_KEY_MASK,
        DOT_PRECISION)
    # phase 2: steady state, every position visible
    acc, m_i, l_i = _decode_inner(
        acc, m_i, l_i, q, k_base, v_base, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_i, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, tl.maximum(start, mid_lo), tl.minimum(end, mid_hi),
        False, BLOCK_N, EVEN_D, EVEN_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_KEY_MASK,
        DOT_PRECISION)
    # phase 3: masked blocks at the causal diagonal / right window edge / sequence end
    acc, m_i, l_i = _decode_inner(
        acc, m_i, l_i, q, k_base, v_base, key_mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
        offs_i, offs_d, offs_dv, head_dim, head_dim_v, q_len, k_len, sm_scale, softcap, slope,
        window_left, window_right, tl.maximum(start, mid_hi), end,
        True, BLOCK_N, EVEN_D, EVEN_DV, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_KEY_MASK,
        DOT_PRECISION)

    # Rows with no visible key in this split (l = 0): output 0, LSE -inf (weight 0 when combined).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]  # [BLOCK_M, BLOCK_DV]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))  # [BLOCK_M], base 2
    offs_i64 = offs_i.to(tl.int64)
    dv_ok = offs_dv[None, :] < head_dim_v
    if SPLIT:
        # Partial of this split, rows of the contiguous workspace: [BLOCK_M] row ids, then
        # o_part[row, split, :] and lse_part[row, split].
        rows = (b64 * num_heads + offs_h) * seqlen_q + offs_i64
        o_part = WORKSPACE + (rows * num_splits + split)[:, None] * head_dim_v + offs_dv[None, :]
        tl.store(o_part, out, mask=row_ok[:, None] & dv_ok)
        lse_part = WORKSPACE + lse_part_offset + rows * num_splits
        tl.store(lse_part + split, lse, mask=row_ok)
        # Every thread's stores come before one thread's release-acquire add (CUTLASS's semaphore
        # pattern: a CTA barrier, then the release): whoever sees the count reach num_splits - 1
        # also sees every split's partial.
        tl.debug_barrier()
        counter = COUNTERS + bkv * tl.num_programs(2) + tl.program_id(2)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:  # the last split of this row block: merge them all
            _merge_splits(WORKSPACE, O, LSE, b, h_kv, tl.program_id(2) * BLOCK_M, kv_group, q_len, seqlen_q,
                          num_heads, head_dim_v, num_splits, lse_part_offset,
                          stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                          MERGE_M, MERGE_S, BLOCK_DV, STORE_LSE)
            tl.atomic_xchg(counter, 0)  # ready for the next launch on this stream
    else:
        _store_final(O, LSE, out, lse, b64, offs_h, offs_i64, offs_dv, row_ok, head_dim_v,
                     stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm, STORE_LSE)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

_launch_decode = CachedLauncher(_decode_split_kernel, num_pointers=10)

# Heuristic constants (see decode_splits).
_PROGRAMS_PER_SM = 2
# Long caches (bandwidth-bound): 4 resident programs per SM, what the D = 128 bf16 split kernel's 128
# registers and 39 KB of shared memory allow. Only for K/V rows of at most 256 bytes: wider rows
# double the tiles' shared memory (unmeasured), so they keep the 2-per-SM rule. At B = 1, 131k keys:
# 32:32 9 -> 16 splits 537 -> 496 us, 32:8 33 -> 64 splits 148 -> 142 us; 32:32 B = 8, 32k keys:
# 1 -> 2 splits 1023 -> 970 us (H200, 2026-11-28, decode_timing --sweep,
# results/2026-11-28_h200_session23_run3_decode_sweep_long.log; cuDNN 490 / 139 / 959 us).
_LONG_PROGRAMS_PER_SM = 4
_LONG_SPLIT_BLOCKS = 32  # key blocks per split (2k keys at BLOCK_N = 64) for the long-cache rule
# 2: at B = 1, GQA 32:8, D = 128 and a 2k cache, 16 splits of 2 blocks took 13.8 us against 16.1
# with 8 splits of 4 (H100, 2026-11-26, benchmarks/decode_timing.py, do_bench with the L2 flushed).
_MIN_BLOCKS_PER_SPLIT = 2
_MAX_SPLITS = 64
_MIN_SPLIT_BLOCKS = 16
# Short caches (8-15 key blocks) split only while the programs leave at least half of the SMs idle; beyond
# that the launch stays whole and takes the deep tile below. GPT-2 shapes (H12, D = 64, 600 keys = 10
# blocks), CUDA-graph replays, one split vs the 2-per-SM rule's 5: B = 1 13.8 -> 11.2 us, B = 2 14.9 ->
# 12.1, B = 4 (48 programs) 14.9 -> 13.3; 9:3 GQA (SmolLM2) B = 1 13.5 -> 10.8; from B = 6 (72 programs)
# every split count lost or tied (B = 8: 15.9 -> 16.3-17.4). D = 128: 32:32 B = 2 (64 programs), 900 keys,
# 4-5 splits 21.9 vs 23.1 whole. Below 8 blocks (300 keys at D = 64) 2 splits lost at B = 1 and 4.
# (H200, 2026-11-28, decode_timing --sweep; results/2026-11-28_h200_session24_run3_decode_sweep_d64_short.log,
# ..._run5_decode_sweep_mid.log, ..._run8_decode_sweep_d128_stages.log.)
_SHORT_SPLIT_BLOCKS = 8
# Whole (unsplit) launches of at most one program per SM: a deeper tile, 96 KB of K/V in flight per
# program for a latency-bound chain. K/V rows of at most 128 bytes (D <= 64 in 16-bit): 128-key tiles,
# half the loop iterations; GPT-2 (D = 64, H12), graph replays, 64 -> 128 keys: 600 keys B = 6 15.2 ->
# 13.8 us, B = 8 15.9 -> 14.5, B = 10 16.4 -> 15.2; 1024 keys B = 8 21.1 -> 18.1. Rows of 129-256 bytes
# (D = 128): 3 stages instead of 2, against the splits the old rule took: 32:32 B = 4 (128 programs),
# 600 keys 23.8 -> 22.1, 32:8 B = 16 600 keys 23.2 -> 22.2, 900 keys 29.9 -> 28.7, B = 12 (96) 21.1 ->
# 20.2; 32:8 B = 9 (72) 18.2 -> 18.6 (...run7_decode_sweep_d128_tiles.log, ...run8_*). Many programs
# keep the shallow tile (B = 32 at D = 64, 384 programs: 27.7 vs 28.7 us with 128 keys). cuDNN at
# these rows: 12.7-13.9 us (D = 64, B = 6-10), 20.5 (32:32 B = 4), 27.4 (32:8 B = 16, 900 keys).
_DEEP_BLOCK_N = 128  # rows <= 128 bytes
_DEEP_STAGES = 3  # rows of 129-256 bytes
_DEEP_MIN_SMEM = 128 * 1024  # bytes of shared memory per block the device must allow for a deep tile


def decode_splits(batch: int, kv_heads: int, seqlen_k: int, block_n: int, num_sms: int,
                  long_programs_per_sm: int = _LONG_PROGRAMS_PER_SM) -> int:
    """Number of key splits for a decode launch of ``batch * kv_heads`` (sequence, KV head) programs.

    - A very short cache (fewer than ``_SHORT_SPLIT_BLOCKS`` = 8 key blocks, 512 keys at
      BLOCK_N = 64: a few microseconds of GPU work, where the workspace and the merge cost about what
      the split saves): 1.
    - A short cache (8 to 15 blocks): 1 when the programs occupy more than half of the SMs (such a
      launch takes the deep tile, see ``flash_decode``), else the 2-programs-per-SM rule below.
    - A long cache (bandwidth-bound): as many splits as fill every SM with
      ``long_programs_per_sm`` (4; 0 turns this rule off) resident programs,
      ``floor(4 * num_sms / programs)`` (more would start a second wave), if that is at least 2 and
      leaves each split at least ``_LONG_SPLIT_BLOCKS`` (32) key blocks.
    - Otherwise, if the programs already fill the GPU (>= one per SM): 1. Else aim at
      ``_PROGRAMS_PER_SM`` (2) programs per SM, ``ceil(2 * num_sms / programs)`` splits, while
      keeping at least ``_MIN_BLOCKS_PER_SPLIT`` (2) key blocks per split (the fixed cost of a
      program and of the merge must stay small next to its streaming).
    - At most ``_MAX_SPLITS`` (64); the count is then trimmed so no split is empty at ``seqlen_k``
      (blocks spread evenly).
    ``batch`` may already include the row blocks of a large GQA group (they are programs too).
    Examples (H100 / H200, 132 SMs, BLOCK_N = 64): GPT-2 (Hkv = 12), 600 keys -> 10 blocks: 5 splits
    of 2 blocks at B = 1 (12 programs), 1 at B = 8 (96 programs). B = 1, Hkv = 8, 8k keys -> 128
    blocks; the long rule's 64 splits would leave 2 blocks each, so 33 are wanted, trimmed to 32 splits
    of 4 blocks: 256 programs. B = 1, Hkv = 32, 131k keys -> 16 splits of 128 blocks: 512 programs.
    """
    programs = max(1, batch * kv_heads)
    n_blocks = (max(seqlen_k, 0) + block_n - 1) // block_n
    if n_blocks < _SHORT_SPLIT_BLOCKS or (n_blocks < _MIN_SPLIT_BLOCKS and 2 * programs > num_sms):
        return 1
    splits = min(long_programs_per_sm * num_sms // programs, _MAX_SPLITS)
    if splits < 2 or n_blocks // splits < _LONG_SPLIT_BLOCKS:
        if programs >= num_sms:
            return 1
        splits = min(-(-_PROGRAMS_PER_SM * num_sms // programs), n_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS)
    per_split = -(-n_blocks // splits)
    return -(-n_blocks // per_split)


@functools.lru_cache(maxsize=256)
def _decode_meta(head_dim: int, head_dim_v: int, elem_size: int, rows: int, flags: tuple,
                 dot_precision: str, store_lse: bool) -> tuple:
    """Per feature combination, computed once: (BLOCK_N, row blocks, num_warps, num_stages,
    kernel constexprs for num_splits > 1, the same for num_splits == 1, the resident programs per SM
    that ``decode_splits``' long-cache rule may aim at (0: rule off), and the deep tile of whole
    launches of at most one program per SM as (num_splits == 1 constexprs, num_stages), None where
    K/V rows are wider than 256 bytes and in the interpreter).
    ``store_lse``: whether the caller wants the LSE (the partial LSEs of several splits are
    always written: the merge reads them).

    BLOCK_M holds the packed rows (group * Sq) up to a cap (more rows take more row blocks). The
    GPU values are untuned first guesses in the spirit of fwd_config (decode is bandwidth bound:
    K/V tiles of 64 keys, 2-3 stages in flight); the interpreter runs small tiles (cheap per op,
    several key blocks and row blocks in the tests).
    """
    block_d, block_dv = block_dim(head_dim), block_dim(head_dim_v)
    width = max(block_d, block_dv) * elem_size  # bytes per row of a K/V tile
    if INTERPRETED:
        cap, block_n, warps, stages = 16, 16, 4, 1
    elif width <= 128:
        cap, block_n, warps, stages = 64, 64, 4, 3
    elif width <= 256:
        cap, block_n, warps, stages = 64, 64, 4, 2
    elif width <= 512:
        cap, block_n, warps, stages = 32, 32, 4, 2
    else:
        cap, block_n, warps, stages = 16, 32, 4, 1
    block_m = min(max(16, triton.next_power_of_2(max(rows, 1))), cap)
    values = dict(zip(_FLAG_NAMES, flags), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  BLOCK_DV=block_dv, EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v,
                  DOT_PRECISION=dot_precision)
    # The merge's tile [MERGE_M, MERGE_S, BLOCK_DV]: the real rows of a row block, and as many
    # splits as keep it at 8192 fp32 values (64 registers a thread at 4 warps).
    merge_m = min(block_m, triton.next_power_of_2(max(rows, 1)))
    # The interpreter merges 2 splits at a time, so its tests (3-12 splits) run several rounds.
    merge_s = 2 if INTERPRETED else max(1, min(_MAX_SPLITS, 8192 // (merge_m * block_dv)))
    split = {**values, "SPLIT": True, "STORE_LSE": store_lse, "MERGE_M": merge_m, "MERGE_S": merge_s}
    single = {**values, "SPLIT": False, "STORE_LSE": store_lse, "MERGE_M": 1, "MERGE_S": 1}
    deep = None
    if width <= 256 and not INTERPRETED:
        deep_n = _DEEP_BLOCK_N if width <= 128 else block_n
        deep = (tuple(deep_n if n == "BLOCK_N" else single[n] for n in _launch_decode.constexpr_names),
                stages if width <= 128 else _DEEP_STAGES)
    return (block_n, triton.cdiv(max(rows, 1), block_m), warps, stages,
            tuple(split[n] for n in _launch_decode.constexpr_names),
            tuple(single[n] for n in _launch_decode.constexpr_names),
            _LONG_PROGRAMS_PER_SM if width <= 256 else 0, deep)


_FLAG_NAMES = ("HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_KEY_MASK", "HAS_SEQUSED_K")


@functools.lru_cache(maxsize=16)
def _num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter: so tests split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=16)
def _deep_tiles_fit(device) -> bool:
    """Whether a block may use the shared memory of the deep tiles (not on GPUs with ~100 KB)."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= _DEEP_MIN_SMEM


def flash_decode(q, k, v, o, lse, key_mask, seqused_k, alibi, max_seqlen_q: int, max_seqlen_k: int,
                 num_seqs: int, sm_scale: float, softcap: float, window_left: int, window_right: int,
                 dot_precision: str, num_splits: int | None = None) -> None:
    """Split-KV decode forward. Writes ``o`` and ``lse``; allocates only the fp32 split workspace
    (and, once per stream, the merge's arrival counters).

    Conventions as ``flash_fwd``: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) and
    o (B, Hq, Sq, Dv) are 4-D views with any strides (o may view BSHD memory); lse is a (B, Hq, Sq)
    fp32 view, natural log, -inf for rows with no visible key (their output is 0). key_mask
    (B, Sk) nonzero = keep, seqused_k (B,) int32, alibi (Hq,) or (B, Hq) fp32: None when absent.
    ``lse`` None: nobody reads it (no autograd, no ``return_lse``): no kernel writes an LSE.
    max_seqlen_q = Sq, max_seqlen_k = Sk, num_seqs = B; causal is window_right = 0.
    ``num_splits``: None = ``decode_splits`` for this device; 1 writes o and lse straight from the
    kernel (no workspace, no counters). One launch either way; no host sync.
    """
    _, num_heads, _, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[3]
    if num_seqs == 0 or num_heads == 0 or max_seqlen_q == 0:
        return  # nothing to write
    kv_group = num_heads // num_kv_heads
    flags = (window_left >= 0, window_right >= 0, softcap > 0, alibi is not None, key_mask is not None,
             seqused_k is not None)
    store_lse = lse is not None
    block_n, row_blocks, warps, stages, cx_split, cx_single, long_per_sm, deep = _decode_meta(
        head_dim, head_dim_v, q.element_size(), kv_group * max_seqlen_q, flags, dot_precision, store_lse)
    num_sms = _num_sms(q.device)
    if num_splits is None:
        num_splits = decode_splits(num_seqs * row_blocks, num_kv_heads, max_seqlen_k, block_n, num_sms,
                                   long_per_sm)
    dummy = o  # pointer for absent tensors (never read or written)
    lse_st = lse.stride() if store_lse else (0, 0, 0)
    if num_splits == 1:
        workspace = counters = dummy
        lse_part_offset = 0
        if (deep is not None and num_seqs * num_kv_heads * row_blocks <= num_sms and max_seqlen_k > block_n
                and _deep_tiles_fit(q.device)):
            cx_single, stages = deep  # at most one program per SM: more K/V in flight each
    else:
        rows = num_seqs * num_heads * max_seqlen_q
        lse_part_offset = rows * num_splits * head_dim_v
        workspace = torch.empty(lse_part_offset + rows * num_splits, device=q.device, dtype=torch.float32)
        counters = arrival_counters(q.device, num_seqs * num_kv_heads * row_blocks)
    _launch_decode(
        (num_seqs * num_kv_heads, num_splits, row_blocks),
        (q, k, v, o, lse if store_lse else dummy, workspace, counters,
         key_mask if key_mask is not None else dummy, seqused_k if seqused_k is not None else dummy,
         alibi if alibi is not None else dummy,
         *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse_st, *mask_strides(key_mask), *alibi_strides(alibi),
         max_seqlen_q, max_seqlen_k, num_heads, num_kv_heads, kv_group, head_dim, head_dim_v, num_splits,
         lse_part_offset, sm_scale, softcap, window_left, window_right),
        cx_single if num_splits == 1 else cx_split, warps, stages)


# Arrival counters of the split merge, per (device, stream): every launch leaves them 0, and
# launches on one stream never overlap, so one buffer per stream serves every call. A buffer that
# grows is simply replaced: it was allocated on its stream, so the caching allocator hands its
# memory only to later work on that stream.
_COUNTERS: dict = {}
_MIN_COUNTERS = 4096
# Counters for launches captured into CUDA graphs. A graph may be replayed on any stream, beside
# eager calls and other graphs, so each captured launch owns its counters: a slice of a per-device
# pool that was zeroed (and waited for, once) when the device's first eager split launch created it.
# Launches leave their counters 0, so the graph needs no memset node before its kernel. A slice is
# never handed out twice (a freed graph's slice is not reused): once the pool is spent, or for a
# capture with no eager split launch before it, the capture takes fresh zeros (a memset node).
_GRAPH_POOLS: dict = {}
_GRAPH_POOL_LOCK = threading.Lock()  # captures on several threads take disjoint slices
_GRAPH_POOL_SIZE = 1 << 16  # int32 counters per device (256 KB); a split launch needs < 1 per SM


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """At least ``needed`` zeroed int32 counters that no concurrent launch uses."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if torch.cuda.is_current_stream_capturing():
            return _graph_counters(device, index, needed)
        if _GRAPH_POOLS.get(index) is None:
            _new_graph_pool(device, index)
        key = (index, _current_stream(index))
    else:
        key = (device.type, device.index)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < needed:
        size = max(needed, _MIN_COUNTERS, 2 * counters.numel() if counters is not None else 0)
        counters = _COUNTERS[key] = torch.zeros(size, device=device, dtype=torch.int32)
    return counters


def _new_graph_pool(device: torch.device, index: int) -> None:
    """The device's pool of graph counters, zeroed. The one host sync of the decode path, at the
    device's first eager split launch (which loads the kernel anyway): a graph captured later may be
    replayed on any stream, which must find the zeros written. Under ``torch.cuda.set_sync_debug_mode``
    no pool is made (no sync where the user asked for none; a later launch outside it makes it):
    captures meanwhile take fresh zeros."""
    if torch.cuda.get_sync_debug_mode() != 0:
        return
    pool = torch.zeros(_GRAPH_POOL_SIZE, device=device, dtype=torch.int32)
    torch.cuda.current_stream(device).synchronize()
    _GRAPH_POOLS[index] = [pool, 0]


def _graph_counters(device: torch.device, index: int, needed: int) -> torch.Tensor:
    """Counters for a launch being captured: the next unused slice of the device's pool, or fresh
    zeros (allocated in the graph's pool by a captured memset) when there is none."""
    with _GRAPH_POOL_LOCK:
        entry = _GRAPH_POOLS.get(index)
        if entry is None or entry[1] + needed > entry[0].numel():
            return torch.zeros(needed, device=device, dtype=torch.int32)
        pool, used = entry
        entry[1] = used + needed
    return pool[used:used + needed]


def _current_stream(index: int) -> int:
    """The raw handle of device ``index``'s current CUDA stream (what Triton launches on)."""
    return torch._C._cuda_getCurrentRawStream(index)
