"""The functional core: :func:`attention` on tensors already split into heads, and
:func:`packed_attention` on packed variable-length batches.

Both validate their inputs into one frozen :class:`~mha._types.Call` and hand it to
dispatch; a variable-length ("varlen") call is an ordinary dispatch case whose
offsets travel in the call.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _dispatch, _varlen
from . import masks as _masks
from ._cache import CachedStep, KVCache, cached_step, check_mask_devices
from ._dispatch import Backend
from ._plan import plan_mask, plan_varlen_mask
from ._types import AttentionOutput, Call, Offsets, WeightsMode, split_weights
from ._validate import check_dropout

__all__ = ["AttentionOutput", "Call", "PackedOutput", "WeightsMode", "attention", "check_scale", "packed_attention"]


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
            Query and key must hold the same number of sequences, key and value the
            same lengths, and none may have holes (offsets and lengths, as
            ``torch.nested.narrow`` makes; call ``.contiguous()`` first).
            On CUDA their offsets should span their values (start at 0, end at the
            last row), as torch's constructors make them: rows outside every
            sequence are not read back to the host to be dropped, so their output
            and gradient rows are left unspecified.
        mask: a :mod:`mha.masks` object (``Causal``, ``KeyPadding``, ``Window``,
            ``Allowed``, ``Blocked``, ``Bias`` or an ``&`` of them), or None.
        scale: multiplies the scores (any finite number); default ``1 / sqrt(Dk)``.
        dropout_p: dropout on ``p`` (pass 0.0 in eval). The returned weights are
            the probabilities after dropout, as in ``nn.MultiheadAttention``.
        weights: None, ``"mean"`` for ``(N, L, S)`` averaged over the Hq heads
            (never materialising per-head weights), or ``"per_head"`` for
            ``(N, Hq, L, S)``.
        return_lse: also return the log-sum-exp ``(N, Hq, L)``.
        backend: force ``"sdpa"``, ``"triton"``, ``"tiled"`` or ``"reference"``;
            default: the one forced by :func:`mha.use_backend`, else the first that
            supports the call. A forced backend that cannot serve the call raises
            ``NotImplementedError`` listing every reason.
        cache: an :class:`mha.KVCache`. ``key``/``value`` ``(N, Hkv, T, D)`` are then
            the new tokens, written into the cache after each sequence's
            ``lengths[n]`` cached ones; query ``t`` ``(N, Hq, T, Dk)`` sits at position
            ``lengths[n] + t`` and attends the cache up to and including itself.
            ``mask`` applies over cache positions (``Window`` counts from the query's
            position; tensors span ``(N, Hq, T, max_length)``). A static
            (cross-attention) cache is overwritten by ``key``/``value`` and attended
            without causality; ``key=value=None`` attends what it holds. Weights and
            lse span the cache's written positions ``S <= max_length``. A call that
            raises (a forced backend that cannot serve it included) leaves the cache
            as it was.
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
        padding = cache.key_padding_mask if isinstance(cache, KVCache) else None
        return plan_cached(
            query, key, value, mask, cache, new_lengths, padding,
            scale=scale, dropout_p=dropout_p, weights=weights, return_lse=return_lse, backend=backend,
        ).run()
    if new_lengths is not None or key is None or value is None:
        raise ValueError(
            "attention: new_lengths=, key=None and value=None need cache=; pass key and value "
            "(N, Hkv, S, D) or a KVCache"
        )
    # type() first: a plain tensor skips the jagged-subclass check.
    if (type(query) is not Tensor and _varlen.is_jagged(query)) or (isinstance(query, Tensor) and query.is_nested):
        return _attention_jagged(query, key, value, mask, scale, dropout_p, weights, return_lse, backend)
    call = _validate_call(query, key, value, mask, scale, dropout_p, weights, return_lse)
    if mask is not None:
        check_mask_devices(mask, query.device)
    return _dispatch.select_backend(call, backend).forward(call)


class CachedCall(NamedTuple):
    """A cached call checked and planned, nothing written yet: its ``step`` on the cache,
    the ``call`` over the cache's positions (views that read the new tokens once the
    step is written) and the ``backend`` that serves it."""

    step: CachedStep
    call: Call
    backend: Backend

    def run(self) -> AttentionOutput:
        """Write the step into the cache, then attend."""
        self.step.write()
        return self.backend.forward(self.call)


def plan_cached(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    mask: _masks.Mask | None,
    cache: KVCache,
    new_lengths: Tensor | None,
    padding: Tensor | None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    weights: WeightsMode | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> CachedCall:
    """:func:`attention` with ``cache``, checked and planned without writing: everything
    the call could reject raises here (its backend refusing it included), before the
    cache changes. Query ``(N, Hq, T, Dk)``, the new tokens ``key``/``value`` ``(N, Hkv,
    T, D)`` (None on a filled static cache); ``padding``: a static cache's key padding
    mask ``(N, max_length)`` for this call, which a fill stores (the module passes its
    memory's; :func:`attention` the cache's own)."""
    _validate_options(dropout_p, weights)
    if backend is not None:
        _dispatch.check_backend_name(backend)
    step = cached_step(cache, query, key, value, mask, new_lengths, backend, padding)
    call = _validate_call(query, step.key, step.value, step.mask, scale, dropout_p, weights, return_lse)
    if step.mask is not None:
        check_mask_devices(step.mask, query.device)
    # Dispatch sees the views as the write leaves them: requiring grad if the new tokens do.
    checked = call._replace(key=step.key.detach().requires_grad_()) if step.gains_grad else call
    return CachedCall(step, call, _dispatch.select_backend(checked, step.backend))


def checked_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: _masks.Mask | None, dropout_p: float, weights: WeightsMode | None
) -> AttentionOutput:
    """:func:`attention` with the default scale ``1 / sqrt(Dk)``, for heads the caller built
    from inputs it has checked: the module's front end validates the shapes, dtypes,
    devices and dropout, and builds ``mask`` for ``(N, H, L, S)`` on the query's device.
    The same mask plan and dispatch, without checking everything a second time (that
    costs tens of microseconds a call). query ``(N, H, L, Dk)``, key ``(N, H, S, Dk)``,
    value ``(N, H, S, Dv)``."""
    _, _, L, Dk = query.shape
    S = key.shape[2]
    scale = 1.0 / math.sqrt(Dk) if Dk > 0 else 1.0
    call = Call(query, key, value, mask, plan_mask(mask, L, S, query.dtype), scale, dropout_p, weights, False)
    return _dispatch.select_backend(call).forward(call)


class PackedOutput(NamedTuple):
    """What :func:`packed_attention` returns: output ``(Tq, Hq, Dv)`` packed like the
    queries; per-sequence weights ``(L_n, S_n)`` (mean) or ``(Hq, L_n, S_n)`` (per
    head), or None; per-sequence lse ``(Hq, L_n)``, or None."""

    output: Tensor
    weights: list[Tensor] | None
    lse: list[Tensor] | None


def packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_offsets: Sequence[int] | Offsets,
    k_offsets: Sequence[int] | Offsets,
    mask: _masks.Mask | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    weights: WeightsMode | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> PackedOutput:
    """Attention over a packed variable-length batch, each sequence on its own.

    Offsets may start past row 0 and end before the last row. Where the host list is
    at hand, the rows outside every sequence are dropped from the output; where only a
    device tensor is (no offsets are read back from the GPU), the output may keep
    one row per query row, and those rows of the output and of the input gradients
    are unspecified.

    Args:
        query: ``(Tq, Hq, Dk)``, sequence ``n`` at rows ``q_offsets[n]:q_offsets[n+1]``.
        key: ``(Tk, Hkv, Dk)``, sequence ``n`` at rows ``k_offsets[n]:k_offsets[n+1]``.
        value: ``(Tk, Hkv, Dv)``.
        q_offsets, k_offsets: ``(N + 1,)`` offsets (a list or :class:`~mha._types.Offsets`).
        mask: None or a band mask (``Causal``/``Window``, aligned per sequence).
        scale, dropout_p, weights, return_lse, backend: as for :func:`attention`;
            the backend is chosen by dispatch like any call's.
    """
    q_offsets = q_offsets if isinstance(q_offsets, Offsets) else Offsets(q_offsets)
    k_offsets = k_offsets if isinstance(k_offsets, Offsets) else Offsets(k_offsets)
    _validate_tensors(query, key, value, packed=True)
    q_offsets.check("query", query.shape[0])
    k_offsets.check("key", key.shape[0])
    if q_offsets.on_host:  # keep only the sequences' rows
        q0, q1 = q_offsets.host()[0], q_offsets.host()[-1]
        if q0 != 0 or q1 != query.shape[0]:
            query, q_offsets = query[q0:q1], q_offsets.shifted(q0)
    if k_offsets.on_host:
        k0, k1 = k_offsets.host()[0], k_offsets.host()[-1]
        if k0 != 0 or k1 != key.shape[0]:
            key, value, k_offsets = key[k0:k1], value[k0:k1], k_offsets.shifted(k0)
    call = _validate_varlen_call(
        query, key, value, q_offsets, k_offsets, mask, scale, dropout_p, weights, return_lse
    )
    result = _dispatch.select_backend(call, backend).forward(call)
    ws = None if result.weights is None else split_weights(result.weights, call)
    lses = None
    if result.lse is not None:
        lses = [result.lse[:, a:b] for a, b in itertools.pairwise(q_offsets.host())]
    return PackedOutput(result.output, ws, lses)


def _attention_jagged(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: _masks.Mask | None,
    scale: float | None,
    dropout_p: float,
    weights: WeightsMode | None,
    return_lse: bool,
    backend: str | None,
) -> AttentionOutput:
    """:func:`attention` for jagged ``(N, H, j, D)`` nested tensors: the packed values
    ``(T, H, D)`` and the offsets go to dispatch as one varlen call."""
    q, q_offsets = _varlen.unpack_heads(query, "query")
    k, k_offsets = (q, q_offsets) if key is query else _varlen.unpack_heads(key, "key")
    v, v_offsets = (k, k_offsets) if value is key else (q, q_offsets) if value is query else _varlen.unpack_heads(
        value, "value"
    )
    q_offsets.check("query", q.shape[0])
    k_offsets.check("key", k.shape[0])
    _varlen.check_same_sequences(q_offsets, k_offsets, v_offsets)
    call = _validate_varlen_call(q, k, v, q_offsets, k_offsets, mask, scale, dropout_p, weights, return_lse)
    result = _dispatch.select_backend(call, backend).forward(call)
    output = _varlen.jagged_like(result.output, query)
    lse = None
    if result.lse is not None:
        packed_lse = result.lse
        if packed_lse.shape[1] == q.shape[0]:  # a row per query row: keep the sequences' rows
            first, last = q_offsets.host()[0], q_offsets.host()[-1]
            packed_lse = packed_lse[:, first:last]
        lse = _varlen.jagged_like(packed_lse.transpose(0, 1), query)
    nested = None if result.weights is None else _varlen.nested_weights(split_weights(result.weights, call))
    return AttentionOutput(output, nested, lse)


def _validate_varlen_call(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_offsets: Offsets,
    k_offsets: Offsets,
    mask: _masks.Mask | None,
    scale: float | None,
    dropout_p: float,
    weights: WeightsMode | None,
    return_lse: bool,
) -> Call:
    """Checks packed ``(T, H, D)`` tensors as :func:`attention` checks ``(1, H, T, D)`` ones."""
    _validate_tensors(query, key, value, packed=True)
    if key.shape[0] != value.shape[0]:
        raise ValueError(
            f"attention: packed key (Tk, Hkv, Dk) = {_shape(key)} and value (Tk, Hkv, Dv) = {_shape(value)} "
            "must hold the same tokens Tk"
        )
    if q_offsets.count != k_offsets.count:
        raise ValueError(
            f"attention: query holds {q_offsets.count} sequences (lengths {q_offsets.lengths()}) but key "
            f"holds {k_offsets.count} (lengths {k_offsets.lengths()}); each query sequence attends the "
            "key sequence of the same index"
        )
    (Tq, Hq, Dk), (Tk, Hkv, Dk2), (Tv, Hv, Dv) = _sizes(query, key, value)
    scale = _validate_sizes((1, Hq, Tq, Dk), (1, Hkv, Tk, Dk2), (1, Hv, Tv, Dv), None, scale, dropout_p, weights)
    return Call(
        query, key, value, mask, plan_varlen_mask(mask), scale, float(dropout_p), weights, bool(return_lse),
        q_offsets, k_offsets,
    )


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _sizes(*tensors: Tensor) -> list[tuple[int, ...]]:
    """Each tensor's ``shape`` as ints. Under ``torch.jit.trace`` sizes are traced tensors;
    the checks and the default scale specialise the trace to the traced shapes (as the head
    split before them does), so they are read as constants, without a TracerWarning each."""
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return [tuple(int(s) for s in t.shape) for t in tensors]
    return [tuple(t.shape) for t in tensors]


def _validate_call(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: _masks.Mask | None,
    scale: float | None,
    dropout_p: float,
    weights: WeightsMode | None,
    return_lse: bool,
) -> Call:
    """Checks the arguments of :func:`attention` and returns them as one :class:`Call`."""
    _validate_tensors(query, key, value, packed=False)
    q_size, k_size, v_size = _sizes(query, key, value)
    scale = _validate_sizes(q_size, k_size, v_size, mask, scale, dropout_p, weights)
    return Call(
        query, key, value, mask, plan_mask(mask, q_size[2], k_size[2], query.dtype), scale, float(dropout_p), weights,
        bool(return_lse),
    )


def _validate_tensors(query: Tensor, key: Tensor, value: Tensor, packed: bool) -> None:
    """Tensors of 4 dims ``(N, H, L, D)``, or 3 ``(T, H, D)`` when ``packed``, floating point,
    of one dtype and on one device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:  # a nested query takes the variable-length path before this check
            raise TypeError(
                f"attention: {name} is a nested tensor but query is not; pass query, key and value all as "
                "jagged nested tensors (N, H, j, D) or all as dense tensors"
            )
        if t.layout != torch.strided:
            raise TypeError(f"attention: {name} is a {t.layout} tensor; attention reads dense tensors: pass {name}.to_dense()")
        if packed and t.dim() != 3:
            raise ValueError(
                f"attention: packed {name} must be 3-D (T, H, D), tokens first, got {t.dim()}-D {_shape(t)}"
            )
        if not packed and t.dim() != 4:
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


def _validate_options(dropout_p: float, weights: WeightsMode | None) -> None:
    """Checks ``weights`` and ``dropout_p`` of :func:`attention`."""
    if weights not in (None, "mean", "per_head"):
        raise ValueError(f"attention: weights must be None, 'mean' or 'per_head', got {weights!r}")
    check_dropout(dropout_p, "dropout_p", "attention: ")


def _validate_sizes(
    q_size: tuple[int, ...],
    k_size: tuple[int, ...],
    v_size: tuple[int, ...],
    mask: _masks.Mask | None,
    scale: float | None,
    dropout_p: float,
    weights: WeightsMode | None,
) -> float:
    """Checks query ``(N, Hq, L, Dk)``, key ``(N, Hkv, S, Dk)`` and value ``(N, Hkv, S, Dv)``
    sizes (a packed call's as ``(1, H, T, D)``), the mask, weights and dropout; returns the
    scale, by default ``1 / sqrt(Dk)``."""
    (N, Hq, L, Dk), (Nk, Hkv, S, Dk2), (Nv, Hv, Sv, _) = q_size, k_size, v_size
    if Nk != N or Nv != N:
        raise ValueError(
            f"attention: batch sizes differ: query (N, Hq, L, Dk) = {q_size}, "
            f"key {k_size}, value {v_size}; all three need the same N"
        )
    if Dk2 != Dk:
        raise ValueError(
            f"attention: key (N, Hkv, S, Dk) = {k_size} must have the query's Dk = {Dk} (query {q_size})"
        )
    if Hv != Hkv or Sv != S:
        raise ValueError(
            f"attention: value (N, Hkv, S, Dv) = {v_size} must match key {k_size} in Hkv and S"
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
    _validate_options(dropout_p, weights)
    checked = check_scale(scale, "attention")
    if checked is None:
        return 1.0 / math.sqrt(Dk) if Dk > 0 else 1.0
    return checked


def check_scale(scale: float | None, fn: str) -> float | None:
    """``scale`` as a float, None kept: TypeError unless a number, ValueError unless finite
    (an infinite or NaN scale turns every score, and so every output, into NaN)."""
    if scale is None:
        return None
    if isinstance(scale, (bool, str, bytes)):  # float() would read True as 1.0 and "0.5" as 0.5
        raise TypeError(f"{fn}: scale must be a number or None, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: scale must be a number or None, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(
            f"{fn}: scale must be finite, got {value}; it multiplies every score (None: 1 / sqrt(Dk))"
        )
    return value
