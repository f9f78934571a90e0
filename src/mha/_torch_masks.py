"""torch-style ``key_padding_mask`` / ``attn_mask`` turned into mask objects, and the
messages for their pitfalls: the inverted ``tril`` causal mask, float masks of 0s and
1s (a boolean mask cast to float) and masks that leave query rows with no key.

Both work from the summaries of :mod:`mha._mask_analysis` (``None`` where values
are not read); the pitfall messages read mask values beyond them (never the
activations) only for masks that are neither causal nor right padding: at most
``O(N*S + L*S)`` work plus one ``(L, S) x (S, N)`` product when both masks are
present.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._mask_analysis import AttnMaskSummary, KeyPaddingSummary, masked_out
from .masks import Bias, Blocked, Causal, Mask, causal_blocked

CAUSAL = Causal("top_left")  # immutable: one for every call


def _attn_mask_4d(attn_mask: Tensor, N: int, H: int) -> Tensor:
    """``(L, S)``, ``(N*H, L, S)`` or ``(N|1, H|1, L, S)`` as a 4-D view, no copy."""
    if attn_mask.dim() == 2:
        return attn_mask.view(1, 1, *attn_mask.shape)
    if attn_mask.dim() == 3:
        return attn_mask.view(N, H, *attn_mask.shape[1:])
    return attn_mask


def masks_from_torch(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    N: int,
    H: int,
    attn: AttnMaskSummary | None = None,
    keep_causal_tensor: bool = False,
) -> Mask | None:
    """Mask objects for batched torch-style masks: ``key_padding_mask (N, S)``,
    ``attn_mask (L, S)``, ``(N*H, L, S)`` or ``(N, H, L, S)``. True means blocked.

    ``is_causal=True`` means top-left causal; with an ``attn_mask`` too, both apply.
    With its summary a standard causal ``attn_mask`` becomes ``Causal``, unless
    ``keep_causal_tensor`` (then it stays a tensor, even with ``is_causal``); otherwise
    each mask blocks or adds at its own broadcast shape. Key padding stays a boolean or float
    ``(N, 1, 1, S)`` mask: one fused call, where ``KeyPadding`` lengths would make SDPA
    attend each length separately (the module drops right padding before projection
    instead, where that pays).
    """
    parts: list[Mask] = []
    standard = attn is not None and attn.standard_causal
    if standard and keep_causal_tensor:
        is_causal = standard = False  # the tensor alone is the causal mask
    if is_causal or standard:
        parts.append(CAUSAL)
    if attn_mask is not None and not standard:
        kind = Blocked if attn_mask.dtype == torch.bool else Bias
        parts.append(kind(_attn_mask_4d(attn_mask, N, H)))
    if key_padding_mask is not None:
        # (N, 1, 1, S) by view: indexing with None costs microseconds more, on every call.
        padding = key_padding_mask.view(key_padding_mask.shape[0], 1, 1, key_padding_mask.shape[1])
        parts.append(Blocked(padding) if key_padding_mask.dtype == torch.bool else Bias(padding))
    if not parts:
        return None
    mask = parts[0]
    for p in parts[1:]:
        mask = mask & p
    return mask


def pitfall_messages(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    padding: KeyPaddingSummary | None,
    attn: AttnMaskSummary | None,
    extra_key: bool = False,
) -> tuple[str, ...]:
    """The warnings a call deserves. Masks are batched torch-style, True = blocked, with
    their summaries (given for every mask present).

    ``extra_key``: the module appends a key open to every query (``add_bias_kv`` or
    ``add_zero_attn``), so no row is ever left without a key."""
    messages = tuple(
        _zeros_and_ones_message(name)
        for name, summary in (("key_padding_mask", padding), ("attn_mask", attn))
        if summary is not None and summary.zeros_and_ones
    )
    inverted = attn_mask is not None and attn is not None and attn.inverted_causal
    if inverted and attn_mask is not None:
        messages += (_inverted_causal_message(attn_mask.shape[0], extra_key),)
    if not extra_key:
        # The inverted-causal message already names the row it empties.
        empty = _empty_rows_message(key_padding_mask, None if inverted else attn_mask, is_causal, padding, attn)
        if empty:
            messages += (empty,)
    return messages


def _zeros_and_ones_message(name: str) -> str:
    return (
        f"{name} is a float mask of 0s and 1s. A float mask is added to the scores, so its 1s add 1 "
        f"and mask nothing out. If it marks positions to mask out, pass {name}.bool() (True = masked "
        f"out), or a float mask of 0 and -inf."
    )


def _inverted_causal_message(L: int, extra_key: bool) -> str:
    return (
        f"attn_mask (L, S) = ({L}, {L}) is torch.tril(torch.ones({L}, {L})).bool(). In "
        "nn.MultiheadAttention and mha, True means *blocked*, so this mask blocks each query's own "
        f"and earlier keys and lets it see only later ones; the last query (row {L - 1}) sees "
        + ("only the key that add_bias_kv/add_zero_attn appends. " if extra_key else
           "no key and gets zero attention. ")
        + f"For a causal mask pass torch.triu(torch.ones({L}, {L}, dtype=torch.bool), diagonal=1), "
        "or is_causal=True with no attn_mask."
    )


def _empty_rows_message(
    kpm: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    padding: KeyPaddingSummary | None,
    attn: AttnMaskSummary | None,
) -> str | None:
    """The message for query rows that have every key blocked (they get zero attention).

    Rows are listed only for a 2-D ``attn_mask``, which is the same for every batch: where
    the batch's own masks decide (a padding mask, a mask per batch element), a listing
    would make the text new on every batch, and the default warning filter, which shows
    a text once per line of code, would repeat the warning through a training loop."""
    messages: list[str] = []
    if kpm is not None and padding is not None and padding.empty_batches:
        messages.append(
            "key_padding_mask blocks every key of some batch elements (key_padding_mask.all(-1) finds them; "
            "key_padding_mask.isneginf().all(-1) for a float mask)"
        )
    causal_rule = is_causal
    ab: Tensor | None = None
    if attn_mask is not None and attn is not None:
        causal_rule = causal_rule or attn.standard_causal
        if is_causal and not attn.standard_causal:
            L, S = attn_mask.shape[-2:]
            ab = masked_out(attn_mask) | causal_blocked(L, S, attn_mask.device)
            empty = ab.all(dim=-1)
            # (..., L) -> (rows, L): no -1, which reshape refuses for an empty mask (L = 0)
            rows = empty.unsqueeze(0).flatten(0, -2).any(dim=0).nonzero().flatten().tolist()
        else:
            rows = list(attn.empty_rows)
        if rows:
            listed = f"query row(s) {_listing(rows)}" if attn_mask.dim() == 2 else "some query rows"
            messages.append(f"attn_mask blocks every key of {listed}")
            return _joined(messages)
        if not attn.standard_causal:
            ab = masked_out(attn_mask) if ab is None else ab
    if kpm is not None and padding is not None and (ab is not None or causal_rule):
        if ab is None and padding.lengths is not None:
            return _joined(messages)  # causal & right padding: only empty sequences, reported above
        if ab is None:
            S = kpm.shape[-1]
            ab = causal_blocked(S, S, kpm.device)
        if ab.dim() == 2:
            both = _rows_empty_through_both(ab, masked_out(kpm))
        else:
            both = _rows_empty_per_batch_element(ab, masked_out(kpm))
        if both:
            what = "attn_mask" if attn_mask is not None else "is_causal"
            messages.append(f"{what} and key_padding_mask together block every key of some query rows")
    return _joined(messages)


def _rows_empty_through_both(attn_blocked: Tensor, kpm_blocked: Tensor, block: int = 1024) -> list[int]:
    """Query rows that have no key in some batch element: row i of batch n has no key iff
    no key j is open in both, i.e. ``(open_attn @ open_kpm^T)[i, n] == 0``. In row blocks."""
    open_keys = (~kpm_blocked).to(torch.float32).T
    rows: list[int] = []
    for start in range(0, attn_blocked.shape[0], block):
        open_pairs = (~attn_blocked[start : start + block]).to(torch.float32) @ open_keys
        rows += (start + (open_pairs == 0).any(dim=1).nonzero().flatten()).tolist()
    return rows


def _rows_empty_per_batch_element(attn_blocked: Tensor, kpm_blocked: Tensor) -> list[int]:
    """As :func:`_rows_empty_through_both` for a mask per batch element and head:
    ``attn_blocked`` ``(N*H, L, S)`` or ``(N or 1, H or 1, L, S)``, ``kpm_blocked`` ``(N, S)``.
    One batch element at a time, so that a mask broadcast over the batch is never
    expanded to ``(N, H, L, S)``; one host read."""
    N = kpm_blocked.shape[0]
    if N == 0:
        return []
    if attn_blocked.dim() == 3:
        attn_blocked = attn_blocked.unflatten(0, (N, attn_blocked.shape[0] // N))
    empty = torch.zeros(attn_blocked.shape[-2], dtype=torch.bool, device=attn_blocked.device)
    for n in range(N):
        rows = (attn_blocked[n if attn_blocked.shape[0] > 1 else 0] | kpm_blocked[n]).all(dim=-1)  # (H, L)
        empty |= rows.any(dim=0)
    return empty.nonzero().flatten().tolist()


def _joined(messages: list[str]) -> str | None:
    if not messages:
        return None
    return (
        "; ".join(messages)
        + ". Those rows get zero attention: their output is out_proj's bias and their weights are 0 "
        "(torch.nn.MultiheadAttention returns NaN there on some paths). If that is unintended, check "
        "the mask's polarity: True means masked out."
    )


def _listing(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}{more}]"
