"""``context_parallel``: run every ``mha.MultiheadAttention`` call as ring attention.

Under the context manager a module's ``query``/``key``/``value`` (and
``key_padding_mask``) are this rank's shards of the sequence dimension. The
module projects them as usual and hands its heads to
:func:`context_parallel_attention`, which reads the torch-style masks with
their meaning on the whole sequence and runs :func:`ring_attention`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._mask_analysis import is_standard_causal
from ..masks import Causal, KeyPadding, Mask
from ._layout import Layout, validate_layout
from ._ring import ring_attention
from ._shard import unshard


@dataclass(frozen=True)
class ContextParallel:
    """The process group and layout that ``mha.MultiheadAttention`` calls shard over."""

    group: Any
    layout: Layout


# The active context managers, innermost last. A plain list rather than a ContextVar:
# torch.compile traces a list lookup, not ContextVar.get.
_ACTIVE: list[ContextParallel] = []


@contextmanager
def context_parallel(group: Any = None, layout: Layout = "contiguous") -> Iterator[ContextParallel]:
    """Run every ``mha.MultiheadAttention`` call inside as ring attention over ``group``.

    Inside, each module call takes ``query``/``key``/``value`` as this rank's
    shards of the sequence dimension (``L``/``S`` of ``(L, N, E)``, or of
    ``(N, L, E)`` with ``batch_first``), cut by :func:`mha.distributed.shard` with
    ``layout``, and returns this rank's shard of the output. ``is_causal=True``, a
    causal ``attn_mask`` (the standard upper-triangular one, built for the local
    shard as a one-device model builds it) and a right-padding
    ``key_padding_mask`` (this rank's ``(N, S_r)`` columns) keep their meaning on
    the whole sequence. ``need_weights=True`` raises: pass ``need_weights=False``.
    Inside, torch's fused transformer fast path is off (it would skip
    ``self_attn``); it is restored on exit.

    Example::

        >>> import os, torch, torch.distributed as dist, mha
        >>> if not dist.is_initialized():  # torchrun sets these; alone: one rank
        ...     for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        ...         _ = os.environ.setdefault(name, value)
        ...     dist.init_process_group("gloo")
        >>> torch.manual_seed(0)  # the same whole tensors and weights on every rank
        <torch._C.Generator object at ...>
        >>> attn = mha.MultiheadAttention(64, 4)
        >>> x = torch.randn(256, 2, 64)                                   # (L, N, E)
        >>> with mha.distributed.context_parallel(layout="zigzag"):
        ...     x_r = mha.distributed.shard(x, 0, layout="zigzag")       # (L_r, N, E)
        ...     y_r, _ = attn(x_r, x_r, x_r, is_causal=True, need_weights=False)
        >>> y = mha.distributed.unshard(y_r, 0, layout="zigzag")          # (L, N, E)
        >>> torch.allclose(y, attn(x, x, x, is_causal=True)[0], atol=1e-5)
        True
    """
    state = ContextParallel(group, validate_layout(layout))
    _ACTIVE.append(state)
    # torch's encoder layers, in eval under no_grad, run a fused kernel instead of
    # calling self_attn; that kernel would attend within the local shard only.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield state
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        _ACTIVE.remove(state)


def active_context() -> ContextParallel | None:
    """The innermost active :func:`context_parallel`, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def refuse_nested() -> None:
    """Raise NotImplementedError when a nested (jagged) batch reaches a module under
    :func:`context_parallel`: its sequences are not split as shards of one sequence."""
    if active_context() is not None:
        raise NotImplementedError(
            "context_parallel: nested (jagged) inputs are not supported by mha.MultiheadAttention under "
            "context parallelism; pack the sequences along the sequence dim and call "
            "mha.distributed.ring_attention(q, k, v, offsets=...) on the projected heads"
        )


def _global_mask(
    state: ContextParallel, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool
) -> Mask | None:
    parts: list[Mask] = []
    if attn_mask is not None:
        square = attn_mask.dim() == 2 and attn_mask.shape[0] == attn_mask.shape[1]
        if not (square and is_standard_causal(attn_mask)):
            raise NotImplementedError(
                f"context_parallel: attn_mask of shape {tuple(attn_mask.shape)} is not the standard causal "
                "(L_r, L_r) mask; under context parallelism attn_mask may only be causal (it then means "
                "causal over the whole sequence); pass is_causal=True instead, or run without context_parallel"
            )
        parts.append(Causal())
    elif is_causal:
        parts.append(Causal())
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            # torch's transformer layers turn a boolean padding mask into 0 / -inf floats.
            padding = torch.isneginf(key_padding_mask)
            if not torch.equal(key_padding_mask.masked_fill(padding, 0.0), torch.zeros_like(key_padding_mask)):
                raise NotImplementedError(
                    "context_parallel: a float key_padding_mask must hold only 0 (key) and -inf (padding) "
                    "under context parallelism: other values are biases, which ring attention does not take"
                )
            key_padding_mask = padding
        whole = unshard(key_padding_mask, 1, group=state.group, layout=state.layout)
        try:
            parts.append(KeyPadding.from_padding_mask(whole))
        except ValueError:
            raise ValueError(
                "context_parallel: key_padding_mask, gathered over the ranks to (N, S) = "
                f"{tuple(whole.shape)}, is not right padding (each row real keys, then only padding); "
                "under context parallelism only right padding of the whole sequence is supported"
            ) from None
    return functools.reduce(operator.and_, parts) if parts else None


def context_parallel_attention(
    state: ContextParallel,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    need_weights: bool,
    dropout_p: float,
    appended_keys: bool,
) -> Tensor:
    """The attention of one ``mha.MultiheadAttention`` call under :func:`context_parallel`.

    Args:
        state: the active :class:`ContextParallel`.
        query: projected heads of this rank's shard, ``(N, H, L_r, Dh)``.
        key: ``(N, H, S_r, Dh)``.
        value: ``(N, H, S_r, Dh)``.
        key_padding_mask: this rank's columns ``(N, S_r)`` of a right-padding mask of
            the whole ``(N, S)``: boolean (True = padding) or float (-inf = padding, else 0).
        attn_mask: None or the standard causal mask (``(L_r, L_r)``, True or ``-inf``
            above the diagonal); it means causal over the whole sequence.
        is_causal: causal over the whole sequence.
        need_weights: must be False.
        dropout_p: must be 0.
        appended_keys: whether the module appends keys (``add_bias_kv``,
            ``add_zero_attn``); not supported across ranks.

    Returns:
        This rank's output heads ``(N, H, L_r, Dh)``.
    """
    if need_weights:
        raise NotImplementedError(
            "context_parallel: need_weights=True is not supported, the (L, S) weights span every rank's keys; "
            "pass need_weights=False inside context_parallel"
        )
    if dropout_p > 0:
        raise NotImplementedError(
            f"context_parallel: attention dropout ({dropout_p}) is not supported under context parallelism; "
            "call module.eval() or build the module with dropout=0.0"
        )
    if appended_keys:
        raise NotImplementedError(
            "context_parallel: add_bias_kv and add_zero_attn append keys to one sequence, which is split "
            "over the ranks here; they are not supported under context parallelism"
        )
    mask = _global_mask(state, key_padding_mask, attn_mask, is_causal)
    return ring_attention(query, key, value, mask, group=state.group, layout=state.layout).output
