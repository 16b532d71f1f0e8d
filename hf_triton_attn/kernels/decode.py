"""Split-KV decode forward: few query tokens against a long KV cache.

The regular forward launches one program per (sequence, query head, query block): at decode
(Sq = 1 or a few tokens) that is only B * Hq programs, each streaming every key, and the GPU sits
mostly idle (B = 1, Hq = 32: 32 programs on 132 SMs). Here the keys are split instead:

1. ``_decode_split_kernel``, grid (B * Hkv, num_splits, row blocks). One program owns one KV head
   and ALL its ``group = Hq // Hkv`` query heads times Sq query rows, packed as M = group * Sq
   rows (row r -> query head ``h_kv * group + r // Sq``, query index ``r % Sq``), so each K/V tile
   is read once per KV head and feeds every query head of the group (GQA never materialises
   repeated k/v). It runs the fp32 exp2-domain online softmax of forward.py over its split of the
   keys and writes a normalised partial output and a partial LSE.
2. ``_decode_combine_kernel``, one program per (b, query head, query row): merges the splits,
   ``lse = log sum_s exp(lse_s)``, ``o = sum_s exp(lse_s - lse) o_s``, and writes O (output
   dtype, any strides) and the natural-log LSE with exactly ``_fwd_kernel``'s semantics (-inf and
   output 0 for rows with no visible key), so the regular backward works from them unchanged.

With one split, kernel 1 writes O and LSE directly (``FINAL``) and kernel 2 is not launched.

Splits are taken over each sequence's own visible key range (after ``seqused_k``, the left window
and the first/last real key of ``key_mask``), computed in the kernel, so a static cache whose used
length is far below its capacity, a sliding window over a long cache or a left-padded row still
spreads its real work evenly over the splits. A split
with no key (more splits than key blocks) writes o = 0 and lse = -inf, which the combine weighs 0.

Workspace (fp32, allocated per call with torch.empty, only when num_splits > 1):
  o_part   (B, Hq, Sq, num_splits, Dv)  partial outputs, each normalised by its own sum
  lse_part (B, Hq, Sq, num_splits)      partial LSE in the base-2 domain (m2 + log2 l)

Not served here (the caller keeps the regular kernel): varlen, dropout, segments, query_mask.
"""

import functools

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
def _decode_split_kernel(
    Q, K, V, O_PART, LSE_PART,
    KEY_MASK, SEQUSED_K, ALIBI,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pm, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_kmb, stride_kmn, stride_ab, stride_ah,
    seqlen_q, seqlen_k, num_kv_heads, kv_group, head_dim, head_dim_v, num_splits,
    sm_scale, softcap, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    FINAL: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, key split, block of packed rows).

    FINAL (one split): O_PART/LSE_PART are the real O (output dtype, any strides) and the
    natural-log LSE. Otherwise they are the fp32 workspace and the LSE stays in base 2.
    STORE_LSE False (only with FINAL; nobody reads the LSE): LSE_PART is a dummy, never written.
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
    if FINAL:
        lse = lse * LN2  # the natural-log LSE the backward reads
    rows = b64 * stride_pb + offs_h * stride_ph + offs_i.to(tl.int64) * stride_pm + split * stride_ps
    o_ptrs = O_PART + rows[:, None] + offs_dv[None, :] * stride_pd
    tl.store(o_ptrs, out.to(O_PART.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    if STORE_LSE:
        lse_rows = b64 * stride_lb + offs_h * stride_lh + offs_i.to(tl.int64) * stride_lm + split * stride_ls
        tl.store(LSE_PART + lse_rows, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    seqlen_q, num_heads, head_dim_v, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Merge the splits of one (b, query head, query row) of the contiguous fp32 workspace.
    STORE_LSE False: nobody reads the LSE, LSE is a dummy, never written.

    Partial LSEs are base 2: with M = max_s lse_s, w_s = 2^(lse_s - M) (0 for empty splits),
    o = sum_s w_s o_s / sum_s w_s, lse = ln 2 * (M + log2 sum_s w_s). Every o_s is normalised
    by its own sum, so the weights stay in [0, 1] and nothing overflows.
    """
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Sq + i, the workspace's row order
    i = row % seqlen_q
    bh = row // seqlen_q
    h = bh % num_heads
    b = bh // num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LSE_PART + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no visible key at all: every weight is 0
    w = tl.exp2(lse_s - m_safe)  # [BLOCK_S]
    total = tl.sum(w, axis=0)
    o_ptrs = O_PART + (row * num_splits + offs_s[:, None]) * head_dim_v + offs_dv[None, :]
    o_s = tl.load(o_ptrs, mask=s_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)  # [BLOCK_S, BLOCK_DV]
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    out = tl.sum(o_s * w[:, None], axis=0) / total_safe  # [BLOCK_DV]; 0 for rows with no key
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(total_safe)) * LN2)
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_om + offs_dv * stride_od,
             out.to(O.dtype.element_ty), mask=offs_dv < head_dim_v)
    if STORE_LSE:
        tl.store(LSE + b * stride_lb + h * stride_lh + i * stride_lm, lse)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

_launch_split = CachedLauncher(_decode_split_kernel, num_pointers=8)
_launch_combine = CachedLauncher(_decode_combine_kernel, num_pointers=4)

# Heuristic constants (see decode_splits).
_PROGRAMS_PER_SM = 2
_MIN_BLOCKS_PER_SPLIT = 4
_MAX_SPLITS = 64
_MIN_SPLIT_BLOCKS = 16


def decode_splits(batch: int, kv_heads: int, seqlen_k: int, block_n: int, num_sms: int) -> int:
    """Number of key splits for a decode launch of ``batch * kv_heads`` (sequence, KV head) programs.

    - If those programs already fill the GPU (>= one per SM), or the cache is short (fewer than
      ``_MIN_SPLIT_BLOCKS`` = 16 key blocks, ~1k keys: a few microseconds of GPU work, where the
      combine launch and the workspace would cost more host time than the split saves), split
      nothing: 1.
    - Otherwise aim at ``_PROGRAMS_PER_SM`` (2) programs per SM in total, i.e.
      ``ceil(2 * num_sms / (batch * kv_heads))`` splits, while keeping at least
      ``_MIN_BLOCKS_PER_SPLIT`` (4) key blocks per split (the fixed cost of a program and of the
      combine must stay small next to its streaming), and at most ``_MAX_SPLITS`` (64).
    - The count is then trimmed so no split is empty at ``seqlen_k`` (blocks spread evenly).
    ``batch`` may already include the row blocks of a large GQA group (they are programs too).
    Example (H100, 132 SMs, BLOCK_N = 64): B = 1, Hkv = 8, 8k keys -> 128 blocks, 33 wanted,
    32 allowed -> 32 splits of 4 blocks: 256 programs.
    """
    programs = max(1, batch * kv_heads)
    n_blocks = (max(seqlen_k, 0) + block_n - 1) // block_n
    if programs >= num_sms or n_blocks < _MIN_SPLIT_BLOCKS:
        return 1
    splits = min(-(-_PROGRAMS_PER_SM * num_sms // programs), n_blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS)
    per_split = -(-n_blocks // splits)
    return -(-n_blocks // per_split)


@functools.lru_cache(maxsize=256)
def _decode_meta(head_dim: int, head_dim_v: int, elem_size: int, rows: int, flags: tuple,
                 dot_precision: str, store_lse: bool) -> tuple:
    """Per feature combination, computed once: (BLOCK_N, row blocks, BLOCK_DV, num_warps,
    num_stages, split-kernel constexprs for num_splits > 1, the same for num_splits == 1).
    ``store_lse``: whether the caller wants the LSE (the partial LSEs of several splits are
    always written: the combine reads them).

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
    split = {**values, "FINAL": False, "STORE_LSE": True}
    final = {**values, "FINAL": True, "STORE_LSE": store_lse}
    return (block_n, triton.cdiv(max(rows, 1), block_m), block_dv, warps, stages,
            tuple(split[n] for n in _launch_split.constexpr_names),
            tuple(final[n] for n in _launch_split.constexpr_names))


_FLAG_NAMES = ("HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_KEY_MASK", "HAS_SEQUSED_K")


@functools.lru_cache(maxsize=16)
def _num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter: so tests split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def flash_decode(q, k, v, o, lse, key_mask, seqused_k, alibi, max_seqlen_q: int, max_seqlen_k: int,
                 num_seqs: int, sm_scale: float, softcap: float, window_left: int, window_right: int,
                 dot_precision: str, num_splits: int | None = None) -> None:
    """Split-KV decode forward. Writes ``o`` and ``lse``; allocates only the fp32 split workspace.

    Conventions as ``flash_fwd``: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) and
    o (B, Hq, Sq, Dv) are 4-D views with any strides (o may view BSHD memory); lse is a (B, Hq, Sq)
    fp32 view, natural log, -inf for rows with no visible key (their output is 0). key_mask
    (B, Sk) nonzero = keep, seqused_k (B,) int32, alibi (Hq,) or (B, Hq) fp32: None when absent.
    ``lse`` None: nobody reads it (no autograd, no ``return_lse``): no kernel writes an LSE.
    max_seqlen_q = Sq, max_seqlen_k = Sk, num_seqs = B; causal is window_right = 0.
    ``num_splits``: None = ``decode_splits`` for this device; 1 writes o and lse straight from the
    split kernel (no workspace, no combine launch). No host sync.
    """
    _, num_heads, _, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[3]
    if num_seqs == 0 or num_heads == 0 or max_seqlen_q == 0:
        return  # nothing to write
    kv_group = num_heads // num_kv_heads
    flags = (window_left >= 0, window_right >= 0, softcap > 0, alibi is not None, key_mask is not None,
             seqused_k is not None)
    store_lse = lse is not None
    block_n, row_blocks, block_dv, warps, stages, cx_split, cx_final = _decode_meta(
        head_dim, head_dim_v, q.element_size(), kv_group * max_seqlen_q, flags, dot_precision, store_lse)
    if num_splits is None:
        num_splits = decode_splits(num_seqs * row_blocks, num_kv_heads, max_seqlen_k, block_n, _num_sms(q.device))
    dummy = lse if store_lse else o  # pointer for absent tensors (never read or written)
    o_st = o.stride()
    lse_st = lse.stride() if store_lse else (0, 0, 0)
    if num_splits == 1:
        o_part, lse_part = o, dummy
        o_strides = (o_st[0], o_st[1], o_st[2], 0, o_st[3])
        lse_strides = (*lse_st, 0)
    else:
        o_part = torch.empty((num_seqs, num_heads, max_seqlen_q, num_splits, head_dim_v),
                             device=q.device, dtype=torch.float32)
        lse_part = torch.empty((num_seqs, num_heads, max_seqlen_q, num_splits), device=q.device, dtype=torch.float32)
        o_strides, lse_strides = o_part.stride(), lse_part.stride()
    args = (q, k, v, o_part, lse_part,
            key_mask if key_mask is not None else dummy, seqused_k if seqused_k is not None else dummy,
            alibi if alibi is not None else dummy,
            *q.stride(), *k.stride(), *v.stride(), *o_strides, *lse_strides,
            *mask_strides(key_mask), *alibi_strides(alibi),
            max_seqlen_q, max_seqlen_k, num_kv_heads, kv_group, head_dim, head_dim_v, num_splits,
            sm_scale, softcap, window_left, window_right)
    _launch_split((num_seqs * num_kv_heads, num_splits, row_blocks), args,
                  cx_final if num_splits == 1 else cx_split, warps, stages)
    if num_splits == 1:
        return
    block_s = max(2, triton.next_power_of_2(num_splits))
    _launch_combine((num_seqs * num_heads * max_seqlen_q, 1, 1),
                    (o_part, lse_part, o, dummy, *o_st, *lse_st,
                     max_seqlen_q, num_heads, head_dim_v, num_splits),
                    (block_s, block_dv, store_lse), 4 if block_s * block_dv >= 2048 else 2, 1)
