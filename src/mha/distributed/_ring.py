"""Ring attention over a ``torch.distributed`` process group.

Rank ``x`` of ``P`` holds a shard of the queries and of the keys/values. At
step ``t`` it holds the key/value block of rank ``(x - t) mod P``; it sends
that block on to rank ``x + 1`` and receives the next from ``x - 1`` with
``batch_isend_irecv`` while it computes on the block it has, then merges the
block's output into its own by log-sum-exp::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

The backward pass is a ring too: each block travels with the running sums of
its ``dK``/``dV``, every rank adds its share, and the last rank to use a block
returns the sums to the block's owner. A rank computes only the blocks its
mask leaves open, and a block travels only as far as the last rank that needs
it: every rank knows every rank's positions, so all agree on the schedule
without talking.
"""

from __future__ import annotations

import itertools
import math
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .._core import AttentionOutput, attention, check_scale
from ..masks import KeyPadding, Mask
from ._layout import LAYOUTS, Layout, Piece, check_divisible, local_length, pieces, validate_layout
from ._rules import Rule, rule_from_mask

# Elements of one block of scores in the backward pass (fp64: 32 MiB).
_BACKWARD_TILE = 1 << 22

_KV, _GRADS, _RETURN = 0, 1, 2  # message tags


@dataclass
class StepTime:
    """One ring step of one rank: seconds computing, then waiting for its messages; bytes sent."""

    compute: float
    wait: float
    sent: int


@dataclass
class Ring:
    """Everything every rank agrees on before the ring starts."""

    group: Any
    world: int
    rank: int
    peers: list[int]
    q_pieces: list[tuple[Piece, ...]]
    k_pieces: list[tuple[Piece, ...]]
    kv_numel: list[tuple[int, int]]  # per rank: elements of its key and value shards
    kv_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]
    rule: Rule
    scale: float
    needed: list[list[bool]]  # needed[x][s]: rank x computes on rank s's keys
    hops: list[int]  # how many ranks downstream rank s's keys travel
    trace: list[StepTime] | None = field(default=None)

    def holds(self, x: int, t: int) -> int | None:
        """The rank whose keys rank ``x`` holds at step ``t``, or None."""
        src = (x - t) % self.world
        return src if t <= self.hops[src] else None

    def forwards(self, x: int, t: int) -> bool:
        """Whether rank ``x`` sends the keys it holds at step ``t`` on to ``x + 1``."""
        src = self.holds(x, t)
        return src is not None and t < self.hops[src]

    def open_blocks(self, x: int, src: int) -> list[tuple[Piece, Piece]]:
        return [(q, k) for q in self.q_pieces[x] for k in self.k_pieces[src] if self.rule.is_open(q, k)]


def _hops(needed: list[list[bool]], world: int) -> list[int]:
    hops = []
    for s in range(world):
        users = [t for t in range(1, world) if needed[(s + t) % world][s]]
        hops.append(max(users, default=0))
    return hops


def schedule(
    rule: Rule, L: int, S: int, world: int, layout: Layout
) -> tuple[list[tuple[Piece, ...]], list[tuple[Piece, ...]], list[list[bool]], list[int]]:
    """What every rank holds and computes, known to all without talking:
    ``(query pieces per rank, key pieces per rank, needed[x][s], hops[s])``."""
    q_pieces = [pieces(L, world, r, layout) for r in range(world)]
    k_pieces = [pieces(S, world, r, layout) for r in range(world)]
    needed = [
        [any(rule.is_open(q, k) for q in q_pieces[x] for k in k_pieces[s]) for s in range(world)]
        for x in range(world)
    ]
    return q_pieces, k_pieces, needed, _hops(needed, world)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate_local(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"ring_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise NotImplementedError(
                f"ring_attention: {name} is a nested tensor; pack the sequences along dim 2 of (1, H, T, D) "
                "and pass their global boundaries as offsets=(B + 1,)"
            )
        if t.dim() != 4:
            raise ValueError(
                f"ring_attention: {name} must be this rank's shard (N, H, {'L' if name == 'query' else 'S'}, D), "
                f"got {t.dim()}-D {_shape(t)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"ring_attention: {name} must be floating point, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"ring_attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    N, Hq, _, Dk = query.shape
    if key.shape[0] != N or value.shape[0] != N or key.shape[-1] != Dk:
        raise ValueError(
            f"ring_attention: query (N, Hq, L, Dk) = {_shape(query)} and key (N, Hkv, S, Dk) = {_shape(key)} "
            f"must share N and Dk, and value (N, Hkv, S, Dv) = {_shape(value)} N"
        )
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(
            f"ring_attention: value (N, Hkv, S, Dv) = {_shape(value)} must match key {_shape(key)} in Hkv and S"
        )
    Hkv = key.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"ring_attention: query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}")


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _mask_text(mask: Mask | None) -> str:
    """``mask`` as text that equal masks share on every rank: key lengths in full (a
    ``KeyPadding``'s repr omits more than 16, and names the device, which differs by rank)."""
    if mask is None:
        return "None"
    return " & ".join(
        f"KeyPadding({part.lengths.tolist()})" if isinstance(part, KeyPadding) else repr(part)
        for part in mask.parts()
    )


def _agree(query: Tensor, key: Tensor, value: Tensor, mask: Mask | None, offsets: Tensor | None,
           layout: Layout, scale: float | None, group: Any, world: int) -> Tensor:
    """Every rank's ``(query shape, key shape, value shape, layout, dtype, scale, mask)``
    as a ``(P, 16)`` int64 table, gathered in one collective."""
    scale_bits = -1 if scale is None else struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    mask_text = _mask_text(mask) + ("" if offsets is None else repr(offsets.tolist()))
    row = [*query.shape, *key.shape, *value.shape, LAYOUTS.index(layout), _crc(str(query.dtype)), scale_bits,
           _crc(mask_text)]
    mine = torch.tensor(row, dtype=torch.int64, device=query.device)
    table = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(table, mine, group=group)
    except RuntimeError as e:
        raise RuntimeError(
            f"ring_attention: rank {dist.get_rank(group)} of {world} could not compare shapes with the other "
            f"ranks: some rank died or did not call ring_attention within the group's timeout. "
            f"From torch.distributed: {e}"
        ) from e
    return torch.stack(table).cpu()


def _check_agreement(table: Tensor, layout: Layout) -> tuple[int, int]:
    """Raise ValueError naming the ranks and shapes unless every rank holds its
    layout's shard of the same sequence; return the global ``(L, S)``."""
    rows = table.tolist()
    world = len(rows)
    fields = [("query (N, Hq, L, Dk)", 0, 4, 2), ("key (N, Hkv, S, Dk)", 4, 8, 2), ("value (N, Hkv, S, Dv)", 8, 12, 2)]
    for name, a, b, seq in fields:
        fixed = {tuple(r[a:b][:seq] + r[a:b][seq + 1 :]) for r in rows}
        if len(fixed) > 1:
            shapes = ", ".join(f"rank {i} {tuple(r[a:b])}" for i, r in enumerate(rows))
            raise ValueError(
                f"ring_attention: ranks hold shards of different tensors: {name} is {shapes}; "
                "shards may differ in the sequence dim only"
            )
    names = ("layout", "dtype", "scale", "mask (its rule, key lengths and offsets)")
    for name, col in zip(names, range(12, 16), strict=True):
        values = {r[col] for r in rows}
        if len(values) > 1:
            if col == 12:
                got = ", ".join(f"rank {i} {LAYOUTS[r[12]]!r}" for i, r in enumerate(rows))
            else:
                got = "ranks " + " / ".join(
                    ", ".join(str(i) for i, r in enumerate(rows) if r[col] == v) for v in sorted(values)
                ) + " differ"
            raise ValueError(f"ring_attention: every rank must pass the same {name}, got {got}")
    sizes = []
    for name, col in (("query L", 2), ("key S", 6)):
        have = [r[col] for r in rows]
        total = sum(have)
        check_divisible(total, world, layout, f"{name} summed over the {world} ranks")
        want = [local_length(total, world, r, layout) for r in range(world)]
        if have != want:
            raise ValueError(
                f"ring_attention: layout {layout!r} splits {name} = {total} over {world} ranks into shards of "
                f"{tuple(want)}, but the ranks hold {tuple(have)}; cut the sequence with "
                f"mha.distributed.shard(x, dim=2, layout={layout!r})"
            )
        sizes.append(total)
    return sizes[0], sizes[1]


def _validate_offsets(offsets: Tensor | None, L: int, S: int) -> None:
    if offsets is None:
        return
    if not isinstance(offsets, Tensor):
        raise TypeError(f"ring_attention: offsets must be an integer Tensor (B + 1,), got {type(offsets).__name__}")
    if offsets.dim() != 1 or offsets.is_floating_point() or offsets.dtype == torch.bool:
        raise TypeError(
            f"ring_attention: offsets must be an integer tensor (B + 1,), got {offsets.dtype} {_shape(offsets)}"
        )
    bounds = offsets.tolist()
    if L != S or not bounds or bounds[0] != 0 or bounds[-1] != L or any(b > c for b, c in itertools.pairwise(bounds)):
        raise ValueError(
            f"ring_attention: offsets must rise from 0 to the packed length T, with queries and keys "
            f"the same T; got offsets {bounds[:4]}{'...' if len(bounds) > 4 else ''} ending at "
            f"{bounds[-1] if bounds else None}, L = {L}, S = {S}"
        )


def plan_ring(query: Tensor, key: Tensor, value: Tensor, mask: Mask | None, offsets: Tensor | None,
          group: Any, layout: Layout, scale: float | None) -> Ring:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ring_attention needs torch.distributed: call torch.distributed.init_process_group first"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    table = _agree(query, key, value, mask, offsets, layout, scale, group, world)
    L, S = _check_agreement(table, layout)
    _validate_offsets(offsets, L, S)
    rule = rule_from_mask(mask, L, S, offsets)
    if mask is not None:
        mask._check_shape(query.shape[0], query.shape[1], L, S)  # as mha.attention on the whole sequence
    q_pieces, k_pieces, needed, hops = schedule(rule, L, S, world, layout)
    N, Hkv, _, Dk = key.shape
    Dv = value.shape[-1]
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
        ((N, Hkv, p, Dk), (N, Hkv, p, Dv)) for p in (sum(k.length for k in ks) for ks in k_pieces)
    ]
    peers = [r if group is None else dist.get_global_rank(group, r) for r in range(world)]
    return Ring(
        group=group,
        world=world,
        rank=rank,
        peers=peers,
        q_pieces=q_pieces,
        k_pieces=k_pieces,
        kv_numel=[(math.prod(a), math.prod(b)) for a, b in shapes],
        kv_shapes=shapes,
        rule=rule,
        scale=1.0 / math.sqrt(Dk) if scale is None else float(scale),
        needed=needed,
        hops=hops,
    )


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _Exchange:
    """One step's point-to-point messages, started together and waited for together."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.ops: list[dist.P2POp] = []

    def send(self, tensor: Tensor, to: int, tag: int) -> None:
        self.ops.append(dist.P2POp(dist.isend, tensor, self.ring.peers[to], self.ring.group, tag))

    def recv(self, numel: int, like: Tensor, frm: int, tag: int) -> Tensor:
        buf = like.new_empty(numel)
        self.ops.append(dist.P2POp(dist.irecv, buf, self.ring.peers[frm], self.ring.group, tag))
        return buf

    def start(self) -> list[Any]:
        return dist.batch_isend_irecv(self.ops) if self.ops else []


def _wait(works: list[Any], ring: Ring, t: int) -> None:
    """Wait for a step's messages (each within the process group's timeout)."""
    try:
        for w in works:
            w.wait()
    except RuntimeError as e:
        x, P = ring.rank, ring.world
        raise RuntimeError(
            f"ring_attention: rank {x} of {P}, step {t}: a message to or from another rank (neighbours "
            f"{(x - 1) % P} and {(x + 1) % P}) failed; that rank died, hangs or stopped calling "
            f"ring_attention. From torch.distributed: {e}"
        ) from e


def _pass_keys(ring: Ring, t: int, held: Tensor | None, like: Tensor) -> tuple[list[Any], Tensor | None]:
    """Start step ``t``'s key/value messages: send the block held on, receive the next
    (in ``like``'s dtype and device). Returns the pending works and the buffer the next
    block arrives in (None if none)."""
    x, P = ring.rank, ring.world
    ex = _Exchange(ring)
    if held is not None and ring.forwards(x, t):
        ex.send(held, (x + 1) % P, _KV)
    incoming = None
    if ring.forwards((x - 1) % P, t):
        prev_src = (x - 1 - t) % P
        incoming = ex.recv(sum(ring.kv_numel[prev_src]), like, (x - 1) % P, _KV)
    return ex.start(), incoming


def _unpack(ring: Ring, buf: Tensor, src: int) -> tuple[Tensor, Tensor]:
    nk, _ = ring.kv_numel[src]
    k_shape, v_shape = ring.kv_shapes[src]
    return buf[:nk].view(k_shape), buf[nk:].view(v_shape)


def _pack(key: Tensor, value: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.cat([key.reshape(-1), value.reshape(-1)]).to(dtype or key.dtype)


def _rows(p: Piece) -> slice:
    return slice(p.local, p.local + p.length)


def _merge(out: Tensor, lse: Tensor, rows: slice, o_b: Tensor, lse_b: Tensor) -> None:
    """Fold a block's ``(o_b, lse_b)`` into rows ``rows`` of the running ``(out, lse)``."""
    lse_a = lse[:, :, rows]
    new = torch.logaddexp(lse_a, lse_b)
    ref = new.masked_fill(torch.isneginf(new), 0.0)
    out[:, :, rows] = out[:, :, rows] * torch.exp(lse_a - ref)[..., None] + o_b * torch.exp(lse_b - ref)[..., None]
    lse[:, :, rows] = new


def ring_forward(ring: Ring, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Output ``(N, Hq, L_local, Dv)`` and lse ``(N, Hq, L_local)``, in the accumulator dtype."""
    N, Hq, Lq, _ = query.shape
    acc = _accumulator_dtype(query.dtype)
    out = query.new_zeros(N, Hq, Lq, value.shape[-1], dtype=acc)
    lse = query.new_full((N, Hq, Lq), float("-inf"), dtype=acc)
    x, P = ring.rank, ring.world
    held: Tensor | None = _pack(key, value)
    for t in range(P):
        src = ring.holds(x, t)
        works, incoming = _pass_keys(ring, t, held, query)
        began = time.perf_counter()
        if src is not None and held is not None and ring.needed[x][src]:
            k_b, v_b = _unpack(ring, held, src)
            for qp, kp in ring.open_blocks(x, src):
                res = attention(
                    query[:, :, _rows(qp)], k_b[:, :, _rows(kp)], v_b[:, :, _rows(kp)],
                    ring.rule.block_mask(qp, kp, query.device), scale=ring.scale, return_lse=True,
                )
                block_lse = cast(Tensor, res.lse)  # asked for with return_lse=True
                _merge(out, lse, _rows(qp), res.output.to(acc), block_lse.to(acc))
        computed = time.perf_counter()
        _wait(works, ring, t)
        if ring.trace is not None:
            sent = held.numel() * held.element_size() if held is not None and ring.forwards(x, t) else 0
            ring.trace.append(StepTime(computed - began, time.perf_counter() - computed, sent))
        held = incoming
    return out, lse


def _block_backward(
    ring: Ring, qp: Piece, kp: Piece, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor,
    delta: Tensor, dq: Tensor, dk: Tensor, dv: Tensor,
) -> None:
    """Add block ``(qp, kp)``'s share to ``dq`` (its rows) and ``dk``/``dv`` (its keys).

    With ``p = exp(s - lse)`` from the global lse and ``delta = rowsum(dO * O) - dlse``:
    ``dV = p^T dO``, ``ds = p * (dO V^T - delta)``, ``dQ = scale * ds K``,
    ``dK = scale * ds^T Q``; query heads share their key head (GQA) by a group dim."""
    N, Hq = q.shape[:2]
    Hkv = k.shape[1]
    G = Hq // Hkv
    acc = dq.dtype
    k_b = k[:, :, _rows(kp)].to(acc)
    v_b = v[:, :, _rows(kp)].to(acc)
    allowed = ring.rule.block_allowed(qp, kp, q.device)
    # (N or 1, 1, 1, Lb or 1, Sb): a key-padding-only mask has one row for every query.
    allowed5 = None if allowed is None else allowed[:, :, None]
    step = max(1, _BACKWARD_TILE // max(1, N * Hq * kp.length))
    for a in range(0, qp.length, step):
        rows = slice(qp.local + a, qp.local + min(qp.length, a + step))
        n = rows.stop - rows.start
        q5 = q[:, :, rows].to(acc).reshape(N, Hkv, G, n, -1)
        do5 = dout[:, :, rows].reshape(N, Hkv, G, n, -1)
        lse5 = lse[:, :, rows].reshape(N, Hkv, G, n, 1)
        d5 = delta[:, :, rows].reshape(N, Hkv, G, n, 1)
        s = torch.matmul(q5, k_b[:, :, None].transpose(-1, -2)) * ring.scale
        p = torch.exp(s - lse5.masked_fill(torch.isneginf(lse5), float("inf")))
        if allowed5 is not None:
            p = p.masked_fill(~(allowed5 if allowed5.shape[3] == 1 else allowed5[:, :, :, a : a + n]), 0.0)
        dv[:, :, _rows(kp)] += torch.matmul(p.transpose(-1, -2), do5).sum(2)
        ds = p * (torch.matmul(do5, v_b[:, :, None].transpose(-1, -2)) - d5)
        dq[:, :, rows] += (torch.matmul(ds, k_b[:, :, None]) * ring.scale).reshape(N, Hq, n, -1)
        dk[:, :, _rows(kp)] += torch.matmul(ds.transpose(-1, -2), q5).sum(2) * ring.scale


def ring_backward(
    ring: Ring, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
    dlse: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of query, key and value (this rank's shards) from those of the output
    ``dout`` and lse ``dlse``, with the forward's ``out`` and ``lse`` (accumulator dtype)."""
    acc = lse.dtype
    dout = dout.to(acc)
    delta = (dout * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dq = torch.zeros(query.shape, dtype=acc, device=query.device)
    x, P = ring.rank, ring.world
    held: Tensor | None = _pack(key, value)
    grads_in: Tensor | None = None
    own: Tensor | None = None
    pending: list[Any] = []  # last step's gradient messages, waited for after this step's compute
    for t in range(P):
        src = ring.holds(x, t)
        kv_works, incoming = _pass_keys(ring, t, held, query)
        prev, prev_src = (x - 1) % P, (x - 1 - t) % P
        grads = None
        if src is not None and held is not None:
            grads = dq.new_zeros(sum(ring.kv_numel[src]))
            if ring.needed[x][src]:
                k_b, v_b = _unpack(ring, held, src)
                dk_b, dv_b = _unpack(ring, grads, src)
                for qp, kp in ring.open_blocks(x, src):
                    _block_backward(ring, qp, kp, query, k_b, v_b, dout, lse, delta, dq, dk_b, dv_b)
        _wait(pending, ring, t)
        ex = _Exchange(ring)
        if src is not None and grads is not None:
            if grads_in is not None:
                grads += grads_in
            if ring.forwards(x, t):
                ex.send(grads, (x + 1) % P, _GRADS)
            elif t > 0:
                ex.send(grads, src, _RETURN)
            else:
                own = grads
        grads_in = ex.recv(sum(ring.kv_numel[prev_src]), dq, prev, _GRADS) if ring.forwards(prev, t) else None
        if ring.hops[x] > 0 and t == ring.hops[x]:
            own = ex.recv(sum(ring.kv_numel[x]), dq, (x + t) % P, _RETURN)
        pending = ex.start()
        _wait(kv_works, ring, t)
        held = incoming
    _wait(pending, ring, P)
    if own is None:
        raise RuntimeError(
            f"ring backward: rank {x} received no gradients for its own keys and values after "
            f"{P} steps; the ranks' schedules disagree (did every rank call with the same mask and layout?)"
        )
    dk, dv = _unpack(ring, own, x)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, ring: Ring) -> tuple[Tensor, Tensor]:
        out, lse = ring_forward(ring, query, key, value)
        ctx.ring = ring
        ctx.save_for_backward(query, key, value, out, lse)
        return out.to(query.dtype), lse.to(query.dtype)

    @staticmethod
    def backward(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, None]:
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.ring, query, key, value, out, lse, dout, dlse)
        return dq, dk, dv, None


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Mask | None = None,
    *,
    group: Any = None,
    layout: Layout = "contiguous",
    scale: float | None = None,
    return_lse: bool = False,
    offsets: Tensor | None = None,
    weights: None = None,
) -> AttentionOutput:
    r"""Attention over a sequence split across the ranks of ``group`` (context parallelism).

    Each rank passes its shard of the sequence dim (dim 2) and gets its shard of
    the output; together the ranks compute exactly :func:`mha.attention` on the
    whole sequence:

    .. math::

        o_i = \sum_j \operatorname{softmax}_j(\text{scale} \cdot q_i \cdot k_j + b_{ij}) \, v_j,
        \qquad \text{lse}_i = \log \sum_j \exp(\text{scale} \cdot q_i \cdot k_j + b_{ij})

    over all ``j`` of all ranks. Masks keep their global meaning: ``Causal``,
    ``Window`` and ``KeyPadding`` lengths refer to positions in the whole
    sequence, and each rank evaluates them on its own blocks (nothing of the
    mask travels). Blocks the mask closes are neither computed nor sent.

    Args:
        query: this rank's shard ``(N, Hq, L_r, Dk)`` of ``(N, Hq, L, Dk)``.
        key: this rank's shard ``(N, Hkv, S_r, Dk)`` of ``(N, Hkv, S, Dk)``, ``Hq % Hkv == 0``.
        value: this rank's shard ``(N, Hkv, S_r, Dv)``; ``Dv`` may differ from ``Dk``.
        mask: ``Causal``, ``Window``, ``KeyPadding`` or an ``&`` of them, with the
            meaning it has on the whole ``(L, S)`` sequence, the same on every rank.
        group: the process group (default: the world).
        layout: how the sequence is split, the same for query and keys:
            ``"contiguous"`` (rank ``r`` holds the ``r``-th chunk; chunk sizes
            differ by at most 1) or ``"zigzag"`` (chunks ``r`` and ``2P - 1 - r``
            of ``2P``, balanced under ``Causal``; ``L`` and ``S`` multiples of ``2P``).
            :func:`mha.distributed.shard` cuts a whole tensor this way.
        scale: multiplies the scores (any finite number); default ``1 / sqrt(Dk)``.
        return_lse: also return this rank's rows ``(N, Hq, L_r)`` of the lse.
        offsets: packed variable-length sequences: ``N == 1``, the tokens of ``B``
            sequences packed along the sequence dim, sequence ``b`` at global
            positions ``[offsets[b], offsets[b + 1])`` (``(B + 1,)``, from 0 to ``L``,
            ``L == S``). Each sequence attends only to itself, wherever its pieces
            live; ``Causal``/``Window`` then apply within each sequence.
        weights: must be None: attention weights across ranks are not supported.

    Returns:
        :class:`mha.AttentionOutput` ``(output (N, Hq, L_r, Dv), None, lse)``.

    Every rank must call this with shards of the same shapes (but the sequence
    dim), dtype, layout, scale and mask; a mismatch raises ValueError on every
    rank, naming the ranks and shapes, before any block moves. A rank that dies
    or never answers makes the others raise within the process group's timeout.

    Shape legend: N batch, Hq query heads, Hkv key/value heads, L queries and S
    keys in the whole sequence, L_r and S_r on this rank, Dk and Dv head dims.
    """
    if weights is not None:
        raise NotImplementedError(
            f"ring_attention: weights={weights!r} is not supported: the (L, S) weights span every rank's "
            "keys; run mha.attention(..., weights=...) on the whole sequence on one device instead"
        )
    _validate_local(query, key, value)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(
            f"ring_attention: mask must be an mha.masks object (Causal, Window, KeyPadding or an & of them), "
            f"got {type(mask).__name__}"
        )
    scale = check_scale(scale, "ring_attention")
    ring = plan_ring(query, key, value, mask, offsets, group, validate_layout(layout), scale)
    out, lse = _RingFunction.apply(query, key, value, ring)
    return AttentionOutput(out, None, lse if return_lse else None)
