"""``mha.TransformerEncoderLayer``: torch's encoder layer whose masked calls run through mha.

In eval under ``torch.no_grad()`` torch's :class:`~torch.nn.TransformerEncoderLayer`
runs a fused kernel of its own (``torch._transformer_encoder_layer_fwd``) that
reads the attention's parameters and never calls the attention module: with a
mask, a sequence whose keys are all padded comes out NaN there, and no mask is
checked. This layer keeps torch's fused kernel for calls without a mask (no row
can lose every key, and there is no mask to check), and runs every masked or
causal call, and every call under :func:`mha.use_backend`, through its
:class:`mha.MultiheadAttention`: fully masked rows give zeros, masks are checked
and their pitfalls warned.

Inside :class:`torch.nn.TransformerEncoder` with ``enable_nested_tensor`` (the
default), a right-padded ``src_key_padding_mask`` in eval is turned into a nested
tensor before the layers run, and they see no mask: the fused kernel then runs as
in torch, over the sequences' real tokens only.
"""

# No `from __future__ import annotations`: TorchScript reads the signatures' annotations as objects.
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dispatch import forced_backend
from ._module import built_like


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """:class:`torch.nn.TransformerEncoderLayer` with :class:`mha.MultiheadAttention` as
    ``self_attn``. Same constructor, parameters (a ``state_dict`` loads both ways),
    ``forward`` and outputs as torch's, except that a masked call never runs torch's
    fused inference kernel (see the module docstring): rows with every key masked
    give zeros, not NaN. Shapes (``batch_first=False``): src ``(S, N, E)``, src_mask
    ``(S, S)`` or ``(N * nhead, S, S)``, src_key_padding_mask ``(N, S)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # torch annotates it as its own class; mha's is a drop-in, not a subclass.
        self.self_attn = built_like(self.self_attn)  # type: ignore[assignment]

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """torch's forward. A call without masks and without ``is_causal`` is torch's own
        (its fused kernel in eval under ``no_grad`` where torch's conditions hold); any
        other call goes through ``self_attn``, with the masks as torch passes them."""
        if (
            not torch.jit.is_scripting()
            and src_mask is None
            and src_key_padding_mask is None
            and not is_causal
            and self._torch_may_fuse()
        ):
            return self._torch_forward(src)
        # torch's forward past its fused kernel, written out: TorchScript compiles no super().
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask),
            other_name="src_mask",
            target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask,
            mask_name="src_mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))

    @torch.jit.unused
    def _torch_may_fuse(self) -> bool:
        """Whether a call without masks may run torch's forward, fused kernel included: not
        while :func:`mha.use_backend` forces a backend (that call is meant for mha)."""
        return forced_backend() is None

    @torch.jit.unused
    def _torch_forward(self, src: Tensor) -> Tensor:
        return super().forward(src)
