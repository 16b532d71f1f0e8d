"""Triton helpers shared by the forward, backward and dropout kernels.

Everything here is `@triton.jit` device code; the host side lives in ops.py.

Conventions used by every kernel:
- Scores live in the base-2 domain: ``s2 = log2(e) * score`` so the softmax uses ``exp2``.
- A (query i, key j) pair of sequence b is allowed when
  ``j < Sk_b`` and ``diag_i - left <= j <= diag_i + right`` with ``diag_i = i + Sk_b - Sq_b``
  (bottom-right alignment, as FlashAttention 2/3). ``causal`` is ``right = 0``.
- Packed sequences in the dense layout (``segment_ids``, Sq == Sk): token t belongs to the run
  ``[seg_start_t, seg_end_t)``; (i, j) is allowed only when j lies in i's run, which is the same
  as i lying in j's run, so query-side and key-side range bounds come from the same two arrays.
- Dropout keeps element (b, h, i, j) when a 14-bit slice of ``hash(seed, offset, b*H + h, i, j // 2)``
  is ``>= round(p * 2**14)`` (``dropout_hash``), so forward, backward and the test helper regenerate
  the same mask from global coordinates.
"""

import triton
import triton.language as tl

from .configs import INTERPRETED

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# mask / LSE entries read per step by mask_extent and lse_extent
EXTENT_CHUNK = tl.constexpr(1024)
# inline PTX where the kernels are compiled for the GPU (the interpreter runs none)
INLINE_PTX = tl.constexpr(not INTERPRETED)


# The causal forward's launch order (``program_tile``): heads per group chosen so a group is about
# TILE_GROUP_PROGRAMS programs (two waves of a 132-SM H100 at 2-3 programs per SM), used from
# TILE_GROUP_MIN_BLOCKS query blocks per head. The interpreter's tests launch 2-4 blocks per head:
# its values give them several groups of a few heads, the last one smaller.
TILE_GROUP_PROGRAMS = tl.constexpr(8 if INTERPRETED else 512)
TILE_GROUP_MIN_BLOCKS = tl.constexpr(2 if INTERPRETED else 64)


@triton.jit
def program_tile(seqlen, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr = False):
    """(first row, b*H + h) of this program's tile on the 1-D grid of ``cdiv(seqlen, BLOCK) * B*H``
    programs (``launch.tile_grid``).

    One grid axis because CUDA caps grid y at 65535 and B*H passes that (MiniLM's 12 heads at a batch
    of 5462 sequences). By default head-major, blocks ascending: the tiles of one head are adjacent,
    so the programs that share its K/V run together and read it from L2.

    ``LONGEST_FIRST`` (the causal forward, where query block i sees i + 1 key blocks), from
    ``TILE_GROUP_MIN_BLOCKS`` blocks per head on: the longest tiles first, in groups of
    G = cdiv(TILE_GROUP_PROGRAMS, blocks) heads, block-major inside a group (every head's last
    block, then every head's second to last, ...), so the grid ends on short tiles instead of the
    last head's long ones while a group's heads still share their K/V in L2. H100 bf16, causal
    forward, 3 alternating rounds, median (results/2026-11-28_h100_session18_run3_ab_causal_order_fwd.log):
    S = 8192 D = 128 1.260 -> 1.187 ms (-5.8%), S = 16384 D = 64 2.790 -> 2.703 (-3.1%), D = 128 2.405 ->
    2.328 (-3.2%); S = 4096 and S = 8192 D = 64 within 1%. Below the threshold the order is unchanged:
    applied at S = 1024 (G = 32) it made D = 128 7% slower (0.197-0.201 -> 0.211-0.213 ms), and in the
    backward kernels it gained nothing (causal fwd+bwd -1.7% to +2.5%; ..._session18_run2_ab_causal_order.log).
    """
    num_blocks = tl.cdiv(seqlen, BLOCK)
    pid = tl.program_id(0)
    bh = pid // num_blocks
    block = pid - bh * num_blocks
    if LONGEST_FIRST:
        if num_blocks >= TILE_GROUP_MIN_BLOCKS:
            num_bh = tl.num_programs(0) // num_blocks
            group = tl.minimum(tl.cdiv(TILE_GROUP_PROGRAMS, num_blocks), num_bh)  # heads per group
            first_bh = pid // (group * num_blocks) * group
            heads = tl.minimum(group, num_bh - first_bh)  # the last group may be smaller
            within = pid - first_bh * num_blocks  # [0, heads * num_blocks), rank-major in the group
            rank = within // heads
            bh = first_bh + within - rank * heads
            block = num_blocks - 1 - rank
    return block * BLOCK, bh


@triton.jit
def seq_bounds(
    b, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_K, seqlen_q, seqlen_k,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
):
    """Start offsets (int64, rows of the packed tensors) and lengths of sequence ``b``.

    Returns (q_start, q_len, k_start, k_len, k_rows): k_rows keys are stored for the sequence,
    the first k_len of them are used (``seqused_k``); dk/dv of the rest are written as 0.
    """
    if IS_VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + b).to(tl.int64)
        q_len = (tl.load(CU_SEQLENS_Q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(CU_SEQLENS_K + b).to(tl.int64)
        k_len = (tl.load(CU_SEQLENS_K + b + 1) - k_start).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        q_len = tl.zeros([], dtype=tl.int32) + seqlen_q
        k_len = tl.zeros([], dtype=tl.int32) + seqlen_k
    k_rows = k_len
    if HAS_SEQUSED_K:
        k_len = tl.maximum(tl.minimum(k_len, tl.load(SEQUSED_K + b).to(tl.int32)), 0)
    return q_start, q_len, k_start, k_len, k_rows


@triton.jit
def load_segments(seg_base, offs, length, seq_stride):
    """Per-token run bounds ([BLOCK] start, [BLOCK] end) and their block-wide extremes.

    Returns (start, end, min_start, max_start, min_end, max_end) over the valid tokens
    (offs < length); an all-invalid block gives an empty range (min_start = max_end = 0).
    """
    ok = offs < length
    start = tl.load(seg_base + offs, mask=ok, other=0)
    end = tl.load(seg_base + seq_stride + offs, mask=ok, other=0)
    big = 2147483647
    min_start = tl.min(tl.where(ok, start, big), axis=0)
    max_start = tl.max(tl.where(ok, start, 0), axis=0)
    min_end = tl.min(tl.where(ok, end, big), axis=0)
    max_end = tl.max(tl.where(ok, end, 0), axis=0)
    min_start = tl.minimum(min_start, max_end)
    return start, end, min_start, max_start, min_end, max_end


@triton.jit
def key_range_for_query_block(
    start_m, q_len, k_len, window_left, window_right,
    seg_min_start, seg_max_start, seg_min_end, seg_max_end,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
):
    """Key-block ranges for query rows [start_m, start_m + BLOCK_M).

    Returns (lo, mid_lo, mid_hi, hi): keys in [lo, hi) may be visible; the blocks in
    [mid_lo, mid_hi) are visible to every row of the block, so they need no mask
    (the steady-state loop); [lo, mid_lo) and [mid_hi, hi) are masked edge blocks.
    lo, mid_lo and mid_hi are multiples of BLOCK_N. With segments, row i sees keys in
    [seg_start_i, seg_end_i): the union over the block bounds [lo, hi), the intersection
    bounds the mask-free middle.
    """
    shift = k_len - q_len  # diag_i = i + shift
    hi = k_len
    full_hi = k_len
    if HAS_RIGHT:
        hi = tl.minimum(hi, start_m + BLOCK_M - 1 + shift + window_right + 1)
        full_hi = tl.minimum(full_hi, start_m + shift + window_right + 1)
    if HAS_SEGMENTS:
        hi = tl.minimum(hi, seg_max_end)
        full_hi = tl.minimum(full_hi, seg_min_end)
    hi = tl.maximum(hi, 0)
    lo = tl.zeros([], dtype=tl.int32)
    full_lo = tl.zeros([], dtype=tl.int32)
    if HAS_LEFT:
        lo = tl.maximum(lo, start_m + shift - window_left)
        full_lo = tl.maximum(full_lo, start_m + BLOCK_M - 1 + shift - window_left)
    if HAS_SEGMENTS:
        lo = tl.maximum(lo, seg_min_start)
        full_lo = tl.maximum(full_lo, seg_max_start)
    lo = tl.minimum((lo // BLOCK_N) * BLOCK_N, hi)
    # [mid_lo, mid_hi): whole blocks inside every row's window and inside k_len.
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), hi)
    mid_hi = tl.maximum(tl.minimum((tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def query_range_for_key_block(
    start_n, q_len, k_len, window_left, window_right,
    seg_min_start, seg_max_start, seg_min_end, seg_max_end,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
):
    """Query-block ranges for key columns [start_n, start_n + BLOCK_N), mirror of the above.

    Query i sees key j iff j - shift - right <= i <= j - shift + left (and i < q_len).
    Returns (lo, mid_lo, mid_hi, hi) in query rows; lo, mid_lo, mid_hi multiples of BLOCK_M.
    The unmasked middle also needs every key of the block to exist (start_n + BLOCK_N <= k_len).
    """
    shift = k_len - q_len
    lo = tl.zeros([], dtype=tl.int32)
    full_lo = tl.zeros([], dtype=tl.int32)
    if HAS_RIGHT:
        lo = tl.maximum(lo, start_n - shift - window_right)
        full_lo = tl.maximum(full_lo, start_n + BLOCK_N - 1 - shift - window_right)
    hi = q_len
    full_hi = q_len
    if HAS_LEFT:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - shift + window_left + 1)
        full_hi = tl.minimum(full_hi, start_n - shift + window_left + 1)
    if HAS_SEGMENTS:  # query i sees key j iff i lies in j's run (the relation is symmetric)
        lo = tl.maximum(lo, seg_min_start)
        full_lo = tl.maximum(full_lo, seg_max_start)
        hi = tl.minimum(hi, seg_max_end)
        full_hi = tl.minimum(full_hi, seg_min_end)
    if start_n + BLOCK_N > k_len:
        full_hi = full_lo  # a partial key block is masked everywhere
    hi = tl.maximum(hi, 0)
    lo = tl.minimum((lo // BLOCK_M) * BLOCK_M, hi)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo), hi)
    mid_hi = tl.maximum(tl.minimum((tl.maximum(full_hi, 0) // BLOCK_M) * BLOCK_M, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def allowed_mask(
    offs_m, offs_n, q_len, k_len, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] bool: key j exists and lies in query i's window."""
    ok = offs_n[None, :] < k_len
    diag = offs_m[:, None] + (k_len - q_len)
    if HAS_RIGHT:
        ok = ok & (offs_n[None, :] <= diag + window_right)
    if HAS_LEFT:
        ok = ok & (offs_n[None, :] >= diag - window_left)
    return ok


@triton.jit
def dot_operand_in_registers(x):
    """``x`` as a computed value, so that a ``tl.dot`` taking it as its left operand reads it from
    registers (wgmma's register-A form) instead of from shared memory on every call. Adding +0.0 is
    exact (it only turns -0.0 into +0.0); Triton does not fold it away."""
    return x + 0.0


@triton.jit
def load_kv_tiles(
    k_base, v_base, offs_n, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd,
    k_len, head_dim, head_dim_v,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_DV] tiles of the keys ``offs_n`` by pointer loads.

    MASKED blocks may run past ``k_len``: those keys load as 0. Other blocks lie inside the sequence
    and mask only the padded head-dim columns (none when EVEN_D / EVEN_DV)."""
    k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd
    if MASKED:
        kT = tl.load(k_ptrs, mask=(offs_n[None, :] < k_len) & (offs_d[:, None] < head_dim), other=0.0)
        v = tl.load(v_ptrs, mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < head_dim_v), other=0.0)
    else:
        if EVEN_D:
            kT = tl.load(k_ptrs)
        else:
            kT = tl.load(k_ptrs, mask=offs_d[:, None] < head_dim, other=0.0)
        if EVEN_DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < head_dim_v, other=0.0)
    return kT, v


@triton.jit
def tanh(x):
    """fp32 tanh from exp2 only (portable across Triton versions and the interpreter).

    |x| >= 0.25: sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow, exact +-1 limits, and the
    cancellation in 1 - e costs at most eps / (1 - e^-0.5) ~ 2.6 eps relative. |x| < 0.25: the odd
    Taylor series to x^9, whose first dropped term (1382/155925 x^11) is < 2e-9 relative there.
    (The naive 1 - 2 / (exp(2x) + 1) lost up to 1e-3 relative near 0: found by tests/test_fuzz.py.)
    """
    ax = tl.abs(x)
    e = tl.exp2(ax * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def score_transform(
    qk, offs_m, offs_n, q_len, k_len, sm_scale, softcap, slope,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    """Raw q.k dot products [BLOCK_M, BLOCK_N] -> base-2 scores (before masking).

    score = softcap * tanh(sm_scale * qk / softcap)  (or sm_scale * qk), then
    score -= slope * |i + Sk - Sq - j| (ALiBi), then * log2(e).
    Also returns tanh (needed by the backward: d score / d qk = sm_scale * (1 - tanh^2)).
    """
    # log2(e) rides on the per-program scalars, so a plain score costs one multiply per element
    # (``qk * (sm_scale * log2 e)``), which the compiler fuses with the caller's ``- m`` into an FMA.
    if HAS_SOFTCAP:
        t = tanh(qk * (sm_scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        t = qk
        s = qk * (sm_scale * LOG2E)
    if HAS_ALIBI:
        rel = (offs_m[:, None] + (k_len - q_len) - offs_n[None, :]).to(tl.float32)
        s = s - (slope * LOG2E) * tl.abs(rel)
    return s, t


@triton.jit
def _mix32(x):
    """A 32-bit integer hash with full avalanche (Wellons' hash-prospector 16/15/15 family, multipliers
    0x21f0aaad and 0x735a2d97, bias ~0.11): two multiplies and three xor-shifts on uint32."""
    x = x ^ (x >> 16)
    return _mix32_tail(x)


@triton.jit
def _mix32_tail(x):
    """``_mix32`` without its first xor-shift: two multiplies and two xor-shifts (7 integer instructions
    with the xor that forms its input). Used on ``row_key ^ column_key``, whose two halves are already
    mixed; the first xor-shift only spreads the high bits of an unmixed input downwards."""
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def dropout_hash(seed, rng_offset, bh, offs_m, start_n, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N // 2] uint32 ``y``: the hash of key pairs (2c, 2c + 1) from global (row b*H+h,
    query i, key j) coordinates, all but its final xor-shift. The pair's 32 bits are
    ``x = y ^ (y >> 15)``: key 2c's 14-bit draw is bits 2-15 of x, key 2c + 1's bits 18-31 (the top
    14 bits of each half). ``keep_from_hash`` and ``dropout_zero`` turn them into the keep-mask.

    Keys come in pairs (``start_n`` is even: block starts are multiples of the block).
    ``x = tail(row_key(seed, offset, b*H+h, i) + c * G)``: the per-row key is fully mixed once per row
    (``_mix32``), ``G = 0x61C88647`` spreads consecutive pairs, and ``tail`` is two multiply /
    xor-shift rounds (``_mix32_tail``). Its first multiply distributes over the sum, so it costs one
    add per pair: ``(row_key * K1) + c * (G * K1)``.

    Why: the keep-mask is integer work per score next to a tensor-core dot that at D = 64 gives each
    score ~256 FLOPs, and Hopper's integer ALU pipe issues a warp instruction every other cycle (the
    FP32 pipes every cycle). Philox-4x32-10 per score made the GPT-2 train step's attention 12.6 ms
    (SDPA 3.5 ms); one 32-bit hash per score cost 12.4 integer instructions per score in the forward's
    main loop; a hash per key pair costs ~3 (counted in the sm_90 SASS, ``scripts/sass_loops.py``).
    A cheaper one, the folded 64-bit product of a row key and a column key (wyhash's "mum": one
    IMAD.WIDE + one LOP3 per pair), cut the forward's loop from 807 to 751 instructions per tile but
    measured slower (H100 bf16, non-causal D=64 S=1024 with dropout 0.1: forward 0.431 -> 0.446 ms,
    fwd+bwd 1.68 -> 1.78; results/2026-11-27_h100_session12_run3_ab_dropout_hash_mum.log).
    Pairing adjacent keys needs no data movement: the pair sits in one thread's registers in
    Hopper's wgmma accumulator layout, and ``join`` + ``reshape`` compile to no layout conversion.
    Why 14 bits: as fp16 bit patterns, 0 .. 0x3FFF are finite and non-negative, ordered as the
    integers, so one half-precision pair compare tests both keys (``dropout_zero``); and the top bits
    of each half, because ``x >= 4 T << 16`` then tests key 2c + 1 without masking x first.
    Statistics (tests/test_dropout.py): keep rate, and correlations between the two keys of a pair,
    neighbouring pairs, rows, and the (i, j), (i, j'), (i', j), (i', j') quads that additively
    combined row and column keys could correlate, all within sampling noise.
    The hash depends on (seed, offset, b*H+h, i, j) only: forward, backward and the test helper
    (kernels/dropout.py) regenerate it for any block shape with an even BLOCK_N.
    """
    seed = seed.to(tl.int64)
    rng_offset = rng_offset.to(tl.int64)
    key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ (rng_offset & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ ((rng_offset >> 32) & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ bh.to(tl.uint32))
    row = _mix32(key ^ offs_m.to(tl.uint32)) * 0x21F0AAAD  # [BLOCK_M] row key * K1
    pairs = start_n // 2 + tl.arange(0, BLOCK_N // 2)
    col = pairs.to(tl.uint32) * 0x473DE3FB  # [BLOCK_N // 2] c * G * K1 (mod 2**32)
    x = row[:, None] + col[None, :]  # [BLOCK_M, BLOCK_N // 2] (row key + c G) K1
    x = x ^ (x >> 15)
    return x * 0x735A2D97


@triton.jit
def dropout_threshold(dropout_p):
    """``4 T`` as uint32, with ``T = round(p * 2**14)`` at most 2**14 - 1: a key is kept when its 14-bit
    draw is ``>= T`` (keep rate ``1 - T / 2**14``: p to 2**-15), i.e. when the 16-bit half of the hash
    that holds the draw in its top 14 bits is ``>= 4 T``."""
    # rounded and scaled in fp32 (exact: at most 2**16): an integer ``* 4`` lets LLVM use that the
    # threshold is a multiple of 4, which cost the D=64 dq kernel's loop 95 SASS instructions per tile
    t = tl.minimum(tl.floor(tl.zeros([], dtype=tl.float32) + dropout_p * 16384.0 + 0.5), 16383.0)
    return (t * 4.0).to(tl.uint32)


@triton.jit
def keep_from_hash(y, threshold, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool keep-mask from ``dropout_hash`` and ``dropout_threshold``."""
    x = y ^ (y >> 15)
    keep_even = (x & 0xFFFF) >= threshold  # key 2c: bits 2-15 >= T, i.e. bits 0-15 >= 4 T
    keep_odd = x >= (threshold << 16)  # key 2c + 1: bits 18-31 >= T, i.e. bits 16-31 >= 4 T
    # [BLOCK_M, BLOCK_N // 2, 2] -> [BLOCK_M, BLOCK_N]: key 2c + e at column 2c + e
    return tl.join(keep_even, keep_odd).reshape([y.shape[0], BLOCK_N])


@triton.jit
def dropout_keep(seed, rng_offset, bh, offs_m, start_n, dropout_p, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool keep-mask of the tile at (offs_m, start_n) (see ``dropout_hash``)."""
    y = dropout_hash(seed, rng_offset, bh, offs_m, start_n, BLOCK_N)
    return keep_from_hash(y, dropout_threshold(dropout_p), BLOCK_N)


@triton.jit
def dropout_zero(p, y, threshold, BLOCK_N: tl.constexpr):
    """``p`` [BLOCK_M, BLOCK_N] (a matmul operand, already in its dtype) with the dropped entries 0;
    ``y`` and ``threshold`` from ``dropout_hash`` and ``dropout_threshold``.

    Compiled for the GPU with a 16-bit ``p``: ``((y >> 2) ^ (y >> 17)) & 0x3FFF3FFF`` is x's two 14-bit
    draws at the bottom of their halves (x's final xor-shift and the move in 3 instructions instead
    of 4), then one inline PTX block per pair: ``set.ge.u32.f16x2`` compares both with T as fp16 bit
    patterns (finite and non-negative there, so ordered as the integers: the same test as
    ``keep_from_hash``) and yields 0xFFFF per kept half; ``and.b32`` applies that to the packed pair
    of p, whose halves are keys 2c (low) and 2c + 1 (high) as in the draws. Per pair: 2 SHF + 2 LOP3
    + HSET2 (sm_90 SASS) where the boolean mask cost SHF + 2 LOP3 + 2 ISETP + 2 FSEL + 2 FMUL (a
    select on the 16-bit values would be 2 PRMT + 2 SEL).
    Elsewhere (the interpreter, which runs no inline assembly; 32-bit p) it selects with
    ``keep_from_hash``: the same mask, bit for bit (tests/test_edge_cases.py reads the 16-bit kernels'
    mask out of their output and compares it with ``testing.dropout_keep_mask``, which takes this path).
    """
    if INLINE_PTX and p.dtype.primitive_bitwidth == 16:
        draws = ((y >> 2) ^ (y >> 17)) & 0x3FFF3FFF
        # [BLOCK_M, BLOCK_N]: each key sees its pair's draws; pack=2 hands one asm block the two
        # neighbouring keys (2c, 2c + 1) of a row as one 32-bit register of p and two copies of draws.
        pair_draws = tl.join(draws, draws).reshape([y.shape[0], BLOCK_N])
        pair_threshold = (threshold >> 2) * 0x10001  # T in both halves
        return tl.inline_asm_elementwise(
            "{ .reg .b32 keep; set.ge.u32.f16x2 keep, $2, $4; and.b32 $0, $1, keep; }",
            "=r,r,r,r,r,r", [p, pair_draws, pair_threshold], dtype=p.dtype, is_pure=True, pack=2)
    else:
        return tl.where(keep_from_hash(y, threshold, BLOCK_N), p, 0.0)


@triton.jit
def mask_extent(mask_base, stride, length, CHUNK: tl.constexpr):
    """``[first, end)``: the first nonzero entry of ``mask[0:length]`` and one past the last one.

    An all-zero mask gives (0, 0). Attention loops are clamped to this range instead of testing each
    block for live keys inside the loop: a data-dependent branch in the loop body stops Triton's
    software pipelining, and contiguous padding (HF's left or right padding) then costs nothing.
    """
    offs0 = tl.arange(0, CHUNK)
    first = tl.zeros([], dtype=tl.int32) + length
    last = tl.zeros([], dtype=tl.int32) - 1
    for start in range(0, length, CHUNK):
        offs = start + offs0
        live = tl.load(mask_base + offs * stride, mask=offs < length, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(live, offs, length), axis=0))
        last = tl.maximum(last, tl.max(tl.where(live, offs, -1), axis=0))
    end = last + 1
    return tl.minimum(first, end), end


@triton.jit
def lse_extent(lse_base, stride, length, CHUNK: tl.constexpr):
    """``[first, end)`` of the query rows whose saved LSE is finite (rows that saw a key); padded
    query rows and rows with every key masked carry -inf and contribute nothing to dK, dV."""
    offs0 = tl.arange(0, CHUNK)
    first = tl.zeros([], dtype=tl.int32) + length
    last = tl.zeros([], dtype=tl.int32) - 1
    for start in range(0, length, CHUNK):
        offs = start + offs0
        live = tl.load(lse_base + offs.to(tl.int64) * stride, mask=offs < length, other=float("-inf")) != float("-inf")
        first = tl.minimum(first, tl.min(tl.where(live, offs, length), axis=0))
        last = tl.maximum(last, tl.max(tl.where(live, offs, -1), axis=0))
    end = last + 1
    return tl.minimum(first, end), end


@triton.jit
def clamp_to_extent(lo, mid_lo, mid_hi, hi, first, end, BLOCK: tl.constexpr):
    """Restrict the three loop phases ``[lo, mid_lo) [mid_lo, mid_hi) [mid_hi, hi)`` to blocks that
    touch ``[first, end)``. The mask-free middle only shrinks (it stays inside the original one), and
    the union still covers every position in ``[max(lo, first), min(hi, end))``."""
    lo2 = tl.maximum(lo, (first // BLOCK) * BLOCK)
    hi2 = tl.minimum(hi, end)
    mid_lo2 = tl.maximum(mid_lo, lo2)
    mid_hi2 = tl.maximum(tl.minimum(mid_hi, tl.cdiv(end, BLOCK) * BLOCK), mid_lo2)
    return lo2, mid_lo2, mid_hi2, hi2
