"""Variable-length ("varlen") batches: nested tensors to packed tokens and offsets, and back.

Sequences are described cu_seqlens-style: sequence ``n`` owns rows
``offsets[n]:offsets[n + 1]`` of a packed ``(T, H, D)`` tensor. The core turns
jagged inputs into packed tensors and :class:`~mha._types.Offsets` here, hands them
to dispatch as one varlen call, and turns the packed output back into a jagged
tensor here. Torch's nested layout keeps its name, jagged, where this module
speaks of torch's tensors.

The packed values, offsets and cached lengths are read through the nested tensor's
attributes (``_values``, ``_offsets``, ...) and the output is built with torch's
``NestedTensor`` constructor when no gradient flows: the public accessors cost tens
of microseconds each through the nested tensor's Python ``__torch_function__``,
which on a GPU is most of a call's host time. Where a gradient must flow, the
autograd-aware public paths are used.
"""

from __future__ import annotations

import itertools
import warnings
from typing import cast

import torch
from torch import Tensor
from torch.nested._internal.nested_tensor import (
    NestedTensor,
    nested_view_from_values_offsets_lengths,
)

from ._types import Offsets

__all__ = [
    "Offsets",
    "check_same_sequences",
    "is_jagged",
    "jagged_from_packed",
    "jagged_like",
    "nested_packed",
    "nested_weights",
    "unpack_heads",
    "with_appended_keys",
]


def is_jagged(t: object) -> bool:
    """Whether ``t`` is a jagged nested tensor (cheaply: no ``__torch_function__``)."""
    return isinstance(t, NestedTensor)


def _grad_flows(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _nt(t: Tensor) -> NestedTensor:
    """``t`` typed as the jagged nested tensor it is (checked by the callers)."""
    return cast(NestedTensor, t)


def _reject_holes(t: NestedTensor, name: str) -> None:
    if t._lengths is not None:
        raise ValueError(
            f"{name} is a jagged tensor with holes (offsets and lengths, as torch.nested.narrow makes, "
            f"lengths {t._lengths.tolist()}); mha reads sequences as packed rows: pass {name}.contiguous()"
        )


def unpack_heads(t: Tensor, name: str) -> tuple[Tensor, Offsets]:
    """A jagged ``(N, H, j, D)`` tensor -> packed values ``(T, H, D)`` and its offsets."""
    # isinstance and the private fields, not t.is_nested, t.layout, t.dim(): each of those
    # goes through the nested tensor's __torch_function__, tens of microseconds.
    if not (isinstance(t, NestedTensor) and t._values.dim() == 3 and t._ragged_idx == 2):
        raise ValueError(
            f"attention: with jagged inputs, {name} must be a jagged nested tensor (N, H, j, D), "
            "e.g. torch.nested.nested_tensor(list_of_(L_n, H, D), layout=torch.jagged).transpose(1, 2)"
        )
    nt = _nt(t)
    _reject_holes(nt, name)
    # values of an (N, H, j, D) jagged tensor are (H, T, D): packed tokens second.
    values = nt.values() if _grad_flows(nt) else nt._values
    return values.transpose(0, 1), _jagged_offsets(nt)


def check_same_sequences(q_offsets: Offsets, k_offsets: Offsets, v_offsets: Offsets) -> None:
    """Query and key hold the same number of sequences, key and value the same offsets
    (the call reads both at the key's).

    Offsets tensors are compared only when they are distinct objects (a read on the host)."""
    if q_offsets.count != k_offsets.count or k_offsets.count != v_offsets.count:
        raise ValueError(
            f"attention: query, key and value must hold the same number of sequences N, got "
            f"query {q_offsets.count} (lengths {q_offsets.lengths()}), key {k_offsets.count} "
            f"(lengths {k_offsets.lengths()}), value {v_offsets.count} (lengths {v_offsets.lengths()})"
        )
    if not k_offsets.same_as(v_offsets) and k_offsets.lengths() != v_offsets.lengths():
        raise ValueError(
            f"attention: key and value must have the same sequence lengths S_n, got key "
            f"{k_offsets.lengths()} and value {v_offsets.lengths()}"
        )
    if not k_offsets.same_as(v_offsets) and k_offsets.host() != v_offsets.host():
        raise ValueError(
            f"attention: key and value must hold their sequences at the same rows, got key offsets "
            f"{k_offsets.host()} and value offsets {v_offsets.host()}; build value on the key's offsets, "
            "e.g. torch.nested.nested_tensor_from_jagged(value.values(), key.offsets())"
        )


def nested_packed(t: Tensor) -> tuple[Tensor, Offsets]:
    """``(N, j, ...)`` nested tensor (jagged or strided) -> packed values ``(T, ...)`` and offsets.

    A jagged tensor's offsets stay on its device, with the longest length it caches."""
    if t.layout == torch.jagged:
        nt = _nt(t)
        if nt._ragged_idx != 1:
            raise ValueError(
                f"nested tensor of shape {tuple(t.shape)} must be ragged in dimension 1 (N, j, E)"
            )
        _reject_holes(nt, "nested tensor")
        return nt.values(), _jagged_offsets(nt)
    parts = t.unbind()
    return torch.cat(parts, dim=0), Offsets(list(itertools.accumulate((p.shape[0] for p in parts), initial=0)))


def with_appended_keys(
    key: Tensor, value: Tensor, offsets: Offsets, keys: Tensor, values: Tensor
) -> tuple[Tensor, Tensor, Offsets]:
    """Packed ``key`` ``(T, H, Dk)`` and ``value`` ``(T, H, Dv)`` with ``A`` tokens appended
    at the end of every sequence, ``keys`` ``(A, H, Dk)`` and ``values`` ``(A, H, Dv)`` in
    order (``add_bias_kv``'s and ``add_zero_attn``'s), and the offsets of the longer
    sequences. Device ops only (nothing is read back), differentiable in every input.

    Row ``r`` of sequence ``n`` moves to ``r + A * n``, which is ``r`` plus ``A`` times
    the number of sequences ending at or before it; token ``a`` of sequence ``n`` goes to
    ``offsets[n + 1] + A * n + a``."""
    A, T = keys.shape[0], key.shape[0]
    ends = offsets.on(key.device).long()
    N = ends.shape[0] - 1
    rows = torch.arange(T, device=key.device)
    moved = rows + A * torch.searchsorted(ends[1:], rows, right=True)
    first = ends[1:] + A * torch.arange(N, device=key.device)
    appended = (first[:, None] + torch.arange(A, device=key.device)).flatten()
    out = []
    for packed, tokens in ((key, keys), (value, values)):
        grown = packed.new_zeros((T + A * N, *packed.shape[1:]))
        grown = grown.index_copy(0, moved, packed).index_copy(0, appended, tokens.repeat(N, 1, 1))
        out.append(grown)
    return out[0], out[1], offsets.appended(A)


def _jagged_offsets(t: NestedTensor) -> Offsets:
    return Offsets(device=t._offsets, longest=getattr(t, "_maybe_max_seqlen", None))


def jagged_like(values: Tensor, like: Tensor) -> Tensor:
    """Packed ``values`` ``(T, ...)``, tokens first, as a jagged tensor ragged where ``like``
    is: ``(N, j, ...)``, or ``(N, H, j, D)`` for a ``like`` of that layout (built in one
    step, as a transpose of a jagged tensor costs as much again).

    Where ``values`` has a row for each of ``like``'s, it reuses ``like``'s offsets: it
    shares ``like``'s ragged size, so ``output + like`` (a residual) works, and its
    cached lengths, so it costs no synchronization. Where ``like``'s offsets leave rows
    out (they start past 0 or end early) and ``values`` holds only the sequences' rows,
    the offsets are shifted to start at 0."""
    like = _nt(like)
    offsets = like._offsets
    token_dim = like._ragged_idx - 1
    if values.shape[0] != like._values.shape[token_dim]:
        offsets = offsets - offsets[0]
    values = values.movedim(0, token_dim)
    if _grad_flows(values):
        # The autograd-aware view that torch.nested.nested_tensor_from_jagged makes,
        # without its one-time "is_fx_tracing" log line.
        return nested_view_from_values_offsets_lengths(
            values,
            offsets,
            None,
            ragged_idx=like._ragged_idx,
            min_seqlen=getattr(like, "_maybe_min_seqlen", None),
            max_seqlen=getattr(like, "_maybe_max_seqlen", None),
        )
    cache = like._metadata_cache
    return NestedTensor(values, offsets, _ragged_idx=like._ragged_idx, _metadata_cache=dict(cache) if cache else {})


def nested_weights(weights: list[Tensor]) -> Tensor:
    """Per-sequence weights ``(L_n, S_n)`` or ``(H, L_n, S_n)`` as one strided nested tensor.

    Two ragged dims need torch's strided layout; its "prototype stage, use
    layout=torch.jagged" warning is silenced here, as the jagged layout cannot hold them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        return torch.nested.as_nested_tensor(weights)


def jagged_from_packed(values: Tensor, offsets: Offsets, like: Tensor) -> Tensor:
    """Packed values (from :func:`nested_packed` of ``like``) back to a nested tensor with the layout of ``like``."""
    if like.layout == torch.jagged:
        return jagged_like(values, like)
    lengths = [b - a for a, b in itertools.pairwise(offsets.host())]
    return torch.nested.as_nested_tensor(list(values.split(lengths)))
