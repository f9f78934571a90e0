"""mha: multi-head attention for PyTorch.

``mha.MultiheadAttention`` is a drop-in for ``torch.nn.MultiheadAttention``
(same constructor, forward, parameter names and results) that checks its
inputs, never returns NaN for fully masked rows, and does not pay for padding.
``mha.attention`` is the functional core on heads, with mask objects from
``mha.masks``; ``mha.use_backend`` forces the backend of every call inside a
block. ``mha.explain`` says what a call will do without running it, ``mha.swap``
puts mha into an existing model, ``mha.KVCache`` and the decoder layers decode token by token without recomputing
the past, ``mha.distributed`` runs attention over sequences split across devices
(ring attention on ``torch.distributed``), and
``mha.plot`` (matplotlib, imported on first use) draws attention weights.
"""

from typing import Any

from . import distributed, masks
from ._cache import KVCache
from ._core import attention
from ._decoder import DecoderCache, LayerCache, TransformerDecoder, TransformerDecoderLayer
from ._dispatch import use_backend
from ._encoder import TransformerEncoderLayer
from ._explain import Explanation, explain
from ._module import MultiheadAttention
from ._swap import swap
from ._types import AttentionOutput

__all__ = [
    "AttentionOutput",
    "DecoderCache",
    "Explanation",
    "KVCache",
    "LayerCache",
    "MultiheadAttention",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
    "attention",
    "distributed",
    "explain",
    "masks",
    "plot",
    "swap",
    "use_backend",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'mha' has no attribute {name!r}")
