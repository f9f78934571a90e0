"""``mha.swap``: put mha's attention into an existing model, or take it out again."""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import nn

from ._decoder import swap_decoders
from ._module import MultiheadAttention

_CLASSES: dict[str, type[nn.Module]] = {"mha": MultiheadAttention, "torch": nn.MultiheadAttention}

# Every per-module hook table of nn.Module (torch 2.5 to 2.13): handles hold weak
# references to these very dicts, so sharing them keeps the handles working.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def swap(model: nn.Module, to: Literal["mha", "torch"] = "mha") -> nn.Module:
    """Replace every ``torch.nn.MultiheadAttention`` in ``model`` by :class:`mha.MultiheadAttention`
    (``to="mha"``), or every ``mha.MultiheadAttention`` by torch's (``to="torch"``).

    Works inside ``nn.Transformer``, ``nn.TransformerEncoder``/``Decoder`` and their
    layers, and on a bare attention module. Torch's ``TransformerDecoderLayer`` and
    ``TransformerDecoder`` become :class:`mha.TransformerDecoderLayer` and
    :class:`mha.TransformerDecoder` (decoding with a cache; they change class in
    place), and back with ``to="torch"``. The new modules take over the old ones'
    parameter objects (so device, dtype, ``requires_grad`` and optimizer state carry
    over, and outputs are unchanged), their configuration and training mode. A module
    used in several places stays shared. Subclasses of either class are left alone.

    Hooks move with the module: forward hooks and forward pre-hooks (with
    ``with_kwargs=True`` and ``always_call=True`` as registered), backward hooks
    and backward pre-hooks, and ``state_dict`` / ``load_state_dict`` hooks. The new
    module takes over the old one's hook tables themselves, so the handles
    returned when the hooks were registered still remove them, and a swap back
    with ``to="torch"`` carries them again. Hooks receive the new module as their
    ``module`` argument. Hooks on ``out_proj`` and on the parameters stay where
    they are, as those objects are kept.

    Returns the model, changed in place (or the new module when ``model`` itself is
    replaced)::

        model = mha.swap(nn.Transformer(d_model=64, nhead=8))
        model = mha.swap(model, to="torch")
    """
    if to not in _CLASSES:
        raise ValueError(f"to must be 'mha' or 'torch', got {to!r}")
    model = swap_decoders(model, to)
    source = _CLASSES["torch" if to == "mha" else "mha"]
    target = _CLASSES[to]
    done: dict[int, nn.Module] = {}

    def convert(module: nn.Module) -> nn.Module:
        if id(module) not in done:
            done[id(module)] = _convert(module, target)
        return done[id(module)]

    if type(model) is source:
        return convert(model)
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a module registered under a second name.
        for name, child in list(parent._modules.items()):
            if type(child) is source:
                setattr(parent, name, convert(child))
    return model


def _convert(old: nn.Module, target: type[nn.Module]) -> nn.Module:
    """``old`` rebuilt as ``target`` on the meta device, then given ``old``'s parameters
    and hook tables."""
    new = target(
        old.embed_dim,
        old.num_heads,
        dropout=old.dropout,
        bias=old.in_proj_bias is not None,
        add_bias_kv=old.bias_k is not None,
        add_zero_attn=old.add_zero_attn,
        kdim=old.kdim,
        vdim=old.vdim,
        batch_first=old.batch_first,
        device=torch.device("meta"),
        dtype=cast(nn.Linear, old.out_proj).weight.dtype,
    )
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    new.out_proj = old.out_proj
    for table in _HOOK_TABLES:
        setattr(new, table, getattr(old, table))
    new.train(old.training)
    return new
