"""``mha.swap``: put mha's attention into an existing model, or take it out again."""

from __future__ import annotations

import copy
from typing import Literal, cast

import torch
from torch import nn

from ._decoder import TransformerDecoder, TransformerDecoderLayer
from ._encoder import TransformerEncoderLayer
from ._module import MultiheadAttention

_CLASSES: dict[str, type[nn.Module]] = {"mha": MultiheadAttention, "torch": nn.MultiheadAttention}

# torch's transformer layers and mha's: mha's only add to torch's (or bypass its fused
# kernel), so a module changes class in place and keeps its identity, submodules,
# parameters, buffers and hooks; the attention inside is converted after.
_LAYERS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.TransformerEncoderLayer, TransformerEncoderLayer),
    (nn.TransformerDecoderLayer, TransformerDecoderLayer),
    (nn.TransformerDecoder, TransformerDecoder),
)

# The registries that a module's state holds and that are copied, not shared, so that the
# old module's own keep their entries. Everything else in its state, hook tables
# included, is taken over as is: hook handles hold weak references to those very dicts.
_REGISTRIES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def swap(model: nn.Module, to: Literal["mha", "torch"] = "mha") -> nn.Module:
    """Replace every ``torch.nn.MultiheadAttention`` in ``model`` by :class:`mha.MultiheadAttention`
    (``to="mha"``), or every ``mha.MultiheadAttention`` by torch's (``to="torch"``).

    Works inside ``nn.Transformer``, ``nn.TransformerEncoder``/``Decoder`` and their
    layers, and on a bare attention module. Torch's ``TransformerEncoderLayer``,
    ``TransformerDecoderLayer`` and ``TransformerDecoder`` become
    :class:`mha.TransformerEncoderLayer` (torch's fused inference kernel, which gives
    NaN for fully padded sequences, serves only calls it gives mha's result for),
    :class:`mha.TransformerDecoderLayer` and :class:`mha.TransformerDecoder`
    (decoding with a cache); they change class in place, and back with
    ``to="torch"``. The new attention modules take over the old ones'
    parameter objects (so device, dtype, ``requires_grad`` and optimizer state carry
    over, and outputs are unchanged), their buffers, submodules, other attributes
    (such as those ``torch.nn.utils.weight_norm`` adds), configuration and training
    mode. A module used in several places stays shared. Subclasses of either class are left alone.

    Hooks move with the module: forward hooks and forward pre-hooks (with
    ``with_kwargs=True`` and ``always_call=True`` as registered), backward hooks
    and backward pre-hooks, and ``state_dict`` / ``load_state_dict`` hooks. The new
    module takes over the old one's hook tables themselves, so the handles
    returned when the hooks were registered still remove them, and a swap back
    with ``to="torch"`` carries them again. Hooks receive the new module as their
    ``module`` argument. Hooks on ``out_proj`` and on the parameters stay where
    they are, as those objects are kept.

    Returns the model, changed in place (or the new module when ``model`` itself is
    replaced).

    Example::

        >>> import torch, mha
        >>> model = mha.swap(torch.nn.Transformer(d_model=64, nhead=8, batch_first=True))
        >>> type(model.encoder.layers[0].self_attn)
        <class 'mha._module.MultiheadAttention'>
        >>> model = mha.swap(model, to="torch")
        >>> type(model.encoder.layers[0].self_attn)
        <class 'torch.nn.modules.activation.MultiheadAttention'>
    """
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise TypeError(
            f"swap: model must be a torch.nn.Module instance, got {what}; pass the model itself "
            "(an instance, e.g. mha.swap(model)), or wrap a list of modules in nn.ModuleList"
        )
    if to not in _CLASSES:
        raise ValueError(f"to must be 'mha' or 'torch', got {to!r}")
    layers = {(theirs if to == "mha" else ours): (ours if to == "mha" else theirs) for theirs, ours in _LAYERS}
    for module in model.modules():
        if type(module) in layers:
            module.__class__ = layers[type(module)]
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
    """``old`` rebuilt as ``target`` on the meta device, then given all of ``old``'s state:
    its parameters, buffers, submodules, hook tables, training flag and other attributes
    (including those that reparametrizations such as ``weight_norm`` add or remove). Only
    attributes that ``target`` sets and ``old`` lacks keep ``target``'s meta-built values."""
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
    state = dict(vars(old))
    for registry in _REGISTRIES:
        state[registry] = copy.copy(state[registry])
    new.__dict__.update(state)
    return new
