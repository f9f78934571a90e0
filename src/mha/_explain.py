"""``mha.explain``: what a forward call of :class:`mha.MultiheadAttention` will do, without running it.

The report names every input's role and dimensions in the notation of the docs
(``L``, ``N``, ``E``, ``S``, ``D``), the output shapes, the path and backend the
module would take (and why the other backends were passed over), and an
estimate of the memory the call needs.

The report is the module's own plan (:func:`mha._frontend.plan_forward`), so a
call that the module would reject raises the same exception with the same
message. Only shapes, dtypes and devices are read, except from masks with real
values: those are read as the module reads them (causal and right-padding
recognition, the pitfall warnings). A module and inputs on the ``meta`` device stand
for a call whose mask values are unknown (what ``mha explain`` builds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._cache import KVCache, preview
from ._core import _validate_call
from ._dispatch import (
    REGISTRY,
    backend_names,
    explain_dispatch,
    forced_backend,
    not_supported_reasons,
    select_backend,
)
from ._frontend import plan_forward
from ._module import MultiheadAttention
from ._module_cache import check_cached_call, check_memory, check_read, new_token_lengths


@dataclass(frozen=True)
class Section:
    """One titled table of the report."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Explanation:
    """The report of :func:`explain`. ``str()`` gives plain text; rich renders it as tables.

    Attributes:
        summary: one line: the module and the layout of its inputs.
        sections: inputs, outputs, dispatch and memory tables.
        notes: what the mask values mean (warnings the module would give, shortcuts it takes).
        output_shape: shape of ``attn_output``.
        weights_shape: shape of ``attn_output_weights``, or None with ``need_weights=False``.
        path: how the module computes the call (dense or right-padded keys dropped).
        backend: the backend dispatch picks.
        memory_bytes: estimated bytes for the call's activations and workspace.
    """

    summary: str
    sections: tuple[Section, ...]
    notes: tuple[str, ...]
    output_shape: tuple[int, ...]
    weights_shape: tuple[int, ...] | None
    path: str
    backend: str
    memory_bytes: int
    dispatch: dict[str, list[str]] = field(repr=False)

    def __str__(self) -> str:
        lines = [self.summary, ""]
        for section in self.sections:
            lines += [section.title, *_text_table(section.columns, section.rows), ""]
        lines.append(f"Path: {self.path}")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list = [Text(self.summary, style="bold")]
        parts += [rich_table(section) for section in self.sections]
        parts.append(Text(f"Path: {self.path}"))
        parts += [Text(f"Note: {note}", style="yellow") for note in self.notes]
        return Group(*parts)


def rich_table(section: Section) -> Any:
    """A :class:`rich.table.Table` of ``section``; its first two columns do not wrap."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=section.title, title_justify="left", title_style="bold cyan")
    for i, column in enumerate(section.columns):
        table.add_column(column, no_wrap=i < 2)
    for row in section.rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _text_table(columns: tuple[str, ...], rows: tuple[tuple[str, ...], ...]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: tuple[str, ...]) -> str:
        return "  " + "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip()

    return [line(columns), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]


def _fmt_shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _dims(labels: tuple[str, ...], shape: tuple[int, ...] | torch.Size) -> str:
    return "  ".join(f"{label}={size}" for label, size in zip(labels, shape, strict=True))


def _mib(nbytes: float) -> str:
    if nbytes < 1 << 20:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def explain(
    module: MultiheadAttention,
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    cache: KVCache | None = None,
    dispatch_device: torch.device | str | None = None,
) -> Explanation:
    """Explain ``module(query, key, value, **forward_kwargs)`` without running it.

    Takes the arguments of :meth:`mha.MultiheadAttention.forward`. Raises what the
    module would raise for an invalid call. With the module and inputs on the
    ``meta`` device the call is explained by shapes alone, and dispatch is reported
    for ``dispatch_device`` (default ``"cpu"``); otherwise for the inputs' device.
    With ``cache=`` (an :class:`mha.KVCache`) the decoding step is explained: the
    positions it reads, the backend and the cache's memory; the cache is not
    written. Nested (variable-length) inputs, and calls inside
    :func:`mha.distributed.context_parallel`, raise ``NotImplementedError`` once
    they pass the module's checks. Returns an :class:`Explanation`; print it.

    Example::

        >>> import torch, mha
        >>> m = mha.MultiheadAttention(64, 8)
        >>> padding = torch.arange(15) >= torch.tensor([[15], [9], [4]])  # (N, S), True = padding
        >>> print(mha.explain(m, torch.randn(10, 3, 64), torch.randn(15, 3, 64),
        ...                   torch.randn(15, 3, 64), key_padding_mask=padding))
        mha.MultiheadAttention(embed_dim=64, num_heads=8): 8 heads of Dh = E / H = 8 features; ...
        ...
          key_padding_mask  (3, 15) bool  N=3  S=15  True = key j of batch row n is padding, ignored; blocks 17 of 45
        ...
        Path: dense: mha.attention on heads (N, H, L, Dh) = (3, 8, 10, 8); mask Blocked(...)
    """
    if not isinstance(module, MultiheadAttention):
        raise TypeError(
            f"explain takes an mha.MultiheadAttention, got {type(module).__name__}; "
            "convert a model with mha.swap(model, to='mha') first"
        )
    if cache is not None:
        return _explain_cached(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                               average_attn_weights, is_causal, cache)
    if key is None or value is None:
        raise TypeError(
            "explain: key and value must be tensors (S, N, E); None is for a filled static "
            "(cross-attention) cache, passed as cache="
        )
    plan = plan_forward(
        module, query, key, value, key_padding_mask, attn_mask, is_causal,
        need_weights, average_attn_weights, module.training,
    )
    if plan.route == "nested":
        raise NotImplementedError(
            "explain takes dense tensors; for nested (variable-length) inputs every sequence is "
            "attended at its own length with no padding"
        )
    if plan.route == "context_parallel":
        raise NotImplementedError(
            "explain describes calls on one device; inside mha.distributed.context_parallel the call "
            "runs as ring attention over the group's ranks: explain it outside the block"
        )
    H, E = module.num_heads, module.embed_dim
    Dh = E // H
    N, L, S, extra = plan.N, plan.L, plan.S, plan.extra_keys
    device = query.device
    if device.type == "meta":
        device = torch.device("cpu" if dispatch_device is None else dispatch_device)

    notes = [f"mha warns: {message}" for message in plan.warnings]
    if not plan.values_read:
        notes.append(
            "explained by shapes alone: with real masks, a standard causal attn_mask "
            "(torch.triu(torch.ones(L, S, dtype=torch.bool), 1)) would run as Causal, a right-padded "
            "key_padding_mask would have its padded keys dropped before projection where that pays, and "
            "masks that leave a query with no key would warn"
        )
    requires_grad = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def heads(n: int, length: int) -> Tensor:
        base = torch.empty((), dtype=query.dtype, device=device).requires_grad_(requires_grad)
        return base.expand(n, H, length, Dh)

    if plan.route == "one_key":
        key_heads = heads(N, S)
        projected_keys = N * S
        path = (
            "one key (self-attention over one position, L = S = 1): the output is the value, projected "
            "(softmax over one score is exactly 1); no query or key projection, no scores, no backend"
        )
    elif plan.key_lengths is not None:
        keys = list(plan.key_lengths.host)
        groups = len(set(keys))
        path = (
            f"right-padded keys: the padded keys are dropped before projection and each sequence "
            f"attends its own keys (lengths {min(keys)}..{max(keys)} of S={S}, {groups} group(s) of "
            f"equal length){', causal' if plan.mask is not None else ''}"
        )
        key_heads = heads(N, max(keys))
        projected_keys = sum(keys)
    else:
        path = f"dense: mha.attention on heads (N, H, L, Dh) = ({N}, {H}, {L}, {Dh})" + (
            f", {extra} learned/zero key(s) appended (S={S + extra})" if extra else ""
        )
        key_heads = heads(N, S + extra)
        projected_keys = N * S
    if plan.mask is not None:
        path += f"; mask {plan.mask!r}"
    call = _validate_call(heads(N, L), key_heads, key_heads, plan.mask, None, plan.dropout_p, plan.weights, False)
    if plan.route == "one_key":
        dispatch = {name: ["not needed: with one key the value is the output"] for name in backend_names()}
        backend = "none"
    else:
        dispatch = explain_dispatch(call)
        backend = select_backend(call).name  # honours mha.use_backend, raises as the call would

    S_w = S + extra
    out_shape = ((N, L, E) if module.batch_first else (L, N, E)) if plan.batched else (L, E)
    w_shape: tuple[int, ...] | None = None
    if need_weights:
        w_shape = (N, L, S_w) if average_attn_weights else (N, H, L, S_w)
        if not plan.batched:
            w_shape = w_shape[1:]

    inputs = _input_rows(module, query, key, value, key_padding_mask, attn_mask, plan.batched, is_causal)
    outputs = _output_rows(module, out_shape, w_shape, plan.batched, average_attn_weights)
    dispatch_rows = tuple(
        (name, "picked" if name == backend else "passed over" if reasons else "could serve", "; ".join(reasons) or "-")
        for name, reasons in dispatch.items()
    )
    itemsize = query.element_size()
    memory, total = _memory_rows(
        module, backend, N, L, S_w, projected_keys, out_shape, w_shape, itemsize, need_weights
    )
    layout = "batch-first (N, L, E)" if module.batch_first else "sequence-first (L, N, E)"
    summary = (
        f"mha.MultiheadAttention({module.extra_repr()}): {H} heads of Dh = E / H = {Dh} features; "
        f"inputs {layout if plan.batched else 'unbatched (L, E)'}; "
        f"{'training' if module.training else 'eval'} mode, {query.dtype} on {device}"
    )
    sections = (
        Section("Inputs", ("argument", "shape", "dims", "role"), inputs),
        Section("Outputs", ("output", "shape", "dims", "meaning"), outputs),
        Section("Dispatch", ("backend", "verdict", "why"), dispatch_rows),
        Section("Memory (estimate)", ("item", "shape", "size"), memory),
    )
    return Explanation(
        summary, sections, tuple(notes), out_shape, w_shape, path, backend, total, dispatch
    )


def _input_rows(
    module: MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kpm: Tensor | None,
    am: Tensor | None,
    batched: bool,
    is_causal: bool,
) -> tuple[tuple[str, ...], ...]:
    bf = module.batch_first and batched
    E = module.embed_dim
    kname = "E" if module.kdim == E else "kdim"

    def labels(seq: str, feat: str) -> tuple[str, ...]:
        if not batched:
            return (seq, feat)
        return ("N", seq, feat) if bf else (seq, "N", feat)

    def shape(t: Tensor) -> str:
        return f"{_fmt_shape(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    L, S = (query.shape[1], key.shape[1]) if bf else (query.shape[0], key.shape[0])
    rows = [
        ("query", shape(query), _dims(labels("L", "E"), query.shape),
         f"asks: {L} positions per sequence, one output row each"),
        ("key", shape(key), _dims(labels("S", kname), key.shape),
         f"is matched: {S} positions, each scored against every query"),
        ("value", shape(value), _dims(labels("S", "D"), value.shape),
         "is mixed: one vector per key, averaged by the weights"),
    ]
    if kpm is not None:
        kdims = ("N", "S") if batched else ("S",)
        if kpm.dtype == torch.bool:
            role = "True = key j of batch row n is padding, ignored"
        else:
            role = "added to the scores of key j in batch row n (-inf = ignored)"
        rows.append(("key_padding_mask", shape(kpm), _dims(kdims, kpm.shape), role + _mask_stats(kpm)))
    if am is not None:
        adims = {2: ("L", "S"), 3: ("N*H", "L", "S") if batched else ("H", "L", "S"), 4: ("N", "H", "L", "S")}[am.dim()]
        scope = "in every batch row and head" if am.dim() == 2 else "per batch row and head"
        if am.dtype == torch.bool:
            role = f"True = query i may not attend key j, {scope}"
        else:
            role = f"added to the score of query i and key j, {scope} (-inf = blocked)"
        rows.append(("attn_mask", shape(am), _dims(adims, am.shape), role + _mask_stats(am)))
    if is_causal:
        rows.append(("is_causal", "True", "-", "query i attends keys j <= i only (top-left causal)"))
    return tuple(rows)


def _mask_stats(mask: Tensor) -> str:
    if mask.device.type == "meta":
        return ""
    blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask)
    return f"; blocks {int(blocked.sum())} of {blocked.numel()}"


def _output_rows(
    module: MultiheadAttention,
    out_shape: tuple[int, ...],
    w_shape: tuple[int, ...] | None,
    batched: bool,
    average: bool,
) -> tuple[tuple[str, ...], ...]:
    if not batched:
        out_labels: tuple[str, ...] = ("L", "E")
    else:
        out_labels = ("N", "L", "E") if module.batch_first else ("L", "N", "E")
    rows = [
        ("attn_output", _fmt_shape(out_shape), _dims(out_labels, out_shape),
         "weighted values through out_proj, one row per query"),
    ]
    if w_shape is None:
        rows.append(("attn_output_weights", "None", "-", "need_weights=False"))
    else:
        w_labels = ("L", "S") if average else ("H", "L", "S")
        if batched:
            w_labels = ("N", *w_labels)
        how = f"mean of the {module.num_heads} heads" if average else "one map per head"
        rows.append(
            ("attn_output_weights", _fmt_shape(w_shape), _dims(w_labels, w_shape),
             f"softmax over keys, {how}; rows sum to 1 (0 if every key is masked)")
        )
    return tuple(rows)


def _memory_rows(
    module: MultiheadAttention,
    backend: str,
    N: int,
    L: int,
    S: int,
    projected_keys: int,
    out_shape: tuple[int, ...],
    w_shape: tuple[int, ...] | None,
    itemsize: int,
    need_weights: bool,
) -> tuple[tuple[tuple[str, ...], ...], int]:
    H, E = module.num_heads, module.embed_dim
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    rows: list[tuple[str, str, int]] = [
        ("projected query", _fmt_shape((N, L, E)), N * L * E * itemsize),
        ("projected key + value", f"2 x {projected_keys} x {E}", 2 * projected_keys * E * itemsize),
        ("attn_output (+ before out_proj)", _fmt_shape(out_shape), 2 * math.prod(out_shape) * itemsize),
    ]
    if backend not in REGISTRY:  # one key: the value projected and through out_proj, nothing else
        rows = [
            ("projected value (+ out_proj)", f"2 x {projected_keys} x {E}", 2 * projected_keys * E * itemsize),
            ("attn_output", _fmt_shape(out_shape), math.prod(out_shape) * itemsize),
        ]
    if w_shape is not None:
        rows.append(("attn_output_weights", _fmt_shape(w_shape), math.prod(w_shape) * itemsize))
    score_bytes = 4 if itemsize < 4 else itemsize
    if backend in REGISTRY:  # "none": no scores at all
        description, size = REGISTRY[backend].workspace(N, H, L, S, score_bytes)
        rows.append(("scores workspace", description, size))
    total = sum(r[2] for r in rows)
    out = [(name, shape, _mib(size)) for name, shape, size in rows]
    out.append(("total activations", "", _mib(total)))
    out.append(("parameters (already allocated)", "", _mib(params)))
    if need_weights:
        torch_bytes = N * H * L * S * itemsize
        out.append(
            ("torch.nn.MultiheadAttention weights", _fmt_shape((N * H, L, S)), _mib(torch_bytes) + " (for comparison)")
        )
    return tuple(out), total


def _explain_cached(
    module: MultiheadAttention,
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    cache: KVCache,
) -> Explanation:
    """:func:`explain` of ``module(query, key, value, ..., cache=cache)``: query ``(T, N, E)``
    (``(N, T, E)`` batch-first) new tokens, key/value their keys and values (or the
    memory filling a static cache, or None on a filled one)."""
    check_cached_call(module, query, attn_mask, is_causal, cache)
    bf = module.batch_first
    H, E = module.num_heads, module.embed_dim
    Dh = E // H
    N, T = (query.shape[0], query.shape[1]) if bf else (query.shape[1], query.shape[0])
    T_new = None if key is None or value is None else key.shape[1 if bf else 0]
    if key is not None and value is not None:  # the call's checks of the new tokens, nothing stored
        if cache.static:
            check_memory(module, key, value, key_padding_mask, cache)
        else:
            new_token_lengths(key_padding_mask, N, key.shape[1 if bf else 0])
    else:
        check_read(key, value, key_padding_mask, cache)
    S, mask, forced = preview(cache, (N, H, T, Dh), T_new)
    weights: Literal["mean", "per_head"] | None = None
    if need_weights:
        weights = "mean" if average_attn_weights else "per_head"
    dropout_p = module.dropout if module.training else 0.0

    def heads(length: int, D: int) -> Tensor:
        return torch.empty((), dtype=cache.key.dtype, device=cache.key.device).expand(N, H, length, D)

    call = _validate_call(heads(T, Dh), heads(S, Dh), heads(S, cache.value.shape[-1]), mask, None,
                          dropout_p, weights, False)
    dispatch = explain_dispatch(call)
    if forced is not None:
        dispatch[forced] = not_supported_reasons(REGISTRY[forced].caps, call)
        backend = forced
    else:
        backend = select_backend(call).name  # honours mha.use_backend, raises as the call would
    M = cache.max_length
    if not cache.static:
        path = (f"cached self-attention: the {T_new} new token(s) of each sequence are projected once and "
                f"written after its cached ones; query t attends cache positions j <= lengths[n] + t "
                f"(causal per sequence), reading S' = {S} of max_length = {M} positions")
    elif T_new is not None:
        path = (f"cached cross-attention: the memory (S = {T_new}) is projected once and stored, replacing "
                f"the cache's contents; every query attends all of it (not causal)")
    else:
        path = (f"cached cross-attention on the stored memory: S' = {S} positions, key and value "
                f"not projected again")
    lengths = cache.lengths.tolist()
    seq = ("N", "T", "E") if bf else ("T", "N", "E")
    inputs: list[tuple[str, ...]] = [
        ("query", _fmt_shape(query.shape), _dims(seq, query.shape), f"the new tokens: {T} per sequence"),
        ("key, value", "None", "-", "the stored memory")
        if key is None
        else ("key, value", _fmt_shape(key.shape), _dims(seq, key.shape), "projected once, written into the cache"),
        ("cache", _fmt_shape(cache.key.shape), _dims(("N", "H", "M", "Dh"), cache.key.shape),
         f"{'static ' if cache.static else ''}KVCache, lengths {min(lengths)}..{max(lengths)} before this call"),
    ]
    out_shape = (N, T, E) if bf else (T, N, E)
    w_shape = None if weights is None else (N, T, S) if weights == "mean" else (N, H, T, S)
    item = cache.key.element_size()
    buffers = (cache.key.numel() + cache.value.numel()) * item
    read = N * H * S * (Dh + cache.value.shape[-1]) * item
    rows: list[tuple[str, str, int]] = [
        ("projected query", _fmt_shape((N, T, E)), N * T * E * item),
        ("new key + value", f"2 x {N} x {T_new or 0} x {E}", 2 * N * (T_new or 0) * E * item),
        ("attn_output (+ before out_proj)", _fmt_shape(out_shape), 2 * math.prod(out_shape) * item),
        ("scores + probabilities", _fmt_shape((N, H, T, S)) + " x2", 2 * N * H * T * S * max(item, 4)),
    ]
    if w_shape is not None:
        rows.append(("attn_output_weights", _fmt_shape(w_shape), math.prod(w_shape) * item))
    total = sum(r[2] for r in rows)
    memory = [(name, shape, _mib(size)) for name, shape, size in rows]
    memory += [
        ("total activations", "", _mib(total)),
        ("cache key + value buffers (already allocated)",
         f"{_fmt_shape(cache.key.shape)} + {_fmt_shape(cache.value.shape)}", _mib(buffers)),
        ("cache read by this step", f"K and V of S' = {S} positions", _mib(read)),
    ]
    summary = (
        f"mha.MultiheadAttention({module.extra_repr()}): {H} heads of Dh = E / H = {Dh} features; "
        f"a decoding step on a {'static (cross-attention)' if cache.static else 'self-attention'} KV cache; "
        f"{'training' if module.training else 'eval'} mode, {cache.key.dtype} on {cache.key.device}"
    )
    if forced is not None:
        why = "few query rows per key/value head"
    elif forced_backend() is not None:
        why = "forced by mha.use_backend"
    else:
        why = "dispatch's first that can serve"
    sections = (
        Section("Inputs", ("argument", "shape", "dims", "role"), tuple(inputs)),
        Section("Outputs", ("output", "shape", "dims", "meaning"), _output_rows(
            module, out_shape, w_shape, True, average_attn_weights)),
        Section("Dispatch", ("backend", "verdict", "why"), tuple(
            (name, f"picked ({why})" if name == backend else "passed over" if reasons else "could serve",
             "; ".join(reasons) or "-")
            for name, reasons in dispatch.items()
        )),
        Section("Memory (estimate)", ("item", "shape", "size"), tuple(memory)),
    )
    notes = ("explained without writing: the cache's lengths and buffers are unchanged",)
    return Explanation(summary, sections, notes, out_shape, w_shape, path, backend, total, dispatch)
