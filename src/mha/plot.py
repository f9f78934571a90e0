"""Attention-weight heatmaps with matplotlib (the optional ``plot`` extra).

``import mha.plot`` needs no matplotlib; drawing does, and says how to install it.
Figures are plain :class:`matplotlib.figure.Figure` objects (no pyplot, no GUI
backend): save them with ``fig.savefig("weights.png")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = ["compare", "demo_weights", "weights"]


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "mha.plot draws with matplotlib, which is not installed: pip install 'mha[plot]'"
        ) from err
    return Figure


Layout = Literal["LS", "HLS", "NLS", "NHLS"]
_LAYOUTS: dict[str, str] = {
    "LS": "(L, S)",
    "HLS": "(H, L, S) per head",
    "NLS": "(N, L, S) averaged over heads",
    "NHLS": "(N, H, L, S) per head",
}


def _layout(t: Tensor, layout: str | None) -> str:
    """The layout of ``t``: ``layout`` checked against its dimensions, or read from them
    (3-D weights are taken as the module's default, ``(N, L, S)`` averaged over heads)."""
    if layout is None:
        by_dim = {2: "LS", 3: "NLS", 4: "NHLS"}
        if t.dim() not in by_dim:
            raise ValueError(
                f"weights must be (L, S), (N, L, S) averaged over heads or (N, H, L, S) per head, "
                f"got {t.dim()}-D {tuple(t.shape)}"
            )
        return by_dim[t.dim()]
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, _LAYOUTS))}, got {layout!r}")
    if t.dim() != len(layout):
        raise ValueError(
            f"layout={layout!r} means weights {_LAYOUTS[layout]}, got {t.dim()}-D {tuple(t.shape)}"
        )
    return layout


def _panels(tensor: Tensor, layout: str | None, batch: int, mean: bool) -> list[tuple[str, Tensor]]:
    """The named ``(L, S)`` maps to draw: one per head (with their mean) or one per batch row."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach().to("cpu", torch.float32)
    layout = _layout(t, layout)
    if t.numel() == 0:
        raise ValueError(f"weights {tuple(t.shape)} hold no element: nothing to draw")
    if layout == "LS":
        return [("weights", t)]
    if layout == "NLS":
        if t.shape[0] == 1:
            return [("mean over heads", t[0])]
        return [(f"batch {n}, mean over heads", t[n]) for n in range(t.shape[0])]
    if layout == "NHLS":
        if not -t.shape[0] <= batch < t.shape[0]:
            raise ValueError(f"batch={batch} is out of range for weights (N, H, L, S) = {tuple(t.shape)}")
        t = t[batch]
    panels = [(f"head {h}", t[h]) for h in range(t.shape[0])]
    if mean and t.shape[0] > 1:
        panels.append(("mean over heads", t.mean(dim=0)))
    return panels


def _heatmap(ax: Axes, data: Tensor, title: str, vmax: float) -> AxesImage:
    image = ax.imshow(data.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j (S)", fontsize=8)
    ax.set_ylabel("query i (L)", fontsize=8)
    ax.tick_params(labelsize=7)
    return image


def weights(
    tensor: Tensor, *, layout: Layout | None = None, batch: int = 0, title: str | None = None, mean: bool = True
) -> Figure:
    """Heatmaps of attention weights, each panel labelled with what it shows.

    Args:
        tensor: attention weights as the module returns them: ``(N, L, S)`` averaged
            over heads (the default, ``need_weights=True``): one panel per batch row;
            ``(N, H, L, S)`` per head (``average_attn_weights=False``): one panel per
            head of batch row ``batch``, plus their mean; or one ``(L, S)`` map.
        layout: what the dimensions mean, ``"LS"``, ``"HLS"``, ``"NLS"`` or ``"NHLS"``;
            by default read from the number of dimensions, a 3-D tensor taken as
            ``"NLS"``. Pass ``"HLS"`` for the per-head weights of an unbatched call
            ``(H, L, S)``.
        batch: batch row drawn from ``(N, H, L, S)`` weights.
        title: figure title.
        mean: add a panel with the mean over heads (per-head weights, more than one head).

    Returns:
        The matplotlib Figure. Raises ImportError naming ``pip install 'mha[plot]'``
        without matplotlib, ValueError when ``layout`` does not fit the tensor or the
        tensor is empty.
    """
    Figure = _figure_class()
    panels = _panels(tensor, layout, batch, mean)
    cols = min(len(panels), 4 if len(panels) <= 8 else math.ceil(math.sqrt(len(panels))))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.0 * cols + 0.8, 2.7 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(max(float(data.max()) for _, data in panels), 1e-6)
    images = [_heatmap(ax, data, name, vmax) for ax, (name, data) in zip(axes.flat, panels, strict=False)]
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.colorbar(images[-1], ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def compare(panels: Mapping[str, Tensor], *, title: str | None = None) -> Figure:
    """Side-by-side heatmaps of ``(L, S)`` weight maps, one per named entry, on one color scale."""
    Figure = _figure_class()
    maps = {name: t.detach().to("cpu", torch.float32) for name, t in panels.items()}
    if not maps:
        raise ValueError("compare takes at least one named (L, S) map in panels, got none")
    for name, t in maps.items():
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"compare takes non-empty (L, S) maps, got {name!r} of shape {tuple(t.shape)}")
    fig = Figure(figsize=(3.6 * len(maps) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    vmax = max(max(float(t.max()) for t in maps.values()), 1e-6)
    images = [_heatmap(ax, t, name, vmax) for ax, (name, t) in zip(axes, maps.items(), strict=True)]
    fig.colorbar(images[-1], ax=list(axes), shrink=0.8, label="attention weight")
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
