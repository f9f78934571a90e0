"""Variable-length calls for backends without a varlen kernel: sequences of equal
``(L_n, S_n)`` stacked into one dense call each.

A backend with a dense ``forward`` serves a varlen call through :func:`by_groups`;
nothing is spent on padding, and a batch of ``G`` distinct length pairs costs ``G``
dense calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._plan import plan_mask
from .._types import AttentionOutput, Call, zeros_in_graph


def by_groups(call: Call, dense: Callable[[Call], AttentionOutput]) -> AttentionOutput:
    """Serve the varlen ``call`` with ``dense`` (a backend's dense forward), one dense
    call per distinct ``(L_n, S_n)``.

    Returns the output ``(T, Hq, Dv)`` of the sequences' rows in order (``T`` the sum of
    the ``L_n``; rows outside every sequence are left out), the per-sequence weights
    packed flat (see :class:`~mha._types.AttentionOutput`), and the lse packed ``(Hq, T)``."""
    query, key, value = call.query, call.key, call.value
    q_offsets, k_offsets = call.offsets()
    q_off, k_off = q_offsets.host(), k_offsets.host()
    q_offsets.check("query", query.shape[0])
    k_offsets.check("key", key.shape[0])
    n_seq = len(q_off) - 1
    Hq, Dv = query.shape[1], value.shape[-1]
    groups: dict[tuple[int, int], list[int]] = {}
    for n in range(n_seq):
        groups.setdefault((q_off[n + 1] - q_off[n], k_off[n + 1] - k_off[n]), []).append(n)
    outs: list[Tensor] = [query.new_empty(0)] * n_seq
    ws: list[Tensor] = [query.new_empty(0)] * n_seq
    lses: list[Tensor] = [query.new_empty(0)] * n_seq

    def heads_first(t: Tensor, offsets: list[int], rows: list[int]) -> Tensor:
        parts = [t[offsets[n] : offsets[n + 1]].transpose(0, 1) for n in rows]
        return parts[0][None] if len(parts) == 1 else torch.stack(parts)

    for (L, S), rows in groups.items():
        if S == 0:  # no keys: zero attention
            for n in rows:
                outs[n] = zeros_in_graph((L, Hq, Dv), query, key, value)
                ws[n] = query.new_zeros(L, 0) if call.weights == "mean" else query.new_zeros(Hq, L, 0)
                lses[n] = query.new_full((Hq, L), float("-inf"))
            continue
        sub = Call(
            heads_first(query, q_off, rows),
            heads_first(key, k_off, rows),
            heads_first(value, k_off, rows),
            call.mask,
            plan_mask(call.mask, L, S, query.dtype),
            call.scale,
            call.dropout_p,
            call.weights,
            call.return_lse,
        )
        result = dense(sub)
        for i, n in enumerate(rows):
            outs[n] = result.output[i].transpose(0, 1)
            if result.weights is not None:
                ws[n] = result.weights[i]
            if result.lse is not None:
                lses[n] = result.lse[i]
    if n_seq == 0:
        output = query.new_zeros(0, Hq, Dv)
        lse = query.new_zeros(Hq, 0)
    else:
        output = outs[0] if n_seq == 1 else torch.cat(outs, dim=0)
        lse = lses[0] if n_seq == 1 else torch.cat(lses, dim=1)
    weights = None
    if call.weights is not None:
        weights = torch.cat([w.flatten() for w in ws]) if n_seq > 0 else query.new_zeros(0)
    return AttentionOutput(output, weights, lse if call.return_lse else None)
