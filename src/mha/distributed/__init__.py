"""Context parallelism: attention over a sequence split across the ranks of a
``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

* :func:`ring_attention` — :func:`mha.attention` on sequence shards, by ring:
  keys and values travel rank to rank, partial results merge by log-sum-exp,
  and masks (``Causal``, ``Window``, ``KeyPadding``, packed sequences) keep
  their meaning on the whole sequence.
* :func:`shard` / :func:`unshard` — cut a whole tensor into this rank's part
  and gather it back, in either layout (``"contiguous"``, ``"zigzag"``).
* :func:`context_parallel` — a context manager under which every
  ``mha.MultiheadAttention`` call takes its inputs as sequence shards.
"""

from ._context import ContextParallel, context_parallel
from ._layout import Layout
from ._ring import ring_attention
from ._shard import shard, unshard

__all__ = ["ContextParallel", "Layout", "context_parallel", "ring_attention", "shard", "unshard"]
