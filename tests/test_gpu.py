"""GPU-only: realistic sizes in fp16/bf16/fp32, and no host sync on the hot paths."""

import pytest
import torch

from hf_triton_attn import attention_reference, flash_attention

from .helpers import assert_pass_rule, count_launches

pytestmark = pytest.mark.gpu

BIG = [(4, 16, 1024, 64), (4, 16, 4096, 64), (4, 16, 8192, 64), (4, 16, 1024, 128), (4, 16, 8192, 128)]


def _inputs(b, h, s, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda: torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    return mk(), mk(), mk()


@pytest.mark.parametrize("b,h,s,d", BIG, ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_realistic_sizes(b, h, s, d, causal, dtype):
    """Full problem on the kernel; the O(S^2) oracle on a (2 batch x 2 head) slice: heads are independent."""
    if dtype == torch.float32 and s > 4096:
        pytest.skip("fp32 at S=8192 adds minutes for no new coverage")
    q, k, v = _inputs(b, h, s, d, dtype)
    out = flash_attention(q, k, v, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    sl = (slice(0, 2), slice(0, 2))
    ref_in = [t.detach()[sl].clone().requires_grad_() for t in (q, k, v)]
    ora_in = [t.detach()[sl].double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, causal=causal)
    ora = attention_reference(*ora_in, causal=causal)
    assert_pass_rule("out", out[sl], ref, ora, dtype)
    for name, a, r, o in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout[sl]),
                             torch.autograd.grad(ora, ora_in, dout[sl].double())):
        assert_pass_rule(name, a[sl], r, o, dtype)


HOT_PATHS = {
    "dense_causal": dict(causal=True),
    "padded": "mask",
    "gqa_window_softcap": dict(causal=True, window_size=(256, 0), softcap=30.0),
    "dropout": dict(causal=True, dropout_p=0.1),
    "varlen": "varlen",
    "decode": "decode",
}


@pytest.mark.parametrize("name", list(HOT_PATHS))
def test_no_host_sync_on_hot_path(name):
    torch.manual_seed(0)
    q, k, v = _inputs(2, 8, 1024, 64, torch.bfloat16)
    kw = HOT_PATHS[name]
    if kw == "mask":
        mask = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
        mask[0, 700:] = False
        kw = dict(attention_mask=mask, query_mask=mask)
    elif kw == "decode":  # one new token against a cache with left padding (a generate step)
        q = q[:, :, -1:].detach().requires_grad_()
        mask = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
        mask[1, :100] = False
        kw = dict(attention_mask=mask, causal=True)
    elif kw == "varlen":
        cu = torch.tensor([0, 300, 1024, 2048], dtype=torch.int32, device="cuda")
        q, k, v = (t.detach().transpose(1, 2).reshape(2048, 8, 64).requires_grad_() for t in (q, k, v))
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1024, max_seqlen_k=1024, causal=True)
    flash_attention(q, k, v, **kw).sum().backward()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = flash_attention(q, k, v, **kw)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(q.grad).all()


def test_int64_offsets_large_tensor():
    """B*H*S*D > 2**31 elements: offsets must be 64-bit (about 9 GB of bf16 inputs)."""
    b, h, s, d = 1, 64, 266_000, 128  # 2.18e9 elements per tensor
    try:
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    k = q[:, :, -2048:]
    v = torch.randn_like(k)
    out = flash_attention(q[:, :, -64:], k, v, backend="triton")  # rows near the end of the buffer
    ref = attention_reference(q[:, :2, -64:].float(), k[:, :2].float(), v[:, :2].float())
    assert (out[:, :2].float() - ref).abs().max() < 2e-2
    q2 = q.view(b, s, h, d).transpose(1, 2)[:, :, -64:]  # late rows in a BSHD view, offsets > 2**31
    assert q2.storage_offset() + q2.stride(1) * 63 > 2**31
    out2 = flash_attention(q2, k, v, backend="triton")
    ref2 = attention_reference(q2[:, -2:].float(), k[:, -2:].float(), v[:, -2:].float())
    assert (out2[:, -2:].float() - ref2).abs().max() < 2e-2


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_more_than_65535_heads_times_batch(layout):
    """B*H = 65544 > 65535, the CUDA limit of grid y: the kernels put B*H on the 1-D grid's x axis.
    A short-sentence encoder batch (5462 sequences x 12 heads, MiniLM-like) in fwd+bwd, plus the
    dropout-mask helper, checked against the reference on the first and last sequences."""
    from hf_triton_attn.kernels.dropout import dropout_mask
    from hf_triton_attn.testing import draw_dropout_rng

    b, h, s, d = 5462, 12, 20, 32  # S > 16: the forward kernel (not the split-KV decode one)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
    dout = torch.randn_like(q)
    if layout == "varlen":
        cu = torch.arange(0, b * s + 1, s, device="cuda", dtype=torch.int32)
        pack = lambda t: t.transpose(1, 2).reshape(b * s, h, d).clone().requires_grad_()
        qp, kp, vp = pack(q), pack(k), pack(v)
        out = flash_attention(qp, kp, vp, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s,
                              max_seqlen_k=s, backend="triton")
        grads = torch.autograd.grad(out, (qp, kp, vp), pack(dout).detach())
        out, *grads = (t.view(b, s, h, d).transpose(1, 2) for t in (out, *grads))
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = flash_attention(q, k, v, causal=True, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), dout)
    for sl in (slice(0, 2), slice(b - 2, b)):  # the first and the last programs of the grid
        ref_in = [t.detach()[sl].clone().requires_grad_() for t in (q, k, v)]
        ora_in = [t.detach()[sl].double().requires_grad_() for t in (q, k, v)]
        ref, ora = attention_reference(*ref_in, causal=True), attention_reference(*ora_in, causal=True)
        assert_pass_rule("out", out[sl], ref, ora, torch.float16)
        for name, got, r, o in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout[sl]),
                                   torch.autograd.grad(ora, ora_in, dout[sl].double())):
            assert_pass_rule(name, got[sl], r, o, torch.float16)
    mask = torch.full((b, h, s, s), 7, dtype=torch.int8, device="cuda")  # poisoned: 7 is neither 0 nor 1
    dropout_mask(mask, draw_dropout_rng("cuda"), 0.5)
    assert ((mask == 0) | (mask == 1)).all(), "programs past grid row 65535 never wrote their mask"


@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_kernel_as_a_threads_first_cuda_work(layout):
    """A thread whose first CUDA work is our kernel (a server's worker thread calling the attention
    directly): the tensor descriptors are encoded before Triton's launcher makes a context current,
    which failed with "invalid device context" (H100, 2026-11-27). The forward and backward in a fresh
    thread give bitwise the main thread's results. Inputs are made on the main thread: a torch kernel
    or a cudaMalloc in the new thread would make its context current and hide the case."""
    import threading

    torch.manual_seed(0)
    b, h, s, d = 2, 4, 300, 64
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    if layout == "varlen":
        cu = torch.tensor([0, 300, 600], device="cuda", dtype=torch.int32)
        q, k, v, dout = (t.reshape(b * s, h, d) for t in (q, k, v, dout))
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s)
    else:
        q, k, v, dout = (t.transpose(1, 2) for t in (q, k, v, dout))
        kw = {}
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def run() -> tuple:
        out = flash_attention(q, k, v, backend="triton", **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    # Run twice here and free the first results: the thread's allocations then come from the caching
    # allocator's free blocks without a cudaMalloc (a runtime call would make the context current).
    run()
    want = run()
    torch.cuda.synchronize()
    results: list = []
    thread = threading.Thread(target=lambda: results.append(run()))
    thread.start()
    thread.join()
    assert results, "the call in a fresh thread raised (see the thread's traceback above)"
    torch.cuda.synchronize()
    for name, got, expected in zip(("out", "dq", "dk", "dv"), results[0], want):
        assert torch.equal(got, expected), name


def test_long_sequence_131072_forward_backward():
    """S = 131072, D = 128, B = 1, H = 16, causal, forward + backward (issue "Performance": memory).

    The score matrix alone would be 16 * 131072**2 * 2 bytes = 550 GB: peak memory must stay a small
    multiple of the inputs (out, dout, dq, dk, dv, LSE), and the last rows must match the reference.
    """
    b, h, s, d = 1, 16, 131072, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v, causal=True, backend="triton")
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    one = q.numel() * q.element_size()  # 537 MB
    assert peak <= 6 * one, f"peak {peak / 1e9:.2f} GB for inputs of {one / 1e9:.2f} GB each"
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    # bottom-right alignment: the last 64 queries against all keys equal the last 64 rows of the full causal
    ref = attention_reference(q[:, :1, -64:].detach().float(), k[:, :1].detach().float(), v[:, :1].detach().float(),
                              causal=True)
    assert (out[:, :1, -64:].float() - ref).abs().max() < 2e-2


def test_cached_launches_are_used():
    """The launchers bypass Triton's per-call binder (kernels/launch.CachedLauncher) on this Triton:
    after a call, the compiled forward is cached and the fast path is still enabled."""
    from hf_triton_attn.kernels import backward, decode, forward

    q, k, v = _inputs(2, 4, 256, 64, torch.bfloat16)
    for _ in range(2):
        flash_attention(q, k, v, causal=True).sum().backward()
        flash_attention(q[:, :, :1], k, v)  # decode kernel
    torch.cuda.synchronize()
    for launcher in (forward._launch_fwd, backward._launch_dkdv, backward._launch_dq, decode._launch_decode):
        assert launcher.fast and launcher.kernels, launcher.fn


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-dq", "split-dq"])
def test_descriptor_launch_plan_matches_tritons_wrapper(monkeypatch, causal, deterministic):
    """TMA-descriptor kernels launch with their descriptors expanded by launch._descriptor_plan, not by
    Triton's generic wrapper; the results are bitwise those of the wrapper's launches (a fresh set of
    launchers per path, so neither reuses the other's cached plans)."""
    import triton

    from hf_triton_attn.kernels import backward, forward, launch

    q, k, v = _inputs(2, 4, 300, 64, torch.bfloat16)
    do = torch.randn_like(q)
    launchers = ((forward, "_launch_fwd"), (backward, "_launch_dkdv"), (backward, "_launch_dq"))

    def run(planned: bool):
        for mod, name in launchers:
            old = getattr(mod, name)
            monkeypatch.setattr(mod, name, launch.CachedLauncher(old.fn, old.num_pointers))
        if not planned:
            monkeypatch.setattr(launch, "_descriptor_plan", lambda kernel, n: False)
        results = []
        for _ in range(3):  # compile, check the specialization, then the cached path
            x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = flash_attention(*x, causal=causal, deterministic=deterministic)
            out.backward(do)
            results = [out.detach(), *(t.grad for t in x)]
        plans = [p for mod, name in launchers for p in getattr(mod, name).plans.values()]
        monkeypatch.undo()
        return results, plans

    planned, plans = run(True)
    plain, plain_plans = run(False)
    assert not any(plain_plans)
    if triton.__version__.startswith("3.6"):  # the wrapper this plan was written against
        assert any(plans), "no descriptor launch plan was made"
    for name, a, b in zip(("out", "dq", "dk", "dv"), planned, plain):
        if deterministic or name != "dq":  # the fused dq sums in a non-deterministic order
            assert torch.equal(a, b), name
        else:
            assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max(), name


def test_encoded_descriptors_are_reused_only_for_the_same_memory_layout(monkeypatch):
    """launch._descriptor_plan keeps each descriptor parameter's encoded tensor maps by (address, padding,
    shape, strides): over three fwd+bwd steps on the same q / k / v / dO, each is encoded once per parameter
    that takes it, and every step gives the first step's results bitwise. Views at the same addresses with
    every other row (other shape and strides: q's tensor map would read rows 0-149 instead) are encoded
    anew: they give bitwise what copies of them at new addresses give."""
    import triton

    from hf_triton_attn.kernels import backward, forward, launch
    from hf_triton_attn.testing import record_descriptor_encodes

    if not triton.__version__.startswith("3.6"):
        pytest.skip("the descriptor launch plan is written against Triton 3.6's launcher wrapper")
    for mod, name in ((forward, "_launch_fwd"), (backward, "_launch_dkdv"), (backward, "_launch_dq")):
        old = getattr(mod, name)
        monkeypatch.setattr(mod, name, launch.CachedLauncher(old.fn, old.num_pointers))
    q, k, v = (t.detach() for t in _inputs(2, 4, 300, 64, torch.bfloat16))
    do = torch.randn_like(q)

    def step(q, k, v, do):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*x, causal=True, deterministic=True)  # split dq: bitwise reproducible
        out.backward(do)
        return [out.detach(), *(t.grad for t in x)]

    with record_descriptor_encodes() as encoded:  # base address of every descriptor the driver encoded
        step(q, k, v, do)  # compiles; the first launch of each kernel goes through Triton, not the plan
        encoded.clear()
        first = step(q, k, v, do)
        for _ in range(2):
            for name, a, b in zip(("out", "dq", "dk", "dv"), step(q, k, v, do), first):
                assert torch.equal(a, b), name
    assert any(encoded), "no descriptor went through the plan's encoder"
    # q: the forward's Q and the dk/dv kernel's Q; k, v: the forward's and the dq kernel's; dO: dk/dv's
    for t, slots in ((q, 2), (k, 2), (v, 2), (do, 1)):
        assert encoded.count(t.data_ptr()) == slots, (encoded.count(t.data_ptr()), slots)

    views = [t[:, :, ::2] for t in (q, k, v, do)]  # same addresses as q, k, v, dO; rows 0, 2, ..., 298
    copies = [t.clone() for t in views]
    for name, a, b in zip(("out", "dq", "dk", "dv"), step(*views), step(*copies)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused-dq", "split-dq"])
def test_dropout_gqa_backward_bf16(monkeypatch, deterministic, causal):
    """GPT-2-like training attention (dropout 0.1, bf16, D = 64; causal, or bidirectional as in BERT,
    whose forward has its own tile) with GQA and an odd length: by default dq is summed by the dk/dv
    kernel with TMA reduce-adds, with deterministic=True by the dq kernel; both meet the pass rule
    against the float64 oracle with the kernel's own keep mask."""
    from hf_triton_attn.kernels import backward
    from hf_triton_attn.testing import draw_dropout_rng, dropout_keep_mask

    b, hq, hkv, s, d, p = 2, 8, 2, 1000, 64, 0.1
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            .requires_grad_() for _ in range(2))
    dq_launches = count_launches(monkeypatch, backward, "_launch_dq")
    torch.manual_seed(11)
    out = flash_attention(q, k, v, causal=causal, dropout_p=p, deterministic=deterministic, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(dq_launches) == (1 if deterministic else 0)
    torch.manual_seed(11)
    mask = dropout_keep_mask(draw_dropout_rng("cuda"), b, hq, s, s, p)
    sl = (slice(0, 1), slice(0, 4))  # query heads 0-3 = the whole group of KV head 0 (dk/dv sum over it)
    kv_sl = (slice(0, 1), slice(0, 1))
    leaves = [t.detach() for t in (q, k, v)]
    ref_in = [leaves[0][sl].clone().requires_grad_()] + [t[kv_sl].clone().requires_grad_() for t in leaves[1:]]
    ora_in = [t.detach().double().requires_grad_() for t in ref_in]
    kw = dict(causal=causal, dropout_p=p, dropout_mask=mask[sl])
    ref = attention_reference(*ref_in, **kw)
    ora = attention_reference(*ora_in, **kw)
    assert_pass_rule("out", out[sl], ref, ora, torch.bfloat16)
    for name, a, r, o, part in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, ref_in, dout[sl]),
                                   torch.autograd.grad(ora, ora_in, dout[sl].double()), (sl, kv_sl, kv_sl)):
        assert_pass_rule(name, a[part], r, o, torch.bfloat16)


def test_first_decode_under_sync_debug_mode_makes_no_graph_pool():
    """The graph-counter pool costs one host sync when a device's first eager split launch makes it;
    under ``set_sync_debug_mode`` that launch makes none (captures then take fresh zeros), and the
    next launch outside it does."""
    from hf_triton_attn.kernels import decode

    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    index = torch.cuda.current_device()
    saved = decode._GRAPH_POOLS.pop(index, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = flash_attention(q, k, v, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        made = decode._GRAPH_POOLS.pop(index, None)
    assert made is None
    assert_pass_rule("out", out, attention_reference(q, k, v),
                     attention_reference(q.double(), k.double(), v.double()), torch.bfloat16)
    flash_attention(q, k, v, backend="triton")
    pool, used = decode._GRAPH_POOLS[index]
    assert used == 0 and int(pool.abs().sum()) == 0
    if saved is not None:
        decode._GRAPH_POOLS[index] = saved


def test_decode_merge_under_graph_and_two_streams():
    """The split decode merges in the launch, with arrival counters kept per stream: CUDA-graph
    replays (each capture takes its own counters: a slice of the device's pool, or fresh zeros once
    the pool is spent) and calls racing on two streams give the eager result bit for bit (the merge
    reads the splits in order, whoever arrives last)."""
    from hf_triton_attn.kernels import decode

    g = torch.Generator(device="cuda").manual_seed(5)
    qs = [torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
          for _ in range(2)]
    k, v = (torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    assert decode.decode_splits(1, 8, 8192, 64, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    refs = [flash_attention(q, k, v) for q in qs]
    assert_pass_rule("out", refs[0], attention_reference(qs[0], k, v),
                     attention_reference(qs[0].double(), k.double(), v.double()), torch.bfloat16)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flash_attention(qs[0], k, v)
    torch.cuda.current_stream().wait_stream(side)
    pool, used = decode._GRAPH_POOLS[torch.cuda.current_device()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flash_attention(qs[0], k, v)
    assert decode._GRAPH_POOLS[torch.cuda.current_device()][1] == used + 8  # its own slice: no memset node
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, refs[0])
    # a second graph from a spent pool takes fresh zeros; both replayed on two streams at once
    decode._GRAPH_POOLS[torch.cuda.current_device()][1] = pool.numel() - 4
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        static_out2 = flash_attention(qs[1], k, v)
    assert decode._GRAPH_POOLS[torch.cuda.current_device()][1] == pool.numel() - 4
    pair = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in pair:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for g_, s in zip((graph, graph2), pair):
            with torch.cuda.stream(s):
                g_.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, refs[0]) and torch.equal(static_out2, refs[1])
    assert int(pool.abs().sum()) == 0  # every launch left its counters 0
    decode._GRAPH_POOLS[torch.cuda.current_device()][1] = used + 8

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(50):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(flash_attention(qs[i], k, v))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(o, refs[i]) for o in outs[i]), f"stream {i}"
