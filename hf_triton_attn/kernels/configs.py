"""Block shapes and launch parameters for each kernel.

The interpreter runs one fixed, small configuration (its cost is per program and per op, and the
tests need several blocks per sequence). GPU configurations are chosen per head dim and dtype.
"""

from __future__ import annotations

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_dim(d: int) -> int:
    """Padded head dim: a power of two, at least 16 (tl.dot's smallest K).

    Integer bit arithmetic, equal to ``max(16, triton.next_power_of_2(d))`` for every d: Triton
    3.6's ``next_power_of_2`` is a constexpr function whose call costs 2.0 us vs 0.05 (2-core CPU
    box); the backward asks twice per call (``_dq_mode``), TMA descriptors once each."""
    return 16 if d <= 16 else 1 << (d - 1).bit_length()


def key_tier(max_seqlen_k: int) -> int:
    """0 below 1024 keys per sequence, 1 from 1024, 2 from 2048: what ``fwd_config`` tells apart."""
    return 2 if max_seqlen_k >= 2048 else int(max_seqlen_k >= 1024)


def short_varlen_rows(total_rows: int, num_seqs: int) -> bool:
    """Whether a packed (varlen) batch's sequences average fewer than 384 query rows, where the forward
    takes 64-row query blocks (``fwd_config``'s ``short_rows``)."""
    return total_rows < 384 * num_seqs


def fwd_config(block_d: int, block_dv: int, elem_size: int, tma: bool = False, diagonal: bool = False,
               keys: int = 2, dropout: bool = False, short_rows: bool = False) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages for the forward kernel (``tma``: K/V read through
    TMA descriptors; ``diagonal``: a causal or right-window mask, so tiles near it are partly masked;
    ``keys``: ``key_tier`` of the longest key sequence (how many key blocks feed the pipeline);
    ``dropout``: the keep-mask hash makes the loop integer-bound, which the 128x128 tile serves worse;
    ``short_rows``: a varlen batch of short sequences, ``short_varlen_rows``)."""
    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    width = max(block_d, block_dv) * elem_size  # bytes per row of a tile
    if tma and width <= 256:
        # H200, Triton 3.6, bf16, B*S = 16384, H*D = 2048, TFLOP/s at S = 1024 / 4096
        # (results/2026-11-26_h200_session2_run2_fwd_sweep.log): D=64 non-causal 128x128 w4 s3
        # 376 / 438 (128x64 w4 s3: 359 / 404); D=64 causal 64x64 w4 s3 274 / 360 (128x64 w4 s3: 256 / 369); D=128 64x64 w4 s3 448 / 482
        # non-causal and 330 / 432 causal (128x64 w8 s3: 401 / 489 and 273 / 427). Below 1024 keys the
        # 128-key tile loses: D=64, S=512 with key + query padding masks (fill 1.0), 128x64 w4 s3
        # 0.245 ms, 128x128 outside the top three (> 0.252 ms; ..._session2_run4_fill_sweep.log).
        # With dropout 0.1 (H100, sweep_configs.py --dropout 0.1: ..._h100_session4_fwd_sweep_dropout.json):
        # D=64 non-causal 64x64 w4 s3 0.499 / 1.957 ms at S = 1024 / 4096 vs 128x128 w4 s3 0.608 / 2.063.
        # With Q as a register operand (forward.py), H100 bf16, HF layout, 2 alternating samples each
        # (results/2026-11-27_h100_session10_run4_ab_fwd_tiles.log): D=64 non-causal S=1024 64x64
        # 0.3272-0.3304 ms vs 128x128 0.3520-0.3557 (-7%); at S = 2048 / 4096 / 16384 the 128x128 tile
        # stays ahead of 64x128 (0.658-0.664 vs 0.685-0.718, 1.277-1.294 vs 1.295-1.364, 4.84-4.85 vs
        # 5.07-5.26); below 1024 keys 128x64 stays (S=512 with padding masks, fill 1.0: 0.106 vs 0.112
        # for 64x64).
        # With dropout (Q as a register operand, H100 bf16, 3 alternating samples, results/2026-11-27_
        # h100_session10_run11_ab_dropout_tile.log): non-causal D=64 forward 128x64 0.4700-0.4735 /
        # 1.714-1.715 ms vs 64x64 0.4788-0.4815 / 1.747-1.835 at S = 1024 / 4096; fwd+bwd 5.824-5.830
        # vs 5.901-5.958 at S = 4096, equal at 1024.
        if width <= 128 and not diagonal:
            if short_rows:  # packed short sequences, as without TMA below
                return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
            if dropout or keys == 0:
                return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
            if keys == 1:
                return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
            return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if width <= 128:  # D <= 64 in 16-bit
        # Packed sequences much shorter than 128-row blocks: 64-row blocks round less of each sequence
        # up. H100 bf16, B32 H12 S512 D64 non-causal, right-padded lengths packed, CUDA-graph replays
        # (results/2026-11-27_h100_session11_run6_padded_configs.log): mean 133 rows 0.0289 ms (64x64
        # w4 s3) vs 0.0312 (128x64); mean 297 rows 0.0620 vs 0.0643; all 512 rows 0.1049 vs 0.1014.
        # With dropout 0.1 (..._run10_padded_configs_dropout.log): mean 297 rows 0.0683 vs 0.0772.
        if short_rows and not diagonal:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if width <= 256:  # D <= 128 in 16-bit, D <= 64 in fp32
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if width <= 512:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)


def dkdv_config(block_d: int, block_dv: int, elem_size: int, tma: bool = False) -> dict:
    """BLOCK_M (query rows streamed), BLOCK_N (keys owned), num_warps, num_stages for dk/dv."""
    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    width = max(block_d, block_dv) * elem_size
    if tma and width <= 128:
        # H200, Triton 3.6, bf16, S=4096, q/dO through TMA: whole backward 3.98 ms non-causal / 2.53 causal
        # at D=64 (s2: 4.17 / 2.66; pointer loads 4.40 / 2.65; results/2026-11-26_h200_session2_run3_bwd_sweep.log)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    # H100, Triton 3.6, fp16, B*S=16384, S=4096 (benchmarks/results/2026-11-25_h100_sweep.json):
    # 64x64 w4 s2 was the fastest dk/dv config for D=64 and 128, causal or not (D=64 non-causal
    # backward 4.46 ms vs 5.27 ms with 32x128); with TMA too at D=128 (H200: 3.38 ms vs 4.06 pointers).
    if width <= 256:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if width <= 512:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)


def dq_config(block_d: int, block_dv: int, elem_size: int, tma: bool = False) -> dict:
    """BLOCK_M (query rows owned), BLOCK_N (keys streamed), num_warps, num_stages for dq."""
    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    width = max(block_d, block_dv) * elem_size
    if tma and width <= 128:
        # H200 sweep with k/v through TMA (as dk/dv above): whole backward at D=64 3.98 ms non-causal,
        # 2.51 causal (best there 64x64 w4 s3, 2.49); pointer loads' best 4.59 / 2.69.
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    # Same sweep: dq configs were within 2% of each other; these won or placed second.
    if width <= 128:
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
    if width <= 256:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if width <= 512:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)


def fuse_dq(block_d: int, block_dv: int, elem_size: int, tma: bool, diagonal: bool, dropout: bool) -> bool:
    """Whether the dk/dv kernel also accumulates dq (fp32, one TMA reduce-add per tile into a zeroed
    buffer; the interpreter adds with pointer atomics) instead of a separate dq kernel.

    Fusing computes P, dP and the dropout mask once instead of twice and drops two of the seven
    matmuls per tile, at the cost of an fp32 read-modify-write of the dq tile per key block and a
    non-deterministic summation order. H100, Triton 3.6, bf16, B*S = 16384, H*D = 2048, fwd+bwd ms
    split -> fused (results/2026-11-26_h100_session4_dq_modes.log):
    - D=64 dropout 0.1: S=1024 2.017 -> 1.865 non-causal, 1.396 -> 1.200 causal; S=4096 7.118 -> 6.295,
      4.157 -> 3.490.
    - D=64 p=0: causal 1.078 -> 1.061 (S=1024), 3.232 -> 3.022 (4096); non-causal slower, 1.484 -> 1.554
      and 5.218 -> 5.294, so it stays split.
    - D=128: 1.4-2.1x slower in every case (the fused loop at BLOCK_D=128 keeps fewer stages).
    The interpreter fuses whenever the GPU could (diagonal or dropout), at any width, so the CPU tests
    run both paths.
    """
    if not (diagonal or dropout):
        return False
    if INTERPRETED:
        return True
    return tma and max(block_d, block_dv) * elem_size <= 128
