"""The torch-compatible front end: ``nn.MultiheadAttention``'s arguments -> one :class:`ForwardPlan`.

:func:`plan_forward` is the one place where torch-style arguments are read:
validation, the unbatched reshape, the masks' values (read once, here), the
pitfall warnings (returned as text, not warned), right-padding and causal
recognition, the keys appended by ``add_bias_kv`` / ``add_zero_attn``, and the
conversion to mask objects. The module runs the plan's route; ``mha.explain``
reports it.

Routes:

* ``"dense"``: heads ``(N, H, L, S + extra)`` through :func:`mha.attention` with
  the plan's mask;
* ``"one_key"``: self-attention over one position (``L = S = 1``), without dropout or
  autograd: softmax over one score is exactly 1, so the output is the value; no
  scores, no query or key projection, no backend (``out_proj(v)``);
* ``"key_lengths"``: right-padded keys, where dropping them before the key and
  value projections pays (:func:`key_lengths_may_pay`, :func:`key_lengths_pay`);
  sequences are packed and attended at their own lengths, with the plan's band mask;
* ``"nested"``: nested (variable-length) inputs, attended per sequence (the keys of
  ``add_bias_kv``/``add_zero_attn`` appended to each);
* ``"context_parallel"``: inside :func:`mha.distributed.context_parallel`, the
  inputs are this rank's shards of the sequence and the torch-style masks keep
  their meaning on the whole sequence; :mod:`mha.distributed` reads them.

Dropout: the dense route draws the same random numbers as
``torch.nn.MultiheadAttention`` (the same ``F.dropout`` on the same
``(N, H, L, S)`` probabilities, or the same SDPA call), except with
``is_causal=True`` and no ``attn_mask`` (torch raises there). The key-lengths and
nested routes attend sequences separately and draw differently (with the same
rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ._core import WeightsMode
from ._mask_analysis import (
    AttnMaskSummary,
    KeyPaddingSummary,
    summarize_attn_mask,
    summarize_key_padding_mask,
    values_readable,
)
from ._torch_masks import CAUSAL, masks_from_torch, pitfall_messages
from ._types import device_type, in_functorch_transform
from ._validate import autocast_enabled, validate_forward, validate_nested_forward
from .distributed._context import ContextParallel, active_context, refuse_nested
from .masks import Mask, causal_blocked

Route = Literal["dense", "one_key", "key_lengths", "nested", "context_parallel"]


class ModuleConfig(Protocol):
    """What the front end reads from a module: its sizes, options and parameters."""

    embed_dim: int
    kdim: int
    vdim: int
    num_heads: int
    batch_first: bool
    dropout: float
    add_zero_attn: bool
    bias_k: Tensor | None

    @property
    def out_proj(self) -> torch.nn.Linear: ...


@dataclass(frozen=True)
class KeyLengths:
    """Right padding: sequence ``n`` has ``lengths[n]`` real keys, then padding. ``lengths``
    ``(N,)`` on the mask's device and ``host``, the same as a tuple."""

    lengths: Tensor
    host: tuple[int, ...]


@dataclass(frozen=True)
class ShardedMasks:
    """The ``"context_parallel"`` route's masks, as torch-style arguments at this rank's
    shard sizes (``key_padding_mask`` ``(N, S_r)``, ``attn_mask`` ``(L_r, S_r)``): their
    meaning on the whole sequence is :mod:`mha.distributed`'s to read."""

    context: ContextParallel
    key_padding_mask: Tensor | None
    attn_mask: Tensor | None
    is_causal: bool


class ForwardPlan(NamedTuple):
    """One planned forward call: immutable, and a NamedTuple, as it is built on every
    call (a frozen dataclass costs a microsecond more).

    Attributes:
        route: ``"dense"``, ``"key_lengths"`` or ``"nested"`` (see the module docstring).
        query, key, value: the inputs, batched: ``(L, N, E)``, ``(S, N, kdim)``,
            ``(S, N, D)`` (or ``(N, L, E)``... when ``batch_first``); nested ``(N, j, E)``.
        batched: False when the inputs came unbatched (``(L, E)``); outputs lose N again.
        batch_first: the layout of ``query``, ``key``, ``value`` here.
        N, L, S: batch, queries, keys (before any appended key; 0 for nested inputs).
        extra_keys: keys appended after projection: ``bias_k``/``bias_v`` then a zero key.
        mask: for ``"dense"``, over ``(N, H, L, S + extra_keys)``; for ``"key_lengths"``
            and ``"nested"``, a band mask aligned per sequence, or None.
        key_lengths: the right padding, for ``"key_lengths"``.
        weights: ``"mean"``, ``"per_head"`` or None (``need_weights=False``).
        dropout_p: dropout on the attention weights (0 in eval).
        warnings: messages the call deserves (the module warns them).
        values_read: whether mask values were read (not under ``torch.compile`` or
            ``make_fx``, nor on meta or fake tensors); without, masks apply at their
            broadcast shapes.
        sharded: for ``"context_parallel"``, the context and the torch-style masks.
    """

    route: Route
    query: Tensor
    key: Tensor
    value: Tensor
    batched: bool
    batch_first: bool
    N: int
    L: int
    S: int
    extra_keys: int
    mask: Mask | None
    key_lengths: KeyLengths | None
    weights: WeightsMode | None
    dropout_p: float
    warnings: tuple[str, ...]
    values_read: bool
    sharded: ShardedMasks | None = None


def plan_forward(
    config: ModuleConfig,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    need_weights: bool,
    average_attn_weights: bool,
    training: bool,
) -> ForwardPlan:
    """Validate a call of ``nn.MultiheadAttention.forward``'s arguments and plan it.

    Raises ``TypeError``/``ValueError`` for invalid calls and ``NotImplementedError``
    for valid ones that are not supported. Reads mask values once (see
    :mod:`mha._mask_analysis`), never activations.
    """
    weights: WeightsMode | None = ("mean" if average_attn_weights else "per_head") if need_weights else None
    dropout_p = float(config.dropout) if training else 0.0
    if isinstance(query, Tensor) and query.is_nested:
        refuse_nested()
        validate_nested_forward(config, query, key, value, key_padding_mask, attn_mask)
        extra_keys = int(config.bias_k is not None) + int(config.add_zero_attn)
        if extra_keys and is_causal:
            raise NotImplementedError(
                "is_causal=True with add_bias_kv or add_zero_attn is not supported with nested inputs: the "
                "appended keys stay open to every query, which a causal band per sequence cannot say; pass "
                "the sequences padded, with is_causal=True"
            )
        return ForwardPlan(
            "nested", query, key, value, True, True, query.size(0), 0, 0, extra_keys,
            CAUSAL if is_causal else None, None, weights, dropout_p, (), False,
        )
    batched, N, L, S = validate_forward(config, query, key, value, key_padding_mask, attn_mask)
    H = config.num_heads
    if not batched:
        # One view per distinct input: a key that is the query (a value that is the key)
        # stays the same tensor, so self-attention is still projected in one GEMM.
        query, key, value = _batch_of_one(query, key, value)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    # A float mask is added to the scores in the heads' dtype: cast it before its values are
    # read, so that a value the cast overflows is refused as +inf and one it rounds to -inf
    # counts as blocked, as the scores will see them.
    if (key_padding_mask is not None and key_padding_mask.dtype != torch.bool) or (
        attn_mask is not None and attn_mask.dtype != torch.bool
    ):
        heads_dtype = _heads_dtype(query)
        key_padding_mask = _in_dtype(key_padding_mask, heads_dtype)
        attn_mask = _in_dtype(attn_mask, heads_dtype)
    batch_first = config.batch_first and batched
    extra_keys = int(config.bias_k is not None) + int(config.add_zero_attn)
    context = active_context()
    if context is not None:
        return ForwardPlan(
            "context_parallel", query, key, value, batched, batch_first, N, L, S, extra_keys,
            None, None, weights, dropout_p, (), False,
            ShardedMasks(context, key_padding_mask, attn_mask, is_causal),
        )

    values_read = values_readable(key_padding_mask, attn_mask)
    padding: KeyPaddingSummary | None = None
    attn: AttnMaskSummary | None = None
    if values_read:
        attn = None if attn_mask is None else summarize_attn_mask(attn_mask)
        if key_padding_mask is not None:
            only_causal = attn_mask is None or (attn is not None and attn.standard_causal)
            lengths_wanted = only_causal and not extra_keys and key_lengths_may_pay(N, L, S)
            padding = summarize_key_padding_mask(key_padding_mask, lengths_wanted)
    messages = pitfall_messages(key_padding_mask, attn_mask, is_causal, padding, attn, extra_keys > 0)

    route: Route = "dense"
    key_lengths: KeyLengths | None = None
    if S == 1 and query is key and key is value and _one_open_key(extra_keys, key_padding_mask, attn_mask, attn, dropout_p):
        route, mask = "one_key", None
    elif extra_keys:
        mask = _mask_with_extra_keys(key_padding_mask, attn_mask, is_causal, extra_keys, N, H, L, S, query.device)
    elif (
        padding is not None
        and padding.lengths is not None
        and padding.lengths_list is not None
        and key_lengths_pay(S, padding.lengths_list)
    ):
        route = "key_lengths"
        causal = is_causal or attn_mask is not None  # only a standard causal attn_mask gets here
        mask = CAUSAL if causal else None
        key_lengths = KeyLengths(padding.lengths, padding.lengths_list)
    else:
        # Weights with dropout: a causal attn_mask stays a tensor so that the probabilities are
        # drawn over the same (N, H, L, S) as torch's.
        same_draws = dropout_p > 0 and weights is not None
        mask = masks_from_torch(key_padding_mask, attn_mask, is_causal, N, H, attn, same_draws)
    return ForwardPlan(
        route, query, key, value, batched, batch_first, N, L, S, extra_keys,
        mask, key_lengths, weights, dropout_p, messages, values_read,
    )


def _heads_dtype(query: Tensor) -> torch.dtype:
    """The dtype of the projected heads: the inputs' own, or autocast's, to which the
    in-projections cast floating-point inputs other than float64 (float32 inputs give
    float16 heads under float16 autocast)."""
    if query.dtype != torch.float64:
        kind = device_type(query.device)
        if autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    return query.dtype


def _in_dtype(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A float ``mask`` in ``dtype``; a boolean one, or None, as it is."""
    if mask is None or mask.dtype == torch.bool or mask.dtype == dtype:
        return mask
    return mask.to(dtype)


def _one_open_key(
    extra_keys: int,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    attn: AttnMaskSummary | None,
    dropout_p: float,
) -> bool:
    """Whether self-attention over one position (``L = S = 1``, query is key is value) has its
    value as output, without scores: no appended keys, no padding mask, no ``attn_mask``
    but the standard causal one (which leaves the one key open), no dropout, and no
    autograd (the query and key projections would get no gradient, where torch gives
    them zeros), and outside ``torch.func`` transforms (its weights are written into a
    fresh tensor, which ``vmap`` does not batch). Only self-attention: a NaN in the
    input then reaches the output through the value, as it does through torch's scores."""
    return (
        not extra_keys
        and key_padding_mask is None
        and (attn_mask is None or (attn is not None and attn.standard_causal))
        and dropout_p == 0.0
        and not torch.is_grad_enabled()
        and not in_functorch_transform()
    )


def _batch_of_one(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unbatched ``(L, E)``, ``(S, kdim)``, ``(S, vdim)`` as ``(L, 1, E)``, ``(S, 1, kdim)``,
    ``(S, 1, vdim)``, inputs that are one tensor still one tensor."""
    q = query.unsqueeze(1)
    k = q if key is query else key.unsqueeze(1)
    v = k if value is key else q if value is query else value.unsqueeze(1)
    return q, k, v


# benchmarks/overhead.py --sections route (CPU, E=256, a third of the keys padded): the
# key-lengths route ran 1.12-1.26x faster than the dense one at N=8, L=S=512 (2M scores),
# 0.89-0.99x at L=S=128..256 and 0.68-0.84x at S=30: below about a million scores its
# packing, index lists and per-length calls cost more than the padded keys. The
# quarter of padding is a floor chosen, not swept.
_KEY_LENGTHS_MIN_SCORES = 1 << 20
_KEY_LENGTHS_MIN_PADDED = 0.25


def key_lengths_may_pay(N: int, L: int, S: int) -> bool:
    """Whether the call is large enough, ``N * L * S`` scores, for dropping right padding
    before projection to pay back the key-lengths route's fixed cost (decided before
    reading the mask). ``L = 0`` has nothing to save."""
    return L > 0 and N * L * S >= _KEY_LENGTHS_MIN_SCORES


def key_lengths_pay(S: int, lengths: tuple[int, ...]) -> bool:
    """Whether enough of the ``S`` keys per sequence are padding, at least a quarter, for
    the key-lengths route to pay (given :func:`key_lengths_may_pay`)."""
    return bool(lengths) and sum(lengths) <= (1.0 - _KEY_LENGTHS_MIN_PADDED) * len(lengths) * S


def _mask_with_extra_keys(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    extra_keys: int,
    N: int,
    H: int,
    L: int,
    S: int,
    device: torch.device,
) -> Mask | None:
    """The dense mask over ``S + extra_keys`` keys: the appended keys are open to every
    query (as torch pads its masks), so causality covers the first ``S`` keys only."""
    if is_causal:
        causal = causal_blocked(L, S, device)
        if attn_mask is None:
            attn_mask = causal
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask | causal
        else:
            attn_mask = attn_mask.masked_fill(causal, float("-inf"))
    pad = (0, extra_keys)
    return masks_from_torch(
        None if key_padding_mask is None else F.pad(key_padding_mask, pad),
        None if attn_mask is None else F.pad(attn_mask, pad),
        False,
        N,
        H,
    )
