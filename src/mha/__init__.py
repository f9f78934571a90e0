"""mha: multi-head attention for PyTorch.

``mha.MultiheadAttention`` is a drop-in for ``torch.nn.MultiheadAttention``
(same constructor, forward, parameter names and results) that checks its
inputs, never returns NaN for fully masked rows, and does not pay for padding.
``mha.attention`` is the functional core on heads, with mask objects from
``mha.masks``.
"""

from . import masks
from ._core import AttentionOutput, attention
from ._module import MultiheadAttention

__all__ = ["AttentionOutput", "MultiheadAttention", "attention", "masks"]
__version__ = "0.1.0"
