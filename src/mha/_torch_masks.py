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

from .masks import Bias, Blocked, Causal, KeyPadding, Mask, right_padding_lengths


def _reads_values() -> bool:
    """Value-reading shortcuts and warnings run in eager mode only (they would break graphs)."""
    return not torch.compiler.is_compiling()


def is_standard_causal(attn_mask: Tensor) -> bool:
    """True if the boolean ``(L, S)`` mask equals ``torch.triu(ones(L, S), diagonal=1)``."""
    L, S = attn_mask.shape
    return torch.equal(attn_mask, torch.ones(L, S, dtype=torch.bool, device=attn_mask.device).triu(1))


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
) -> Mask | None:
    """Mask objects for batched torch-style masks: ``key_padding_mask (N, S)``,
    ``attn_mask (L, S)``, ``(N*H, L, S)`` or ``(N, H, L, S)``. True means blocked.

    ``is_causal=True`` means top-left causal; with an ``attn_mask`` too, both apply.
    """
    parts: list[Mask] = []
    if is_causal:
        parts.append(Causal("top_left"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            if attn_mask.dim() == 2 and _reads_values() and is_standard_causal(attn_mask):
                if not is_causal:
                    parts.append(Causal("top_left"))
            else:
                parts.append(Blocked(_attn_mask_4d(attn_mask, N, H)))
        else:
            parts.append(Bias(_attn_mask_4d(attn_mask, N, H)))
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            lengths = right_padding_lengths(key_padding_mask) if _reads_values() else None
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


def warn_pitfalls(key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> None:
    """Warn about the seed's pitfalls. Masks are batched torch-style, True = blocked."""
    if not _reads_values():
        return
    if attn_mask is not None:
        _warn_inverted_causal(attn_mask)
    _warn_empty_rows(key_padding_mask, attn_mask, is_causal)


def _warn_inverted_causal(attn_mask: Tensor) -> None:
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 2:
        return
    L, S = attn_mask.shape
    if L != S or L < 2:
        return
    tril = torch.ones(L, L, dtype=torch.bool, device=attn_mask.device).tril()
    if torch.equal(attn_mask, tril):
        warnings.warn(
            f"attn_mask (L, S) = ({L}, {L}) is torch.tril(torch.ones({L}, {L})).bool(). In "
            "nn.MultiheadAttention and mha, True means *blocked*, so this mask blocks each query's own "
            f"and earlier keys and lets it see only later ones; the last query (row {L - 1}) sees no key. "
            f"For a causal mask pass torch.triu(torch.ones({L}, {L}, dtype=torch.bool), diagonal=1), "
            "or is_causal=True with no attn_mask.",
            UserWarning,
            stacklevel=4,
        )


def _blocked(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else torch.isneginf(mask)


def _warn_empty_rows(kpm: Tensor | None, attn_mask: Tensor | None, is_causal: bool) -> None:
    """Warn when some query row has every key blocked. Such rows get zero attention."""
    messages: list[str] = []
    if kpm is not None:
        kb = _blocked(kpm)
        empty_batches = kb.all(dim=-1).nonzero().flatten().tolist()
        if empty_batches:
            messages.append(
                f"key_padding_mask blocks every key of batch element(s) {_listing(empty_batches)}"
            )
    if attn_mask is not None:
        ab = _blocked(attn_mask)
        if is_causal:
            L, S = ab.shape[-2:]
            ab = ab | torch.ones(L, S, dtype=torch.bool, device=ab.device).triu(1)
        empty = ab.all(dim=-1)  # (..., L)
        rows = empty.reshape(-1, empty.shape[-1]).any(dim=0).nonzero().flatten().tolist()
        if rows:
            messages.append(f"attn_mask blocks every key of query row(s) {_listing(rows)}")
        elif kpm is not None and ab.dim() == 2:
            # Rows empty only through both masks: row i of batch n has no key iff no key j
            # is open in both, i.e. (open_attn @ open_kpm^T)[i, n] == 0.
            open_pairs = (~ab).to(torch.float32) @ (~_blocked(kpm)).to(torch.float32).T
            both = (open_pairs == 0).any(dim=1).nonzero().flatten().tolist()
            if both:
                messages.append(
                    f"attn_mask and key_padding_mask together block every key of query row(s) {_listing(both)}"
                )
    if messages:
        warnings.warn(
            "; ".join(messages)
            + ". Those rows get zero attention: their output is out_proj's bias and their weights are 0 "
            "(torch.nn.MultiheadAttention returns NaN there on some paths). If that is unintended, check "
            "the mask's polarity: True means masked out.",
            UserWarning,
            stacklevel=4,
        )


def _listing(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}{more}]"
