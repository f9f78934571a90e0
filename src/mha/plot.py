"""Attention-weight heatmaps with matplotlib (the optional ``plot`` extra).

``import mha.plot`` needs no matplotlib; drawing does, and says how to install it.
Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot, no GUI
backend): save them with ``fig.savefig("weights.png")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["compare", "demo_weights", "weights"]


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "mha.plot draws with matplotlib, which is not installed: pip install 'mha[plot]'"
        ) from err
    return Figure


def _as_maps(tensor: Tensor, batch: int) -> Tensor:
    """Weights as ``(H, L, S)`` (H = 1 for averaged weights)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().to("cpu", torch.float32)
    if t.dim() == 4:
        if not -t.shape[0] <= batch < t.shape[0]:
            raise ValueError(f"batch={batch} is out of range for weights (N, H, L, S) = {tuple(t.shape)}")
        t = t[batch]
    elif t.dim() == 2:
        t = t[None]
    elif t.dim() != 3:
        raise ValueError(
            f"weights must be (L, S), (H, L, S) or (N, H, L, S), got {t.dim()}-D {tuple(t.shape)}; "
            "for averaged weights (N, L, S) pass one batch row, weights[n]"
        )
    return t


def _heatmap(ax, data: Tensor, title: str, vmax: float) -> object:
    image = ax.imshow(data.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j (S)", fontsize=8)
    ax.set_ylabel("query i (L)", fontsize=8)
    ax.tick_params(labelsize=7)
    return image


def weights(tensor: Tensor, *, batch: int = 0, title: str | None = None, mean: bool = True) -> Figure:
    """Heatmaps of attention weights: one panel per head, plus the mean over heads.

    Args:
        tensor: ``(L, S)`` (one map), ``(H, L, S)`` (per head) or ``(N, H, L, S)``
            (per head, batch row ``batch`` drawn), e.g. the weights of
            ``module(q, k, v, average_attn_weights=False)``.
        batch: batch row drawn from 4-D weights.
        title: figure title.
        mean: add a panel with the mean over heads (when there is more than one head).

    Returns:
        The matplotlib Figure. Raises ImportError naming ``pip install 'mha[plot]'``
        without matplotlib.
    """
    Figure = _figure_class()
    maps = _as_maps(tensor, batch)
    H = maps.shape[0]
    panels = [(f"head {h}" if H > 1 else "weights", maps[h]) for h in range(H)]
    if mean and H > 1:
        panels.append(("mean over heads", maps.mean(dim=0)))
    cols = min(len(panels), 4 if len(panels) <= 8 else math.ceil(math.sqrt(len(panels))))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.0 * cols + 0.8, 2.7 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(float(maps.max()), 1e-6)
    image = None
    for ax, (name, data) in zip(axes.flat, panels, strict=False):
        image = _heatmap(ax, data, name, vmax)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def compare(panels: Mapping[str, Tensor], *, title: str | None = None) -> Figure:
    """Side-by-side heatmaps of ``(L, S)`` weight maps, one per named entry, on one color scale."""
    Figure = _figure_class()
    maps = {name: t.detach().to("cpu", torch.float32) for name, t in panels.items()}
    for name, t in maps.items():
        if t.dim() != 2:
            raise ValueError(f"compare takes (L, S) maps, got {name!r} of shape {tuple(t.shape)}")
    fig = Figure(figsize=(3.6 * len(maps) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    vmax = max(max(float(t.max()) for t in maps.values()), 1e-6)
    image = None
    for ax, (name, t) in zip(axes, maps.items(), strict=True):
        image = _heatmap(ax, t, name, vmax)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def demo_weights(seed: int = 0) -> Tensor:
    """Per-head weights ``(N, H, L, S) = (32, 8, 10, 10)`` of causal self-attention with
    ``embed_dim=64``: what ``mha plot`` draws by default."""
    from ._module import MultiheadAttention

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        attention = MultiheadAttention(embed_dim=64, num_heads=8)
    x = torch.randn(10, 32, 64, generator=generator)
    causal = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
    with torch.no_grad():
        _, w = attention(x, x, x, attn_mask=causal, average_attn_weights=False)
    return w
