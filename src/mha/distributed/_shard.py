"""``shard`` and ``unshard``: between a whole tensor and this rank's part of it."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._layout import Layout, check_divisible, join_shards, take_shard, validate_layout


def _group_rank(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("mha.distributed needs torch.distributed: call torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


def _validate_dim(x: Tensor, dim: int, fn: str) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: dim={dim} is out of range for a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(x: Tensor, dim: int, *, group: Any = None, layout: Layout = "contiguous") -> Tensor:
    """This rank's part of the whole ``x`` along ``dim``, as :func:`ring_attention` expects it.

    ``"contiguous"``: rank ``r`` of ``P`` takes the ``r``-th of ``P`` chunks (the
    first ``size % P`` are one longer); ``"zigzag"``: chunks ``r`` and ``2P - 1 - r``
    of ``2P`` equal chunks (the size along ``dim`` must be a multiple of ``2P``).
    Example: heads ``(N, H, L, D)`` are split with ``shard(q, 2)``. Differentiable."""
    dim = _validate_dim(x, dim, "shard")
    world, rank = _group_rank(group)
    layout = validate_layout(layout)
    check_divisible(x.shape[dim], world, layout, f"size of dim {dim} of x {tuple(x.shape)}")
    return take_shard(x, dim, world, rank, layout)


def unshard(x: Tensor, dim: int, *, group: Any = None, layout: Layout = "contiguous") -> Tensor:
    """The whole tensor, on every rank, from each rank's shard ``x`` along ``dim``
    (the inverse of :func:`shard`; one all-gather, not differentiable). Shards may
    differ in size along ``dim`` only."""
    dim = _validate_dim(x, dim, "unshard")
    world, _ = _group_rank(group)
    layout = validate_layout(layout)
    size = torch.tensor([x.shape[dim]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    moved = x.detach().movedim(dim, 0)
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    parts = [g[:n] for g, n in zip(gathered, lengths, strict=True)]
    return join_shards(parts, 0, layout).movedim(0, dim)
