"""The triton backend: fused Triton kernels for what SDPA cannot run fused.

Dispatch tries SDPA first, so on CUDA this backend serves the calls SDPA
declines: any mask (key lengths, bands, boolean and additive tensors read
through their broadcast strides), attention weights and the log-sum-exp.

* forward: online softmax over key blocks, fp32 accumulation, key blocks
  outside the band or past a row's length skipped; lse in natural log, ``-inf``
  and output 0 on fully masked rows; deterministic.
* weights: a second kernel recomputes ``p`` tile by tile from the forward's row
  statistics and sums the heads in registers, so ``weights="mean"`` costs
  ``N * L * S`` elements, never ``N * Hq * L * S``; ``"per_head"`` writes each
  head's tile.
* backward: flash-attention-2 style, dk/dv per key block (summed over the query
  heads of a GQA group) and dq per query block, no atomics. The gradient of the
  weights (averaged or per head) enters the same ``ds = p * (dp - delta)``:
  ``dp`` gains ``dW / Hq`` (``dW`` per head), and ``delta`` its row sums with
  ``p``, which one more kernel recomputes per head; no per-head weights are
  ever held in memory.
* variable-length batches: the same forward and backward kernels read packed
  q/k/v and int32 cu_seqlens-style offsets, so a jagged batch costs one launch
  (per kernel), whatever its lengths; bands align per sequence.

The kernels are wrapped as ``torch.library.custom_op`` (``mha::triton_attention_fwd``,
``mha::triton_attention_bwd``, ``mha::triton_varlen_fwd``, ``mha::triton_varlen_bwd``)
with fake and autograd registrations, so ``torch.compile`` traces through them.
Triton itself is imported only when a kernel runs.

On CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``,
set before the kernels are first used), which is how the tests run them.
"""

# No ``from __future__ import annotations``: custom_op reads the annotations as types.

import functools
import importlib.util
import operator
import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .._plan import Band
from .._types import AttentionOutput, Call, Capabilities, device_type
from ._grouped import by_groups
from ._layout import new_output

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension
_LN2 = 0.6931471805599453


def _kernels() -> ModuleType:
    from . import _triton_kernels

    return _triton_kernels


@torch.library.custom_op("mha::triton_attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor | None,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    lo: int | None,
    hi: int | None,
    weights: str = "none",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention of q ``(N, Hq, L, Dk)``, k ``(N, Hkv, S, Dk)``, v ``(N, Hkv, S, Dv)``; keys
    allowed where ``i + lo <= j <= i + hi``, ``j < lengths[n]`` (int32 ``(N,)`` within
    ``0..S``) and ``allowed``, scores plus ``bias`` (both broadcastable to ``(N, Hq, L, S)``).

    Returns the output ``(N, Hq, L, Dv)`` (q's dtype), the lse ``(N, Hq, L)`` (fp32, in log2
    units: ``log2 sum_j 2^(s_ij log2(e))``), the row statistics ``(2, N, Hq, L)`` the
    backward recomputes the probabilities from (the row maximum and ``log2 l``; no
    gradient), and the weights ``p`` in q's dtype: ``(N, L, S)`` averaged over heads
    (``weights="mean"``), ``(N, Hq, L, S)`` (``"per_head"``) or empty (``"none"``). The
    weights are differentiable: their gradient enters the fused backward."""
    kernels = _kernels()
    out = new_output(q, v.shape[-1])
    lse, stats, w = kernels.forward(q, k, v, out, kernels.mask_args(lengths, allowed, bias, lo, hi), scale, weights)
    return out, lse, stats, w


@attention_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor | None,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    lo: int | None,
    hi: int | None,
    weights: str = "none",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    N, Hq, L, _ = q.shape
    S = k.shape[2]
    w_shape = {"none": (0,), "mean": (N, L, S), "per_head": (N, Hq, L, S)}[weights]
    lse = q.new_empty(N, Hq, L, dtype=torch.float32)
    return new_output(q, v.shape[-1]), lse, q.new_empty(2, N, Hq, L, dtype=torch.float32), q.new_empty(w_shape)


@torch.library.custom_op("mha::triton_attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    dlse: Tensor,
    dw: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    lengths: Tensor | None,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    lo: int | None,
    hi: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_fwd` given the gradients of its output, lse and
    weights (``dw`` None when the weights receive no gradient)."""
    kernels = _kernels()
    masks = kernels.mask_args(lengths, allowed, bias, lo, hi)
    return kernels.backward(dout, dlse, dw, q, k, v, out, stats, masks, scale)


@attention_bwd.register_fake
def _(
    dout: Tensor,
    dlse: Tensor,
    dw: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    lengths: Tensor | None,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    lo: int | None,
    hi: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, lengths, allowed, bias, scale, lo, hi, _ = inputs
    out, _, stats, _ = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, stats, lengths, allowed, bias)
    ctx.args = (scale, lo, hi)


def _backward(
    ctx: Any, dout: Tensor | None, dlse: Tensor | None, dstats: Tensor | None, dw: Tensor | None
) -> tuple[Tensor | None, ...]:
    q, k, v, out, stats, lengths, allowed, bias = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = stats.new_zeros(stats.shape[1:]) if dlse is None else dlse
    dw = None if dw is None or dw.numel() == 0 else dw
    dq, dk, dv = attention_bwd(dout, dlse, dw, q, k, v, out, stats, lengths, allowed, bias, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mha::triton_varlen_fwd", mutates_args=())
def varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_offsets: Tensor,
    k_offsets: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    lo: int | None,
    hi: int | None,
    bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention over a packed batch in one launch.

    q ``(Tq, Hq, Dk)``, k ``(Tk, Hkv, Dk)``, v ``(Tk, Hkv, Dv)``; sequence ``n`` owns
    query rows ``q_offsets[n]:q_offsets[n + 1]`` and key rows
    ``k_offsets[n]:k_offsets[n + 1]`` (int32 ``(N + 1,)`` on q's device, within
    ``0..Tq``/``0..Tk``; rows outside every sequence are left unwritten, in the
    output and in the gradients); ``max_q``/``max_k`` are the longest ``L_n``/``S_n``. Query ``i``
    of sequence ``n`` attends its keys ``j`` with ``i + lo <= j <= i + hi``, both
    offsets shifted by ``S_n - L_n`` when ``bottom_right`` (None: unbounded side).

    Returns the packed output ``(Tq, Hq, Dv)`` (q's dtype), the lse packed
    ``(Hq, Tq)`` (fp32, log2 units; sequence ``n``'s lse is ``lse[:, q_offsets[n]:q_offsets[n + 1]]``)
    and the row statistics ``(2, Hq, Tq)`` of the backward (no gradient)."""
    return _kernels().varlen_forward(q, k, v, q_offsets, k_offsets, max_q, max_k, scale, lo, hi, bottom_right)


@varlen_fwd.register_fake
def _(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_offsets: Tensor,
    k_offsets: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    lo: int | None,
    hi: int | None,
    bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    Tq, Hq, _ = q.shape
    stats = q.new_empty(2, Hq, Tq, dtype=torch.float32)
    return q.new_empty(Tq, Hq, v.shape[-1]), q.new_empty(Hq, Tq, dtype=torch.float32), stats


@torch.library.custom_op("mha::triton_varlen_bwd", mutates_args=())
def varlen_bwd(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    q_offsets: Tensor,
    k_offsets: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    lo: int | None,
    hi: int | None,
    bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, packed like q, k, v, of :func:`varlen_fwd` given the gradients
    of its output ``(Tq, Hq, Dv)`` and lse ``(Hq, Tq)``."""
    return _kernels().varlen_backward(
        dout, dlse, q, k, v, out, stats, q_offsets, k_offsets, max_q, max_k, scale, lo, hi, bottom_right
    )


@varlen_bwd.register_fake
def _(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    q_offsets: Tensor,
    k_offsets: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    lo: int | None,
    hi: int | None,
    bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    q, k, v, q_offsets, k_offsets, *args = inputs
    out, _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, out, stats, q_offsets, k_offsets)
    ctx.args = args


def _varlen_backward(ctx: Any, dout: Tensor, dlse: Tensor, dstats: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, out, stats, q_offsets, k_offsets = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(dout, dlse, q, k, v, out, stats, q_offsets, k_offsets, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Looked up once, at import: a cached function would make torch.compile warn that it
# traces through the cache.
_INSTALLED = importlib.util.find_spec("triton") is not None


def _extra_reasons(call: Call) -> list[str]:
    """What the capability record cannot say: installed, CUDA (or the interpreter), grid
    limits, int32 offsets, one band alignment per varlen call."""
    if not _INSTALLED:
        return ["triton is not installed: pip install 'mha[triton]'"]
    reasons = []
    device = device_type(call.query.device)
    if device != "cuda" and not _interpreting():
        reasons.append(
            f"Triton kernels need CUDA tensors, got {device} "
            "(on CPU they run only in Triton's interpreter, TRITON_INTERPRET=1, for tests)"
        )
    N, Hq, _, L, S, _, _ = call.shape
    if N * Hq > _MAX_GRID_Y:
        what = "sequence" if call.is_varlen else "batch row"
        reasons.append(
            f"the triton backend runs one program per {what} and head along a grid axis of at most "
            f"{_MAX_GRID_Y}, got N={N} * Hq={Hq}; split the batch"
        )
    if call.is_varlen and call.weights is None:
        if call.plan.align == "mixed":
            reasons.append(
                f"the varlen Triton kernels take bands of one alignment, got {call.mask!r} "
                "(top_left and bottom_right mixed)"
            )
        if max(L, S) >= 2**31:
            reasons.append(f"the varlen Triton kernels take int32 offsets, got {L} queries and {S} keys")
    return reasons


CAPABILITIES = Capabilities(
    label="the triton backend",
    auto_devices=frozenset({"cuda"}),
    dtypes=_DTYPES,
    max_head_dim=_MAX_HEAD_DIM,
    dropout=False,
    weights_grad=True,
    bias_grad=False,
    extra=_extra_reasons,
)


def _band_offsets(band: Band | None, bound: int) -> tuple[int | None, int | None]:
    """The band's offsets clamped to ``[-bound, bound]``, ``bound = L + S``: the same keys
    (past ``L + S`` either way a band side allows every key or none), and offsets the
    kernels' int32 index arithmetic holds (``Window(None, 2**31 - 1)`` wrapped to no key)."""
    if band is None:
        return None, None
    lo, hi = (None if x is None else min(max(x, -bound), bound) for x in band)
    return lo, hi


class _Triton:
    """Fused kernels; a varlen call runs in one launch, or per group of equal lengths
    when weights are asked for (the varlen kernels compute none)."""

    name = "triton"
    caps = CAPABILITIES

    def workspace(self, N: int, H: int, L: int, S: int, score_bytes: int) -> tuple[str, int]:
        return "fused kernel tiles, row statistics (N, H, L) x3", 3 * N * H * L * 4

    def forward(self, call: Call) -> AttentionOutput:
        if call.is_varlen:
            return by_groups(call, self._dense) if call.weights is not None else self._varlen(call)
        return self._dense(call)

    def _dense(self, call: Call) -> AttentionOutput:
        q, k, v = call.query, call.key, call.value
        plan = call.plan
        lengths = None
        if plan.lengths is not None:
            # clamped in int64: int32 would wrap lengths of 2**31 or more, and a uint8 or
            # int8 tensor cannot hold the bound S itself when S is past its range
            lengths = plan.lengths.to(q.device, torch.int64).clamp(0, k.shape[2]).to(torch.int32)
        allowed = functools.reduce(operator.and_, plan.allowed).to(q.device) if plan.allowed else None
        bias = functools.reduce(operator.add, plan.bias).to(q.device) if plan.bias else None
        lo, hi = _band_offsets(plan.band, q.shape[2] + k.shape[2])
        out, lse, _, w = attention_fwd(q, k, v, lengths, allowed, bias, call.scale, lo, hi, call.weights or "none")
        return AttentionOutput(
            out, None if call.weights is None else w, (lse * _LN2).to(q.dtype) if call.return_lse else None
        )

    def _varlen(self, call: Call) -> AttentionOutput:
        """The packed batch in one launch of :func:`varlen_fwd`; nothing here copies
        between host and device when the offsets are on the device with their longest
        lengths known."""
        q_offsets, k_offsets = call.offsets()
        q = call.query
        max_q, max_k = q_offsets.longest(), k_offsets.longest()
        # a square sequence's band, shifted per sequence by S_n - L_n (within the bound) if bottom-right
        lo, hi = _band_offsets(call.plan.band, max_q + max_k)
        out, lse, _ = varlen_fwd(
            q, call.key, call.value, q_offsets.on(q.device), k_offsets.on(q.device),
            max_q, max_k, call.scale, lo, hi, call.plan.align == "bottom_right",
        )
        return AttentionOutput(out, None, (lse * _LN2).to(q.dtype) if call.return_lse else None)


BACKEND = _Triton()
