"""``mha demo``: four short examples of :class:`mha.MultiheadAttention` beside torch's module.

1. shapes: what goes in and what comes out of a fixed-length call;
2. padding: a sequence whose keys are all padding gives NaN in torch, zeros in mha;
3. an inverted boolean mask: ``torch.tril(...)`` passed as a "causal" ``attn_mask``;
4. errors: a transposed ``key_padding_mask`` and a per-batch ``attn_mask``, torch's
   message beside mha's.

For each call: a table of every input (shape, what each dim means, what each
mask does) and of the outputs; then the same call on ``torch.nn.MultiheadAttention``
with the same weights, and where the two differ. The inverted mask is shown beside
the causal mask it was meant to be, and a heatmap of both is written to a PNG when
matplotlib is installed. Runs offline in a few seconds.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from ._explain import explain, rich_table
from ._module import MultiheadAttention

_TRIU = "torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)"


def _pair() -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    """torch's module and mha's with the same weights: embed_dim=64, num_heads=8."""
    theirs = nn.MultiheadAttention(embed_dim=64, num_heads=8)
    ours = MultiheadAttention(embed_dim=64, num_heads=8)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _call(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict) -> tuple[Tensor, Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out, weights = module(*args, **kwargs)
    return out, weights, [str(w.message) for w in caught]


def _where_nan(t: Tensor, row_dim: int, batch_dim: int) -> str:
    """Which query rows hold NaN, in which batch rows (``t``'s two leading dims are those)."""
    bad = t.isnan().any(dim=-1)
    if not bad.any():
        return "none"
    rows = bad.any(dim=batch_dim).nonzero().flatten().tolist()
    batches = bad.any(dim=row_dim).nonzero().flatten().tolist()
    L, N = bad.shape[row_dim], bad.shape[batch_dim]
    rows_text = f"all {L} query rows" if len(rows) == L else f"query row(s) {rows}"
    batch_text = f"all {N} batch rows" if len(batches) == N else f"batch row(s) {batches}"
    return f"{int(t.isnan().sum())} values: {rows_text} of {batch_text}"


def _compare(console: Console, theirs: nn.Module, ours: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """Run both modules; print a torch-vs-mha table; return mha's weights."""
    out_t, w_t, warn_t = _call(theirs, args, kwargs)
    out_m, w_m, warn_m = _call(ours, args, kwargs)
    finite = ~out_t.isnan()
    diff = (out_t - out_m)[finite].abs().max() if finite.any() else torch.tensor(float("nan"))
    table = Table(title="torch vs mha, same weights, same call", title_justify="left", title_style="bold cyan")
    table.add_column("", no_wrap=True)
    table.add_column("torch.nn.MultiheadAttention")
    table.add_column("mha.MultiheadAttention")
    rows = [
        ("attn_output", str(tuple(out_t.shape)), str(tuple(out_m.shape))),
        ("attn_output_weights", str(tuple(w_t.shape)), str(tuple(w_m.shape))),
        ("NaN in output", _where_nan(out_t, 0, 1), _where_nan(out_m, 0, 1)),
        ("NaN in weights", _where_nan(w_t, 1, 0), _where_nan(w_m, 1, 0)),
        ("max |torch - mha|", f"{float(diff):.1e} where torch is finite", ""),
        ("warnings", "\n".join(warn_t) or "none", "\n".join(warn_m) or "none"),
    ]
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    console.print(table)
    return w_m


def _describe(console: Console, module: MultiheadAttention, code: str, args: tuple, kwargs: dict) -> None:
    console.print(Text(code, style="green"))
    report = explain(module, *args, **kwargs)
    console.print(rich_table(report.sections[0]))
    console.print(rich_table(report.sections[1]))
    console.print(Text(f"mha runs it as {report.path}; backend {report.backend}", style="dim"))


def _grid(mask: Tensor) -> str:
    return "\n".join(" ".join("x" if v else "." for v in row.tolist()) for row in mask)


def _error(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict) -> str:
    """The error ``module(*args, **kwargs)`` raises, as ``Type: message``."""
    try:
        module(*args, **kwargs)
    except (AssertionError, RuntimeError, ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _errors(console: Console) -> None:
    """Two malformed calls: torch's error, then mha's."""
    theirs, ours = _pair()
    query, key = torch.randn(10, 32, 64), torch.randn(15, 32, 64)
    calls = [
        ("key_padding_mask=torch.zeros(15, 32, dtype=torch.bool)", "(S, N), not (N, S)",
         {"key_padding_mask": torch.zeros(15, 32, dtype=torch.bool)}),
        ("attn_mask=torch.zeros(32, 10, 15, dtype=torch.bool)", "one mask per batch row",
         {"attn_mask": torch.zeros(32, 10, 15, dtype=torch.bool)}),
    ]
    for code, note, kwargs in calls:
        args = (query, key, key)
        console.print(Text(f"attention(query, key, value, {code})  # {note}", style="green"))
        console.print(Text("  torch: ", style="bold").append(_error(theirs, args, kwargs), style=""))
        console.print(Text("  mha:   ", style="bold").append(_error(ours, args, kwargs), style=""))


def run(console: Console, out: Path | None) -> int:
    """Print the walk-through; write the heatmap of example 3 to ``out`` (None: skip).

    Returns the exit status: 0, or 2 when ``out`` cannot be written."""
    torch.manual_seed(0)
    console.rule("mha demo: the inputs to nn.MultiheadAttention, checked")
    console.print(
        "Four calls to mha.MultiheadAttention beside torch.nn.MultiheadAttention with the same "
        "weights. Notation: L queries (target length), S keys (source length), N batch, "
        "E embed_dim, D value features (vdim), H heads."
    )
    console.print(
        Text(
            "attention = mha.MultiheadAttention(embed_dim=64, num_heads=8)  # torch's: same weights",
            style="green",
        )
    )

    console.rule("1. Shapes: what goes in, what comes out")
    theirs, ours = _pair()
    query, key, value = torch.randn(10, 32, 64), torch.randn(10, 32, 64), torch.randn(10, 32, 64)
    args1 = (query, key, value)
    _describe(console, ours, "attn_output, attn_output_weights = attention(query, key, value)", args1, {})
    _compare(console, theirs, ours, args1, {})

    console.rule("2. Padding: a sequence with no key left gives NaN in torch, zeros in mha")
    theirs, ours = _pair()
    query, key, value = torch.randn(10, 32, 64), torch.randn(15, 32, 64), torch.randn(15, 32, 64)
    key_padding_mask = torch.randint(0, 2, (32, 15)).bool()
    args2 = (query, key, value)
    code = "attention(query, key, value, key_padding_mask=torch.randint(0, 2, (32, 15)).bool())"
    _describe(console, ours, code, args2, {"key_padding_mask": key_padding_mask})
    _compare(console, theirs, ours, args2, {"key_padding_mask": key_padding_mask})
    console.print(
        "A random mask is not padding: real padding is True at the end of each row "
        "(key_padding_mask[n, j] = j >= length[n]), which mha runs without computing the padded keys. "
        "Each row here blocks all 15 keys with chance 2**-15; when it does, torch gives NaN. "
        "Forcing it for batch row 5 (key_padding_mask[5] = True):"
    )
    blank = key_padding_mask.clone()
    blank[5] = True
    _compare(console, theirs, ours, args2, {"key_padding_mask": blank})

    console.rule("3. An inverted boolean mask: torch.tril(...) is not causal here")
    theirs, ours = _pair()
    query, key, value = torch.randn(10, 32, 64), torch.randn(10, 32, 64), torch.randn(10, 32, 64)
    args3 = (query, key, value)
    inverted = torch.tril(torch.ones(10, 10)).bool()
    causal = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    code = "attention(query, key, value, attn_mask=torch.tril(torch.ones(10, 10)).bool())"
    _describe(console, ours, code, args3, {"attn_mask": inverted})
    w_inverted = _compare(console, theirs, ours, args3, {"attn_mask": inverted})
    masks = Table(
        title="attn_mask: x = True = blocked (row i = query, column j = key)",
        title_justify="left",
        title_style="bold cyan",
    )
    masks.add_column("inverted: torch.tril(torch.ones(10, 10)).bool()")
    masks.add_column(f"causal: {_TRIU}")
    masks.add_row(
        Text(_grid(inverted) + "\nquery i sees only keys j > i;\nrow 9 sees nothing"),
        Text(_grid(causal) + "\nquery i sees keys j <= i\n(or pass is_causal=True)"),
    )
    console.print(masks)
    console.print(Text(f"The corrected call: attention(query, key, value, attn_mask={_TRIU})", style="green"))
    report = explain(ours, *args3, attn_mask=causal)
    console.print(Text(f"mha runs it as {report.path}; backend {report.backend}", style="dim"))
    w_causal = _compare(console, theirs, ours, args3, {"attn_mask": causal})

    console.rule("4. Errors that name the argument, the shapes and the fix")
    _errors(console)

    console.rule("The inverted mask as a picture")
    if out is None:
        console.print("heatmap skipped (--no-plot)")
        return 0
    try:
        from .plot import compare

        figure = compare(
            {
                "inverted tril(...): row 9 is 0 (torch: NaN)": w_inverted[0],
                "causal mask triu(..., 1)": w_causal[0],
            },
            title="the inverted mask and the causal one: attention weights of batch row 0, averaged over heads",
        )
    except ImportError as err:
        console.print(f"heatmap skipped: {err}")
        return 0
    try:
        figure.savefig(out, dpi=110)
    except OSError as err:
        print(f"mha demo: cannot write the heatmap to --out {out}: {err}", file=sys.stderr)
        return 2
    console.print(f"wrote the heatmap (inverted mask | causal mask) to {out.resolve()}")
    return 0
