"""The split-KV decode kernels (kernels/decode.py) called directly, against the float64 oracle.

Every output buffer and the split workspace start as NaN, so an element never written fails.
"""

import pytest
import torch

from hf_triton_attn.kernels.decode import decode_splits, flash_decode
from hf_triton_attn.reference import attention_reference

from .helpers import BACKEND, DEVICE, ON_GPU, assert_pass_rule, count_launches, make_qkv, max_err, record_launches

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    """torch.empty returns NaN-filled float tensors: the fp32 split workspace must be fully written."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", empty)


def run_decode(q, k, v, *, causal=False, window=(-1, -1), key_mask=None, seqused_k=None, alibi=None,
               softcap=0.0, num_splits=None, out_bshd=False, scale=None):
    """flash_decode into NaN-poisoned o/lse; returns (o, lse) and checks them against the oracle."""
    q, k, v = q.detach(), k.detach(), v.detach()
    b, hq, sq, _ = q.shape
    dv = v.shape[3]
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if out_bshd:  # o and lse as views of (B, S, H, .) memory, as HF's transpose(1, 2) leaves them
        o = torch.full((b, sq, hq, dv), float("nan"), device=DEVICE, dtype=q.dtype).transpose(1, 2)
        lse = torch.full((b, sq, hq), float("nan"), device=DEVICE).transpose(1, 2)
    else:
        o = torch.full((b, hq, sq, dv), float("nan"), device=DEVICE, dtype=q.dtype)
        lse = torch.full((b, hq, sq), float("nan"), device=DEVICE)
    o_ptr, lse_ptr = o.data_ptr(), lse.data_ptr()
    sm_scale = scale if scale is not None else q.shape[-1] ** -0.5
    flash_decode(q, k, v, o, lse, key_mask=key_mask, seqused_k=seqused_k, alibi=alibi, max_seqlen_q=sq,
                 max_seqlen_k=k.shape[2], num_seqs=b, sm_scale=sm_scale, softcap=softcap, window_left=left,
                 window_right=right, dot_precision="ieee", num_splits=num_splits)
    assert o.data_ptr() == o_ptr and lse.data_ptr() == lse_ptr

    kw = dict(causal=causal, window_size=window, attention_mask=key_mask, seqused_k=seqused_k,
              alibi_slopes=alibi, softcap=softcap, softmax_scale=sm_scale)
    ref_out = attention_reference(q, k, v, **kw)
    ora_out, ora_lse = attention_reference(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert_pass_rule("out", o, ref_out, ora_out, q.dtype)
    assert not torch.isnan(lse).any(), "NaN in lse (or an element never written)"
    finite = torch.isfinite(ora_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE: -inf rows differ from the oracle"
    assert (lse[~finite] == float("-inf")).all(), "rows with no visible key must have lse -inf"
    assert (o[~finite] == 0).all(), "rows with no visible key must be 0"
    lse_scale = max(1.0, float(ora_lse[finite].abs().max())) if finite.any() else 1.0
    assert max_err(lse[finite], ora_lse[finite]) <= 1e-3 * lse_scale, "LSE differs from the oracle"
    return o, lse


# (B, Hq, Hkv, Sq, Sk, D, Dv): odd key lengths, GQA/MQA groups, Sq 1 and 3, D != Dv, D = 40.
# Under the interpreter BLOCK_N = 16 and BLOCK_M is capped at 16 packed rows (group * Sq).
SHAPES = [
    (1, 4, 1, 1, 300, 64, 64),    # MQA 4:1, 19 key blocks
    (2, 2, 2, 3, 97, 32, 32),     # no grouping, Sq = 3
    (1, 6, 3, 3, 17, 40, 40),     # GQA 2:1, D = 40 (EVEN_D false), 2 key blocks
    (2, 4, 1, 1, 1, 16, 16),      # a single key
    (1, 4, 2, 3, 61, 32, 16),     # Dv != D
    (1, 8, 2, 5, 40, 16, 24),     # group 4 x Sq 5 = 20 packed rows: two row blocks
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_and_splits(shape, dtype):
    """1 split (direct write), the heuristic's choice, and more splits than key blocks (empty splits)."""
    b, hq, hkv, sq, sk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv, dtype)
    for num_splits in (1, None, 3, 12):
        run_decode(q, k, v, causal=sq > 1, num_splits=num_splits)


def test_no_keys():
    """Sk = 0: every row is empty (output 0, lse -inf), split or not."""
    q, k, v = make_qkv(2, 4, 2, 2, 0, 16, 16, torch.float32)
    for num_splits in (1, 4):
        run_decode(q, k, v, num_splits=num_splits)


def _key_mask(pattern: str, batch: int, sk: int) -> torch.Tensor:
    m = torch.ones(batch, sk, dtype=torch.bool)
    if pattern == "left":  # left padding (HF generation of a left-padded batch)
        m[0, :37] = False
        m[1, :5] = False
    elif pattern == "holes":
        m = torch.rand(batch, sk, generator=torch.Generator().manual_seed(3)) > 0.4
        m[0, :40] = False  # fully masked key blocks, skipped
    elif pattern == "empty_row":
        m[0] = False  # a row with no real key at all
    return m


@pytest.mark.parametrize("pattern", ["left", "holes", "empty_row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_mask(pattern, dtype):
    q, k, v = make_qkv(2, 4, 2, 1, 70, 32, 32, dtype)
    mask = _key_mask(pattern, 2, 70).to(DEVICE)
    run_decode(q, k, v, key_mask=mask, num_splits=4)
    if pattern == "empty_row":
        o, lse = run_decode(q, k, v, key_mask=mask.to(torch.int64), causal=True, num_splits=1)
        assert (o[0] == 0).all() and (lse[0] == float("-inf")).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seqused_k(dtype):
    """Static cache: only the first seqused_k[b] keys exist; 0 used keys gives 0 / -inf."""
    q, k, v = make_qkv(3, 4, 2, 3, 80, 32, 32, dtype)
    used = torch.tensor([80, 33, 0], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 5):
        o, lse = run_decode(q, k, v, causal=True, seqused_k=used, num_splits=num_splits)
        assert (o[2] == 0).all() and (lse[2] == float("-inf")).all()


@pytest.mark.parametrize("window", [(7, 0), (20, -1), (5, 2), (0, 0)])
def test_window(window):
    """Sliding windows, bottom-right aligned, with Sq = 3 (the left edge moves per query row)."""
    q, k, v = make_qkv(1, 4, 2, 3, 97, 32, 32, torch.float32)
    run_decode(q, k, v, window=window, num_splits=3)


def test_window_seqused_mask():
    """Window + static cache + padding mask + GQA: the split range follows each row's used length."""
    q, k, v = make_qkv(2, 4, 1, 2, 90, 32, 32, torch.float32)
    used = torch.tensor([71, 90], dtype=torch.int32, device=DEVICE)
    mask = _key_mask("holes", 2, 90).to(DEVICE)
    run_decode(q, k, v, causal=True, window=(30, -1), seqused_k=used, key_mask=mask, num_splits=4)
    mask[1] = False
    mask[1, :10] = True  # row 1's only real keys lie left of its window: no visible key, split or not
    for num_splits in (1, 4):
        o, lse = run_decode(q, k, v, causal=True, window=(30, -1), key_mask=mask, num_splits=num_splits)
        assert (o[1] == 0).all() and (lse[1] == float("-inf")).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_alibi(dtype):
    q, k, v = make_qkv(2, 4, 2, 3, 60, 32, 32, dtype)
    q = q.detach() * 3  # scores large enough for the cap to bite
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    run_decode(q, k, v, softcap=5.0, num_splits=3)
    run_decode(q, k, v, alibi=slopes, causal=True, num_splits=3)
    run_decode(q, k, v, softcap=5.0, alibi=(slopes * torch.tensor([[1.0], [0.3]], device=DEVICE)).contiguous(),
               causal=True, num_splits=1, scale=0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bshd_views_in_place(dtype):
    """q/k/v/o/lse as transposed (B, S, H, .) views (HF's layout): read and written in place."""
    q, k, v = make_qkv(2, 6, 2, 3, 50, 40, 40, dtype, layout="bshd")
    assert q.stride(1) < q.stride(2)
    for num_splits in (1, 4):
        run_decode(q, k, v, causal=True, num_splits=num_splits, out_bshd=True)


def test_one_launch_counters_left_zero(monkeypatch):
    """Split or not, a call is one launch; the last split of each row block merges, then resets its
    arrival counter, so the per-stream counters are all 0 again after every call; repeated calls
    give the same bits (the merge reads the splits in order, whoever arrives last)."""
    from hf_triton_attn.kernels import decode

    grids = count_launches(monkeypatch, decode, "_launch_decode")
    q, k, v = make_qkv(2, 8, 2, 5, 90, 16, 24, torch.float16)  # 20 packed rows: two row blocks
    first, _ = run_decode(q, k, v, causal=True, num_splits=7)
    again, _ = run_decode(q, k, v, causal=True, num_splits=7)
    assert torch.equal(first, again)
    run_decode(q, k, v, causal=True, num_splits=1)
    assert [g[1] for g in grids] == [7, 7, 1] and len({g[2] for g in grids}) == 1
    if not ON_GPU:
        assert grids[0][2] == 2  # BLOCK_M is capped at 16 rows under the interpreter
    counters = [c for c in decode._COUNTERS.values() if c.device.type == q.device.type]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch", [3, pytest.param(70, marks=pytest.mark.skipif(not ON_GPU, reason="GPU-sized"))])
def test_whole_launch_deep_tiles(batch, head_dim, monkeypatch):
    """Whole (unsplit) launches take the deep tile on a GPU while they have at most one program per SM
    (6 programs here: 128-key tiles at D = 64, 3 stages at D = 128), the default tile beyond that (140
    programs); both match the oracle, with a key mask and causal, at a key count (301) that ends inside
    a tile."""
    from hf_triton_attn.kernels import decode

    launches = record_launches(monkeypatch, decode, "_launch_decode")
    q, k, v = make_qkv(batch, 4, 2, 1, 301, head_dim, head_dim, torch.float16, layout="bshd")
    mask = torch.rand(batch, 301, generator=torch.Generator().manual_seed(3)) > 0.2
    run_decode(q, k, v, causal=True, key_mask=mask.to(DEVICE), num_splits=1)
    names = decode._launch_decode.constexpr_names
    tiles = [(dict(zip(names, constexprs))["BLOCK_N"], stages) for _, constexprs, _, stages in launches.calls]
    meta = decode._decode_meta(head_dim, head_dim, 2, 2, (False, True, False, False, True, False), "ieee", True)
    tile = (meta[0], meta[3])  # (BLOCK_N, num_stages)
    if ON_GPU and decode._deep_tiles_fit(q.device) and batch * 2 <= decode._num_sms(q.device):
        deep_constexprs, deep_stages = meta[7]
        tile = (dict(zip(names, deep_constexprs))["BLOCK_N"], deep_stages)
    assert tiles == [tile]
    if ON_GPU and torch.cuda.get_device_capability()[0] >= 9:  # Hopper: 132 SMs, 227 KB per block
        expected = {(3, 64): (128, 3), (3, 128): (64, 3), (70, 64): (64, 3), (70, 128): (64, 2)}
        assert tiles[0] == expected[batch, head_dim]


def test_arrival_counters_grow():
    """A call needing more counters than the stream's buffer holds gets a larger, zeroed one, which
    later calls of the stream then share."""
    from hf_triton_attn.kernels import decode

    device = torch.device(DEVICE)
    small = decode.arrival_counters(device, 10)
    assert small.dtype == torch.int32 and small.numel() >= 10 and int(small.abs().sum()) == 0
    assert decode.arrival_counters(device, 10) is small
    big = decode.arrival_counters(device, small.numel() + 1)
    assert big.numel() > small.numel() and int(big.abs().sum()) == 0
    assert decode.arrival_counters(device, 10) is big


def test_decode_splits_heuristic():
    # 4 programs per SM already (536): no split
    assert decode_splits(67, 8, 8192, 64, 132) == 1
    assert decode_splits(64, 8, 2048, 64, 132) == 1
    # long caches fill the SMs with 4 programs each, at least 32 key blocks per split
    assert decode_splits(17, 8, 8192, 64, 132) == 3  # 136 programs: 3 splits of 43 blocks
    assert decode_splits(16, 8, 8192, 64, 132) == 4  # 128 programs: 4 splits of 32 blocks
    assert decode_splits(8, 32, 32768, 64, 132) == 2  # 256 programs: floor(528 / 256)
    assert decode_splits(1, 32, 131072, 64, 132) == 16  # 16 x 32 = 512 programs, no second wave
    assert decode_splits(1, 8, 131072, 64, 132) == 64  # at most 64 splits
    # the rule off (K/V rows wider than 256 bytes): 2 programs per SM, no split once the SMs are full
    assert decode_splits(1, 32, 131072, 32, 132, 0) == 9
    assert decode_splits(8, 32, 32768, 32, 132, 0) == 1
    # B = 1, Hkv = 8, 8k keys: 2 programs per SM wanted (33), trimmed to 32 splits of 4 blocks
    assert decode_splits(1, 8, 8192, 64, 132) == 32
    assert decode_splits(1, 8, 2048, 64, 132) == 16  # 2 blocks per split allowed
    # short cache (8-15 key blocks): split only while the programs fill at most half of the SMs
    assert decode_splits(1, 12, 600, 64, 132) == 5  # GPT-2 at B = 1: 5 splits of 2 blocks
    assert decode_splits(4, 12, 600, 64, 132) == 5  # 48 programs: min(ceil(264 / 48), 10 // 2)
    assert decode_splits(1, 8, 512, 64, 132) == 4
    assert decode_splits(66, 1, 600, 64, 132) == 4  # 66 programs: half of the SMs
    assert decode_splits(67, 1, 600, 64, 132) == 1  # 67: more than half
    assert decode_splits(8, 12, 640, 64, 132) == 1  # GPT-2 generate, B = 8: 96 programs
    # very short cache (< 8 key blocks): one split, no merge
    assert decode_splits(1, 12, 448, 64, 132) == 1
    assert decode_splits(1, 12, 300, 64, 132) == 1
    # at least 2 key blocks per split
    assert decode_splits(1, 8, 1024, 64, 132) == 8
    assert decode_splits(1, 1, 64, 64, 132) == 1
    assert decode_splits(1, 1, 0, 64, 132) == 1
    for batch, heads, sk in [(1, 1, 10**6), (3, 2, 1000), (2, 4, 4097), (1, 8, 300)]:
        n = decode_splits(batch, heads, sk, 64, 132)
        blocks = -(-sk // 64)
        per = -(-blocks // n)
        assert 1 <= n <= 64 and (n - 1) * per < blocks, (batch, heads, sk, n)  # no split left empty


@pytest.mark.parametrize("num_splits", [1, 4])
def test_without_lse(num_splits):
    """lse=None (no autograd, no return_lse): no kernel writes an LSE, and o is bit for bit the same."""
    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 1, 70, 32, 32, torch.float16, layout="bshd"))
    mask = _key_mask("left", 2, 70).to(DEVICE)
    o_ref, _ = run_decode(q, k, v, causal=True, key_mask=mask, num_splits=num_splits, out_bshd=True)
    o = torch.full_like(o_ref, float("nan"))
    flash_decode(q, k, v, o, None, key_mask=mask, seqused_k=None, alibi=None, max_seqlen_q=1, max_seqlen_k=70,
                 num_seqs=2, sm_scale=32 ** -0.5, softcap=0.0, window_left=-1, window_right=0,
                 dot_precision="ieee", num_splits=num_splits)
    assert torch.equal(o, o_ref)


def test_flash_attention_skips_lse_only_when_unused(monkeypatch):
    """A no-grad decode call without return_lse allocates no LSE; its output equals the LSE path's."""
    from hf_triton_attn import flash_attention, ops

    q, k, v = make_qkv(2, 4, 2, 1, 40, 16, 16, torch.float16)
    mask = _key_mask("left", 2, 40).to(DEVICE)
    kw = dict(causal=True, attention_mask=mask, backend=BACKEND)
    with torch.no_grad():
        out_lse, lse = flash_attention(q, k, v, return_lse=True, **kw)
        allocated = []
        real = ops._empty_lse
        monkeypatch.setattr(ops, "_empty_lse", lambda *a: allocated.append(1) or real(*a))
        out = flash_attention(q, k, v, **kw)
    assert not allocated and torch.equal(out, out_lse) and torch.isfinite(lse).all()
    flash_attention(q, k, v, **kw).sum().backward()  # autograd: the LSE again, for the backward
    assert allocated and q.grad is not None
