"""Ring attention on gloo ranks (CPU): speed, hidden communication, skipped work,
and a model of where communication hides on GPU interconnects.

    PYTHONPATH=src python benchmarks/ring.py [--length 8192] [--heads 4] [--dim 64] [--repeats 5]

Sections:

1. Work per rank, from the ring's own schedule (no processes): the blocks
   each rank computes under ``Causal`` in the two layouts, for P = 2, 4, 8, and
   with key padding the blocks skipped and the key/value bytes not sent.
2. Timed, 2 gloo ranks with 1 thread each, fp32, ``(1, H, L, D)``: one ring
   forward (lse included) against single-process ``mha.attention`` on the whole
   sequence with 2 threads (the same cores) and with 1, interleaved in one
   timeline, medians of ``--repeats``. Communication hidden under compute, from
   per-step timings: ``1 - wait / transfer`` where ``wait`` is the time a rank
   still waited for the next block after its compute and ``transfer`` the time
   the same block takes with nothing to overlap.
3. Paper model: a step's transfer hides under its compute when the chunk per
   rank ``c`` satisfies ``flops(c) / F >= bytes(c) / B``.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mha
from mha.distributed import _ring
from mha.distributed._rules import rule_from_mask
from mha.masks import Causal, KeyPadding


def work_table(L: int) -> None:
    print(f"## Work per rank under Causal, L = {L} (blocks of L/2P x L/2P keys; a diagonal block counts 1)\n")
    print("| P | layout | blocks computed per rank | max / min | score elements per rank (M) |")
    print("|---|---|---|---|---|")
    rule = rule_from_mask(Causal(), L, L, None)
    for P in (2, 4, 8):
        for layout in ("contiguous", "zigzag"):
            q_pieces, k_pieces, needed, _ = _ring.schedule(rule, L, L, P, layout)
            unit = (L // (2 * P)) ** 2
            blocks, elements = [], []
            for x in range(P):
                pairs = [(q, k) for s in range(P) for q in q_pieces[x] for k in k_pieces[s] if rule.is_open(q, k)]
                elements.append(sum(q.length * k.length for q, k in pairs))
                blocks.append(sum(q.length * k.length for q, k in pairs) // unit)
            print(f"| {P} | {layout} | {', '.join(map(str, blocks))} | {max(blocks) / min(blocks):.2f} | "
                  f"{', '.join(f'{e / 1e6:.1f}' for e in elements)} |")
    print("\n## Key padding: blocks skipped and bytes not sent (contiguous, per ring pass)\n")
    print("| P | lengths (of L) | blocks computed / all | key/value sends / P(P-1) |")
    print("|---|---|---|---|")
    for P in (2, 4, 8):
        for frac in (0.25, 0.5):
            lengths = torch.tensor([int(L * frac), int(L * frac) // 2])
            rule = rule_from_mask(KeyPadding(lengths), L, L, None)
            _, _, needed, hops = _ring.schedule(rule, L, L, P, "contiguous")
            computed = sum(map(sum, needed))
            print(f"| {P} | {frac:.2f}, {frac / 2:.3f} | {computed} / {P * P} | {sum(hops)} / {P * (P - 1)} |")
    print()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    H, L, D = args.heads, args.length, args.dim
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    shards = [mha.distributed.shard(t, 2) for t in (q, k, v)]
    zig = [mha.distributed.shard(t, 2, layout="zigzag") for t in (q, k, v)]
    buf = torch.cat([shards[1].reshape(-1), shards[2].reshape(-1)])
    peer = 1 - rank

    def transfer() -> None:
        incoming = torch.empty_like(buf)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, buf, peer), dist.P2POp(dist.irecv, incoming, peer)])
        for w in works:
            w.wait()

    def ring(mask, layout, tensors, trace):
        r = _ring.plan_ring(*tensors, mask, None, None, layout, None)
        r.trace = trace
        with torch.no_grad():
            _ring.ring_forward(r, *tensors)

    results: dict[str, list] = {k: [] for k in ("anchor2", "anchor1", "anchor2_nolse", "ring", "transfer",
                                                 "causal_contiguous", "causal_zigzag", "steps")}
    for rep in range(args.repeats + 1):
        dist.barrier()
        if rank == 0:
            torch.set_num_threads(2)
            a2 = _timed(lambda: mha.attention(q, k, v, return_lse=True))
            a2n = _timed(lambda: mha.attention(q, k, v))
            torch.set_num_threads(1)
            a1 = _timed(lambda: mha.attention(q, k, v, return_lse=True))
        dist.barrier()
        torch.set_num_threads(1)
        transfer()
        dist.barrier()
        tr = _timed(transfer)
        dist.barrier()
        trace: list = []
        rt = _timed(functools.partial(ring, None, "contiguous", shards, trace))
        dist.barrier()
        cc = _timed(lambda: ring(Causal(), "contiguous", shards, None))
        dist.barrier()
        cz = _timed(lambda: ring(Causal(), "zigzag", zig, None))
        if rep == 0:
            continue  # warm-up
        if rank == 0:
            results["anchor2"].append(a2)
            results["anchor2_nolse"].append(a2n)
            results["anchor1"].append(a1)
        results["ring"].append(rt)
        results["transfer"].append(tr)
        results["causal_contiguous"].append(cc)
        results["causal_zigzag"].append(cz)
        results["steps"].append([(s.compute, s.wait, s.sent) for s in trace])
    out[rank] = results
    dist.barrier()
    dist.destroy_process_group()


def timed_table(args: argparse.Namespace) -> dict:
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(2, _free_port(), args, out), nprocs=2, start_method="fork")
    r0, r1 = out[0], out[1]
    med = statistics.median
    H, L, D = args.heads, args.length, args.dim
    flops = 4 * H * L * L * D
    ring = [max(a, b) for a, b in zip(r0["ring"], r1["ring"], strict=True)]
    print(f"## Timed: 2 gloo ranks x 1 thread, fp32, (1, {H}, {L}, {D}), medians of {args.repeats}\n")
    print("| what | ms | GFLOP/s | ring speed-up |")
    print("|---|---|---|---|")
    rows = [
        ("ring forward (lse), slower rank", med(ring)),
        ("mha.attention, 1 process, 2 threads, lse", med(r0["anchor2"])),
        ("mha.attention, 1 process, 2 threads, no lse (SDPA)", med(r0["anchor2_nolse"])),
        ("mha.attention, 1 process, 1 thread, lse", med(r0["anchor1"])),
    ]
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.0f} | {flops / t / 1e9:.1f} | {t / med(ring):.2f}x |")
    per_ratio = [a / b for a, b in zip(r0["anchor2"], ring, strict=True)]
    print(f"\nring / anchor (2 threads, lse), per interleaved repeat: {', '.join(f'{x:.2f}' for x in per_ratio)}")

    print("\n### Communication hidden under compute (per step with a transfer)\n")
    print("| rank | compute ms | waited ms | transfer alone ms | MB sent | hidden |")
    print("|---|---|---|---|---|---|")
    model: dict = {}
    for rank, r in ((0, r0), (1, r1)):
        transfer = med(r["transfer"])
        comp = med(s[0][0] for s in r["steps"])
        wait = med(s[0][1] for s in r["steps"])
        sent = r["steps"][0][0][2]
        hidden = max(0.0, 1 - wait / transfer)
        print(f"| {rank} | {comp * 1e3:.0f} | {wait * 1e3:.1f} | {transfer * 1e3:.1f} | {sent / 1e6:.1f} | "
              f"{hidden:.0%} |")
        model.setdefault("bandwidth", []).append(sent / transfer)
        block_flops = 4 * H * (L // 2) ** 2 * D
        model.setdefault("flops", []).append(block_flops / comp)
    print("\n### Causal, time per rank (ms; balance = slower / faster)\n")
    print("| layout | rank 0 | rank 1 | balance |")
    print("|---|---|---|---|")
    for layout in ("contiguous", "zigzag"):
        a, b = med(r0[f"causal_{layout}"]), med(r1[f"causal_{layout}"])
        print(f"| {layout} | {a * 1e3:.0f} | {b * 1e3:.0f} | {max(a, b) / min(a, b):.2f} |")
    print()
    return {"bandwidth": med(model["bandwidth"]), "flops": med(model["flops"])}


def paper_model(measured: dict | None) -> None:
    print("## Paper model: the chunk per rank c at which a step's transfer hides under its compute\n")
    print("Forward step: compute 4 c^2 H D flops, transfer 2 c Hkv D bytes-per-element bytes; hidden iff")
    print("c >= F * bytes_per_element * Hkv / (2 * H * B). Causal (zigzag) steps do half the work: c doubles.")
    print("H = Hkv (no GQA; GQA with H/Hkv = g divides c by g).\n")
    print("| setting | F (TFLOP/s) | B (GB/s) | c non-causal | c causal | L = P c, P = 8 (causal) |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("8 GPUs, NVLink 900 GB/s, bf16 (F: H100 Triton forward, README)", 460e12, 900e9, 2),
        ("2 nodes, 400 Gb/s per GPU, bf16", 460e12, 50e9, 2),
    ]
    if measured is not None:
        rows.append(("this CPU: 2 gloo ranks, fp32 (measured above)", measured["flops"], measured["bandwidth"], 4))
    for name, F, B, elem in rows:
        c = F * elem / (2 * B)
        print(f"| {name} | {F / 1e12:.3g} | {B / 1e9:.3g} | {c:,.0f} | {2 * c:,.0f} | {16 * c:,.0f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-timing", action="store_true", help="sections 1 and 3 only")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work_table(args.length)
    measured = None if args.no_timing else timed_table(args)
    paper_model(measured)


if __name__ == "__main__":
    main()
