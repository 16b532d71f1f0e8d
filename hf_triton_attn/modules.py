"""``nn.Module`` drop-ins over ``flash_attention``: ``FlashAttention`` and ``TritonMultiHeadAttention``.

``FlashAttention`` is the functional API as a module (SDPA layout ``(B, H, S, D)``, dropout only in
training mode). ``TritonMultiHeadAttention`` is a drop-in for ``torch.nn.MultiheadAttention``: the same
parameters, state_dict keys, initialisation, ``forward`` signature and mask conventions, with the
attention itself computed by the Triton kernel.

The three mask conventions of this package (one table, also in ``docs/modules.md``):

=====================================  ==========================================  =====  ==========================
where                                  argument and shape                          dtype  meaning
=====================================  ==========================================  =====  ==========================
``flash_attention``, ``FlashAttention``  ``attention_mask (B, Sk)``,                 bool,  nonzero = keep (HF
                                       ``query_mask (B, Sq)``                      int    tokenizer convention)
``TritonMultiHeadAttention``           ``key_padding_mask (N, S)``,                bool   True = masked out
(torch-style arguments)                ``attn_mask (L, S)`` or ``(N*H, L, S)``            (torch's convention)
``TritonMultiHeadAttention``           the same arguments                          float  added to the scores
                                                                                          (``-inf`` = masked out)
=====================================  ==========================================  =====  ==========================

This module never imports transformers.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .ops import flash_attention

__all__ = ["FlashAttention", "TritonMultiHeadAttention"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL_HEAD_DIM = 256


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__} {x!r}"


def _fail(exc: type, owner: str, name: str, expected: str, got: object) -> None:
    raise exc(f"{owner}: `{name}` must be {expected}; got {got}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_dropout(owner: str, dropout: object) -> float:
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        _fail(ValueError, owner, "dropout", "a float in [0, 1)", _describe(dropout))
    return float(dropout)


def _check_bool(owner: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(TypeError, owner, name, "a bool", _describe(value))
    return value


# ----------------------------------------------------------------------------------------------
# FlashAttention
# ----------------------------------------------------------------------------------------------

class FlashAttention(nn.Module):
    """``flash_attention`` as a module: ``softmax(q k^T * scale + mask) v`` in the SDPA layout.

    Args:
        causal: causal attention (bottom-right aligned when ``Sq != Sk``: query i sees key j iff
            ``j <= i + Sk - Sq``, as FlashAttention 2/3).
        softmax_scale: defaults to ``D ** -0.5``.
        dropout: dropout probability on the attention probabilities, applied in training mode only
            (``module.train()``); ``module.eval()`` turns it off.

    Shapes (see ``hf_triton_attn.flash_attention`` for every option)::

        q (B, Hq, Sq, D)   k (B, Hkv, Sk, D)   v (B, Hkv, Sk, Dv)   -> out (B, Hq, Sq, Dv)

    ``Hq % Hkv == 0`` (GQA/MQA). Masks follow the functional convention: ``attention_mask (B, Sk)``
    and ``query_mask (B, Sq)`` are bool/int with nonzero = keep. Packed (varlen) inputs are
    forwarded too (``cu_seqlens_q`` etc.). Rows with no visible key give 0, never NaN.

    Example::

        attn = FlashAttention(causal=True, dropout=0.1)
        out = attn(q, k, v, attention_mask=tokenizer_mask)   # (B, H, S, D)
    """

    def __init__(self, causal: bool = False, softmax_scale: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.causal = _check_bool(owner, "causal", causal)
        if softmax_scale is not None and (not _is_number(softmax_scale) or not math.isfinite(softmax_scale)):
            _fail(TypeError, owner, "softmax_scale", "None or a finite float", _describe(softmax_scale))
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.dropout = _check_dropout(owner, dropout)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        attention_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None, *,
        causal: bool | None = None, seqused_k: torch.Tensor | None = None,
        cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
        max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
        window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None, deterministic: bool = False, return_lse: bool = False,
        backend: str | None = None,
    ):
        """Attention of q over k, v.

        Args:
            q, k, v: ``(B, Hq, Sq, D)``, ``(B, Hkv, Sk, D)``, ``(B, Hkv, Sk, Dv)`` (or packed
                ``(total, H, D)`` with ``cu_seqlens_*`` / ``max_seqlen_*``).
            attention_mask: ``(B, Sk)`` bool/int, nonzero = real key.
            query_mask: ``(B, Sq)`` bool/int, nonzero = real query (masked rows are 0).
            causal: overrides the module's ``causal`` for this call (None = the module's).
            seqused_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size, softcap,
            alibi_slopes, deterministic, return_lse, backend: as in ``flash_attention``.

        Returns:
            ``out`` ``(B, Hq, Sq, Dv)``, or ``(out, lse)`` with ``return_lse=True``.
        """
        return flash_attention(
            q, k, v, causal=self.causal if causal is None else causal, softmax_scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, attention_mask=attention_mask,
            query_mask=query_mask, seqused_k=seqused_k, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=return_lse, backend=backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}, dropout={self.dropout}"


# ----------------------------------------------------------------------------------------------
# TritonMultiHeadAttention
# ----------------------------------------------------------------------------------------------

def _values_checkable(t: torch.Tensor) -> bool:
    """Whether a hint may be verified against mask values: CPU tensors, or HF_TRITON_ATTN_VALIDATE=1
    (a device sync), never while torch.compile traces (the same policy as ``flash_attention``)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("HF_TRITON_ATTN_VALIDATE", "0") == "1"


def _can_inspect(t: torch.Tensor) -> bool:
    """Whether mask values may be read to pick the kernel (not while tracing or capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _blocked(mask: torch.Tensor) -> torch.Tensor | None:
    """A torch-style mask as bool "masked out", or None for a float mask that is not all 0 / -inf
    (a real additive bias, which the kernel cannot add). Reads float values (one sync on a GPU)."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == float("-inf"))).all()):
        return None
    return mask == float("-inf")


def _causal_blocked(length_q: int, length_k: int, device: torch.device) -> torch.Tensor:
    """Bool (L, S), True where bottom-right causal attention hides key j from query i (j > i + S - L)."""
    return torch.ones(length_q, length_k, dtype=torch.bool, device=device).triu(length_k - length_q + 1)


def _safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim whose fully masked rows (all -inf) are 0 with finite gradients."""
    m = scores.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom)


class TritonMultiHeadAttention(nn.Module):
    r"""Drop-in for ``torch.nn.MultiheadAttention`` whose attention runs in the Triton flash kernel.

    ``output, attn_weights = attention(query, key, value)``: ``query`` ``(N, L, E)`` (``(L, N, E)``
    with ``batch_first=False``, ``(L, E)`` unbatched), ``key`` ``(N, S, kdim)``, ``value``
    ``(N, S, vdim)``; ``output`` has query's shape and ``attn_weights`` is None unless
    ``need_weights=True``.

    Args:
        d_model: embedding dim E of the queries and of the output (torch's ``embed_dim``).
        num_heads: number of heads H; ``d_model % num_heads == 0``, head dim ``E // H``.
        dropout: dropout on the attention probabilities, in training mode only.
        bias: biases on the input and output projections.
        batch_first: ``(N, L, E)`` inputs when True (the default here), ``(L, N, E)`` when False.
        kdim, vdim: key and value feature dims (default ``d_model``); when either differs,
            separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` replace ``in_proj_weight``.
        causal: every call is causal (as if ``is_causal=True``).
        device, dtype: of the parameters.

    Parameters, their initialisation (xavier_uniform_ input projections, zero biases, torch's Linear
    init for ``out_proj.weight``: the same seed gives the same weights as torch) and state_dict keys
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``, or
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when kdim/vdim differ) are torch's, so
    checkpoints load both ways; ``from_torch`` / ``to_torch`` convert modules with their weights.

    Masks (torch's conventions; the functional API's is the opposite, see the module docstring):

    ==========================================  =====  ===============================================
    argument and shape                          dtype  meaning
    ==========================================  =====  ===============================================
    ``key_padding_mask (N, S)`` (``(S,)``       bool   True = key masked out (padding)
    unbatched)                                  float  added to the scores of that key
    ``attn_mask (L, S)`` or ``(N*H, L, S)``     bool   True = pair masked out
    (``(H, L, S)`` unbatched)                   float  added to the scores (``-inf`` = masked out)
    ==========================================  =====  ===============================================

    Which computation runs (both are exact; the answer never depends on the path):

    * The Triton kernel when ``need_weights=False`` and the masks reduce to what it serves: a
      bool ``key_padding_mask`` (read without a sync), a float one whose values are all 0 or
      ``-inf`` (as ``nn.TransformerEncoderLayer`` passes), an ``attn_mask`` that masks nothing
      or is exactly the causal mask (bool, or float 0 / ``-inf``), and causal attention.
      Inspecting a float mask or an ``attn_mask`` reads its values (one device sync on a GPU;
      skipped under ``torch.compile`` and CUDA-graph capture, where such masks take the exact path).
    * Otherwise an exact eager computation of the same math (``S^2`` memory): ``need_weights=True``,
      float masks with other values, any other ``attn_mask`` (banded, per-head, ...), float64
      inputs and head dims above 256.

    Causality: ``causal=True`` (constructor) or ``is_causal=True`` (call) makes the call causal,
    bottom-right aligned when ``L != S`` (query i sees key j iff ``j <= i + S - L``, as
    FlashAttention 2/3; torch's SDPA aligns top-left; for ``L == S`` they agree). Given with an
    ``attn_mask``, the two combine (a pair is visible only if both allow it). ``is_causal=True``
    with an ``attn_mask`` and ``L == S`` is, as in torch, a hint that the mask is the causal mask:
    it is trusted without reading the mask, and verified (``ValueError`` if the mask hides a pair
    causal attention shows) where values can be checked: CPU tensors or ``HF_TRITON_ATTN_VALIDATE=1``.

    Deliberate differences from ``torch.nn.MultiheadAttention``:

    * ``batch_first=True`` and ``need_weights=False`` by default (batch-first is the common usage,
      and weights cost an ``(N, H, L, S)`` tensor and the exact path).
    * A query row whose keys are all masked out gives 0 (and zero weights); torch gives NaN.
    * ``is_causal=True`` needs no ``attn_mask`` (torch requires one), and causal is bottom-right
      aligned when ``L != S`` (see above).
    * Masks must be bool or float (integer masks raise, to keep them apart from the functional
      API's nonzero = keep); shapes must match exactly.
    * ``add_bias_kv`` and ``add_zero_attn`` do not exist (``from_torch`` refuses such modules).
    * ``causal`` is our option; ``to_torch`` cannot carry it.
    * ``need_weights=True`` returns the weights after dropout, as torch does.

    Inside ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` in eval mode without grad (even
    head count), torch's native fused path skips ``forward`` and computes with this module's
    torch-named parameters (and ``merge_masks``, which folds in ``causal``): exact, but not our
    kernel. ``torch.backends.mha.set_fastpath_enabled(False)`` keeps the kernel there.
    """

    def __init__(
        self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True, batch_first: bool = True,
        kdim: int | None = None, vdim: int | None = None, causal: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("d_model", d_model), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(TypeError if not isinstance(value, int) else ValueError, owner, name, "a positive int",
                      _describe(value))
        if d_model % num_heads != 0:
            _fail(ValueError, owner, "d_model", f"divisible by num_heads ({num_heads})", d_model)
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                _fail(ValueError, owner, name, "None or a positive int", _describe(value))
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = d_model
        self.kdim = kdim if kdim is not None else d_model
        self.vdim = vdim if vdim is not None else d_model
        self._qkv_same_embed_dim = self.kdim == d_model and self.vdim == d_model
        self.num_heads = num_heads
        self.dropout = _check_dropout(owner, dropout)
        self.batch_first = _check_bool(owner, "batch_first", batch_first)
        self.causal = _check_bool(owner, "causal", causal)
        _check_bool(owner, "bias", bias)
        self.head_dim = d_model // num_heads

        # Registration order and initialisation as torch.nn.MultiheadAttention (same keys, same RNG use).
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * d_model, d_model), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((d_model, d_model), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((d_model, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((d_model, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.bias_k = self.bias_v = None  # torch's attribute names (add_bias_kv is not supported)
        self.add_zero_attn = False
        self._reset_parameters()
        if self.head_dim > _MAX_KERNEL_HEAD_DIM:
            warnings.warn(f"{owner}: head dim {self.head_dim} > {_MAX_KERNEL_HEAD_DIM} is beyond the kernel; "
                          "every call takes the exact eager path (S^2 memory)", stacklevel=2)

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    @property
    def d_model(self) -> int:
        return self.embed_dim

    def extra_repr(self) -> str:
        s = f"d_model={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        s += f", bias={self.in_proj_bias is not None}, batch_first={self.batch_first}"
        return s + (", causal=True" if self.causal else "")

    # -- conversion --------------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, causal: bool = False) -> TritonMultiHeadAttention:
        """A new module with ``mha``'s configuration (its ``batch_first`` included: torch's default is
        False) and a copy of its weights, on its device and dtype, in its training mode.

        Raises ``TypeError`` for anything but ``torch.nn.MultiheadAttention`` and ``ValueError`` for
        ``add_bias_kv=True`` / ``add_zero_attn=True`` (not supported).
        """
        owner = f"{cls.__name__}.from_torch"
        if not isinstance(mha, nn.MultiheadAttention):
            _fail(TypeError, owner, "mha", "a torch.nn.MultiheadAttention", _describe(mha))
        if mha.bias_k is not None or mha.add_zero_attn:
            _fail(ValueError, owner, "mha", "a module without add_bias_kv / add_zero_attn (not supported)",
                  f"add_bias_kv={mha.bias_k is not None}, add_zero_attn={mha.add_zero_attn}")
        ref = mha.out_proj.weight
        with torch.device("meta"):  # no RNG drawn, no memory: load_state_dict fills the weights
            new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                      batch_first=mha.batch_first, kdim=mha.kdim, vdim=mha.vdim, causal=causal, dtype=ref.dtype)
        new = new.to_empty(device=ref.device)
        new.load_state_dict(mha.state_dict())
        for name, p in new.named_parameters():
            p.requires_grad_(mha.get_parameter(name).requires_grad)
        return new.train(mha.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """A ``torch.nn.MultiheadAttention`` with this configuration and a copy of the weights (the
        ``causal`` option has no torch equivalent: pass ``is_causal``/``attn_mask`` to it instead)."""
        ref = self.out_proj.weight
        with torch.device("meta"):
            mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                        bias=self.in_proj_bias is not None, batch_first=self.batch_first,
                                        kdim=self.kdim, vdim=self.vdim, dtype=ref.dtype)
        mha = mha.to_empty(device=ref.device)
        mha.load_state_dict(self.state_dict())
        for name, p in mha.named_parameters():
            p.requires_grad_(self.get_parameter(name).requires_grad)
        return mha.train(self.training)

    def merge_masks(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                    query: torch.Tensor) -> tuple[torch.Tensor | None, int | None]:
        """torch's helper for ``nn.TransformerEncoderLayer``'s native inference path (eval, no grad,
        even head count), which skips ``forward`` and reads this module's torch-named parameters:
        the same merge as ``nn.MultiheadAttention.merge_masks``, with our ``causal`` option folded in
        so that path stays exact. ``torch.backends.mha.set_fastpath_enabled(False)`` keeps torch's
        layers calling ``forward`` (and the kernel) instead."""
        if self.causal:
            if query.is_nested:
                raise ValueError(
                    f"{type(self).__name__}: `query` must not be a NestedTensor when causal=True (torch's native "
                    "TransformerEncoder path cannot apply our causal option; call "
                    "torch.backends.mha.set_fastpath_enabled(False))")
            length = query.shape[1]
            hidden = _causal_blocked(length, length, query.device)
            if attn_mask is None:
                attn_mask = torch.zeros(length, length, dtype=query.dtype, device=query.device).masked_fill(
                    hidden, float("-inf"))
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask | hidden
            else:
                attn_mask = attn_mask.masked_fill(hidden, float("-inf"))
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention, torch's signature and semantics (differences: see the class docstring).

        Args:
            query: ``(N, L, E)`` (batch_first), ``(L, N, E)`` (not batch_first) or ``(L, E)`` unbatched.
            key: ``(N, S, kdim)`` / ``(S, N, kdim)`` / ``(S, kdim)``.
            value: ``(N, S, vdim)`` / ``(S, N, vdim)`` / ``(S, vdim)``.
            key_padding_mask: ``(N, S)`` (``(S,)`` unbatched), bool True = padding, or float added.
            need_weights: also return the attention weights (exact eager path).
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)`` (``(num_heads, L, S)`` unbatched), bool
                True = masked out, or float added to the scores.
            average_attn_weights: average the returned weights over heads.
            is_causal: causal attention for this call (see the class docstring for the hint rule).

        Returns:
            ``(output, weights)``: output of query's shape (last dim E); weights None, or
            ``(N, L, S)`` averaged / ``(N, H, L, S)`` per head (without N when unbatched).
        """
        owner = type(self).__name__
        batched = self._check_inputs(query, key, value)
        self_attention, shared_kv = query is key and key is value, key is value
        _check_bool(owner, "need_weights", need_weights)
        _check_bool(owner, "average_attn_weights", average_attn_weights)
        _check_bool(owner, "is_causal", is_causal)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length_q, length_k = query.shape[0], query.shape[1], key.shape[1]
        kpm = self._check_key_padding_mask(key_padding_mask, query, batched, n, length_k)
        mask = self._check_attn_mask(attn_mask, query, batched, n, length_q, length_k)
        causal = self.causal or is_causal

        q, k, v = self._in_projection(query, key, value, self_attention, shared_kv)
        plan = None if need_weights else self._kernel_plan(q, kpm, mask, causal, is_causal, length_q, length_k)
        weights = None
        if plan is not None:
            kernel_causal, keep = plan
            out = flash_attention(q, k, v, causal=kernel_causal, dropout_p=self.dropout if self.training else 0.0,
                                  attention_mask=keep)
        else:
            out, weights = self._exact_attention(q, k, v, kpm, mask, causal)
            if need_weights:
                weights = weights.mean(dim=1) if average_attn_weights else weights
            else:
                weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, length_q, self.embed_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _check_inputs(self, query, key, value) -> bool:
        """Types, ranks, feature dims, batch and sequence sizes, dtypes, devices. Returns batched."""
        owner = type(self).__name__
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                _fail(TypeError, owner, name, "a torch.Tensor", _describe(t))
        if query.dim() not in (2, 3):
            _fail(ValueError, owner, "query", "3-D (batched) or 2-D (unbatched)", f"shape {tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim():
                _fail(ValueError, owner, name, f"{query.dim()}-D like query", f"shape {tuple(t.shape)}")
            if t.shape[-1] != dim:
                _fail(ValueError, owner, name, f"of feature (last) dim {dim}", f"shape {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                _fail(TypeError, owner, name, "a floating-point tensor", f"dtype {t.dtype}")
            if t.device != self.out_proj.weight.device:
                _fail(ValueError, owner, name, f"on the parameters' device ({self.out_proj.weight.device})",
                      f"device {t.device}")
        if key.shape[:-1] != value.shape[:-1]:
            _fail(ValueError, owner, "value", f"of key's batch and sequence sizes {tuple(key.shape[:-1])}",
                  f"shape {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if batched and key.shape[batch_dim] != query.shape[batch_dim]:
            _fail(ValueError, owner, "key", f"of query's batch size {query.shape[batch_dim]} (dim {batch_dim})",
                  f"shape {tuple(key.shape)}")
        autocast = query.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(query.device.type)
        if not autocast:
            param_dtype = self.out_proj.weight.dtype
            for name, t in (("query", query), ("key", key), ("value", value)):
                if t.dtype != param_dtype:
                    _fail(TypeError, owner, name, f"of the parameters' dtype {param_dtype} (outside autocast)",
                          f"dtype {t.dtype}")
        return batched

    @staticmethod
    def _check_mask_tensor(name: str, mask: object, query: torch.Tensor) -> torch.Tensor:
        owner = "TritonMultiHeadAttention"
        if not isinstance(mask, torch.Tensor):
            _fail(TypeError, owner, name, "None or a torch.Tensor", _describe(mask))
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            _fail(TypeError, owner, name, "a bool (True = masked out) or float (added to the scores) tensor",
                  f"dtype {mask.dtype}")
        if mask.device != query.device:
            _fail(ValueError, owner, name, f"on query's device ({query.device})", f"device {mask.device}")
        return mask

    def _check_key_padding_mask(self, mask, query, batched: bool, n: int, length_k: int) -> torch.Tensor | None:
        """-> None or (N, S)."""
        if mask is None:
            return None
        self._check_mask_tensor("key_padding_mask", mask, query)
        expected = (n, length_k) if batched else (length_k,)
        if tuple(mask.shape) != expected:
            _fail(ValueError, type(self).__name__, "key_padding_mask", f"of shape {expected} (batch, key length)",
                  f"shape {tuple(mask.shape)}")
        return mask if batched else mask.unsqueeze(0)

    def _check_attn_mask(self, mask, query, batched: bool, n: int, length_q: int,
                         length_k: int) -> torch.Tensor | None:
        """-> None, (1, 1, L, S) or (N, H, L, S)."""
        if mask is None:
            return None
        self._check_mask_tensor("attn_mask", mask, query)
        heads = self.num_heads
        shapes = ((length_q, length_k), (n * heads if batched else heads, length_q, length_k))
        if tuple(mask.shape) not in shapes:
            per_head = "(N * num_heads, L, S)" if batched else "(num_heads, L, S)"
            _fail(ValueError, type(self).__name__, "attn_mask", f"of shape (L, S) or {per_head} = {shapes[0]} or "
                  f"{shapes[1]}", f"shape {tuple(mask.shape)}")
        if mask.dim() == 2:
            return mask.view(1, 1, length_q, length_k)
        return mask.view(n, heads, length_q, length_k)

    def _in_projection(self, query, key, value, self_attention: bool, shared_kv: bool):
        """(N, L, E), (N, S, kdim), (N, S, vdim) -> q (N, H, L, hd), k, v (N, H, S, hd): transposed views
        of the projections (BSHD memory, which the kernel reads in place)."""
        e, heads, hd = self.embed_dim, self.num_heads, self.head_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)

        def split(x: torch.Tensor, parts: int):
            return x.view(x.shape[0], x.shape[1], parts, heads, hd).transpose(1, 3).unbind(2)

        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attention:
                return split(F.linear(query, w, b), 3)
            q = F.linear(query, w[:e], b_q).view(query.shape[0], query.shape[1], heads, hd).transpose(1, 2)
            if shared_kv:
                k, v = split(F.linear(key, w[e:], None if b is None else b[e:]), 2)
                return q, k, v
            w_k, w_v = w[e:2 * e], w[2 * e:]
        else:
            q = F.linear(query, self.q_proj_weight, b_q).view(query.shape[0], query.shape[1], heads, hd)
            q = q.transpose(1, 2)
            w_k, w_v = self.k_proj_weight, self.v_proj_weight
        k = F.linear(key, w_k, b_k).view(key.shape[0], key.shape[1], heads, hd).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(value.shape[0], value.shape[1], heads, hd).transpose(1, 2)
        return q, k, v

    def _kernel_plan(self, q: torch.Tensor, kpm: torch.Tensor | None, mask: torch.Tensor | None, causal: bool,
                     is_causal: bool, length_q: int, length_k: int) -> tuple[bool, torch.Tensor | None] | None:
        """(causal, keep-keys mask (N, S) or None) when the kernel computes exactly this call, else None."""
        if q.dtype not in _KERNEL_DTYPES or self.head_dim > _MAX_KERNEL_HEAD_DIM:
            return None
        inspect = _can_inspect(q)
        keep = None
        if kpm is not None:
            blocked = kpm if kpm.dtype == torch.bool else (_blocked(kpm) if inspect else None)
            if blocked is None:
                return None
            keep = ~blocked
        if mask is None:
            return causal, keep
        hint = is_causal and length_q == length_k
        if hint and not _values_checkable(q):
            return True, keep  # torch's contract: is_causal says attn_mask is the causal mask
        if not inspect:
            return None
        blocked = _blocked(mask)
        hidden = _causal_blocked(length_q, length_k, q.device)
        if causal:
            # Combined with causal: the mask must hide nothing causal attention shows.
            if blocked is not None and not bool((blocked & ~hidden).any()):
                return True, keep
            if hint:
                raise ValueError(
                    "TritonMultiHeadAttention: `attn_mask` must be the causal mask (bool True / float -inf "
                    "exactly above the diagonal, or hiding less) when `is_causal=True` hints so; got a mask "
                    "that hides pairs causal attention shows, or adds a float bias (pass is_causal=False "
                    "for an arbitrary mask)")
            return None
        if blocked is None:
            return None
        if not bool(blocked.any()):
            return False, keep
        if bool((blocked == hidden).all()):
            return True, keep
        return None

    def _exact_attention(self, q, k, v, kpm, mask, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager attention with torch's mask semantics: q (N, H, L, hd), k, v (N, H, S, hd) ->
        out (N, H, L, hd), weights (N, H, L, S) (after dropout, in q's dtype). Fully masked rows: 0."""
        soft_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.matmul(q, k.transpose(-1, -2)).to(soft_dtype) * (self.head_dim ** -0.5)
        neg_inf = float("-inf")
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, neg_inf)
            else:
                scores = scores + mask.to(soft_dtype)
        if kpm is not None:
            kpm = kpm.view(kpm.shape[0], 1, 1, kpm.shape[1])
            scores = scores.masked_fill(kpm, neg_inf) if kpm.dtype == torch.bool else scores + kpm.to(soft_dtype)
        if causal:
            scores = scores.masked_fill(_causal_blocked(q.shape[2], k.shape[2], q.device), neg_inf)
        p = _safe_softmax(scores)
        if self.training and self.dropout > 0:
            p = F.dropout(p, self.dropout)
        p = p.to(q.dtype)
        return torch.matmul(p, v), p
