"""``mha bench``: time :class:`mha.MultiheadAttention` against :class:`torch.nn.MultiheadAttention`.

Both modules hold the same weights (``load_state_dict``) and see the same inputs. After
``--warmup`` interleaved warm-up calls, ``--repeats`` timed calls alternate torch, mha,
torch, mha, ... in one process, so that both sides share the machine's state (clock,
caches, other load). Each case reports the min and the median of both sides, the speed-up
(torch time / mha time, on medians and on mins), the achieved useful GFLOP/s (see
:func:`useful_flops`) and its ratio to an fp32 matmul roofline measured in the same run
(:class:`Roofline`).

Every module is built with ``batch_first=True``, torch's fast-path layout (torch's eval
cases then run its native fast path wherever it accepts the call). Results are printed as a
table and, with ``--json PATH``, written to that file with every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn

from ._module import MultiheadAttention

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of the cases; ``FULL`` is the README's table, ``QUICK`` a smoke test."""

    batch: int
    length: int
    embed: int
    heads: int
    min_length: int
    causal_length: int
    roofline_n: int
    decode_steps: int


FULL = Sizes(
    batch=8, length=512, embed=512, heads=8, min_length=64, causal_length=4096, roofline_n=2048, decode_steps=64
)
QUICK = Sizes(batch=3, length=32, embed=32, heads=4, min_length=8, causal_length=64, roofline_n=256, decode_steps=8)

LENGTHS_SEED = 1234


def useful_flops(
    q_lengths: list[int], k_lengths: list[int], embed: int, causal: bool = False, backward: bool = False
) -> int:
    r"""Floating-point operations of the useful work of one self- or cross-attention call.

    With ``E`` the embedding width, ``T_q = sum(q_lengths)`` and ``T_k = sum(k_lengths)``
    the real (unpadded) query and key tokens, and ``P`` the allowed (query, key) pairs
    among real tokens (``sum_n lq_n * lk_n``, or ``sum_n l_n (l_n + 1) / 2`` for causal
    self-attention), one forward costs

    .. math::

        F = \underbrace{2 T_q E^2}_{Q\ \text{proj}} + \underbrace{2 \cdot 2 T_k E^2}_{K, V\ \text{proj}}
            + \underbrace{2 T_q E^2}_{\text{out proj}}
            + \underbrace{2 P E}_{Q K^\top} + \underbrace{2 P E}_{P V}

    (each ``(m, k) x (k, n)`` matmul counts ``2 m k n``; over the ``H`` heads of width
    ``E / H`` the attention matmuls add up to ``2 P E`` each). Padded tokens, blocked
    pairs, softmax, scaling, biases and weight averaging are not counted. With
    ``backward=True`` the forward and a backward that computes the input and weight
    gradients are counted, ``3 F`` (each matmul's backward is two matmuls of its size).
    """
    if causal:
        pairs = sum(lq * (lq + 1) // 2 for lq in q_lengths)
    else:
        pairs = sum(lq * lk for lq, lk in zip(q_lengths, k_lengths, strict=True))
    tokens_q, tokens_k = sum(q_lengths), sum(k_lengths)
    forward = 2 * embed * embed * (2 * tokens_q + 2 * tokens_k) + 4 * embed * pairs
    return 3 * forward if backward else forward


@dataclass
class Case:
    """One benchmark: a zero-argument callable per side, and the useful work of one call."""

    name: str
    description: str
    flops: int
    torch_call: Callable[[], object]
    mha_call: Callable[[], object]
    grad: bool = False
    meta: dict = field(default_factory=dict)


CASE_DESCRIPTIONS = {
    "dense": "self-attention N={b}, L={l}, E={e}, H={h}, eval, need_weights=False",
    "padded": "dense, right-padded batch (lengths {lo}..{l}) with key_padding_mask",
    "jagged": "jagged nested tensor (mha) vs torch's strided nested fast path, same lengths",
    "weights": "dense, need_weights=True averaged",
    "causal": "N=1, L={lc}, E={e}, H={h}, boolean causal attn_mask only, need_weights=False",
    "causal-hint": "causal, attn_mask and is_causal=True for both",
    "train": "dense, training forward + backward of output.sum(), dropout 0",
    "decode": "greedy self-attention decoding of {t} tokens, N={b}, E={e}, H={h}: mha on a KV cache, "
    "torch recomputing the causal prefix each step",
    "decode-step": "one decoding step, N={b}, E={e}, H={h}, {l} cached tokens: mha on a KV cache, "
    "torch projecting and attending the whole prefix",
}
CASE_NAMES = tuple(CASE_DESCRIPTIONS)


def _case_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown case(s) {', '.join(unknown) or repr(text)}; expected a comma-separated "
            f"list of: {', '.join(CASE_NAMES)}"
        )
    return names


def _integer(text: str, low: int, high: int | None, expected: str) -> int:
    """``text`` as an int within ``low..high`` (no upper bound when None)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, None, "an integer >= 0")


def _thread_count(text: str) -> int:
    return _integer(text, 1, 2**31 - 1, "a positive integer below 2**31 (torch.set_num_threads takes an int32)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``mha bench`` options to ``parser``."""
    parser.add_argument(
        "--cases",
        type=_case_list,
        default=list(CASE_NAMES),
        help=f"comma-separated cases to run (default: all of {','.join(CASE_NAMES)})",
    )
    parser.add_argument(
        "--threads",
        type=_thread_count,
        default=None,
        help="torch.set_num_threads for the run (default: torch's current setting)",
    )
    parser.add_argument("--repeats", type=_positive_int, default=10, help="timed calls per side (default 10)")
    parser.add_argument(
        "--warmup", type=_non_negative_int, default=2, help="untimed warm-up calls per side (default 2)"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="default float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH",
        help="also write every timing and the machine's description to this JSON file (default: none)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes, a smoke test in seconds; its numbers are indicative only",
    )


def _module_pair(
    sizes: Sizes, dtype: torch.dtype, device: torch.device, train: bool = False
) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """torch's module and mha's with the same weights (random biases, so none is trivially 0)."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(sizes.embed, sizes.heads, batch_first=True, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_(std=0.02)
    ours = MultiheadAttention(sizes.embed, sizes.heads, batch_first=True, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(train)
    ours.train(train)
    return theirs, ours


def _random_lengths(sizes: Sizes) -> list[int]:
    generator = torch.Generator().manual_seed(LENGTHS_SEED)
    return torch.randint(sizes.min_length, sizes.length + 1, (sizes.batch,), generator=generator).tolist()


def _self_call(module: nn.Module, x: Tensor, **kwargs: object) -> Callable[[], object]:
    return lambda: module(x, x, x, **kwargs)


def _train_call(module: nn.Module, x: Tensor) -> Callable[[], object]:
    def step() -> Tensor:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x, x, x, need_weights=False)[0]
        out.sum().backward()
        return out

    return step


def build_case(name: str, sizes: Sizes, dtype: torch.dtype, device: torch.device) -> Case:
    """The inputs, modules and callables of case ``name``."""
    b, length, e = sizes.batch, sizes.length, sizes.embed
    description = CASE_DESCRIPTIONS[name].format(
        b=b, l=length, e=e, h=sizes.heads, lo=sizes.min_length, lc=sizes.causal_length, t=sizes.decode_steps
    )
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    theirs, ours = _module_pair(sizes, dtype, device, train=name == "train")
    full = [length] * b
    if name in ("dense", "weights", "train"):
        x = randn(b, length, e)
        if name == "train":
            x.requires_grad_(True)
            flops = useful_flops(full, full, e, backward=True)
            return Case(name, description, flops, _train_call(theirs, x), _train_call(ours, x), grad=True)
        kwargs: dict[str, object] = {"need_weights": name == "weights"}
        flops = useful_flops(full, full, e)
        return Case(name, description, flops, _self_call(theirs, x, **kwargs), _self_call(ours, x, **kwargs))
    if name in ("padded", "jagged"):
        lengths = _random_lengths(sizes)
        flops = useful_flops(lengths, lengths, e)
        meta = {"lengths": lengths, "padding_fraction": 1 - sum(lengths) / (b * length)}
        if name == "padded":
            x = randn(b, length, e)
            padding = torch.arange(length, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
            kwargs = {"key_padding_mask": padding, "need_weights": False}
            return Case(
                name, description, flops, _self_call(theirs, x, **kwargs), _self_call(ours, x, **kwargs), meta=meta
            )
        sequences = [randn(n, e) for n in lengths]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
            strided = torch.nested.nested_tensor(sequences)
        jagged = torch.nested.nested_tensor(sequences, layout=torch.jagged)
        return Case(
            name,
            description,
            flops,
            _self_call(theirs, strided, need_weights=False),
            _self_call(ours, jagged, need_weights=False),
            meta=meta,
        )
    if name == "decode":
        return _greedy_case(description, sizes, theirs, ours, randn(b, 1, e))
    if name == "decode-step":
        return _step_case(description, sizes, theirs, ours, randn(b, length, e), randn(b, 1, e))
    # causal, causal-hint
    lc = sizes.causal_length
    x = randn(1, lc, e)
    mask = torch.ones(lc, lc, dtype=torch.bool, device=device).triu(1)
    kwargs = {"attn_mask": mask, "need_weights": False, "is_causal": name == "causal-hint"}
    flops = useful_flops([lc], [lc], e, causal=True)
    return Case(name, description, flops, _self_call(theirs, x, **kwargs), _self_call(ours, x, **kwargs))


def _decode_flops(sizes: Sizes, keys: list[int]) -> int:
    """Useful work of decoding one token per sequence at each step, step ``i`` attending
    ``keys[i]`` positions: the projections of one token and the attention over the keys."""
    one = [1] * sizes.batch
    return len(keys) * useful_flops(one, one, sizes.embed) + 4 * sizes.embed * sizes.batch * sum(keys)


def _greedy_case(
    description: str, sizes: Sizes, theirs: nn.MultiheadAttention, ours: MultiheadAttention, first: Tensor
) -> Case:
    """Each step's output (N, 1, E) is the next step's input; the result is every step's output."""
    steps = sizes.decode_steps
    blocked = torch.ones(steps, steps, dtype=torch.bool, device=first.device).triu(1)

    def torch_greedy() -> Tensor:
        seq = first
        for t in range(1, steps + 1):
            out = theirs(seq, seq, seq, attn_mask=blocked[:t, :t], need_weights=False)[0]
            seq = torch.cat([seq, out[:, -1:]], 1)
        return seq[:, 1:]

    def mha_greedy() -> Tensor:
        cache = ours.new_cache(sizes.batch, steps)
        outputs = [first]
        for _ in range(steps):
            outputs.append(ours(outputs[-1], outputs[-1], outputs[-1], need_weights=False, cache=cache)[0])
        return torch.cat(outputs[1:], 1)

    flops = _decode_flops(sizes, list(range(1, steps + 1)))
    return Case("decode", description, flops, torch_greedy, mha_greedy, meta={"steps": steps})


def _step_case(
    description: str, sizes: Sizes, theirs: nn.MultiheadAttention, ours: MultiheadAttention, prefix: Tensor, new: Tensor
) -> Case:
    """The token ``new`` (N, 1, E) after ``prefix`` (N, S, E): mha's cache holds the prefix
    (each timed call sets its lengths back to S), torch attends to ``cat(prefix, new)``."""
    S = prefix.shape[1]
    cache = ours.new_cache(sizes.batch, S + 1)
    with torch.no_grad():
        ours(prefix, prefix, prefix, need_weights=False, cache=cache)
    everything = torch.cat([prefix, new], 1)

    def mha_step() -> object:
        cache.lengths.fill_(S)
        return ours(new, new, new, need_weights=False, cache=cache)

    def torch_step() -> object:
        return theirs(new, everything, everything, need_weights=False)

    flops = _decode_flops(sizes, [S + 1])
    return Case("decode-step", description, flops, torch_step, mha_step, meta={"cached": S})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by ``call()``, its device work included."""
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - start


def _output(result: object) -> Tensor:
    """The attention output of a module call's result (a tuple) or of a training step."""
    output = result[0] if isinstance(result, tuple) else result
    if not isinstance(output, Tensor):
        raise TypeError(f"a benchmark call returned {type(output).__name__}, expected a tensor")
    return output


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    """Largest elementwise difference between two outputs, dense or nested of any layout."""
    if a.is_nested or b.is_nested:
        pairs = list(zip(a.unbind(), b.unbind(), strict=True))
    else:
        pairs = [(a, b)]
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in pairs)


def _stats(times: list[float]) -> dict:
    return {"times_s": times, "min_s": min(times), "median_s": statistics.median(times)}


class Roofline:
    """fp32 ``torch.mm`` of two ``(n, n)`` matrices at the current thread count, sampled
    before and after every case; the roofline is the best sample of the run, so that a
    moment of load on a shared machine does not lower it."""

    def __init__(self, n: int, device: torch.device, repeats: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(n, n, generator=generator).to(device) for _ in range(2))
        self.n, self.device, self.repeats = n, device, repeats
        self.samples: list[float] = []
        torch.mm(self.a, self.b)

    def sample(self) -> None:
        """Time ``repeats`` matmuls; keep the best GFLOP/s of them."""
        best = min(_timed(lambda: torch.mm(self.a, self.b), self.device) for _ in range(self.repeats))
        self.samples.append(2 * self.n**3 / best / 1e9)

    def report(self) -> dict:
        return {"gflops": max(self.samples), "n": self.n, "dtype": "float32", "samples_gflops": self.samples}


class _Progress:
    """A transient progress bar on stderr, one step per warm-up or timed call."""

    def __init__(self, total: int) -> None:
        self._bar = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task("bench", total=total)

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        with self._bar:
            yield self

    def stage(self, text: str) -> None:
        self._bar.update(self._task, description=text)

    def advance(self) -> None:
        self._bar.advance(self._task)


def run_case(case: Case, repeats: int, warmup: int, device: torch.device, progress: _Progress) -> dict:
    """Warm up and time both sides of ``case``, interleaved; a side that raises on its first
    call makes the case ``unsupported`` with the reason."""
    result = {"name": case.name, "description": case.description, "flops": case.flops, **case.meta}
    grad = torch.enable_grad() if case.grad else torch.no_grad()
    outputs = {}
    times: dict[str, list[float]] = {"torch": [], "mha": []}
    calls = {"torch": case.torch_call, "mha": case.mha_call}
    with grad:
        for side, call in calls.items():
            try:
                outputs[side] = _output(call())
            except (NotImplementedError, RuntimeError, ValueError, TypeError) as error:
                result.update(status="unsupported", reason=f"{side}: {type(error).__name__}: {error}")
                return result
        result["max_abs_diff"] = _max_abs_diff(outputs["torch"], outputs["mha"])
        del outputs
        for step in range(warmup + repeats):
            for side, call in calls.items():
                elapsed = _timed(call, device)
                if step >= warmup:
                    times[side].append(elapsed)
                progress.advance()
    result["status"] = "ok"
    for side in calls:
        result[side] = _stats(times[side])
        result[side]["gflops"] = case.flops / result[side]["min_s"] / 1e9
    result["speedup_median"] = result["torch"]["median_s"] / result["mha"]["median_s"]
    result["speedup_min"] = result["torch"]["min_s"] / result["mha"]["min_s"]
    return result


def _machine_info(device: torch.device, dtype_name: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import __version__

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mha": __version__,
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _fmt_rate(value: float) -> str:
    """Three significant digits, so that a small rate never prints as 0.0."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _fmt_percent(fraction: float) -> str:
    percent = 100 * fraction
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


TABLE_COLUMNS = (
    "case",
    "torch\nmin",
    "torch\nmed",
    "mha\nmin",
    "mha\nmed",
    "speed-up\nmed",
    "speed-up\nmin",
    "GFLOP/s",
    "% of\nmatmul",
)


def _table_rows(report: dict) -> list[list[str]]:
    roofline = report["roofline"]["gflops"]
    rows = []
    for case in report["cases"]:
        if case["status"] != "ok":
            rows.append([case["name"], "unsupported", *[""] * (len(TABLE_COLUMNS) - 2)])
            continue
        torch_s, mha_s = case["torch"], case["mha"]
        rows.append([
            case["name"],
            _fmt_ms(torch_s["min_s"]),
            _fmt_ms(torch_s["median_s"]),
            _fmt_ms(mha_s["min_s"]),
            _fmt_ms(mha_s["median_s"]),
            f"{case['speedup_median']:.2f}",
            f"{case['speedup_min']:.2f}",
            _fmt_rate(mha_s["gflops"]),
            _fmt_percent(mha_s["gflops"] / roofline),
        ])
    return rows


QUICK_CAUTION = (
    "--quick: tiny sizes, where per-call overhead dominates and times vary from run to run; "
    "these numbers are indicative only. Run without --quick to measure."
)


def _print_report(report: dict) -> None:
    machine, roofline = report["machine"], report["roofline"]
    title = (
        f"mha {machine['mha']} vs torch {machine['torch']}: {machine['cpu']}, {machine['device']}, "
        f"threads={machine['threads']}, {machine['dtype']}; fp32 matmul "
        f"{roofline['gflops']:.1f} GFLOP/s"
    )
    legend = (
        "times in ms; speed-up = torch time / mha time, on medians and on mins; "
        "GFLOP/s: mha's useful work (padding excluded) at its min time; % of matmul: that rate "
        "as a share of a plain fp32 matmul's in the same run, about the most this machine reaches"
    )
    rows = _table_rows(report)
    notes = [
        f"{case['name']}: {case['reason']}" for case in report["cases"] if case["status"] != "ok"
    ]
    table = Table(title=title, caption=legend, box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1))
    for i, column in enumerate(TABLE_COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note, markup=False)
    if report["config"]["quick"]:
        console.print(QUICK_CAUTION, markup=False, style="yellow")


def run(args: argparse.Namespace) -> int:
    """Run ``mha bench`` with parsed ``args``: print a table, write ``--json`` if given.

    Returns the exit status: 0, or 2 when the JSON file cannot be written."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mha bench: --device cuda given but torch sees no CUDA device", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = _run_cases(args, device)
    finally:
        torch.set_num_threads(previous_threads)
    _print_report(report)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report, indent=2))
        except OSError as err:
            print(f"mha bench: cannot write --json {args.json}: {err}", file=sys.stderr)
            return 2
        print(f"wrote every timing to {args.json.resolve()}")
    return 0


def _run_cases(args: argparse.Namespace, device: torch.device) -> dict:
    """Measure the roofline, then every case; the report that goes to JSON."""
    dtype = DTYPES[args.dtype]
    sizes = QUICK if args.quick else FULL
    progress = _Progress(len(args.cases) * 2 * (args.warmup + args.repeats))
    results = []
    with progress.running():
        progress.stage("fp32 matmul roofline")
        roofline = Roofline(sizes.roofline_n, device)
        roofline.sample()
        for name in args.cases:
            progress.stage(name)
            case = build_case(name, sizes, dtype, device)
            results.append(run_case(case, args.repeats, args.warmup, device, progress))
            del case  # free its modules and inputs before the next roofline sample
            roofline.sample()
    roofline_report = roofline.report()
    for result in results:
        if result["status"] == "ok":
            for side in ("torch", "mha"):
                result[side]["roofline_fraction"] = result[side]["gflops"] / roofline_report["gflops"]
    return {
        "machine": _machine_info(device, args.dtype),
        "config": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "sizes": asdict(sizes),
            "batch_first": True,
            "lengths_seed": LENGTHS_SEED,
        },
        "roofline": roofline_report,
        "cases": results,
    }
