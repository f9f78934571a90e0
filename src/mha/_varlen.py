"""Variable-length batches: packed tokens plus offsets, no padding anywhere.

Sequences are described cu_seqlens-style: sequence ``n`` owns rows
``offsets[n]:offsets[n + 1]`` of a packed ``(T, H, D)`` tensor. Each sequence is
attended on its own, so no compute or memory is spent on padding: on the triton
backend the whole batch in one launch of its varlen kernels, elsewhere
sequences of equal lengths together, one call per distinct ``(L_n, S_n)``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import masks as _masks
from ._core import WeightsMode, _validate_call, attention, zeros_in_graph


class PackedOutput(NamedTuple):
    """output ``(Tq, Hq, Dv)`` packed like the queries; per-sequence weights
    ``(L_n, S_n)`` (mean) or ``(Hq, L_n, S_n)`` (per head), or None; per-sequence
    lse ``(Hq, L_n)`` or None."""

    output: Tensor
    weights: list[Tensor] | None
    lse: list[Tensor] | None


class Offsets:
    """Where the sequences of a packed batch lie, cu_seqlens style: sequence ``n``
    owns rows ``offsets[n]:offsets[n + 1]``.

    Held as a host list, an integer tensor on the data's device, or both; either is
    made from the other only when asked for, since reading a CUDA tensor on the host
    waits for the GPU. The varlen kernels need only the tensor and the longest
    length, so a jagged batch whose nested tensors know their longest sequence runs
    without a single host-device synchronization."""

    def __init__(self, host: Sequence[int] | None = None, device: Tensor | None = None, longest: int | None = None):
        self._host = None if host is None else list(host)
        self._device = device
        self._longest = longest

    def __len__(self) -> int:
        return len(self._host) if self._host is not None else self._device.shape[0]

    @property
    def on_host(self) -> bool:
        """Whether the list is at hand (reading it costs nothing)."""
        return self._host is not None

    def host(self) -> list[int]:
        if self._host is None:
            self._host = self._device.tolist()
        return self._host

    def on(self, device: torch.device) -> Tensor:
        """The offsets as an int32 tensor on ``device``."""
        if self._device is None:
            self._device = torch.tensor(self._host, dtype=torch.int32, device=device)
        return self._device.to(device=device, dtype=torch.int32)

    def longest(self) -> int:
        """The longest sequence's length (0 for none)."""
        if self._longest is None:
            if self._host is None and len(self) > 1:
                self._longest = int(self._device.diff().max())
            else:
                self._longest = max([0, *(b - a for a, b in itertools.pairwise(self.host()))])
        return self._longest

    def shifted(self, by: int) -> Offsets:
        """The offsets minus ``by``."""
        if by == 0:
            return self
        return Offsets(
            None if self._host is None else [o - by for o in self._host],
            None if self._device is None else self._device - by,
            self._longest,
        )


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
    """Attention over packed sequences.

    Offsets may start past row 0 and end before the last row. Where the host list is
    at hand, the rows outside every sequence are dropped from the output; where only a
    device tensor is (the triton path reads no offsets back from the GPU), the output
    keeps one row per query row, and those rows of the output and of the input
    gradients are unspecified.

    Args:
        query: ``(Tq, Hq, Dk)``, sequence ``n`` at rows ``q_offsets[n]:q_offsets[n+1]``.
        key: ``(Tk, Hkv, Dk)``, sequence ``n`` at rows ``k_offsets[n]:k_offsets[n+1]``.
        value: ``(Tk, Hkv, Dv)``.
        mask: None or a band mask (``Causal``/``Window``, aligned per sequence).
        backend: ``"triton"`` runs the batch in one launch of the varlen Triton kernels
            (with weights, one call of the triton backend per group of equal lengths);
            any other backend runs per group. None picks the varlen kernels for CUDA
            tensors where they can serve the call, else groups.
    """
    _validate_band_only(mask)
    q_offsets = q_offsets if isinstance(q_offsets, Offsets) else Offsets(q_offsets)
    k_offsets = k_offsets if isinstance(k_offsets, Offsets) else Offsets(k_offsets)
    if backend == "triton" or (backend is None and query.device.type == "cuda"):
        packed = _packed_triton(
            query, key, value, q_offsets, k_offsets, mask, scale, dropout_p, weights, return_lse,
            forced=backend == "triton",
        )
        if packed is not None:
            return packed
    q_offsets, k_offsets = q_offsets.host(), k_offsets.host()
    n_seq = len(q_offsets) - 1
    groups: dict[tuple[int, int], list[int]] = {}
    for n in range(n_seq):
        L = q_offsets[n + 1] - q_offsets[n]
        S = k_offsets[n + 1] - k_offsets[n]
        groups.setdefault((L, S), []).append(n)
    outs: list[Tensor | None] = [None] * n_seq
    ws: list[Tensor | None] = [None] * n_seq
    lses: list[Tensor | None] = [None] * n_seq

    def heads_first(t: Tensor, offsets: list[int], rows: list[int]) -> Tensor:
        parts = [t[offsets[n] : offsets[n + 1]].transpose(0, 1) for n in rows]
        return parts[0][None] if len(parts) == 1 else torch.stack(parts)

    for (L, S), rows in groups.items():
        if S == 0:  # no keys: zero attention
            for n in rows:
                outs[n] = zeros_in_graph((L, query.shape[1], value.shape[-1]), query, key, value)
                if weights == "mean":
                    ws[n] = query.new_zeros(L, 0)
                elif weights == "per_head":
                    ws[n] = query.new_zeros(query.shape[1], L, 0)
                lses[n] = query.new_full((query.shape[1], L), float("-inf"))
            continue
        result = attention(
            heads_first(query, q_offsets, rows),
            heads_first(key, k_offsets, rows),
            heads_first(value, k_offsets, rows),
            mask,
            scale=scale,
            dropout_p=dropout_p,
            weights=weights,
            return_lse=return_lse,
            backend=backend,
        )
        for i, n in enumerate(rows):
            outs[n] = result.output[i].transpose(0, 1)
            if result.weights is not None:
                ws[n] = result.weights[i]
            if result.lse is not None:
                lses[n] = result.lse[i]
    if n_seq == 0:
        output = query.new_zeros(0, query.shape[1], value.shape[-1])
    else:
        output = outs[0] if n_seq == 1 else torch.cat(outs, dim=0)
    return PackedOutput(output, ws if weights is not None else None, lses if return_lse else None)


def _packed_triton(
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
    forced: bool,
) -> PackedOutput | None:
    """:func:`packed_attention` in one launch of the varlen Triton kernels, or None where
    they cannot serve it and the grouping path should: weights asked for, or not
    ``forced`` (a forced call they cannot serve otherwise raises NotImplementedError)."""
    from ._backends import triton as _triton

    if q_offsets.on_host:  # a list may leave rows out: keep those of the sequences
        q0 = q_offsets.host()[0]
        query, q_offsets = query[q0 : q_offsets.host()[-1]], q_offsets.shifted(q0)
    if k_offsets.on_host:
        k0 = k_offsets.host()[0]
        key, value, k_offsets = key[k0 : k_offsets.host()[-1]], value[k0 : k_offsets.host()[-1]], k_offsets.shifted(k0)
    # The packed tensors as one (1, H, T, D) sequence: checked as mha.attention checks its inputs.
    call = _validate_call(
        *(t.transpose(0, 1)[None] for t in (query, key, value)), mask, scale, dropout_p, weights, return_lse
    )
    reasons = _triton.varlen_not_supported_reasons(call, len(q_offsets) - 1)
    if reasons:
        if forced and weights is None:
            raise NotImplementedError(
                "backend 'triton' cannot serve this variable-length (jagged) call:\n"
                + "\n".join(f"  - {r}" for r in reasons)
            )
        return None
    output, lse = _triton.varlen_attention(
        query, key, value, q_offsets.on(query.device), k_offsets.on(query.device),
        q_offsets.longest(), k_offsets.longest(), mask, call.scale, return_lse,
    )
    lses = [lse[:, a:b] for a, b in itertools.pairwise(q_offsets.host())] if return_lse else None
    return PackedOutput(output, None, lses)


def _validate_band_only(mask: _masks.Mask | None) -> None:
    if mask is None:
        return
    for part in mask.parts():
        if not isinstance(part, _masks.Window):
            raise ValueError(
                f"variable-length (jagged) inputs take only Causal or Window masks, got {part!r}; "
                "jagged sequences carry their own lengths, so no padding mask is needed"
            )


def nested_packed(t: Tensor) -> tuple[Tensor, Offsets]:
    """``(N, j, ...)`` nested tensor (jagged or strided) -> packed values ``(T, ...)`` and offsets.

    A jagged tensor's offsets stay on its device, with the longest length it caches."""
    if t.layout == torch.jagged:
        if t._ragged_idx != 1:
            raise ValueError(
                f"nested tensor of shape {tuple(t.shape)} must be ragged in dimension 1 (N, j, E)"
            )
        return t.values(), _jagged_offsets(t)
    parts = t.unbind()
    return torch.cat(parts, dim=0), Offsets(itertools.accumulate((p.shape[0] for p in parts), initial=0))


def _jagged_offsets(t: Tensor) -> Offsets:
    return Offsets(device=t.offsets(), longest=getattr(t, "_maybe_max_seqlen", None))


def _jagged_like(values: Tensor, like: Tensor) -> Tensor:
    """Packed ``values`` ``(T, ...)``, tokens first, as a jagged tensor ragged where ``like``
    is: ``(N, j, ...)``, or ``(N, H, j, D)`` for a ``like`` of that layout (built in one
    step, as a transpose of a jagged tensor costs as much again).

    Where ``values`` has a row for each of ``like``'s, it reuses ``like``'s offsets: it
    shares ``like``'s ragged size, so ``output + like`` (a residual) works, and its
    cached lengths, so it costs no synchronization. Where ``like``'s offsets leave rows
    out (they start past 0 or end early) and ``values`` holds only the sequences' rows,
    the offsets are shifted to start at 0."""
    offsets = like.offsets()
    token_dim = like._ragged_idx - 1
    if values.shape[0] != like._values.shape[token_dim]:
        offsets = offsets - offsets[0]
    return torch.nested.nested_tensor_from_jagged(
        values.movedim(0, token_dim),
        offsets,
        jagged_dim=like._ragged_idx,
        min_seqlen=getattr(like, "_maybe_min_seqlen", None),
        max_seqlen=getattr(like, "_maybe_max_seqlen", None),
    )


def jagged_from_packed(values: Tensor, offsets: Offsets, like: Tensor) -> Tensor:
    """Packed values (from :func:`nested_packed` of ``like``) back to a nested tensor with the layout of ``like``."""
    if like.layout == torch.jagged:
        return _jagged_like(values, like)
    lengths = [b - a for a, b in itertools.pairwise(offsets.host())]
    return torch.nested.as_nested_tensor(list(values.split(lengths)))


def nested_weights(weights: list[Tensor]) -> Tensor:
    """Per-sequence weights ``(L_n, S_n)`` or ``(H, L_n, S_n)`` as one strided nested tensor.

    Two ragged dims need torch's strided layout; its "prototype stage, use
    layout=torch.jagged" warning is silenced here, as the jagged layout cannot hold them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        return torch.nested.as_nested_tensor(weights)


def core_jagged(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: _masks.Mask | None,
    *,
    scale: float | None,
    dropout_p: float,
    weights: WeightsMode | None,
    return_lse: bool,
    backend: str | None,
):
    """:func:`mha.attention` for jagged ``(N, H, j, D)`` nested tensors."""
    from ._core import AttentionOutput

    # Each distinct tensor is checked and unpacked once: attribute reads on a nested tensor
    # go through its Python __torch_function__, microseconds each, and self-attention
    # passes one tensor three times.
    packed: dict[int, Tensor] = {}
    for name, t in (("query", query), ("key", key), ("value", value)):
        if id(t) in packed:
            continue
        if not (t.is_nested and t.layout == torch.jagged and t.dim() == 4 and t._ragged_idx == 2):
            raise ValueError(
                f"attention: with jagged inputs, {name} must be a jagged nested tensor (N, H, j, D), "
                "e.g. torch.nested.nested_tensor(list_of_(L_n, H, D), layout=torch.jagged).transpose(1, 2)"
            )
        # values() of an (N, H, j, D) jagged tensor is (H, T, D): packed tokens second.
        packed[id(t)] = t.values().transpose(0, 1)
    q_offsets = _jagged_offsets(query)
    k_offsets = q_offsets if key.offsets() is query.offsets() else _jagged_offsets(key)
    result = packed_attention(
        packed[id(query)],
        packed[id(key)],
        packed[id(value)],
        q_offsets,
        k_offsets,
        mask,
        scale=scale,
        dropout_p=dropout_p,
        weights=weights,
        return_lse=return_lse,
        backend=backend,
    )
    output = _jagged_like(result.output, query)
    w = nested_weights(result.weights) if result.weights is not None else None
    lse = None
    if result.lse is not None:
        packed_lse = torch.cat([x.transpose(0, 1) for x in result.lse], dim=0)
        lse = _jagged_like(packed_lse, query)
    return AttentionOutput(output, w, lse)
