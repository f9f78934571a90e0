"""mha: multi-head attention for PyTorch.

``mha.MultiheadAttention`` is a drop-in for ``torch.nn.MultiheadAttention``
(same constructor, forward, parameter names and results) that checks its
inputs, never returns NaN for fully masked rows, and does not pay for padding.
``mha.attention`` is the functional core on heads, with mask objects from
``mha.masks``. ``mha.explain`` says what a call will do without running it,
``mha.swap`` puts mha into an existing model, ``mha.KVCache`` and the decoder
layers decode token by token without recomputing the past, and ``mha.plot`` (matplotlib,
imported on first use) draws attention weights.
"""

from typing import Any

from . import masks
from ._cache import KVCache
from ._core import AttentionOutput, attention
from ._decoder import DecoderCache, LayerCache, TransformerDecoder, TransformerDecoderLayer
from ._explain import Explanation, explain
from ._module import MultiheadAttention
from ._swap import swap

__all__ = [
    "AttentionOutput",
    "DecoderCache",
    "Explanation",
    "KVCache",
    "LayerCache",
    "MultiheadAttention",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "attention",
    "explain",
    "masks",
    "plot",
    "swap",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'mha' has no attribute {name!r}")
