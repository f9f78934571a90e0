"""``mha.TransformerEncoderLayer``: torch's encoder layer whose masked calls are mha's.

In eval under ``torch.no_grad()`` torch's :class:`~torch.nn.TransformerEncoderLayer`
runs a fused kernel of its own (``torch._transformer_encoder_layer_fwd``) that
reads the attention's parameters and never calls the attention module: with a
mask, a sequence whose keys are all padded comes out NaN there, an inverted
causal mask goes unwarned, and the masks are merged to ``(N, nhead, S, S)``.

This layer plans each masked call with mha's front end first (the masks are
checked and read, as :class:`mha.MultiheadAttention` reads them). Torch's
forward, fused kernel included, serves what it serves as mha would: calls without
a mask, and short masked calls (``S <= 128``) whose masks leave every row a key,
deserve no warning and only block or pass keys (boolean, or float 0 and ``-inf``:
the kernel reads a float mask as booleans). Every other call runs through
``self_attn``, mha's attention: rows left with no key give zeros, pitfalls warn,
and longer sequences skip what the masks close instead of merging them. Under
:func:`mha.use_backend` every call runs through mha.

Inside :class:`torch.nn.TransformerEncoder` with ``enable_nested_tensor`` (the
default), a right-padded ``src_key_padding_mask`` in eval becomes a nested tensor
before the layers run, and they see no mask: torch's fused kernel then runs as
in torch, over the sequences' real tokens only.
"""

# No `from __future__ import annotations`: TorchScript reads the signatures' annotations as objects.
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._dispatch import forced_backend
from ._frontend import plan_forward
from ._fx import leaf_call
from ._mask_analysis import blocks_or_passes, is_standard_causal, values_readable
from ._module import built_like
from ._validate import module_member


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """:class:`torch.nn.TransformerEncoderLayer` with :class:`mha.MultiheadAttention` as
    ``self_attn``. Same constructor, parameters (a ``state_dict`` loads both ways),
    ``forward`` and outputs as torch's, except that torch's fused inference kernel
    serves only the calls it gives mha's result for (see the module docstring): rows
    with every key masked give zeros, not NaN, and mask pitfalls warn. Shapes
    (``batch_first=False``): src ``(S, N, E)``, src_mask ``(S, S)`` or
    ``(N * nhead, S, S)``, src_key_padding_mask ``(N, S)``.
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
        """torch's forward: torch's own where it gives mha's result (its fused kernel in
        eval under ``no_grad`` where torch's conditions hold), otherwise written out
        past that kernel, through ``self_attn`` with the masks as torch passes them."""
        if not torch.jit.is_scripting():
            traced = self._fx_node(src, src_mask, src_key_padding_mask, is_causal)
            if traced is not None:
                return traced
            if self._torch_serves(src, src_mask, src_key_padding_mask, is_causal):
                return self._torch_forward(src, src_mask, src_key_padding_mask, is_causal)
        elif src.is_nested and src_mask is None and src_key_padding_mask is None and not is_causal:
            nested = self._nested_kernel(src)
            if nested is not None:
                return nested
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

    def _nested_kernel(self, src: Tensor) -> Tensor | None:
        """torch's fused kernel over a nested ``src`` without masks, as torch's forward runs
        it, for the forward TorchScript compiles (no ``super()`` there): a scripted
        ``TransformerEncoder`` nests right-padded batches in eval, having checked the
        kernel's conditions, and mha's scripted attention takes no nested tensor. None
        where a parameter the kernel needs is absent (``bias=False``)."""
        attn = self.self_attn
        in_bias, out_bias = attn.in_proj_bias, attn.out_proj.bias
        norm1_bias, norm2_bias = self.norm1.bias, self.norm2.bias
        bias1, bias2 = self.linear1.bias, self.linear2.bias
        if (
            in_bias is None or out_bias is None or norm1_bias is None or norm2_bias is None
            or bias1 is None or bias2 is None
        ):
            return None
        return torch._transformer_encoder_layer_fwd(
            src, attn.embed_dim, attn.num_heads, attn.in_proj_weight, in_bias,
            attn.out_proj.weight, out_bias, self.activation_relu_or_gelu == 2, self.norm_first,
            self.norm1.eps, self.norm1.weight, norm1_bias, self.norm2.weight, norm2_bias,
            self.linear1.weight, bias1, self.linear2.weight, bias2, None, None,
        )

    @torch.jit.unused
    def _fx_node(
        self, src: Tensor, src_mask: Tensor | None, src_key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor | None:
        """Under ``torch.fx`` tracing, this call as one node (a proxy of the output), as
        torch's layer is recorded; None otherwise."""
        kwargs = {"src_mask": src_mask, "src_key_padding_mask": src_key_padding_mask, "is_causal": is_causal}
        return leaf_call(self, (src,), kwargs)  # a proxy of the output, or None

    @torch.jit.unused
    def _torch_serves(
        self, src: Tensor, src_mask: Tensor | None, src_key_padding_mask: Tensor | None, is_causal: bool
    ) -> bool:
        """Whether torch's forward (its fused kernel in eval under ``no_grad``) gives this
        call mha's result: no backend forced, and either no mask and no ``is_causal`` (no
        row can lose every key), or, in eval without autograd, a short sequence whose
        masks mha's front end read (it raises for malformed ones) and found to leave
        every row a key and to deserve no warning, with ``is_causal`` only beside the
        causal mask itself (torch's kernel applies the mask alone, mha both). Over
        longer sequences mha's path is the faster."""
        if forced_backend() is not None:
            return False
        if src_mask is None and src_key_padding_mask is None:
            return not is_causal  # is_causal alone: torch's kernel would attend every key
        attention = module_member(self, "self_attn")
        if (
            self.training or torch.is_grad_enabled() or src.dim() != 3 or not attention.batch_first
            or not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled()
        ):
            return False  # torch's forward would call self_attn: mha's path directly, planned once
        if torch.jit.is_tracing():
            return False  # a trace would keep the kernel chosen from these masks' values for any others
        if src.shape[1] > _TORCH_KERNEL_MAX_KEYS:  # (N, S, E): batch_first
            return False
        if not values_readable(src_mask, src_key_padding_mask):
            return False  # meta, fake or traced masks (unread, they may empty rows): mha's path
        causal_mask = is_causal and src_mask is not None and is_standard_causal(src_mask)
        if is_causal and not causal_mask:
            return False  # torch's kernel reads the mask alone; mha applies causality too
        plan = plan_forward(
            attention, src, src, src, src_key_padding_mask, src_mask, is_causal,
            need_weights=False, average_attn_weights=True, training=False,
        )
        if plan.route != "dense" or plan.warnings:
            return False
        # torch's kernel reads a float mask as booleans (nonzero = masked out): an added
        # bias, or a large negative number, would block its keys there (the causal mask
        # holds only 0 and -inf).
        return (causal_mask or blocks_or_passes(src_mask)) and blocks_or_passes(src_key_padding_mask)

    @torch.jit.unused
    def _torch_forward(
        self, src: Tensor, src_mask: Tensor | None, src_key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """torch's own forward (not compiled by TorchScript, which compiles no ``super()``)."""
        return super().forward(src, src_mask, src_key_padding_mask, is_causal)


# benchmarks/overhead.py --sections encoder, and a sweep of one layer (E=256, 8 heads, eval,
# causal or right-padded masks, 1 thread): torch's fused kernel against mha's path ran
# 0.86-0.93x at S=64 and 0.83-0.87x at S=128 for N=1, 0.97-0.98x at S=64 for N=8 and 32,
# 1.04x at S=128 for N=8, 1.14-1.15x at S=256 for N=1 (torch's time / mha's): over short
# sequences the fused feed-forward and fewer Python calls win, over longer ones mha's
# attention, which neither merges nor materialises the masks.
_TORCH_KERNEL_MAX_KEYS = 128
