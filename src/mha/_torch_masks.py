"""torch-style ``key_padding_mask`` / ``attn_mask`` turned into mask objects, once.

Also the pitfall warnings of the seed: the inverted ``tril`` causal mask and
masks that leave query rows with no key. These read mask values (never the
activations), at most ``O(N*S + L*S)`` work plus one ``(L, S) x (S, N)``
product when both masks are present; they are skipped under ``torch.compile``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._mask_analysis import _blocked, summarize_attn_mask, summarize_key_padding_mask
from .masks import Bias, Blocked, Causal, KeyPadding, Mask


def reads_values() -> bool:
    """Value-reading shortcuts and warnings run in eager mode only (they would break graphs)."""
    return not torch.compiler.is_compiling()


def _attn_mask_4d(attn_mask: Tensor, N: int, H: int) -> Tensor:
    """``(L, S)``, ``(N*H, L, S)`` or ``(N|1, H|1, L, S)`` as a 4-D view, no copy."""
    if attn_mask.dim() == 2:
        return attn_mask[None, None]
    if attn_mask.dim() == 3:
        return attn_mask.view(N, H, *attn_mask.shape[1:])
    return attn_mask


def masks_from_torch(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    N: int,
    H: int,
    *,
    read_values: bool | None = None,
) -> Mask | None:
    """Mask objects for batched torch-style masks: ``key_padding_mask (N, S)``,
    ``attn_mask (L, S)``, ``(N*H, L, S)`` or ``(N, H, L, S)``. True means blocked.

    ``is_causal=True`` means top-left causal; with an ``attn_mask`` too, both apply.
    ``read_values`` (default: outside ``torch.compile``) lets it recognise a
    standard causal ``attn_mask`` and right padding; without it each mask blocks or
    adds at its own broadcast shape.
    """
    if read_values is None:
        read_values = reads_values()
    parts: list[Mask] = []
    if is_causal:
        parts.append(Causal("top_left"))
    if attn_mask is not None:
        if read_values and summarize_attn_mask(attn_mask).standard_causal:
            if not is_causal:
                parts.append(Causal("top_left"))
        elif attn_mask.dtype == torch.bool:
            parts.append(Blocked(_attn_mask_4d(attn_mask, N, H)))
        else:
            parts.append(Bias(_attn_mask_4d(attn_mask, N, H)))
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            lengths = summarize_key_padding_mask(key_padding_mask).lengths if read_values else None
            if lengths is not None:
                parts.append(KeyPadding(lengths))
            else:
                parts.append(Blocked(key_padding_mask[:, None, None, :]))
        else:
            parts.append(Bias(key_padding_mask[:, None, None, :]))
    if not parts:
        return None
    mask = parts[0]
    for p in parts[1:]:
        mask = mask & p
    return mask


def warn_pitfalls(
    key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool, extra_key: bool = False
) -> None:
    """Warn about the seed's pitfalls. Masks are batched torch-style, True = blocked.

    ``extra_key``: the module appends a key open to every query (``add_bias_kv`` or
    ``add_zero_attn``), so no row is ever left without a key."""
    if not reads_values():
        return
    inverted = attn_mask is not None and _warn_inverted_causal(attn_mask, extra_key)
    if not extra_key:
        # The inverted-causal warning already names the row it empties.
        _warn_empty_rows(key_padding_mask, None if inverted else attn_mask, is_causal)


def _warn_inverted_causal(attn_mask: Tensor, extra_key: bool) -> bool:
    """Warn if ``attn_mask`` is the seed's ``tril`` mask; return whether it is."""
    if summarize_attn_mask(attn_mask).inverted_causal:
        L = attn_mask.shape[0]
        warnings.warn(
            f"attn_mask (L, S) = ({L}, {L}) is torch.tril(torch.ones({L}, {L})).bool(). In "
            "nn.MultiheadAttention and mha, True means *blocked*, so this mask blocks each query's own "
            f"and earlier keys and lets it see only later ones; the last query (row {L - 1}) sees "
            + ("only the key that add_bias_kv/add_zero_attn appends. " if extra_key else
               "no key and gets zero attention. ")
            + f"For a causal mask pass torch.triu(torch.ones({L}, {L}, dtype=torch.bool), diagonal=1), "
            "or is_causal=True with no attn_mask.",
            UserWarning,
            stacklevel=7,  # here, warn_pitfalls, _forward_batched, forward, Module call (2), caller
        )
        return True
    return False


def _warn_empty_rows(kpm: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> None:
    """Warn when some query row has every key blocked. Such rows get zero attention."""
    messages: list[str] = []
    if kpm is not None:
        empty_batches = list(summarize_key_padding_mask(kpm).empty_batches)
        if empty_batches:
            messages.append(
                f"key_padding_mask blocks every key of batch element(s) {_listing(empty_batches)}"
            )
    causal_rule = is_causal
    ab: Tensor | None = None
    if attn_mask is not None:
        summary = summarize_attn_mask(attn_mask)
        causal_rule = causal_rule or summary.standard_causal
        if is_causal and not summary.standard_causal:
            L, S = attn_mask.shape[-2:]
            ab = _blocked(attn_mask) | torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).triu(1)
            empty = ab.all(dim=-1)
            rows = empty.reshape(-1, empty.shape[-1]).any(dim=0).nonzero().flatten().tolist()
        else:
            rows = list(summary.empty_rows)
        if rows:
            messages.append(f"attn_mask blocks every key of query row(s) {_listing(rows)}")
            return _warn(messages)
        if not summary.standard_causal and attn_mask.dim() == 2:
            ab = _blocked(attn_mask) if ab is None else ab
    if kpm is not None and (ab is not None or causal_rule):
        if ab is None and summarize_key_padding_mask(kpm).lengths is not None:
            return _warn(messages)  # causal & right padding: only empty sequences, reported above
        if ab is None:
            S = kpm.shape[-1]
            ab = torch.ones(S, S, dtype=torch.bool, device=kpm.device).triu(1)
        both = _rows_empty_through_both(ab, _blocked(kpm))
        if both:
            what = "attn_mask" if attn_mask is not None else "is_causal"
            messages.append(
                f"{what} and key_padding_mask together block every key of query row(s) {_listing(both)}"
            )
    _warn(messages)


def _rows_empty_through_both(attn_blocked: Tensor, kpm_blocked: Tensor, block: int = 1024) -> list[int]:
    """Query rows that have no key in some batch element: row i of batch n has no key iff
    no key j is open in both, i.e. ``(open_attn @ open_kpm^T)[i, n] == 0``. In row blocks."""
    open_keys = (~kpm_blocked).to(torch.float32).T
    rows: list[int] = []
    for start in range(0, attn_blocked.shape[0], block):
        open_pairs = (~attn_blocked[start : start + block]).to(torch.float32) @ open_keys
        rows += (start + (open_pairs == 0).any(dim=1).nonzero().flatten()).tolist()
    return rows


def _warn(messages: list[str]) -> None:
    if messages:
        warnings.warn(
            "; ".join(messages)
            + ". Those rows get zero attention: their output is out_proj's bias and their weights are 0 "
            "(torch.nn.MultiheadAttention returns NaN there on some paths). If that is unintended, check "
            "the mask's polarity: True means masked out.",
            UserWarning,
            stacklevel=8,  # _warn, _warn_empty_rows, warn_pitfalls, _forward_batched, forward, Module call (2), caller
        )


def _listing(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}{more}]"
