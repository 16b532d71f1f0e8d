"""Eager PyTorch oracle with exactly the semantics of ``flash_attention``.

Runs anywhere torch runs, in any float dtype (float64 for the oracle). Scores are computed in the
input dtype, the softmax in float32 (float64 for float64 inputs) and the probabilities are cast back
to the input dtype before the product with V, as a "same-dtype PyTorch attention" does. Memory is
O(S^2): this is the correctness reference and the CPU fallback, not a fast path.

Never imports the Triton kernels.
"""

from __future__ import annotations

import torch


def allowed_positions(
    seqlen_q: int, seqlen_k: int, *, used_k: torch.Tensor | int, causal: bool,
    window_size: tuple[int, int], device: torch.device,
) -> torch.Tensor:
    """Bool ``(..., Sq, Sk)``: key j exists (j < used_k) and lies in query i's window.

    Bottom-right alignment: ``diag_i = i + used_k - Sq``; visible iff
    ``diag_i - left <= j <= diag_i + right`` (``right = 0`` when causal, -1 = unbounded).
    ``used_k`` is an int or a ``(B,)`` tensor (result ``(B, 1, Sq, Sk)``).
    """
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    if isinstance(used_k, torch.Tensor):
        used = used_k.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    else:
        used = torch.tensor(used_k, device=device)
    diag = i + used - seqlen_q
    ok = (j < used) & (i >= 0)  # always (..., Sq, Sk), also when no window bound applies
    if right >= 0:
        ok = ok & (j <= diag + right)
    if left >= 0:
        ok = ok & (j >= diag - left)
    return ok


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
    dropout_p: float, dropout_mask: torch.Tensor | None, key_mask: torch.Tensor | None,
    query_mask: torch.Tensor | None, used_k: torch.Tensor | int, window_size: tuple[int, int],
    softcap: float, alibi_slopes: torch.Tensor | None, segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv), lse (B, Hq, Sq)."""
    batch, hq, sq, _ = q.shape
    sk = k.shape[2]
    group = hq // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    soft_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not (isinstance(used_k, int) and used_k >= sk):
        # Keys at or beyond the used length (an empty cache tail) do not exist: the kernels never read
        # them, so neither does the oracle (a NaN left there must not reach any output or gradient).
        used = used_k.view(-1, 1, 1, 1) if isinstance(used_k, torch.Tensor) else used_k
        exists = torch.arange(sk, device=k.device).view(1, 1, sk, 1) < used
        k, v = k.masked_fill(~exists, 0), v.masked_fill(~exists, 0)

    # [B, Hq, Sq, Sk] scores in the input dtype, then the softmax dtype.
    s = torch.matmul(q, k.transpose(-1, -2)).to(soft_dtype) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(soft_dtype)
        slopes = slopes.view(1, hq, 1, 1) if slopes.dim() == 1 else slopes.view(batch, hq, 1, 1)
        used = used_k.view(-1, 1, 1, 1) if isinstance(used_k, torch.Tensor) else used_k
        rel = (torch.arange(sq, device=q.device)[:, None] + used - sq
               - torch.arange(sk, device=q.device)[None, :])
        s = s - slopes * rel.abs().to(soft_dtype)

    ok = allowed_positions(sq, sk, used_k=used_k, causal=causal, window_size=window_size,
                           device=q.device)
    ok = ok.expand(batch, 1, sq, sk) if ok.dim() == 2 else ok
    if key_mask is not None:
        ok = ok & (key_mask != 0).view(batch, 1, 1, sk)
    if query_mask is not None:
        ok = ok & (query_mask != 0).view(batch, 1, sq, 1)
    if segment_ids is not None:  # runs of equal consecutive ids are separate sequences (Sq == Sk)
        change = torch.ones_like(segment_ids, dtype=torch.bool)
        change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        run = change.long().cumsum(dim=1)
        ok = ok & (run[:, None, :, None] == run[:, None, None, :])

    # Softmax that stays finite (and has finite gradients) when a row has no visible key.
    if sk == 0:  # no key at all: every row is empty
        m = s.new_zeros(s.shape[:-1] + (1,))
    else:
        m = s.masked_fill(~ok, float("-inf")).amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.where(ok, torch.exp(torch.where(ok, s, m) - m), torch.zeros_like(s))
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    p = e / torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), m + torch.log(denom)).squeeze(-1)

    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse.detach()


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    softmax_scale: float | None = None, dropout_p: float = 0.0,
    attention_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None, window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, return_lse: bool = False,
    dropout_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
):
    """Reference attention with ``flash_attention``'s signature and semantics.

    ``dropout_mask``: optional bool keep-mask ``(B, Hq, max Sq, max Sk)`` (global (b, h, i, j)
    coordinates, varlen sequences indexed locally) to reproduce a kernel's dropout exactly;
    without it dropout draws from torch's generator. Inputs are not validated here (ops.py does).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    common = dict(causal=causal, scale=scale, dropout_p=dropout_p, window_size=tuple(window_size),
                  softcap=softcap)
    if cu_seqlens_q is None:
        used_k: torch.Tensor | int = k.shape[2]
        if seqused_k is not None:
            used_k = seqused_k.clamp(max=k.shape[2])
        out, lse = _dense_attention(
            q, k, v, dropout_mask=dropout_mask, key_mask=attention_mask, query_mask=query_mask,
            used_k=used_k, alibi_slopes=alibi_slopes, segment_ids=segment_ids, **common)
        return (out, lse) if return_lse else out

    # Varlen: q (total_q, Hq, D); each sequence is a dense B=1 problem.
    outs, lses = [], []
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        used = ck[b + 1] - ck[b]
        if seqused_k is not None:
            used = min(used, int(seqused_k[b]))
        mask_b = None
        if dropout_mask is not None:
            mask_b = dropout_mask[b:b + 1, :, :qb.shape[2], :kb.shape[2]]
        slopes_b = None
        if alibi_slopes is not None:
            slopes_b = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        o, l = _dense_attention(qb, kb, vb, dropout_mask=mask_b, key_mask=None, query_mask=None,
                                used_k=used, alibi_slopes=slopes_b, **common)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out = torch.cat(outs, dim=0)
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out
