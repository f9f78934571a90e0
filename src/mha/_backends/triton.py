"""The triton backend: fused Triton kernels for what SDPA cannot run fused.

Dispatch tries SDPA first, so on CUDA this backend serves the calls SDPA
declines: any mask (key lengths, bands, boolean and additive tensors read
through their broadcast strides), attention weights and the log-sum-exp.

* forward: online softmax over key blocks, fp32 accumulation, key blocks
  outside the band or past a row's length skipped; lse in natural log, ``-inf``
  and output 0 on fully masked rows; deterministic.
* weights: a second kernel recomputes ``p = exp(s - lse)`` tile by tile and sums
  the heads in registers, so ``weights="mean"`` costs ``N * L * S`` elements,
  never ``N * Hq * L * S``; ``"per_head"`` writes each head's tile.
* backward: flash-attention-2 style, dk/dv per key block (summed over the query
  heads of a GQA group) and dq per query block, no atomics.

The kernels are wrapped as ``torch.library.custom_op`` (``mha::triton_attention_fwd``,
``mha::triton_attention_bwd``, ``mha::triton_attention_weights``) with fake and
autograd registrations, so ``torch.compile`` traces through them. Triton itself
is imported only when a kernel runs.

On CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``,
set before the kernels are first used), which is how the tests run them.
"""

# No ``from __future__ import annotations``: custom_op reads the annotations as types.

import functools
import importlib.util
import operator
import os

import torch
from torch import Tensor

from .._core import AttentionOutput, Call

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LN2 = 0.6931471805599453


def _kernels():
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
) -> tuple[Tensor, Tensor]:
    """Output ``(N, Hq, L, Dv)`` (q's dtype) and lse ``(N, Hq, L)`` (fp32, in log2
    units: ``log2 sum_j 2^(s_ij log2(e))``) for
    q ``(N, Hq, L, Dk)``, k ``(N, Hkv, S, Dk)``, v ``(N, Hkv, S, Dv)``; keys
    allowed where ``i + lo <= j <= i + hi``, ``j < lengths[n]`` and ``allowed``,
    scores plus ``bias`` (both broadcastable to ``(N, Hq, L, S)``)."""
    return _kernels().forward(q, k, v, lengths, allowed, bias, scale, lo, hi)


@attention_fwd.register_fake
def _(q, k, v, lengths, allowed, bias, scale, lo, hi):
    N, Hq, L, _ = q.shape
    return q.new_empty(N, Hq, L, v.shape[-1]), q.new_empty(N, Hq, L, dtype=torch.float32)


@torch.library.custom_op("mha::triton_attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    lengths: Tensor | None,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    lo: int | None,
    hi: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_fwd` given the gradients of its two outputs."""
    return _kernels().backward(dout, dlse, q, k, v, out, lse, lengths, allowed, bias, scale, lo, hi)


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, lengths, allowed, bias, scale, lo, hi):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, allowed, bias, scale, lo, hi = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lengths, allowed, bias)
    ctx.args = (scale, lo, hi)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, lengths, allowed, bias = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, dlse, q, k, v, out, lse, lengths, allowed, bias, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mha::triton_attention_weights", mutates_args=())
def attention_weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    lengths: Tensor | None,
    allowed: Tensor | None,
    bias: Tensor | None,
    scale: float,
    lo: int | None,
    hi: int | None,
    per_head: bool,
) -> Tensor:
    """Attention probabilities recomputed from the log2 ``lse``: ``(N, L, S)`` averaged over
    the Hq heads, or ``(N, Hq, L, S)`` when ``per_head``; q's dtype."""
    return _kernels().weights(q, k, lse, lengths, allowed, bias, scale, lo, hi, per_head)


@attention_weights.register_fake
def _(q, k, lse, lengths, allowed, bias, scale, lo, hi, per_head):
    N, Hq, L, _ = q.shape
    S = k.shape[2]
    return q.new_empty((N, Hq, L, S) if per_head else (N, L, S))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Triton:
    name = "triton"
    auto_devices = frozenset({"cuda"})

    def not_supported_reasons(self, call: Call) -> list[str]:
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed: pip install 'mha[triton]'"]
        reasons = []
        device = call.query.device.type
        if device != "cuda" and not _interpreting():
            reasons.append(
                f"Triton kernels need CUDA tensors, got {device} "
                "(on CPU they run only in Triton's interpreter, TRITON_INTERPRET=1, for tests)"
            )
        if call.query.dtype not in _DTYPES:
            reasons.append(f"the triton backend takes float16, bfloat16 or float32, got {call.query.dtype}")
        _, _, _, _, _, Dk, Dv = call.shape
        if max(Dk, Dv) > _MAX_HEAD_DIM:
            reasons.append(f"the triton backend takes head dims up to {_MAX_HEAD_DIM}, got Dk={Dk}, Dv={Dv}")
        if call.dropout_p > 0:
            reasons.append(f"the triton backend has no dropout (dropout_p={call.dropout_p}); pass 0.0 in eval")
        if _needs_grad(*call.plan.bias):
            reasons.append("the triton backend computes no gradient for a Bias tensor that requires grad")
        if call.weights is not None and _needs_grad(call.query, call.key, call.value):
            reasons.append(
                f"the triton backend's weights={call.weights!r} are not differentiable "
                "and the inputs require grad"
            )
        return reasons

    def forward(self, call: Call) -> AttentionOutput:
        q, k, v = call.query, call.key, call.value
        plan = call.plan
        lengths = None if plan.lengths is None else plan.lengths.to(device=q.device, dtype=torch.int32)
        allowed = functools.reduce(operator.and_, plan.allowed).to(q.device) if plan.allowed else None
        bias = functools.reduce(operator.add, plan.bias).to(q.device) if plan.bias else None
        lo = None if plan.band is None else plan.band.lo
        hi = None if plan.band is None else plan.band.hi
        masks = (lengths, allowed, bias, call.scale, lo, hi)
        out, lse = attention_fwd(q, k, v, *masks)
        w = None
        if call.weights is not None:
            w = attention_weights(q.detach(), k.detach(), lse.detach(), *masks, call.weights == "per_head")
        return AttentionOutput(out, w, (lse * _LN2).to(q.dtype) if call.return_lse else None)


BACKEND = _Triton()
