"""Memory layouts shared by the triton backend and its kernels (a leaf: imports no backend)."""

from __future__ import annotations

from torch import Tensor


def new_output(q: Tensor, dv: int) -> Tensor:
    """The forward's output ``(N, Hq, L, Dv)``, laid out ``(N, L, Hq, Dv)`` in memory (as
    SDPA's fused kernels do): the module's merge of the heads into ``(N, L, E)`` is then
    a view, not a copy."""
    N, Hq, L, _ = q.shape
    return q.new_empty(N, L, Hq, dv).transpose(1, 2)
