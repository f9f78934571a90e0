"""Ring attention across gloo ranks on CPU against single-process ``mha.attention``.

Each world size runs every case inside one spawned process group (starting
processes and importing torch costs seconds; a case costs milliseconds). Every
rank builds the same whole tensors from the case's seed, takes its shard, runs
the ring, and compares its shard of the output, lse and gradients with the
matching shard of the single-process result on the whole tensors. Failures are
reported per case and rank.

Tolerance (fp64): both sides sum at most ~100 terms per output in a different
order, so they differ by a few hundred ulps of the result at most
(100 * 2.2e-16 ~ 2e-14 relative); 1e-10 leaves room and still catches any wrong
mask entry, which moves results by far more.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mha
from mha.distributed import _ring as ring_module
from mha.distributed import context_parallel, ring_attention, shard, unshard
from mha.distributed._ring import plan_ring
from mha.masks import Causal, KeyPadding, Mask, Window

RTOL = ATOL = 1e-10
F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``|actual - expected| <= ATOL + RTOL * |expected|`` elementwise (inf equal to inf).

    (torch.testing.assert_close would import torch.distributed.tensor, seconds per rank.)"""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_inf = torch.isinf(actual) & (actual == expected)
    err = torch.where(same_inf, 0.0, (actual - expected).abs() - RTOL * expected.abs())
    worst = float(err.detach().max()) if err.numel() else 0.0
    assert not err.isnan().any(), f"{what}: NaN"
    assert worst <= ATOL, f"{what}: off by {worst:.3g} beyond {ATOL:g}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _heads(seed: int, N: int, Hq: int, Hkv: int, L: int, S: int, Dk: int, Dv: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Hq, L, Dk, generator=g, dtype=F64)
    k = torch.randn(N, Hkv, S, Dk, generator=g, dtype=F64)
    v = torch.randn(N, Hkv, S, Dv, generator=g, dtype=F64)
    dout = torch.randn(N, Hq, L, Dv, generator=g, dtype=F64)
    dlse = torch.randn(N, Hq, L, generator=g, dtype=F64)
    return q, k, v, dout, dlse


def _loss(out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor) -> torch.Tensor:
    """A loss through the output and the lse (rows with lse = -inf left out)."""
    finite = torch.isfinite(lse)
    return (out * dout).sum() + torch.where(finite, lse, 0.0).mul(dlse).sum()


def _check_ring(
    seed: int,
    mask: Mask | None,
    *,
    layout: str = "contiguous",
    N: int = 2,
    Hq: int = 3,
    Hkv: int = 3,
    L: int = 13,
    S: int | None = None,
    Dk: int = 5,
    Dv: int = 7,
    noncontiguous: bool = False,
) -> None:
    """Ring attention on this rank's shards equals ``mha.attention`` on the whole tensors:
    output, lse and the gradients of query, key and value."""
    S = L if S is None else S
    q, k, v, dout, dlse = _heads(seed, N, Hq, Hkv, L, S, Dk, Dv)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = mha.attention(*ref_in, mask, return_lse=True, backend="reference")
    _loss(ref.output, ref.lse, dout, dlse).backward()

    local = [shard(t, 2, layout=layout).clone() for t in (q, k, v)]
    if noncontiguous:
        local = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in local]
    for t in local:
        t.requires_grad_()
    res = ring_attention(*local, mask, layout=layout, return_lse=True)
    _loss(res.output, res.lse, shard(dout, 2, layout=layout), shard(dlse, 2, layout=layout)).backward()

    _close(res.output, shard(ref.output, 2, layout=layout), "output")
    _close(res.lse, shard(ref.lse, 2, layout=layout), "lse")
    for name, mine, theirs in zip("qkv", local, ref_in, strict=True):
        assert mine.grad is not None, f"no gradient for {name}"
        _close(mine.grad, shard(theirs.grad, 2, layout=layout), f"grad {name}")
    _close(unshard(res.output.detach(), 2, layout=layout), ref.output.detach(), "unshard(output)")


def case_no_mask(world: int) -> None:
    _check_ring(1, None)
    _check_ring(2, None, L=3 * world + 1, noncontiguous=True)


def case_causal_contiguous(world: int) -> None:
    _check_ring(3, Causal())


def case_causal_zigzag(world: int) -> None:
    _check_ring(4, Causal(), layout="zigzag", L=6 * world)


def case_key_padding_causal(world: int) -> None:
    lengths = torch.tensor([13, 5, 0])
    _check_ring(5, Causal() & KeyPadding(lengths), N=3)
    _check_ring(6, KeyPadding(torch.tensor([4, 1])) & Causal(), layout="zigzag", L=4 * world)


def case_window_one_sided(world: int) -> None:
    _check_ring(7, Window(3, 0), L=17)
    _check_ring(8, Window(2, 0), layout="zigzag", L=4 * world)


def case_window_two_sided(world: int) -> None:
    _check_ring(9, Window(2, 3), L=17)
    _check_ring(10, Window(1, 4) & KeyPadding(torch.tensor([11, 7])), layout="zigzag", L=6 * world)


def case_backward_tiles(world: int) -> None:
    """The backward pass cuts a block's queries into tiles of at most ``_BACKWARD_TILE``
    scores; a key-padding mask (one row for all queries) must apply to every tile."""
    tile = ring_module._BACKWARD_TILE
    ring_module._BACKWARD_TILE = 2 * 3 * 13  # N * Hq * S: tiles of a few query rows
    try:
        _check_ring(23, KeyPadding(torch.tensor([9, 3])), L=13)
        _check_ring(24, KeyPadding(torch.tensor([2, 8])) & Causal(), layout="zigzag", L=4 * world)
    finally:
        ring_module._BACKWARD_TILE = tile


def case_cross_bottom_right(world: int) -> None:
    """L != S: bottom-right causal keeps its alignment over the whole (L, S)."""
    _check_ring(11, Causal("bottom_right"), L=11, S=19)


def case_gqa(world: int) -> None:
    _check_ring(12, Causal(), Hq=6, Hkv=2, layout="zigzag", L=2 * world)
    _check_ring(13, Window(4, 1), Hq=6, Hkv=1, Dk=8, Dv=3)


def case_varlen(world: int) -> None:
    """Packed sequences split across ranks: each attends to itself, as per-sequence mha.attention."""
    lengths = [5, 1, 7, 0, 4, 12 * world - 17]  # T = 12 * world, for both layouts
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    T = int(offsets[-1])
    for layout, mask, seed in (("contiguous", None, 14), ("zigzag", Causal(), 15), ("contiguous", Window(2, 1), 16)):
        q, k, v, dout, dlse = _heads(seed, 1, 3, 3, T, T, 5, 7)
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        outs, lses = [], []
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
            r = mha.attention(*(t[:, :, a:b] for t in ref_in), mask, return_lse=True, backend="reference")
            outs.append(r.output)
            lses.append(r.lse)
        ref_out, ref_lse = torch.cat(outs, 2), torch.cat(lses, 2)
        _loss(ref_out, ref_lse, dout, dlse).backward()
        local = [shard(t, 2, layout=layout).clone().requires_grad_() for t in (q, k, v)]
        res = ring_attention(*local, mask, layout=layout, return_lse=True, offsets=offsets)
        _loss(res.output, res.lse, shard(dout, 2, layout=layout), shard(dlse, 2, layout=layout)).backward()
        _close(res.output, shard(ref_out, 2, layout=layout), "output")
        _close(res.lse, shard(ref_lse, 2, layout=layout), "lse")
        for name, mine, theirs in zip("qkv", local, ref_in, strict=True):
            _close(mine.grad, shard(theirs.grad, 2, layout=layout), f"grad {name}")


def case_subgroups(world: int) -> None:
    """``group=``: each rank alone in its own group (no messages), then the ring on a group
    of the last two ranks, whose group ranks differ from their global ranks when world is 3."""
    rank = dist.get_rank()
    alone = [dist.new_group([r]) for r in range(world)][rank]
    pair = dist.new_group([world - 2, world - 1])
    q, k, v, _, _ = _heads(22, 2, 3, 3, 12, 12, 5, 7)
    ref = mha.attention(q, k, v, Causal(), return_lse=True, backend="reference")
    res = ring_attention(q, k, v, Causal(), group=alone, return_lse=True)
    _close(res.output, ref.output, "output, group of one")
    if rank >= world - 2:
        local = [shard(t, 2, group=pair, layout="zigzag") for t in (q, k, v)]
        res = ring_attention(*local, Causal(), group=pair, layout="zigzag", return_lse=True)
        _close(res.lse, shard(ref.lse, 2, group=pair, layout="zigzag"), "lse, group of two")


def _module_pair(seed: int, E: int, H: int, batch_first: bool) -> tuple[nn.MultiheadAttention, mha.MultiheadAttention]:
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=F64)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = mha.MultiheadAttention(E, H, batch_first=batch_first, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _check_module(seed: int, layout: str, L: int, batch_first: bool, causal: str, lengths: list[int] | None) -> None:
    """The module under context_parallel on shards equals torch's module on the whole sequence:
    outputs, input gradients and (summed over ranks) parameter gradients."""
    N, E, H = 2, 15, 3
    theirs, ours = _module_pair(seed, E, H, batch_first)
    seq = 1 if batch_first else 0
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N, L, E) if batch_first else (L, N, E), generator=g, dtype=F64)
    gout = torch.randn(x.shape, generator=g, dtype=F64)
    pad = None if lengths is None else torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]
    full_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal != "none" else None
    x_ref = x.clone().requires_grad_()
    ref, _ = theirs(x_ref, x_ref, x_ref, key_padding_mask=pad, attn_mask=full_mask, need_weights=False)
    ref.backward(gout)

    x_r = shard(x, seq, layout=layout).clone().requires_grad_()
    pad_r = None if pad is None else shard(pad, 1, layout=layout)
    with context_parallel(layout=layout):
        local_mask = None
        if causal == "attn_mask":  # a one-device model builds the mask from the length it sees
            local_mask = nn.Transformer.generate_square_subsequent_mask(x_r.shape[seq], dtype=F64)
        out_r, weights = ours(x_r, x_r, x_r, key_padding_mask=pad_r, attn_mask=local_mask, need_weights=False,
                              is_causal=causal != "none")
    assert weights is None
    out_r.backward(shard(gout, seq, layout=layout))
    _close(out_r, shard(ref, seq, layout=layout), "module output")
    _close(x_r.grad, shard(x_ref.grad, seq, layout=layout), "input grad")
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        grad = p_ours.grad.clone()
        dist.all_reduce(grad)
        _close(grad, p_theirs.grad, f"grad {name}")


def case_module(world: int) -> None:
    _check_module(17, "contiguous", 11, False, "is_causal", [11, 6])
    _check_module(18, "zigzag", 4 * world, True, "attn_mask", None)
    _check_module(19, "contiguous", 7, True, "none", [3, 7])


def case_encoder_layer(world: int) -> None:
    """A one-device torch encoder layer, swapped to mha, runs on shards under context_parallel:
    causal mask built at the shard's size, boolean padding (torch turns it into floats), or
    no mask; in training and in eval under no_grad (where torch's fused fast path must stay
    off)."""
    torch.manual_seed(20)
    E, N, L, layout = 10, 2, 4 * world, "zigzag"
    theirs = nn.TransformerEncoderLayer(E, 2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=F64)
    ours = mha.swap(copy.deepcopy(theirs))
    x = torch.randn(N, L, E, dtype=F64)
    pad = torch.arange(L)[None, :] >= torch.tensor([L, L - 3])[:, None]
    ref = theirs(x, src_mask=nn.Transformer.generate_square_subsequent_mask(L, dtype=F64), src_key_padding_mask=pad)
    x_r, pad_r = shard(x, 1, layout=layout), shard(pad, 1, layout=layout)
    local = nn.Transformer.generate_square_subsequent_mask(x_r.shape[1], dtype=F64)
    for train in (True, False):
        ours.train(train)
        with context_parallel(layout=layout), torch.set_grad_enabled(train):
            out_r = ours(x_r, src_mask=local, src_key_padding_mask=pad_r, is_causal=True)
        _close(out_r, shard(ref, 1, layout=layout), f"encoder layer, train={train}")
        # Without a mask too: torch's fused kernel in eval would attend this rank's shard alone.
        with context_parallel(layout=layout), torch.set_grad_enabled(train):
            out_r = ours(x_r)
        _close(out_r, shard(theirs(x), 1, layout=layout), f"encoder layer without a mask, train={train}")
    assert torch.backends.mha.get_fastpath_enabled()


def case_fsdp_out_proj_unit(world: int) -> None:
    """FSDP with out_proj as a unit of its own (a policy wrapping every linear layer):
    torch's attention reads out_proj's weight directly and fails on the shard; mha calls
    the wrapped out_proj, whose hooks gather the weight. Output and input gradients equal
    the module's without FSDP (every rank runs the same inputs)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(21)
    plain = mha.MultiheadAttention(8, 2, dtype=F64)
    policy = ModuleWrapPolicy({type(plain.out_proj)})
    sharded = FullyShardedDataParallel(copy.deepcopy(plain), auto_wrap_policy=policy, device_id=torch.device("cpu"))
    assert isinstance(sharded.module.out_proj, FullyShardedDataParallel)
    x = torch.randn(3, 2, 8, dtype=F64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out = sharded(x, x, x, need_weights=False)[0]
    want = plain(y, y, y, need_weights=False)[0]
    out.square().sum().backward()
    want.square().sum().backward()
    _close(out, want, "FSDP output")
    _close(x.grad, y.grad, "FSDP input gradient")


def _raises(exc: type[Exception], match: str, fn: Callable[[], object]) -> None:
    with pytest.raises(exc, match=match):
        fn()


def case_errors(world: int) -> None:
    rank = dist.get_rank()
    q = torch.randn(1, 2, 3, 4, dtype=F64)
    _raises(NotImplementedError, "weights", lambda: ring_attention(q, q, q, weights="mean"))  # type: ignore[arg-type]
    _raises(ValueError, "zigzag", lambda: ring_attention(q, q, q, layout="zigzag"))
    odd = torch.randn(1, 2, 3, 4 + rank, dtype=F64)  # every rank a different head dim
    _raises(ValueError, r"rank 0 \(1, 2, 3, 4\), rank 1 \(1, 2, 3, 5\)", lambda: ring_attention(odd, odd, odd))
    long = torch.randn(1, 2, 3 + (rank == world - 1), 4, dtype=F64)  # shards not as the layout cuts them
    _raises(ValueError, "splits query L", lambda: ring_attention(long, long, long))
    layouts = ("contiguous", "zigzag")
    _raises(ValueError, "same layout", lambda: ring_attention(q, q, q, layout=layouts[rank % 2]))
    pad = KeyPadding(torch.tensor([rank + 1]))
    _raises(ValueError, "same mask", lambda: ring_attention(q, q, q, pad))
    many = torch.full((17,), 4)  # more lengths than a KeyPadding's repr spells out
    many[0] = rank + 1
    q17 = torch.randn(17, 2, 3, 4, dtype=F64)
    _raises(ValueError, "same mask", lambda: ring_attention(q17, q17, q17, KeyPadding(many)))
    long_enough = KeyPadding(torch.tensor([100, 100, 100]))  # no key padded, but not N = 1 lengths
    _raises(ValueError, "3 lengths but the batch has N=1", lambda: ring_attention(q, q, q, long_enough))
    _raises(NotImplementedError, "need_weights=True", lambda: _module_weights())
    _raises(NotImplementedError, "nested", lambda: _module_nested())
    _raises(ValueError, "layout must be", lambda: context_parallel(layout="ring").__enter__())
    # unshard: shards not as shard() cuts them for zigzag would lose or scramble positions;
    # shards of different tensors would make gloo abort the process.
    odd = torch.zeros(2, 3)  # zigzag shards are two equal chunks
    _raises(ValueError, r"sizes \(3, 3(, 3)?\) along dim 1", lambda: unshard(odd, 1, layout="zigzag"))
    uneven = torch.zeros(2, 2 + 2 * (rank == 0))
    _raises(ValueError, r"sizes \(4, 2", lambda: unshard(uneven, 1, layout="zigzag"))
    wide = torch.zeros(1 + rank, 2)
    _raises(ValueError, r"along dim 1 only, got rank 0 \(1, 2\), rank 1 \(2, 2\)", lambda: unshard(wide, 1))
    flat = torch.zeros(2) if rank == 0 else torch.zeros(1, 2)
    _raises(ValueError, "rank 0 a 1-D shard along dim 0, rank 1 a 2-D", lambda: unshard(flat, 0))
    typed = torch.zeros(2, dtype=F64 if rank == 0 else torch.float32)
    _raises(ValueError, "ranks 0 / 1", lambda: unshard(typed, 0))


def _module_nested() -> None:
    x = torch.nested.nested_tensor([torch.randn(3, 6, dtype=F64), torch.randn(2, 6, dtype=F64)], layout=torch.jagged)
    with context_parallel():
        mha.MultiheadAttention(6, 2, batch_first=True, dtype=F64)(x, x, x, need_weights=False)


def _module_weights() -> None:
    x = torch.randn(3, 1, 6, dtype=F64)
    with context_parallel():
        mha.MultiheadAttention(6, 2, dtype=F64)(x, x, x)


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    failures = {}
    for name, fn in CASES.items():
        try:
            fn(world)
        except (Exception, pytest.fail.Exception):
            failures[name] = traceback.format_exc()
    def report() -> None:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(failures))

    if world == 2:
        failures["faults"] = _silent_peer(rank)
    else:
        failures["faults"] = _dead_peer(rank, report)
    report()
    # A fault left the group's gloo pairs mid-message; leave without tearing it down.
    os._exit(0)


TIMEOUT_S = 1.0


def _silent_peer(rank: int) -> str | None:
    """On a group with a short timeout, rank 1 never joins the ring: rank 0 must
    raise within the timeout, not hang. Returns what went wrong, or None."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        time.sleep(1.5 * TIMEOUT_S)
        return None
    return _ring_must_fail(group)


def _dead_peer(rank: int, report: Callable[[], None]) -> str | None:
    """Rank 2 agrees to the ring, then its process dies: rank 0, waiting for its
    block, must raise within the timeout."""
    group = dist.new_group([0, 2], timeout=timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        return None
    if rank == 2:
        q = torch.randn(1, 1, 4, 2, dtype=F64)
        plan_ring(q, q, q, None, None, group, "contiguous", None)  # the ring's first collective
        report()
        os._exit(0)
    return _ring_must_fail(group)


def _ring_must_fail(group: object) -> str | None:
    q = torch.randn(1, 1, 4, 2, dtype=F64)
    began = time.perf_counter()
    try:
        ring_attention(q, q, q, group=group)
    except RuntimeError as e:
        seconds = time.perf_counter() - began
        if seconds > 1.5 * TIMEOUT_S or not str(e).startswith("ring_attention: rank 0 of 2"):
            return f"raised after {seconds:.1f} s: {type(e).__name__}: {e}"
        return None
    return "ring_attention returned although its peer never answered"


def _spawn(target: Callable[..., None], world: int, out_dir: Path, *args: object) -> None:
    mp.start_processes(target, args=(world, _free_port(), str(out_dir), *args), nprocs=world, start_method="fork")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ring_results(request, tmp_path_factory) -> tuple[int, list[dict[str, str]]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"ring{world}")
    # Import what the first calls import here once, not in every forked rank.
    x = torch.zeros(1, 1, 1, 1, dtype=F64)
    mha.attention(x, x, x, Causal(), return_lse=True)
    y = torch.zeros(1, 2, 6, dtype=F64)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=4, dropout=0.0, batch_first=True, dtype=F64)
    layer(y, src_mask=nn.Transformer.generate_square_subsequent_mask(2, dtype=F64))
    mha.swap(layer)(y, is_causal=True, src_mask=nn.Transformer.generate_square_subsequent_mask(2, dtype=F64))
    _spawn(_worker, world, out)
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ring(ring_results, case: str) -> None:
    world, per_rank = ring_results
    failed = {r: f[case] for r, f in enumerate(per_rank) if f.get(case)}
    assert not failed, "\n".join(f"rank {r} of {world}:\n{tb}" for r, tb in failed.items())




def test_faults_raise_within_timeout(ring_results) -> None:
    """World 2: a peer that never answers; world 3: a peer that dies inside the ring."""
    _, per_rank = ring_results
    assert per_rank[0]["faults"] is None, per_rank[0]["faults"]


@pytest.mark.parametrize("shift", [-9, -2, 0, 3, 11])
@pytest.mark.parametrize(("before", "after"), [(None, 0), (0, None), (2, 3), (0, 0)])
def test_window_shift(shift: int, before: int | None, after: int | None) -> None:
    """``Window(shift=)``, how a block keeps the band of the whole sequence: the rule
    ``i + shift - before <= j <= i + shift + after``, on the tiled backend as on the reference."""
    L, S = 7, 11
    mask = Window(before, after, shift=shift)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    want = torch.ones(L, S, dtype=torch.bool)
    if before is not None:
        want &= j >= i + shift - before
    if after is not None:
        want &= j <= i + shift + after
    assert torch.equal(mask.allowed(L, S), want)
    q, k, v, _, _ = _heads(21, 2, 3, 3, L, S, 5, 4)
    ref = mha.attention(q, k, v, mask, return_lse=True, backend="reference")
    for backend in ("tiled", None):
        got = mha.attention(q, k, v, mask, return_lse=True, backend=backend)
        _close(got.output, ref.output, f"output, backend {backend}")
        _close(got.lse, ref.lse, f"lse, backend {backend}")


@pytest.mark.parametrize(("scale", "exc", "match"), [
    (float("nan"), ValueError, "ring_attention: scale must be finite, got nan"),
    (float("inf"), ValueError, "scale must be finite"),
    ("0.5", TypeError, "ring_attention: scale must be a number or None"),
])
def test_ring_checks_the_scale_before_any_collective(scale, exc, match) -> None:
    q = torch.randn(1, 2, 3, 4, dtype=F64)
    with pytest.raises(exc, match=match):
        ring_attention(q, q, q, scale=scale)
