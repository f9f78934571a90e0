"""``shard`` and ``unshard``: between a whole tensor and this rank's part of it."""

from __future__ import annotations

import zlib
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


def _gather_shapes(x: Tensor, dim: int, group: Any, world: int) -> list[tuple[int, ...]]:
    """Every rank's shape of ``x``; ValueError on every rank unless all ranks pass shards of
    one tensor: the same dims, dtype and ``dim``, sizes differing along ``dim`` only."""
    header = torch.tensor([x.dim(), dim, zlib.crc32(str(x.dtype).encode())], device=x.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    rows = [tuple(int(v) for v in h) for h in headers]
    if len({r[:2] for r in rows}) > 1:
        got = ", ".join(f"rank {r} a {h[0]}-D shard along dim {h[1]}" for r, h in enumerate(rows))
        raise ValueError(f"unshard: every rank must pass a shard of one tensor along the same dim, got {got}")
    if len({r[2] for r in rows}) > 1:
        groups = " / ".join(
            ", ".join(str(r) for r, h in enumerate(rows) if h[2] == code) for code in dict.fromkeys(h[2] for h in rows)
        )
        raise ValueError(
            f"unshard: every rank must pass a shard of the same dtype, but ranks {groups} differ "
            f"(this rank: {x.dtype}); convert the shards to one dtype first"
        )
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    got_shapes = [tuple(int(n) for n in s) for s in shapes]
    if len({s[:dim] + s[dim + 1 :] for s in got_shapes}) > 1:
        got = ", ".join(f"rank {r} {s}" for r, s in enumerate(got_shapes))
        raise ValueError(f"unshard: shards may differ in size along dim {dim} only, got {got}")
    return got_shapes


def unshard(x: Tensor, dim: int, *, group: Any = None, layout: Layout = "contiguous") -> Tensor:
    """The whole tensor, on every rank, from each rank's shard ``x`` along ``dim``
    (the inverse of :func:`shard`; all-gathers, not differentiable). Shards may
    differ in size along ``dim`` only, and not at all for ``"zigzag"`` (two equal
    chunks each); otherwise ValueError on every rank."""
    dim = _validate_dim(x, dim, "unshard")
    world, _ = _group_rank(group)
    layout = validate_layout(layout)
    lengths = [s[dim] for s in _gather_shapes(x, dim, group, world)]
    if layout == "zigzag" and (len(set(lengths)) > 1 or lengths[0] % 2):
        raise ValueError(
            f"unshard: layout 'zigzag' shards are two equal chunks each, the same size on every rank, but "
            f"the ranks' shards have sizes {tuple(lengths)} along dim {dim}; cut them with "
            "mha.distributed.shard(x, dim, layout='zigzag'), or pass the layout they were cut with"
        )
    longest = max(lengths)
    moved = x.detach().movedim(dim, 0)
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[: moved.shape[0]] = moved
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    parts = [g[:n] for g, n in zip(gathered, lengths, strict=True)]
    return join_shards(parts, 0, layout).movedim(0, dim)
