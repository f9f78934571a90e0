"""Which global sequence positions each rank holds, and moving tensors between
the whole sequence and its shards.

A sequence of length ``L`` split over ``P`` ranks:

* ``"contiguous"``: rank ``r`` holds the ``r``-th of ``P`` chunks; chunk sizes
  differ by at most one (the first ``L % P`` chunks are one longer).
* ``"zigzag"``: the sequence is cut into ``2P`` equal chunks and rank ``r``
  holds chunks ``r`` and ``2P - 1 - r``, so that under a causal mask every rank
  has the same work. ``L`` must be divisible by ``2P``.

::

    L = 12, P = 3      positions 0 1 2 3 4 5 6 7 8 9 10 11
    contiguous         rank      0 0 0 0 1 1 1 1 2 2 2  2
    zigzag             rank      0 0 1 1 2 2 2 2 1 1 0  0
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[Layout, ...] = ("contiguous", "zigzag")


class Piece(NamedTuple):
    """A run of ``length`` consecutive global positions from ``start``, held at
    local positions ``[local, local + length)`` of a shard."""

    start: int
    length: int
    local: int

    @property
    def stop(self) -> int:
        return self.start + self.length


def validate_layout(layout: object) -> Layout:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be 'contiguous' or 'zigzag', got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")
    return layout


def check_divisible(length: int, world: int, layout: Layout, what: str = "sequence length L") -> None:
    """ValueError unless ``layout`` can split ``length`` positions over ``world`` ranks."""
    if layout == "zigzag" and length % (2 * world) != 0:
        raise ValueError(
            f"layout 'zigzag' cuts the sequence into 2P = {2 * world} equal chunks, but the {what} is "
            f"{length}, not a multiple of {2 * world}; pad the sequence to a multiple of {2 * world} "
            "(with key padding) or use layout='contiguous', which takes any length"
        )


def pieces(length: int, world: int, rank: int, layout: Layout) -> tuple[Piece, ...]:
    """The global positions rank ``rank`` of ``world`` holds, in local order."""
    check_divisible(length, world, layout)
    if layout == "contiguous":
        base, extra = divmod(length, world)
        start = rank * base + min(rank, extra)
        return (Piece(start, base + (rank < extra), 0),)
    chunk = length // (2 * world)
    return (Piece(rank * chunk, chunk, 0), Piece((2 * world - 1 - rank) * chunk, chunk, chunk))


def local_length(length: int, world: int, rank: int, layout: Layout) -> int:
    return sum(p.length for p in pieces(length, world, rank, layout))


def take_shard(x: Tensor, dim: int, world: int, rank: int, layout: Layout) -> Tensor:
    """Rank ``rank``'s shard of the whole ``x`` along ``dim`` (a view for one piece)."""
    parts = [x.narrow(dim, p.start, p.length) for p in pieces(x.shape[dim], world, rank, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def join_shards(shards: list[Tensor], dim: int, layout: Layout) -> Tensor:
    """The whole tensor from every rank's shard (in rank order) along ``dim``."""
    if layout == "contiguous":
        return torch.cat(shards, dim)
    chunk = shards[0].shape[dim] // 2
    firsts = [s.narrow(dim, 0, chunk) for s in shards]
    seconds = [s.narrow(dim, chunk, chunk) for s in reversed(shards)]
    return torch.cat(firsts + seconds, dim)
