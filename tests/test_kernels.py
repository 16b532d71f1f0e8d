"""The Triton kernels (interpreted on CPU, compiled on the GPU) against the float64 oracle."""

import pytest
import torch

from hf_triton_attn import flash_attention

from .helpers import BACKEND, DEVICE, ON_GPU, check_against_oracle, count_launches, cu_seqlens, make_qkv

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
pytestmark = pytest.mark.usefixtures("poison")

# (B, Hq, Hkv, Sq, Sk, D, Dv): odd lengths, head dims 1..256 incl. non powers of two, Dv != D.
SHAPES = [
    (1, 2, 2, 17, 17, 16, 16),
    (2, 2, 2, 63, 63, 40, 40),
    (1, 2, 2, 97, 97, 80, 80),
    (1, 1, 1, 129, 129, 64, 64),
    (1, 2, 2, 63, 63, 96, 96),
    (1, 1, 1, 33, 33, 128, 128),
    (1, 1, 1, 17, 17, 256, 256),
    (1, 2, 2, 1, 97, 64, 64),      # decode: Sq = 1
    (1, 2, 1, 97, 17, 32, 32),     # Sq > Sk: causal rows with no key
    (1, 2, 2, 17, 63, 32, 16),     # Dv != D
    (1, 1, 1, 20, 20, 1, 1),       # D = 1
    (2, 1, 1, 11, 30, 3, 7),       # tiny D, Dv != D
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes(shape, causal, dtype):
    b, hq, hkv, sq, sk, d, dv = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv, dtype)
    check_against_oracle(q, k, v, causal=causal)


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_mqa(hkv, dtype):
    q, k, v = make_qkv(2, 4, hkv, 45, 45, 32, 32, dtype)
    check_against_oracle(q, k, v, causal=True)


def _key_masks(batch: int, sk: int) -> dict:
    right = torch.ones(batch, sk, dtype=torch.bool)
    right[0, sk // 2:] = False
    left = torch.ones(batch, sk, dtype=torch.bool)
    left[-1, : sk - 5] = False
    holes = torch.rand(batch, sk, generator=torch.Generator().manual_seed(3)) > 0.4
    holes[0, :40] = False  # a fully masked key block
    empty = right.clone()
    empty[0] = False  # a row with no real key at all
    return {"right": right, "left": left, "holes": holes, "empty_row": empty}


@pytest.mark.parametrize("pattern", ["right", "left", "holes", "empty_row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_mask(pattern, dtype):
    q, k, v = make_qkv(2, 2, 2, 70, 70, 32, 32, dtype)
    mask = _key_masks(2, 70)[pattern].to(DEVICE)
    check_against_oracle(q, k, v, attention_mask=mask)


@pytest.mark.parametrize("extra", [{}, {"causal": True}, {"window_size": (40, 9)}], ids=["plain", "causal", "window"])
def test_padding_masks_at_block_boundaries_in_bhsd_and_bshd(extra):
    """Padding masks on both sides of block boundaries (the interpreter's 32-key blocks; the GPU's 64
    and 128), with causal and window masks, in both memory layouts: right, left and two-sided
    padding, a single real key, no real key, and a two-sided span with a hole. The forward clamps its
    key loop to [first real key, last real key] and tests the mask inside."""
    sk = 173
    spans = [(0, 150), (37, 173), (33, 129), (64, 65), (0, 0), (5, 170)]
    mask = torch.zeros(len(spans), sk, dtype=torch.bool)
    for row, (first, end) in enumerate(spans):
        mask[row, first:end] = True
    mask[-1, 100] = False
    for layout in ("bhsd", "bshd"):
        q, k, v = make_qkv(len(spans), 2, 1, 140, sk, 32, 32, torch.float32, layout=layout)
        check_against_oracle(q, k, v, attention_mask=mask.to(DEVICE), **extra)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32])
def test_attention_and_query_mask_padded_batch(mask_dtype):
    """A padded encoder batch: pad keys masked, pad query rows skipped and written 0."""
    q, k, v = make_qkv(3, 2, 2, 66, 66, 32, 32, torch.float32)
    mask = torch.ones(3, 66, dtype=torch.bool)
    mask[0, 20:] = False   # right padding
    mask[1, :50] = False   # left padding
    mask = mask.to(device=DEVICE, dtype=mask_dtype)
    out = check_against_oracle(q, k, v, attention_mask=mask, query_mask=mask)
    assert (out[0, :, 20:] == 0).all() and (out[1, :, :50] == 0).all()


def test_causal_mask_gqa_combo():
    q, k, v = make_qkv(2, 4, 2, 50, 70, 32, 32, torch.float32)
    mask = _key_masks(2, 70)["holes"].to(DEVICE)
    check_against_oracle(q, k, v, causal=True, attention_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seqused_k(dtype):
    q, k, v = make_qkv(3, 2, 2, 5, 80, 32, 32, dtype)
    used = torch.tensor([80, 33, 0], dtype=torch.int32, device=DEVICE)
    check_against_oracle(q, k, v, causal=True, seqused_k=used)


@pytest.mark.parametrize("window", [(7, 3), (5, -1), (-1, 4), (0, 0), (40, 0)])
@pytest.mark.parametrize("sq_sk", [(70, 70), (30, 77), (77, 30)])
def test_sliding_window(window, sq_sk):
    q, k, v = make_qkv(1, 2, 2, sq_sk[0], sq_sk[1], 32, 32, torch.float32)
    check_against_oracle(q, k, v, window_size=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_alibi(dtype):
    q, k, v = make_qkv(2, 3, 3, 45, 60, 32, 32, dtype)
    q = (q.detach() * 3).requires_grad_()  # scores large enough for the cap to bite
    slopes = torch.tensor([0.5, 0.25, 0.125], device=DEVICE)
    check_against_oracle(q, k, v, softcap=5.0)
    check_against_oracle(q, k, v, alibi_slopes=slopes, causal=True)
    check_against_oracle(q, k, v, softcap=5.0, alibi_slopes=slopes.expand(2, 3).contiguous() * 0.5)


def test_softmax_scale():
    q, k, v = make_qkv(1, 2, 2, 33, 33, 32, 32, torch.float32)
    check_against_oracle(q, k, v, softmax_scale=0.3, causal=True)


def _varlen_inputs(lens_q, lens_k, hq, hkv, d, dv, dtype):
    g = torch.Generator().manual_seed(5)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(tk, hkv, d, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(tk, hkv, dv, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k, v, dict(cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k),
                         max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, causal):
    q, k, v, kw = _varlen_inputs([5, 40, 0, 17], [5, 40, 3, 30], 4, 2, 32, 24, dtype)
    check_against_oracle(q, k, v, causal=causal, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_neighbours_non_finite_values_stay_out(monkeypatch, causal):
    """The forward reads a packed sequence's Q, K and V tiles as TMA boxes from its cu_seqlens row, so
    a box past the sequence's end holds the next sequence's rows (real memory); the backward reads
    them by masked pointer loads (a TMA version of it is in benchmarks/results/2026-11-27_h100_
    session14_varlen_bwd_tma.patch). NaN queries and keys, inf values and an inf output gradient in
    one sequence must change nothing in its neighbours: outputs and gradients of the other sequences
    are bitwise those of a batch where that sequence is finite."""
    from hf_triton_attn.kernels import forward, launch

    described = []
    real_descriptor = forward.packed_tma_descriptor
    monkeypatch.setattr(forward, "packed_tma_descriptor", lambda *a: described.append(a) or real_descriptor(*a))
    lens = [37, 5, 70]  # the middle one is shorter than a block and straddles block edges
    results = []
    for poisoned in (False, True):
        q, k, v, kw = _varlen_inputs(lens, lens, 2, 2, 40, 40, torch.float16)
        dout = torch.ones(112, 2, 40, device=DEVICE, dtype=torch.float16)
        if poisoned:
            with torch.no_grad():
                q[37:42, 0] = float("nan")
                k[37:42, 1] = float("nan")
                v[37:42, 0] = float("inf")
            dout[37:42, 1] = float("inf")
        out = flash_attention(q, k, v, causal=causal, backend=BACKEND, **kw)
        out.backward(dout)
        keep = torch.cat([torch.arange(0, 37), torch.arange(42, 112)]).to(DEVICE)
        results.append([t[keep] for t in (out, q.grad, k.grad, v.grad)])
    for name, clean, dirty in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(clean).all(), name
        assert torch.equal(clean, dirty), name
    if launch._tma_usable(torch.device(DEVICE)):
        assert described, "packed fp16 tensors with 16-byte strides take the TMA path"


def test_varlen_window_seqused():
    q, k, v, kw = _varlen_inputs([33, 20, 7], [33, 41, 7], 2, 2, 32, 32, torch.float32)
    check_against_oracle(q, k, v, causal=True, window_size=(9, 0), **kw)
    used = torch.tensor([30, 41, 2], dtype=torch.int32, device=DEVICE)
    check_against_oracle(q, k, v, causal=True, seqused_k=used, **kw)


def test_varlen_softcap_alibi():
    q, k, v, kw = _varlen_inputs([33, 20], [33, 41], 2, 1, 32, 32, torch.float32)
    slopes = torch.tensor([[0.3, 0.1], [0.2, 0.05]], device=DEVICE)
    check_against_oracle(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes, **kw)


def _segment_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    rows = []
    for lengths in lengths_per_row:
        rows.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
    return torch.stack(rows).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_segment_ids_packed_rows(dtype, causal):
    """Packed sequences in the dense layout: runs of 1..40 tokens, block-straddling boundaries."""
    ids = _segment_ids([[5, 40, 1, 17, 4], [33, 3, 31]])
    q, k, v = make_qkv(2, 4, 2, 67, 67, 32, 24, dtype)
    check_against_oracle(q, k, v, causal=causal, segment_ids=ids)


def test_segment_ids_match_separate_sequences():
    """Equivalence with varlen: each run gives exactly what it gives on its own."""
    lengths = [9, 30, 2, 26]
    ids = _segment_ids([lengths])
    q, k, v = make_qkv(1, 2, 1, 67, 67, 16, 16, torch.float32)
    out = flash_attention(q, k, v, causal=True, segment_ids=ids, backend=BACKEND)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = flash_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=True, backend=BACKEND)
        torch.testing.assert_close(out[:, :, sl], alone, rtol=0, atol=1e-6)
        start += n


def test_segment_ids_with_window_mask_and_softcap():
    ids = _segment_ids([[20, 45], [64, 1]])
    q, k, v = make_qkv(2, 2, 2, 65, 65, 32, 32, torch.float32)
    mask = torch.ones(2, 65, dtype=torch.bool, device=DEVICE)
    mask[1, 3:9] = False
    check_against_oracle(q, k, v, causal=True, segment_ids=ids, window_size=(11, 0), attention_mask=mask,
                         softcap=2.0)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = make_qkv(1, 2, 2, 40, 10, 16, 16, torch.float32)
    out = check_against_oracle(q, k, v, causal=True)  # rows 0..29 see no key
    assert (out[:, :, :30] == 0).all()
    flash_attention(q, k, v, causal=True, backend=BACKEND).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bshd_layout_read_in_place_and_output_layout(monkeypatch):
    """No hidden copies: the kernel receives the caller's memory; output keeps q's BSHD layout."""
    from hf_triton_attn.kernels import forward

    q, k, v = make_qkv(2, 3, 3, 33, 33, 32, 32, torch.float32, layout="bshd")
    seen = {}
    real = forward.flash_fwd

    def spy(qq, kk, vv, *args, **kwargs):
        seen.update(q=qq.data_ptr(), k=kk.data_ptr(), v=vv.data_ptr())
        return real(qq, kk, vv, *args, **kwargs)

    monkeypatch.setattr(forward, "flash_fwd", spy)
    out = check_against_oracle(q, k, v, causal=True)
    assert seen == dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr())
    assert out.transpose(1, 2).is_contiguous()


def test_strided_and_expanded_inputs():
    """Slices of a fused projection (non-contiguous) and stride-0 (expanded) k/v, read in place."""
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(2, 37, 3, 2, 24, generator=g).to(DEVICE)  # (B, S, qkv, H, D)
    q, k, v = (fused[:, :, i].transpose(1, 2).requires_grad_(False) for i in range(3))
    check_against_oracle(q, k, v, causal=True, grad=False)
    k1 = torch.randn(1, 1, 37, 24, generator=g).to(DEVICE)
    v1 = torch.randn(1, 1, 37, 24, generator=g).to(DEVICE)
    ke, ve = k1.expand(2, 2, 37, 24), v1.expand(2, 2, 37, 24)
    assert ke.stride(0) == 0
    qq = q.detach().clone().requires_grad_()
    check_against_oracle(qq, ke.requires_grad_(), ve.requires_grad_(), grad=True)


def test_empty_inputs():
    q, k, v = make_qkv(2, 2, 2, 0, 10, 16, 16, torch.float32)
    out = flash_attention(q, k, v, backend=BACKEND)
    assert out.shape == (2, 2, 0, 16)
    q, k, v = make_qkv(0, 2, 2, 5, 10, 16, 16, torch.float32)
    assert flash_attention(q, k, v, backend=BACKEND).shape == (0, 2, 5, 16)
    q, k, v = make_qkv(1, 2, 2, 5, 0, 16, 16, torch.float32)
    out, lse = flash_attention(q, k, v, backend=BACKEND, return_lse=True)  # no key: zeros
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_deterministic_backward_is_bitwise():
    q, k, v = make_qkv(1, 4, 2, 70, 70, 32, 32, torch.float32)
    dout = torch.randn(1, 4, 70, 32, device=DEVICE)
    grads = []
    for _ in range(2):
        out = flash_attention(q, k, v, causal=True, backend=BACKEND, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# dq: its own kernel, or summed over key blocks by the dk/dv kernel (configs.fuse_dq)

def _count_dq_launches(monkeypatch) -> list:
    from hf_triton_attn.kernels import backward

    return count_launches(monkeypatch, backward, "_launch_dq")


FUSED_DQ_CASES = {
    "causal": dict(causal=True),
    "window-gqa-bshd": dict(window_size=(20, 0), hkv=2, layout="bshd"),
    "causal-masks-softcap-alibi": dict(causal=True, softcap=8.0, alibi=True, key_mask=True, query_mask=True),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("case", list(FUSED_DQ_CASES), ids=list(FUSED_DQ_CASES))
def test_fused_dq_runs_where_chosen_and_matches_the_oracle(monkeypatch, case, deterministic):
    """Causal / right-window backward: by default dq is summed by the dk/dv kernel (no dq launch);
    deterministic=True launches the dq kernel. Both meet the pass rule with several query blocks
    per key block (Sq = 70) and several key blocks per query block (Sk = 90)."""
    kw = dict(FUSED_DQ_CASES[case])
    hkv, layout = kw.pop("hkv", 4), kw.pop("layout", "bhsd")
    # fp16: on the GPU fused dq needs TMA (16-bit inputs); fp32 there keeps the dq kernel
    q, k, v = make_qkv(2, 4, hkv, 70, 90, 32, 32, torch.float16, layout=layout)
    g = torch.Generator().manual_seed(3)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(2, 4, generator=g).to(DEVICE)
    if kw.pop("key_mask", False):
        kw["attention_mask"] = (torch.rand(2, 90, generator=g) > 0.3).to(DEVICE)
    if kw.pop("query_mask", False):
        kw["query_mask"] = (torch.rand(2, 70, generator=g) > 0.3).to(DEVICE)
    launches = _count_dq_launches(monkeypatch)
    check_against_oracle(q, k, v, deterministic=deterministic, **kw)
    assert len(launches) == (1 if deterministic else 0)


def test_fused_dq_off_without_diagonal_or_dropout_and_under_deterministic_algorithms(monkeypatch):
    """A plain non-causal backward keeps the dq kernel (fusing measured slower there), and so does a
    causal one under torch.use_deterministic_algorithms(True)."""
    launches = _count_dq_launches(monkeypatch)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, torch.float32)
    flash_attention(q, k, v, backend=BACKEND).sum().backward()
    assert len(launches) == 1
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        flash_attention(q, k, v, causal=True, backend=BACKEND).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(launches) == 2


def test_dq_mode_environment_override(monkeypatch):
    """HF_TRITON_ATTN_DQ forces either backward (for benchmarks); a bad value names the variable."""
    launches = _count_dq_launches(monkeypatch)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, torch.float32)
    monkeypatch.setenv("HF_TRITON_ATTN_DQ", "split")
    flash_attention(q, k, v, causal=True, backend=BACKEND).sum().backward()
    assert len(launches) == 1
    monkeypatch.setenv("HF_TRITON_ATTN_DQ", "fused")
    check_against_oracle(q, k, v)  # non-causal, fused on request
    assert len(launches) == 1
    monkeypatch.setenv("HF_TRITON_ATTN_DQ", "atomics")
    out = flash_attention(q, k, v, backend=BACKEND)
    with pytest.raises(ValueError, match="HF_TRITON_ATTN_DQ.*'atomics'"):
        out.sum().backward()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["varlen-empty", "seqused_k", "many-query-blocks"])
def test_fused_dq_finishes_every_query_block(monkeypatch, case, causal):
    """The fused backward (dq summed by the dk/dv programs) writes every query block's dq, also for a
    sequence without keys (no dk/dv program adds to it), keys cut by seqused_k, and more than 128 query
    blocks (a variant that finished dq inside the dk/dv kernel counted arrivals in vectors of 128;
    benchmarks/NOTES.md, session 6). Outputs are NaN-poisoned, so a block never written fails."""
    monkeypatch.setenv("HF_TRITON_ATTN_DQ", "fused")
    launches = _count_dq_launches(monkeypatch)
    g = torch.Generator().manual_seed(5)
    if case == "varlen-empty":
        lens_q, lens_k = [5, 0, 40, 7, 33], [0, 3, 50, 33, 70]
        q, k, v = (torch.randn(sum(n), 4, 16, generator=g).to(DEVICE).requires_grad_()
                   for n in (lens_q, lens_k, lens_k))
        kw = dict(cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=max(lens_q),
                  max_seqlen_k=max(lens_k))
    elif case == "seqused_k":
        q, k, v = make_qkv(3, 4, 2, 45, 70, 16, 16, torch.float32)
        kw = dict(seqused_k=torch.tensor([0, 38, 70], dtype=torch.int32, device=DEVICE))
    else:  # 32-row query blocks in the interpreter, 64 on the GPU
        q, k, v = make_qkv(1, 1, 1, 129 * 64 + 5, 40, 16, 16, torch.float32)
        kw = {}
    check_against_oracle(q, k, v, causal=causal, **kw)
    assert launches == []


@pytest.mark.slow
def test_long_sequence_forward():
    """S = 1025 crosses many key blocks (interpreted: a few seconds)."""
    q, k, v = make_qkv(1, 1, 1, 1025, 1025, 64, 64, torch.float32)
    check_against_oracle(q, k, v, causal=True, grad=False)


@pytest.mark.parametrize("takes_ints", [True, False])
def test_cached_launch_passes_pointers_as_ints_only_where_the_launcher_takes_them(monkeypatch, takes_ints):
    """The first cached launch of a process tries the pointer arguments as ints (Triton 3.6's launcher
    then skips a data_ptr() call and a cuPointerGetAttribute each); a launcher that raises TypeError
    for them gets the tensors, then and on every later launch."""
    from hf_triton_attn.kernels import launch

    monkeypatch.setattr(launch, "_INT_POINTERS", [None])
    calls = []

    class Kernel:
        def run(self, *args):
            if not takes_ints and isinstance(args[9], int):
                raise TypeError("Pointer argument must be either uint64 or have data_ptr method")
            calls.append(args)

    t = torch.zeros(4)
    args = (t, None, 7, 0.5)
    pointers = [t.data_ptr(), None]
    header = (1, 1, 1, 0, "function", "metadata", None, None, None)
    for _ in range(2):
        launch.CachedLauncher._first_int_launch(Kernel(), header, args, pointers, ("C",))
    assert launch._INT_POINTERS[0] is takes_ints
    expected = (t.data_ptr(), None, 7, 0.5, "C") if takes_ints else (t, None, 7, 0.5, "C")
    assert [c[9:] for c in calls] == [expected, expected]


def test_record_descriptor_encodes_wraps_the_plans_made_inside_the_block(monkeypatch):
    """testing.record_descriptor_encodes: a launch plan made inside the block records the base address of
    each descriptor its encoder encodes and returns the encoder's result unchanged; kernels without a plan
    stay without one; on leaving the block, _descriptor_plan is launch's own again."""
    from hf_triton_attn.kernels import launch
    from hf_triton_attn.testing import record_descriptor_encodes

    def fake_plan(kernel, num_pointers):
        return kernel and ("raw", False, False, ((0, "meta", {}),), lambda desc, meta: [meta, desc.base.shape])

    monkeypatch.setattr(launch, "_descriptor_plan", fake_plan)
    desc = launch.tma_descriptor(torch.zeros(1, 2, 64, 64, dtype=torch.float16), 64)
    with record_descriptor_encodes() as encoded:
        assert launch._descriptor_plan(False, 4) is False
        *head, encode = launch._descriptor_plan(True, 4)
        assert head == ["raw", False, False, ((0, "meta", {}),)]
        assert encode(desc, "meta") == ["meta", torch.Size([1, 2, 64, 64])]
    assert encoded == [desc.base.data_ptr()]
    assert launch._descriptor_plan is fake_plan


def test_forward_config_takes_64_row_blocks_for_short_packed_sequences(monkeypatch):
    """The GPU forward config of a varlen batch follows its mean sequence length (host-side shapes
    only, no sync): sequences averaging under 384 rows take 64-row query blocks, longer ones and
    causal batches keep 128 rows (configs.fwd_config; measured in
    benchmarks/results/2026-11-27_h100_session11_run6_padded_configs.log)."""
    from hf_triton_attn.kernels import configs

    monkeypatch.setattr(configs, "INTERPRETED", False)
    assert configs.short_varlen_rows(32 * 297, 32) and not configs.short_varlen_rows(32 * 512, 32)
    assert not configs.short_varlen_rows(384, 1) and configs.short_varlen_rows(383, 1)
    for tma in (False, True):  # packed tensors are read by TMA where they allow it
        short = configs.fwd_config(64, 64, 2, tma=tma, short_rows=True, keys=0)
        assert (short["BLOCK_M"], short["BLOCK_N"]) == (64, 64), tma
        cfg = configs.fwd_config(64, 64, 2, tma=tma, short_rows=False, keys=0)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (128, 64), tma
    for kw in (dict(short_rows=False), dict(short_rows=True, diagonal=True)):
        cfg = configs.fwd_config(64, 64, 2, **kw)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (128, 64), kw
