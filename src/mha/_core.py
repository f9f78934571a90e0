"""The functional core: :func:`attention` on tensors already split into heads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from . import masks as _masks
from ._plan import MaskPlan, plan_mask

if TYPE_CHECKING:
    from ._cache import KVCache

WeightsMode = Literal["mean", "per_head"]


class AttentionOutput(NamedTuple):
    """What :func:`attention` returns.

    output:  ``(N, Hq, L, Dv)``
    weights: ``(N, L, S)`` for ``weights="mean"``, ``(N, Hq, L, S)`` for
             ``"per_head"``, else None
    lse:     ``(N, Hq, L)`` natural log-sum-exp of the scaled, masked scores
             (``-inf`` for a fully masked row) when ``return_lse=True``, else None
    """

    output: Tensor
    weights: Tensor | None
    lse: Tensor | None


@dataclass(frozen=True)
class Call:
    """One validated call of :func:`attention`, as backends see it."""

    query: Tensor
    key: Tensor
    value: Tensor
    mask: _masks.Mask | None
    plan: MaskPlan
    scale: float
    dropout_p: float
    weights: WeightsMode | None
    return_lse: bool

    @property
    def shape(self) -> tuple[int, int, int, int, int, int, int]:
        """``(N, Hq, Hkv, L, S, Dk, Dv)``."""
        N, Hq, L, Dk = self.query.shape
        Hkv, S, Dv = self.key.shape[1], self.key.shape[2], self.value.shape[-1]
        return N, Hq, Hkv, L, S, Dk, Dv


def attention(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mask: _masks.Mask | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    weights: WeightsMode | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    cache: KVCache | None = None,
    new_lengths: Tensor | None = None,
) -> AttentionOutput:
    r"""Multi-head scaled dot-product attention with explicit masks.

    .. math::

        s_{nhij} = \text{scale} \cdot q_{nhi} \cdot k_{n g(h) j} + b_{nhij},
        \qquad p_{nhij} = \frac{\exp s_{nhij}}{\sum_{j'} \exp s_{nhij'}},
        \qquad o_{nhi} = \sum_j p_{nhij} v_{n g(h) j}

    where :math:`b` is 0 where the mask allows, :math:`-\infty` where it blocks,
    plus any :class:`~mha.masks.Bias`, and :math:`g(h) = \lfloor h / (H_q / H_{kv}) \rfloor`
    maps a query head to its key/value head (GQA/MQA). A row whose keys are all
    blocked gets :math:`p = 0`, output 0 and ``lse = -inf`` (never NaN).

    Args:
        query: ``(N, Hq, L, Dk)``.
        key: ``(N, Hkv, S, Dk)`` with ``Hq % Hkv == 0``.
        value: ``(N, Hkv, S, Dv)``; ``Dv`` may differ from ``Dk``.
            For variable-length batches, all three may be jagged nested tensors
            ``(N, H, j, D)`` (``nested_tensor(list_of_(L_n, H, D), layout=torch.jagged)
            .transpose(1, 2)``); then only ``Causal``/``Window`` masks apply, per
            sequence, and weights come back as a nested tensor of per-sequence weights.
            On CUDA their offsets should span their values (start at 0, end at the
            last row), as torch's constructors make them: rows outside every
            sequence are not read back to the host to be dropped, so their output
            and gradient rows are left unspecified.
        mask: a :mod:`mha.masks` object (``Causal``, ``KeyPadding``, ``Window``,
            ``Allowed``, ``Blocked``, ``Bias`` or an ``&`` of them), or None.
        scale: multiplies the scores; default ``1 / sqrt(Dk)``.
        dropout_p: dropout on ``p`` (pass 0.0 in eval). The returned weights are
            the probabilities after dropout, as in ``nn.MultiheadAttention``.
        weights: None, ``"mean"`` for ``(N, L, S)`` averaged over the Hq heads
            (never materialising per-head weights), or ``"per_head"`` for
            ``(N, Hq, L, S)``.
        return_lse: also return the log-sum-exp ``(N, Hq, L)``.
        backend: force ``"sdpa"``, ``"blocked"`` or ``"reference"``; default picks
            the first that supports the call. A forced backend that cannot serve
            the call raises ``NotImplementedError`` listing every reason.
        cache: an :class:`mha.KVCache`. ``key``/``value`` ``(N, Hkv, T, D)`` are then
            the new tokens, written into the cache after each sequence's
            ``lengths[n]`` cached ones; query ``t`` ``(N, Hq, T, Dk)`` sits at position
            ``lengths[n] + t`` and attends the cache up to and including itself.
            ``mask`` applies over cache positions (``Window`` counts from the query's
            position; tensors span ``(N, Hq, T, max_length)``). A static
            (cross-attention) cache is overwritten by ``key``/``value`` and attended
            without causality; ``key=value=None`` attends what it holds. Weights and
            lse span the cache's written positions ``S <= max_length``.
        new_lengths: with ``cache``, ``(N,)`` how many of the ``T`` new tokens are
            real (right padding); only those are stored. Default: all ``T``.

    Shape legend: N batch, Hq query heads, Hkv key/value heads, L queries,
    S keys, Dk query/key head dim, Dv value head dim.

    Causal alignment when ``L != S`` (``x`` = allowed, L=3, S=5)::

        Causal("top_left")     Causal("bottom_right")
            x . . . .              x x x . .
            x x . . .              x x x x .
            x x x . .              x x x x x

    Returns:
        :class:`AttentionOutput` ``(output (N, Hq, L, Dv), weights, lse)``.
    """
    if cache is not None:
        from ._cache import cached_inputs

        key, value, mask, backend = cached_inputs(cache, query, key, value, mask, new_lengths, backend)
    elif new_lengths is not None or key is None or value is None:
        raise ValueError(
            "attention: new_lengths=, key=None and value=None need cache=; pass key and value "
            "(N, Hkv, S, D) or a KVCache"
        )
    if isinstance(query, Tensor) and query.is_nested:
        from ._varlen import core_jagged

        return core_jagged(
            query, key, value, mask, scale=scale, dropout_p=dropout_p, weights=weights,
            return_lse=return_lse, backend=backend,
        )
    call = _validate_call(query, key, value, mask, scale, dropout_p, weights, return_lse)
    from ._dispatch import select_backend

    return select_backend(call, backend).forward(call)


def zeros_in_graph(shape: tuple[int, ...], *inputs: Tensor) -> Tensor:
    """Zeros of ``shape`` whose gradient to each input is zero, not missing.

    For outputs that no key contributes to (every key masked or padded): a plain
    ``new_zeros`` would cut the graph, and ``backward()`` would then raise or leave
    ``.grad`` unset where torch's users expect zeros."""
    first = inputs[0]
    zero = sum(t.flatten()[:0].sum() for t in inputs)
    return torch.zeros(shape, dtype=first.dtype, device=first.device) + zero


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _validate_call(query, key, value, mask, scale, dropout_p, weights, return_lse) -> Call:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (N, H, {'L' if name == 'query' else 'S'}, D), "
                f"got {t.dim()}-D {_shape(t)}; split heads first, e.g. x.view(N, L, H, D).transpose(1, 2)"
            )
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"attention: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    N, Hq, L, Dk = query.shape
    Nk, Hkv, S, Dk2 = key.shape
    Nv, Hv, Sv, _ = value.shape
    if Nk != N or Nv != N:
        raise ValueError(
            f"attention: batch sizes differ: query (N, Hq, L, Dk) = {_shape(query)}, "
            f"key {_shape(key)}, value {_shape(value)}; all three need the same N"
        )
    if Dk2 != Dk:
        raise ValueError(
            f"attention: key (N, Hkv, S, Dk) = {_shape(key)} must have the query's Dk = {Dk} "
            f"(query {_shape(query)})"
        )
    if Hv != Hkv or Sv != S:
        raise ValueError(
            f"attention: value (N, Hkv, S, Dv) = {_shape(value)} must match key {_shape(key)} in Hkv and S"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"attention: query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} (GQA/MQA)"
        )
    if mask is not None and not isinstance(mask, _masks.Mask):
        raise TypeError(
            f"attention: mask must be an mha.masks object (Causal, KeyPadding, Window, Allowed, Blocked, "
            f"Bias, or an & of them), got {type(mask).__name__}; wrap a boolean tensor as Blocked(t) "
            "(True = masked out) or Allowed(t) (True = may attend)"
        )
    if mask is not None:
        mask._check_shape(N, Hq, L, S)
    if weights not in (None, "mean", "per_head"):
        raise ValueError(f"attention: weights must be None, 'mean' or 'per_head', got {weights!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(Dk) if Dk > 0 else 1.0
    return Call(
        query, key, value, mask, plan_mask(mask, L, S), float(scale), float(dropout_p), weights, bool(return_lse)
    )
