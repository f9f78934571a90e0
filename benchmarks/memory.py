"""Peak-memory growth of one forward: mha.MultiheadAttention against torch.nn.MultiheadAttention.

The targets (fp32, ``need_weights=False`` unless said, self-attention, eval, no_grad):

* ``masked``: L = S = 8192, N = 1, E = 256, H = 8, a right-padded ``key_padding_mask``
  (60% of the keys valid) and the causal boolean ``attn_mask`` (``torch.triu(ones, 1)``);
  mha should grow by at most 10% of torch's growth.
* ``weights``: L = S = 4096, N = 1, E = 256, H = 8, ``need_weights=True`` averaged, no
  mask; mha should grow by at most 25% of torch's growth.

The modules are built with ``batch_first=True`` and fed ``(N, L, E)`` inputs, the layout of
torch's fast path, which is where torch grows the most
(``--seq-first`` measures the default layout instead, where torch grows less).

Each measurement runs in a fresh process (this script with ``--child``), so that no
allocator cache or earlier peak hides the growth. The child builds the module and the
inputs, runs one small forward of the same kind (so that code paths, thread pools and
kernels are loaded before measuring), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``; where that is not writable, ``ru_maxrss`` is read instead and
the growth is measured from the peak so far), runs the forward, and reports the peak
resident set size minus the resident set size before the forward.

Usage::

    .venv/bin/python benchmarks/memory.py            # full size (needs about 8 GB free)
    .venv/bin/python benchmarks/memory.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys

CASES = {
    # name: (full length, quick length, masked, need_weights, target ratio)
    "masked": (8192, 1024, True, False, 0.10),
    "weights": (4096, 512, False, True, 0.25),
}
EMBED, HEADS, BATCH, VALID_FRACTION = 256, 8, 1, 0.6
WARMUP_LENGTH = 64


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the peak resident set size to the current one; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_kib(resettable: bool) -> int:
    if resettable:
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _inputs(length: int, masked: bool, batch_first: bool):
    """Query (also key and value), key_padding_mask and attn_mask of one case."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(length, BATCH, EMBED, generator=generator)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    if not masked:
        return x, None, None
    valid = round(VALID_FRACTION * length)
    key_padding_mask = (torch.arange(length) >= valid).expand(BATCH, length)
    attn_mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    return x, key_padding_mask, attn_mask


def child(case: str, impl: str, length: int, batch_first: bool) -> dict:
    """Measure one forward in this process; the result as a dict."""
    import torch
    from torch import nn

    import mha

    _, _, masked, need_weights, _ = CASES[case]
    torch.manual_seed(0)
    module_class = mha.MultiheadAttention if impl == "mha" else nn.MultiheadAttention
    module = module_class(EMBED, HEADS, batch_first=batch_first).eval()

    def prepared(length: int) -> functools.partial:
        """One forward on inputs of ``length``, built now so that they are not measured."""
        x, key_padding_mask, attn_mask = _inputs(length, masked, batch_first)
        return functools.partial(
            module, x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=need_weights
        )

    with torch.no_grad():
        prepared(WARMUP_LENGTH)()
        measured = prepared(length)
        resettable = _reset_peak()
        before = _status_kib("VmRSS") if resettable else _peak_kib(resettable)
        out, weights = measured()
        peak = _peak_kib(resettable)
    return {
        "case": case,
        "impl": impl,
        "length": length,
        "batch_first": batch_first,
        "growth_bytes": (peak - before) * 1024,
        "peak_reset": resettable,
        "output_bytes": out.numel() * out.element_size(),
        "weights_bytes": 0 if weights is None else weights.numel() * weights.element_size(),
    }


def measure(case: str, impl: str, length: int, batch_first: bool) -> dict:
    """Run :func:`child` in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", case, impl, str(length), str(int(batch_first))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds, not GBs)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--seq-first",
        action="store_true",
        help="(L, N, E) inputs and batch_first=False modules, instead of torch's fast-path "
        "layout (N, L, E) with batch_first=True",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, impl, length, batch_first = args.child
        print(json.dumps(child(case, impl, int(length), batch_first == "1")))
        return 0

    names = [name for name in args.cases.split(",") if name]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; expected some of {', '.join(CASES)}")
    results = []
    header = f"{'case':<8} {'L=S':>6} {'torch growth':>14} {'mha growth':>12} {'mha/torch':>10} {'target':>7}"
    batch_first = not args.seq_first
    layout = f"batch_first={batch_first}"
    print(
        f"peak RSS growth of one forward, N={BATCH}, E={EMBED}, H={HEADS}, fp32, {layout}, "
        "fresh process each"
    )
    print(header)
    for name in names:
        full, quick, _, _, target = CASES[name]
        length = quick if args.quick else full
        theirs = measure(name, "torch", length, batch_first)
        ours = measure(name, "mha", length, batch_first)
        ratio = ours["growth_bytes"] / theirs["growth_bytes"]
        # The targets are for the full sizes; at --quick sizes fixed costs dominate.
        verdict = "" if args.quick else "ok" if ratio <= target else "MISSED"
        results.append({"case": name, "torch": theirs, "mha": ours, "ratio": ratio, "target": target})
        print(
            f"{name:<8} {length:>6} {_mib(theirs['growth_bytes']):>14} {_mib(ours['growth_bytes']):>12} "
            f"{ratio:>9.1%} {f'<={target:.0%}':>7} {verdict}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
