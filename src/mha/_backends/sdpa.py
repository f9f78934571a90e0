"""The SDPA backend: ``torch.nn.functional.scaled_dot_product_attention``.

Torch's fused kernels are at the hardware limit for dense and causal attention,
so this backend hands them everything it can: top-left causal becomes
``is_causal=True``; key lengths are served by slicing each batch row's keys to
its length, so padded keys cost nothing; other masks go in at their own
broadcast shape, never expanded to ``(N, H, L, S)``. It cannot return weights
or the log-sum-exp.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .._plan import MaskPlan
from .._types import AttentionOutput, Call, Capabilities, zeros_in_graph
from ._grouped import by_groups

CAPABILITIES = Capabilities(
    label="SDPA",
    weights=frozenset(),
    lse=False,
    # On CPU torch gives 0 for fully masked rows; its GPU kernels are not all checked to.
    masked_devices=frozenset({"cpu"}),
)


class _SDPA:
    name = "sdpa"
    caps = CAPABILITIES

    def workspace(self, N: int, H: int, L: int, S: int, score_bytes: int) -> tuple[str, int]:
        return "fused SDPA kernel", 0

    def forward(self, call: Call) -> AttentionOutput:
        return by_groups(call, self._dense) if call.is_varlen else self._dense(call)

    def _dense(self, call: Call) -> AttentionOutput:
        q, k, v = call.query, call.key, call.value
        if call.plan.lengths is None:
            out = _sdpa(q, k, v, call.plan, call.scale, call.dropout_p)
        else:
            out = _by_length(q, k, v, call.plan.lengths, call.plan, call.scale, call.dropout_p)
        return AttentionOutput(out, None, None)


def _by_length(
    q: Tensor, k: Tensor, v: Tensor, key_lengths: Tensor, plan: MaskPlan, scale: float, dropout_p: float
) -> Tensor:
    """Each batch row with its keys cut to its length: padding costs nothing.

    Rows of equal length run together in one SDPA call when the mask's tensors
    do not vary over the batch."""
    S = k.shape[2]
    lengths = [min(max(length, 0), S) for length in key_lengths.tolist()]
    N, Hq, L, _ = q.shape
    if not any(lengths):
        return zeros_in_graph((N, Hq, L, v.shape[-1]), q, k, v, *plan.bias)
    out = q.new_zeros(N, Hq, L, v.shape[-1])
    if plan.has_tensors:
        for n, length in enumerate(lengths):
            if length > 0:
                sub = plan.select_batch(n, length)
                out[n : n + 1] = _sdpa(
                    q[n : n + 1], k[n : n + 1, :, :length], v[n : n + 1, :, :length], sub, scale, dropout_p
                )
        return out
    groups: dict[int, list[int]] = {}
    for n, length in enumerate(lengths):
        groups.setdefault(length, []).append(n)
    sub = plan.without_lengths()
    for length, rows in groups.items():
        if length == 0:
            continue
        if len(rows) == rows[-1] - rows[0] + 1:
            index = slice(rows[0], rows[-1] + 1)
            out[index] = _sdpa(q[index], k[index, :, :length], v[index, :, :length], sub, scale, dropout_p)
        else:
            idx = torch.tensor(rows, device=q.device)
            out[idx] = _sdpa(q[idx], k[idx, :, :length], v[idx, :, :length], sub, scale, dropout_p)
    return out


def _heads_differ(q: Tensor, k: Tensor) -> bool:
    """Whether ``Hq != Hkv``, as the Python bool SDPA's ``enable_gqa`` must be.

    Under ``torch.jit.trace`` sizes are traced tensors; the head counts are fixed by
    the model, so the trace takes them as constants (without the TracerWarning)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if type(Hq) is int and type(Hkv) is int:  # eager: no need to ask whether this is a trace
        return Hq != Hkv
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return bool(q.shape[1] != k.shape[1])
    return q.shape[1] != k.shape[1]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, plan: MaskPlan, scale: float, dropout_p: float) -> Tensor:
    gqa = _heads_differ(q, k)
    # torch's fused CPU kernel multiplies its causal -inf by the scale: NaN for scale <= 0.
    if plan.band is not None and plan.band.is_top_left_causal and not plan.has_tensors and scale > 0:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa
        )
    mask = None
    if not plan.is_empty:
        L, S = q.shape[2], k.shape[2]
        if plan.bias:
            mask = plan.additive_rows(0, L, S, q.dtype, q.device)
        else:
            mask = plan.allowed_rows(0, L, S, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )


BACKEND = _SDPA()
