"""The ``mha`` command: ``demo``, ``explain``, ``plot`` and ``bench``.

Exit status: 0 on success, 2 on bad usage (argparse errors, an invalid
``explain`` call, an unreadable ``--weights`` file, an output path that cannot be
written, an unavailable subcommand), 1 when ``plot`` lacks matplotlib (the
``plot`` extra). Files are written only where ``--out`` or ``--json`` says, and
each command prints the path it wrote.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import pickle
import sys
from pathlib import Path

import torch
from rich.console import Console

from . import __version__

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MASK_KINDS = ("bool", "float")
_MAX_ELEMENTS = 2**60  # at 8 bytes an element, the most a tensor's int64 size in bytes holds


def _shape(text: str) -> tuple[int, ...]:
    """``10,32,64`` -> ``(10, 32, 64)``."""
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 10,32,64, got {text!r}") from None
    if not dims or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative sizes like 10,32,64, got {text!r}")
    if max(dims) >= 2**63 or math.prod(dims) > _MAX_ELEMENTS:
        raise argparse.ArgumentTypeError(
            "expected sizes below 2**63 whose product is at most 2**60 (a tensor's size in bytes must fit in int64), "
            f"got {text!r}"
        )
    return dims


def _mask_spec(text: str) -> tuple[tuple[int, ...], str]:
    """``10,15:bool``, ``32,15`` or ``10,15:float`` -> (shape, dtype name)."""
    shape_text, _, kind = text.partition(":")
    kind = kind or "bool"
    if kind not in _MASK_KINDS:
        raise argparse.ArgumentTypeError(f"mask dtype must be bool or float, got {kind!r}")
    return _shape(shape_text), kind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mha",
        description="mha: multi-head attention for PyTorch. What goes into nn.MultiheadAttention, "
        "what comes out, and what mha does differently.",
    )
    parser.add_argument("--version", action="version", version=f"mha {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="walk through four calls: shapes, padding that gives NaN, an inverted mask, errors",
        description="Four calls to mha.MultiheadAttention beside torch.nn.MultiheadAttention: "
        "a table of every input and output, a fully padded sequence (NaN in torch, zeros in mha), "
        "an inverted boolean 'causal' mask and its fix, malformed calls and their errors, and a "
        "heatmap PNG of the inverted and the causal mask's weights (needs matplotlib: "
        "pip install 'mha[plot]'; skipped without it).",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("mha-demo.png"), metavar="FILE.png",
        help="where to write the heatmap (default ./mha-demo.png)",
    )
    demo.add_argument("--no-plot", action="store_true", help="skip the heatmap")

    explain = sub.add_parser(
        "explain",
        help="say what a MultiheadAttention call does, without running it",
        description="Check a call by its shapes, as mha.MultiheadAttention would, and print each "
        "input's role and dims, the output shapes, the backend dispatch picks (and why not the "
        "others) and the memory it needs. Sizes are comma-separated: --query 10,32,64. "
        "An invalid call prints the module's error and exits 2.",
        epilog="example: mha explain --embed-dim 64 --num-heads 8 --query 10,32,64 --key 15,32,64 "
        "--value 15,32,64 --key-padding-mask 32,15 --attn-mask 10,15:bool",
    )
    module = explain.add_argument_group("module (constructor arguments)")
    module.add_argument("--embed-dim", type=int, required=True, help="E")
    module.add_argument("--num-heads", type=int, required=True, help="H; E must be divisible by it")
    module.add_argument("--kdim", type=int, default=None, help="key features (default E)")
    module.add_argument("--vdim", type=int, default=None, help="value features D (default E)")
    module.add_argument("--batch-first", action="store_true", help="inputs are (N, L, E)")
    module.add_argument("--dropout", type=float, default=0.0, help="attention dropout (default 0)")
    module.add_argument("--no-bias", action="store_true", help="bias=False")
    module.add_argument("--add-bias-kv", action="store_true", help="add_bias_kv=True")
    module.add_argument("--add-zero-attn", action="store_true", help="add_zero_attn=True")
    module.add_argument("--eval", action="store_true", help="explain the module in eval mode (no dropout)")
    call = explain.add_argument_group("call (forward arguments)")
    call.add_argument("--query", type=_shape, required=True, metavar="L,N,E", help="query shape")
    call.add_argument("--key", type=_shape, default=None, metavar="S,N,E", help="key shape (default: query's)")
    call.add_argument("--value", type=_shape, default=None, metavar="S,N,D", help="value shape (default: key's)")
    call.add_argument(
        "--key-padding-mask", type=_mask_spec, default=None, metavar="N,S[:bool|float]",
        help="key_padding_mask shape and dtype (default bool)",
    )
    call.add_argument(
        "--attn-mask", type=_mask_spec, default=None, metavar="L,S[:bool|float]",
        help="attn_mask shape and dtype (default bool); (N*H, L, S) and (N, H, L, S) work too",
    )
    call.add_argument(
        "--need-weights", action=argparse.BooleanOptionalAction, default=True,
        help="return attention weights (default: yes, as forward)",
    )
    call.add_argument(
        "--average-attn-weights", action=argparse.BooleanOptionalAction, default=True,
        help="average the weights over heads (default: yes)",
    )
    call.add_argument("--is-causal", action="store_true", help="is_causal=True")
    call.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="default float32")
    call.add_argument("--device", default="cpu", help="device to explain dispatch for (default cpu)")

    plot = sub.add_parser(
        "plot",
        help="draw attention-weight heatmaps: per head and their mean, or per batch row",
        description="Heatmaps of attention weights (needs matplotlib: pip install 'mha[plot]'). "
        "Input: a tensor saved with torch.save: (N, L, S) averaged over heads (the module's "
        "default), (N, H, L, S) per head, or (L, S); --layout HLS for an unbatched call's per-head "
        "(H, L, S). By default the weights of a demo call (causal self-attention, L=S=10, N=32, "
        "E=64, H=8).",
    )
    plot.add_argument("--weights", type=Path, default=None, metavar="FILE.pt", help="saved weights tensor")
    plot.add_argument(
        "--out", type=Path, default=Path("mha-weights.png"), metavar="FILE.png",
        help="output image (default ./mha-weights.png)",
    )
    plot.add_argument(
        "--layout", choices=["LS", "HLS", "NLS", "NHLS"], default=None,
        help="what the dimensions mean (default: by their number, 3-D as NLS)",
    )
    plot.add_argument("--batch", type=int, default=0, help="batch row to draw from 4-D weights (default 0)")
    plot.add_argument("--title", default=None, help="figure title")

    sub.add_parser(
        "bench",
        help="time mha against torch.nn.MultiheadAttention",
        description="Benchmarks of mha against torch.nn.MultiheadAttention.",
        add_help=False,
    )
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` starts with, or None when it starts with an option (``-h``,
    ``--version``: the top-level parser's, which answer before any subcommand runs)."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mha`` and ``python -m mha``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if _command(argv) == "bench":
        return _bench(parser, argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return _code(exit_)
    if args.command == "explain":
        return _explain(args)
    if args.command == "demo":
        from ._demo import run

        out = None if args.no_plot else args.out
        if out is not None and (problem := _unwritable(out)):
            return _usage_error("demo", "--out", out, problem)
        return run(_console(), out)
    return _plot(args, _console())


def _code(exit_: SystemExit) -> int:
    return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be created at ``path``, or None when it can (as far as a look tells)."""
    if path.is_dir():
        return "it is a folder; give a file name inside it"
    folder = path.absolute().parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist; create it or choose another path"
    return None


def _usage_error(command: str, option: str, path: Path, problem: str) -> int:
    print(f"mha {command}: cannot write {option} {path}: {problem}", file=sys.stderr)
    return 2


def _bench(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    try:
        bench = importlib.import_module("mha._bench")
    except ImportError as err:
        print(f"mha bench is not available in this install: {err}", file=sys.stderr)
        return 2
    index = argv.index("bench")
    bench_parser = argparse.ArgumentParser(
        prog="mha bench", description="Benchmarks of mha against torch.nn.MultiheadAttention."
    )
    bench.add_arguments(bench_parser)
    try:
        args = bench_parser.parse_args(argv[index + 1 :])
    except SystemExit as exit_:
        return _code(exit_)
    if args.json is not None and (problem := _unwritable(args.json)):
        return _usage_error("bench", "--json", args.json, problem)
    return bench.run(args)


def _console() -> Console:
    console = Console(highlight=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 100
    return console


def _explain(args: argparse.Namespace) -> int:
    from ._explain import explain
    from ._module import MultiheadAttention

    dtype = _DTYPES[args.dtype]
    try:
        torch.empty((), device=args.device)
    except (RuntimeError, AssertionError) as err:
        print(f"mha explain: device {args.device!r} is not usable here: {err}", file=sys.stderr)
        return 2
    meta = torch.device("meta")
    key_shape = args.key or args.query
    value_shape = args.value or key_shape
    try:
        module = MultiheadAttention(
            args.embed_dim, args.num_heads, dropout=args.dropout, bias=not args.no_bias,
            add_bias_kv=args.add_bias_kv, add_zero_attn=args.add_zero_attn, kdim=args.kdim,
            vdim=args.vdim, batch_first=args.batch_first, device=meta, dtype=dtype,
        )
        module.train(not args.eval)
        query, key, value = (torch.empty(s, dtype=dtype, device=meta) for s in (args.query, key_shape, value_shape))
        kpm, attn_mask = (_mask(spec, dtype) for spec in (args.key_padding_mask, args.attn_mask))
        report = explain(
            module, query, key, value, key_padding_mask=kpm, need_weights=args.need_weights,
            attn_mask=attn_mask, average_attn_weights=args.average_attn_weights,
            is_causal=args.is_causal, dispatch_device=args.device,
        )
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    _console().print(report)
    return 0


def _mask(spec: tuple[tuple[int, ...], str] | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask of known shape and unknown values (on the meta device)."""
    if spec is None:
        return None
    shape, kind = spec
    return torch.empty(shape, dtype=torch.bool if kind == "bool" else dtype, device="meta")


def _plot(args: argparse.Namespace, console: Console) -> int:
    from . import plot

    if problem := _unwritable(args.out):
        return _usage_error("plot", "--out", args.out, problem)
    if args.weights is None:
        weights, title = plot.demo_weights(), "causal self-attention, weights of batch row 0"
    else:
        try:
            weights = torch.load(args.weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
            # what torch.load raises on a file it cannot read: missing, empty, truncated or not its format
            print(
                f"mha plot: cannot read {args.weights} as a tensor saved with torch.save: {type(err).__name__}: {err}",
                file=sys.stderr,
            )
            return 2
        if not isinstance(weights, torch.Tensor):
            print(f"mha plot: {args.weights} holds a {type(weights).__name__}, not a tensor", file=sys.stderr)
            return 2
        title = str(args.weights)
    try:
        figure = plot.weights(weights, layout=args.layout, batch=args.batch, title=args.title or title)
    except ImportError as err:
        print(f"mha plot: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"mha plot: {err}", file=sys.stderr)
        return 2
    try:
        figure.savefig(args.out, dpi=110)
    except OSError as err:
        return _usage_error("plot", "--out", args.out, str(err))
    console.print(f"wrote {args.out.resolve()} ({_describe(weights)})")
    return 0


def _describe(weights: torch.Tensor) -> str:
    return f"weights {tuple(weights.shape)}"
