"""Checks on what users pass to :class:`mha.MultiheadAttention`.

Every check reads shapes, dtypes and devices only; none reads tensor values.
Messages use the notation of the docs: query ``(L, N, E)``, key ``(S, N, E)``,
value ``(S, N, D)`` (``(N, L, E)`` ... with ``batch_first=True``), and each
says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

import operator
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

# Sizes of one validated forward call: (batched, N, L, S). A plain tuple: it is built on
# every call, and even a NamedTuple costs a microsecond there between large kernels.
ForwardShapes = tuple[bool, int, int, int]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def module_member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` for a registered parameter or submodule, at a fraction of
    its cost: on Python 3.11 those are found only after the ordinary attribute lookup has
    failed, formatted an AttributeError and fallen back to ``nn.Module.__getattr__``, close
    to a microsecond each, and a forward reads several. Whatever is not registered under
    ``name`` (a parametrization's property, a plain attribute that replaced a parameter,
    a parameter registered as None) is read with ``getattr``."""
    member: nn.Parameter | nn.Module | None = module._parameters.get(name)
    if member is None:
        member = module._modules.get(name)
    return member if member is not None else getattr(module, name)


def as_int(value: Any, what: str, expected: str = "an int") -> int:
    """``value`` as a Python int: an int or another integral type (a numpy integer, a
    one-element integer tensor: what ``operator.index`` takes), never a bool. TypeError
    naming ``what``, the ``expected`` kind and what came otherwise."""
    if not isinstance(value, bool) and not (isinstance(value, Tensor) and value.dtype == torch.bool):
        try:
            return operator.index(value)
        except (TypeError, RuntimeError):  # RuntimeError: a tensor that holds no value (meta)
            pass
    got = (
        f"a Tensor of shape {_shape(value)}, dtype {value.dtype} on {value.device}"
        if isinstance(value, Tensor)
        else f"{type(value).__name__} {value!r}"
    )
    fix = "pass a Python int" + (f", e.g. int({what.split()[-1]})" if isinstance(value, Real) else "")
    raise TypeError(f"{what} must be {expected}, got {got}; {fix} (numpy and torch integers are taken too)")


def validate_constructor(
    embed_dim: Any, num_heads: Any, dropout: Any, kdim: Any, vdim: Any
) -> tuple[int, int, int | None, int | None]:
    """Check the constructor's arguments; return ``(embed_dim, num_heads, kdim, vdim)`` as
    Python ints (None kept): numpy integers and integer tensors, which torch's constructor
    takes, are read through ``operator.index``."""
    embed_dim = as_int(embed_dim, "embed_dim")
    num_heads = as_int(num_heads, "num_heads")
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {name}={value}")
    kdim = None if kdim is None else as_int(kdim, "kdim", "an int or None")
    vdim = None if vdim is None else as_int(vdim, "vdim", "an int or None")
    for name, value in (("kdim", kdim), ("vdim", vdim)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive (the width of {'key' if name == 'kdim' else 'value'}), got {name}={value}")
    if embed_dim % num_heads != 0:
        divisors = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0]
        raise ValueError(
            f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}: each head gets "
            f"embed_dim // num_heads features. Choose num_heads from {_few(divisors)}, "
            f"or embed_dim as a multiple of {num_heads} (e.g. {num_heads * max(1, round(embed_dim / num_heads))})"
        )
    check_dropout(dropout, "dropout", "")
    return embed_dim, num_heads, kdim, vdim


def check_dropout(value: Any, name: str, prefix: str) -> None:
    """TypeError unless ``value`` is a real number (not a bool), ValueError unless it is in
    [0, 1] as torch's ``F.dropout`` takes it (1 zeroes every weight); ``prefix`` starts the
    message (the function's name)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        fix = f"float({name})" if isinstance(value, Tensor) else f"a Python float, e.g. {name}=0.1"
        raise TypeError(
            f"{prefix}{name} must be a float in [0, 1], got {type(value).__name__} {value!r}; pass {fix}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"{prefix}{name} must be in [0, 1] (the probability of zeroing an attention weight), "
            f"got {name}={value}"
        )


def _few(values: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


_BATCHED_NOTATION = {
    False: {"query": "(L, N, E)", "key": "(S, N, E)", "value": "(S, N, D)"},
    True: {"query": "(N, L, E)", "key": "(N, S, E)", "value": "(N, S, D)"},
}
_UNBATCHED_NOTATION = {"query": "(L, E)", "key": "(S, E)", "value": "(S, D)"}


def validate_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any,
    attn_mask: Any,
) -> ForwardShapes:
    """Check a forward call's inputs; return its sizes. Raises TypeError or ValueError."""
    shapes = _common_call_shapes(module, query, key, value, key_padding_mask, attn_mask)
    if shapes is not None:
        return shapes
    bf = module.batch_first
    names, unbatched = _BATCHED_NOTATION[bool(bf)], _UNBATCHED_NOTATION
    tensors = {"query": query, "key": key, "value": value}
    _validate_not_nested(key=key, value=value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape {names[name]}, got {type(t).__name__}; "
                f"convert it with torch.as_tensor({name}, dtype=torch.float32)"
            )
        if t.layout != torch.strided:
            raise TypeError(
                f"{name} {names[name]} = {_shape(t)} is a {t.layout} tensor; attention reads dense "
                f"tensors: pass {name}.to_dense()"
            )
        if not (t.is_floating_point()):
            if t.is_quantized:
                # Eager-mode static quantization converts torch's attention (an exact type
                # match), not mha's, which then receives the quantized activations.
                raise TypeError(
                    f"{name} is a quantized tensor ({t.dtype}, shape {_shape(t)}); mha.MultiheadAttention "
                    f"has no quantized form: quantize a model with torch's attention "
                    f"(mha.swap(model, to='torch') before torch.ao.quantization.prepare), or pass "
                    f"{name}.dequantize()"
                )
            raise TypeError(
                f"{name} must be a floating-point tensor, got dtype {t.dtype} with shape {_shape(t)}; "
                f"cast it, e.g. {name}.float()"
            )
    if query.dim() not in (2, 3):
        raise ValueError(
            f"query must be 3-D {names['query']} (batched) or 2-D (L, E) (unbatched), got "
            f"{query.dim()}-D {_shape(query)}"
            + ("; merge extra batch dimensions into N first" if query.dim() > 3 else "")
        )
    batched = query.dim() == 3
    for name in ("key", "value"):
        t = tensors[name]
        if t.dim() != query.dim():
            if batched:
                raise ValueError(
                    f"query is batched {names['query']} = {_shape(query)}, so {name} must be 3-D "
                    f"{names[name]}, got {t.dim()}-D {_shape(t)}"
                    + (f"; add the batch dimension with {name}.unsqueeze({0 if bf else 1})" if t.dim() == 2 else "")
                )
            raise ValueError(
                f"query is unbatched (L, E) = {_shape(query)}, so {name} must be unbatched "
                f"{unbatched[name]}, got {t.dim()}-D {_shape(t)}; either pass query batched "
                f"{names['query']} (query.unsqueeze({0 if bf else 1})) or drop {name}'s batch dimension"
            )
    notation = names if batched else unbatched
    _validate_dtypes_devices(module, query, key, value)
    E, kdim, vdim = module.embed_dim, module.kdim, module.vdim
    if query.shape[-1] != E:
        raise ValueError(
            f"query {notation['query']} = {_shape(query)} has E = {query.shape[-1]}, but the module was "
            f"built with embed_dim={E}; build it with embed_dim={query.shape[-1]} or project query to {E} features"
        )
    if key.shape[-1] != kdim:
        fix = (
            f"build the module with kdim={key.shape[-1]}"
            if kdim == E
            else f"the module was built with kdim={kdim}: pass a key with {kdim} features or build "
            f"the module with kdim={key.shape[-1]}"
        )
        raise ValueError(
            f"key {notation['key']} = {_shape(key)} has {key.shape[-1]} features, expected kdim = {kdim}; {fix}"
        )
    if value.shape[-1] != vdim:
        if vdim == E:
            raise ValueError(
                f"value {notation['value']} = {_shape(value)} has D = {value.shape[-1]}, but the module "
                f"expects D = E = {E} because it was built without vdim; D != E works: build the module "
                f"with vdim={value.shape[-1]}"
            )
        raise ValueError(
            f"value {notation['value']} = {_shape(value)} has D = {value.shape[-1]}, but the module was built "
            f"with vdim={vdim}; pass a value with D = {vdim} or build the module with vdim={value.shape[-1]}"
        )
    seq = 1 if (bf and batched) else 0
    bat = 0 if bf else 1
    L = query.shape[seq]
    S = key.shape[seq]
    if value.shape[seq] != S:
        raise ValueError(
            f"key {notation['key']} = {_shape(key)} and value {notation['value']} = {_shape(value)} must have "
            f"the same S (one value per key), got S = {S} and {value.shape[seq]}"
        )
    N = query.shape[bat] if batched else 1
    if batched:
        for name in ("key", "value"):
            t = tensors[name]
            if t.shape[bat] != N:
                raise ValueError(
                    f"{name} {notation[name]} = {_shape(t)} has batch size N = {t.shape[bat]}, but query "
                    f"{notation['query']} = {_shape(query)} has N = {N}; all three need the same N"
                    + _batch_first_hint(module, query, key, value)
                )
    if key_padding_mask is not None:
        _validate_key_padding_mask(module, key_padding_mask, batched, N, S, notation, key)
    if attn_mask is not None:
        # (L, S) as the tensors would read in the other layout, for the message of a mask made for it.
        other = (query.shape[0], key.shape[0]) if bf else (query.shape[1], key.shape[1])
        _validate_attn_mask(module, attn_mask, batched, N, L, S, query.device, other if batched else None)
    return batched, N, L, S


def _common_call_shapes(
    module: Any, query: Any, key: Any, value: Any, key_padding_mask: Any, attn_mask: Any
) -> ForwardShapes | None:
    """The sizes of the most common call, checked in a few steps (the checks above cost
    tens of microseconds a call, as much as a small call's attention): batched dense
    tensors, no subclass, of the module's dtype, device and widths; key and value of one
    length; ``key_padding_mask`` None or ``(N, S)`` and ``attn_mask`` None or ``(L, S)``,
    dense, boolean or floating, on that device. None for every other call, valid or not,
    which :func:`validate_forward` then checks one by one, with its messages: what this
    accepts is a subset of what it accepts. A key or value that is the query (or value
    the key) is the same tensor: checked once."""
    if (
        type(query) is not Tensor
        or query.layout != torch.strided
        or query.is_nested
        or query.dim() != 3
        or not query.is_floating_point()
    ):
        return None
    param = module_member(module_member(module, "out_proj"), "weight")
    dtype, device = query.dtype, query.device
    if dtype != param.dtype or device != param.device:
        return None
    if key is not query and not _common_input(key, dtype, device):
        return None
    if value is not key and value is not query and not _common_input(value, dtype, device):
        return None
    seq = 1 if module.batch_first else 0
    shape = query.shape
    k_shape = shape if key is query else key.shape
    v_shape = k_shape if value is key else shape if value is query else value.shape
    L, N, S = shape[seq], shape[1 - seq], k_shape[seq]
    if (shape[2], k_shape[2], v_shape[2]) != (module.embed_dim, module.kdim, module.vdim):
        return None
    if k_shape[1 - seq] != N or v_shape[1 - seq] != N or v_shape[seq] != S:
        return None
    if key_padding_mask is not None and not _common_mask(key_padding_mask, N, S, device):
        return None
    if attn_mask is not None and not _common_mask(attn_mask, L, S, device):
        return None
    return True, N, L, S


def _common_input(t: Any, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``t`` is a dense (strided, not nested) 3-D tensor, no subclass, of ``dtype`` on ``device``."""
    return type(t) is Tensor and t.layout == torch.strided and not t.is_nested and t.dim() == 3 and t.dtype == dtype and t.device == device


def _common_mask(mask: Any, rows: int, columns: int, device: torch.device) -> bool:
    """Whether ``mask`` is a dense (strided, not nested) boolean or floating ``(rows, columns)``
    tensor on ``device``."""
    return (
        type(mask) is Tensor
        and mask.layout == torch.strided
        and not mask.is_nested
        and mask.shape == (rows, columns)
        and (mask.dtype == torch.bool or mask.is_floating_point())
        and mask.device == device
    )


def _batch_first_hint(module: Any, query: Tensor, key: Tensor, value: Tensor) -> str:
    """A hint when the tensors fit the other layout (batch-first vs sequence-first)."""
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        return ""
    bat_other = 1 if module.batch_first else 0
    if query.shape[bat_other] == key.shape[bat_other] == value.shape[bat_other]:
        return f". The shapes fit {_other_layout(module)}"
    return ""


def _other_layout(module: Any) -> str:
    """The layout the module was not built for, and how to switch to it."""
    if module.batch_first:
        return (
            "sequence-first tensors (L, N, E): this module has batch_first=True; "
            "build it with batch_first=False or pass query.transpose(0, 1)"
        )
    return (
        "batch-first tensors (N, L, E): this module has batch_first=False; "
        "build it with batch_first=True or pass query.transpose(0, 1) (and key, value likewise)"
    )


def _validate_dtypes_devices(module: Any, query: Tensor, key: Tensor, value: Tensor) -> None:
    # Under autocast the projections cast inputs and parameters to one dtype, as torch's
    # do: mixed dtypes are what autocast regions hold (a bf16 activation, fp32 weights).
    if not autocast_enabled(query.device.type):
        _validate_dtypes(module, query, key, value)
    param = module.out_proj.weight
    if not (query.device == key.device == value.device == param.device):
        raise ValueError(
            f"query, key, value and the module must be on one device, got query on {query.device}, "
            f"key on {key.device}, value on {value.device}, module on {param.device}; move them with .to(device)"
        )


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for types autocast has no key
    for (``meta``), where torch.is_autocast_enabled raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _validate_dtypes(module: Any, query: Tensor, key: Tensor, value: Tensor) -> None:
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, "
            f"value {value.dtype}; cast them, e.g. key.to(query.dtype)"
        )
    param = module.out_proj.weight
    if query.dtype != param.dtype:
        raise TypeError(
            f"query, key and value are {query.dtype} but the module's parameters are {param.dtype}; "
            f"cast the module with module.to({query.dtype}) or the inputs with .to({param.dtype})"
        )


def _validate_mask_type(name: str, mask: Any, expected: str, device: torch.device) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected} or None, got {type(mask).__name__}")
    if mask.layout != torch.strided:
        raise TypeError(
            f"{name} {expected} = {_shape(mask)} is a {mask.layout} tensor; masks are read as dense "
            f"tensors: pass {name}.to_dense()"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name} {expected} = {_shape(mask)} has dtype {mask.dtype}; pass a bool tensor (True = masked "
            f"out), e.g. {name}.bool() or ({name} != 0), or a float tensor added to the scores (-inf = masked out)"
        )
    if mask.device != device:
        raise ValueError(
            f"{name} is on {mask.device} but query is on {device}; move it with {name}.to({str(device)!r})"
        )


def _validate_key_padding_mask(
    module: Any, kpm: Any, batched: bool, N: int, S: int, notation: dict[str, str], key: Tensor
) -> None:
    expected = "(N, S)" if batched else "(S,)"
    _validate_mask_type("key_padding_mask", kpm, expected, key.device)
    if not batched:
        if kpm.dim() != 1:
            raise ValueError(
                f"query is unbatched, so key_padding_mask must be 1-D (S,) = ({S},), got {kpm.dim()}-D "
                f"{_shape(kpm)}; pass key_padding_mask[0] for one sequence, or batch all inputs"
            )
        if kpm.shape[0] != S:
            raise ValueError(
                f"key_padding_mask (S,) must have S = {S} (the key's length), got {_shape(kpm)}"
            )
        return
    if kpm.dim() != 2:
        raise ValueError(
            f"key_padding_mask must be 2-D (N, S) = ({N}, {S}), got {kpm.dim()}-D {_shape(kpm)}"
        )
    if _shape(kpm) == (N, S):
        return
    if _shape(kpm) == (S, N):
        raise ValueError(
            f"key_padding_mask has shape {_shape(kpm)} = (S, N), expected (N, S) = ({N}, {S}); "
            "pass key_padding_mask.T"
            + (
                ". If your tensors are batch-first (N, L, E), build the module with batch_first=True"
                if not module.batch_first
                else ""
            )
        )
    if not module.batch_first and key.dim() == 3 and _shape(kpm) == (key.shape[0], key.shape[1]):
        raise ValueError(
            f"key_padding_mask (N, S) = {_shape(kpm)} does not match (N, S) = ({N}, {S}) read from "
            f"key {notation['key']} = {_shape(key)}, but it matches key read as batch-first (N, S, E): "
            "build the module with batch_first=True"
        )
    if kpm.shape[0] != N:
        raise ValueError(
            f"key_padding_mask (N, S) = {_shape(kpm)} has N = {kpm.shape[0]}, expected N = {N} (query's batch size)"
        )
    raise ValueError(
        f"key_padding_mask (N, S) = {_shape(kpm)} has S = {kpm.shape[1]}, expected S = {S} (the key's length); "
        "it needs one entry per key position"
    )


def _validate_attn_mask(
    module: Any,
    mask: Any,
    batched: bool,
    N: int,
    L: int,
    S: int,
    device: torch.device,
    other_layout: tuple[int, int] | None = None,
) -> None:
    """``other_layout``: ``(L, S)`` as batched tensors read in the layout the module was
    not built for (batch-first vs sequence-first), or None."""
    H = module.num_heads
    layouts = {3: "(N*num_heads, L, S)" if batched else "(num_heads, L, S)", 4: "(N, num_heads, L, S)"}
    expected = layouts.get(mask.dim(), "(L, S)") if isinstance(mask, Tensor) else "(L, S)"
    _validate_mask_type("attn_mask", mask, expected, device)
    shape = _shape(mask)
    if mask.dim() == 2:
        if shape == (L, S):
            return
        if shape == (S, L):
            raise ValueError(
                f"attn_mask has shape {shape} = (S, L), expected (L, S) = ({L}, {S}): one row per query; "
                "pass attn_mask.T"
            )
        raise ValueError(
            f"attn_mask must be (L, S) = ({L}, {S}) (queries x keys), got {shape}"
            + _fix_2d(module, shape, L, S, other_layout)
        )
    if mask.dim() == 3:
        lead = N * H if batched else H
        lead_name = "N*num_heads" if batched else "num_heads"
        what = f"N*num_heads = {N}*{H} = {N * H}" if batched else f"num_heads = {H}"
        if shape == (lead, L, S):
            return
        if shape[1:] == (S, L) and shape[0] == lead and L != S:
            raise ValueError(
                f"attn_mask has shape {shape} = ({lead_name}, S, L), expected "
                f"({lead_name}, L, S) = ({lead}, {L}, {S}); pass attn_mask.transpose(1, 2)"
            )
        if shape[1:] != (L, S):
            raise ValueError(
                f"attn_mask of shape {shape} must be ({lead_name}, L, S) = ({lead}, {L}, {S})"
            )
        fix = ""
        if batched and shape[0] == N:
            fix = (
                f"; for one mask per batch row, pass it as (N, num_heads, L, S) with "
                f"attn_mask[:, None].expand({N}, {H}, {L}, {S}) or repeat it per head with "
                f"attn_mask.repeat_interleave({H}, dim=0)"
            )
        raise ValueError(
            f"3-D attn_mask must have first dimension {what}, got {shape[0]} (attn_mask {shape}){fix}"
        )
    if mask.dim() == 4 and batched:
        if shape[2:] == (L, S) and shape[0] in (1, N) and shape[1] in (1, H):
            return
        raise ValueError(
            f"4-D attn_mask must be (N, num_heads, L, S) = ({N}, {H}, {L}, {S}) (N and num_heads may be 1 "
            f"to broadcast), got {shape}"
        )
    raise ValueError(
        f"attn_mask must be (L, S) = ({L}, {S})"
        + (
            f", (N*num_heads, L, S) = ({N * H}, {L}, {S}) or (N, num_heads, L, S) = ({N}, {H}, {L}, {S})"
            if batched
            else f" or (num_heads, L, S) = ({H}, {L}, {S}) (the query is unbatched)"
        )
        + f", got {mask.dim()}-D {shape}"
    )


def _fix_2d(module: Any, shape: tuple[int, ...], L: int, S: int, other_layout: tuple[int, int] | None) -> str:
    """How to build a 2-D ``attn_mask`` of ``shape`` that is not ``(L, S)`` (nor ``(S, L)``)."""
    if shape == other_layout:
        return f"; that is (L, S) for {_other_layout(module)}"
    if shape[0] == L:
        return f"; it has {shape[1]} columns: it needs one column per key, S = {S} (the key's length)"
    if shape[1] == S:
        return f"; it has {shape[0]} rows: it needs one row per query, L = {L} (the query's length)"
    if L == S:
        return (
            f"; build it with one row per query and one column per key, e.g. "
            f"nn.Transformer.generate_square_subsequent_mask({L}) for a causal mask"
        )
    return "; build it with one row per query and one column per key"


def validate_nested_forward(
    module: Any, query: Tensor, key: Any, value: Any, key_padding_mask: Any, attn_mask: Any
) -> None:
    """Checks for nested-tensor inputs to ``MultiheadAttention.forward``."""
    if not module.batch_first:
        raise ValueError(
            "nested (variable-length) inputs need a module built with batch_first=True: "
            "a nested query is (N, j, E), batch first"
        )
    widths = {"query": module.embed_dim, "key": module.kdim, "value": module.vdim}
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or not t.is_nested:
            raise TypeError(
                f"query is a nested tensor, so {name} must be one too (N, j, {'E' if name == 'query' else 'kdim' if name == 'key' else 'D'}), "
                f"got {type(t).__name__ if not isinstance(t, Tensor) else 'a dense tensor of shape ' + str(tuple(t.shape))}"
            )
        if t.dim() != 3:
            raise ValueError(f"nested {name} must be 3-D (N, j, features), got {t.dim()}-D")
        _validate_regular_features(name, t)
        if t.size(-1) != widths[name]:
            raise ValueError(
                f"nested {name} has {t.size(-1)} features, expected {widths[name]} "
                f"({'embed_dim' if name == 'query' else 'kdim' if name == 'key' else 'vdim'} of the module)"
            )
        if not t.is_floating_point():
            raise TypeError(f"nested {name} must be floating point, got dtype {t.dtype}")
        if t.dtype != module.out_proj.weight.dtype:
            raise TypeError(
                f"nested {name} is {t.dtype} but the module's parameters are {module.out_proj.weight.dtype}; "
                f"cast the module with module.to({t.dtype})"
            )
    if query.size(0) != key.size(0) or key.size(0) != value.size(0):
        raise ValueError(
            f"nested query, key and value must hold the same number of sequences N, got "
            f"{query.size(0)}, {key.size(0)}, {value.size(0)}"
        )
    if key is not value:
        k_len = [t.shape[0] for t in key.unbind()] if key.layout != torch.jagged else key.offsets().diff().tolist()
        v_len = [t.shape[0] for t in value.unbind()] if value.layout != torch.jagged else value.offsets().diff().tolist()
        if k_len != v_len:
            raise ValueError(f"nested key and value must have the same lengths S_n, got {k_len} and {v_len}")
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask must be None with nested inputs: each sequence has its own length, "
            "so there is no padding to mask"
        )
    if attn_mask is not None:
        raise ValueError(
            "attn_mask is not supported with nested inputs (sequences differ in length); "
            "for causal attention pass is_causal=True"
        )


def _validate_regular_features(name: str, t: Tensor) -> None:
    """A nested tensor may be ragged in its sequence dimension only: every sequence needs
    the same number of features."""
    if t.layout == torch.jagged:
        return
    widths = sorted(set(t._nested_tensor_size()[:, -1].tolist()))
    if len(widths) > 1:
        raise ValueError(
            f"nested {name} (N, j, features) must have the same number of features in every sequence, "
            f"got {_few(widths)}; only the sequence length may vary"
        )


def _validate_not_nested(**tensors: Any) -> None:
    """A dense query takes dense keys, values and masks."""
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_nested:
            raise TypeError(
                f"query is a dense tensor, so {name} must be dense too, got a nested tensor; pass query as a "
                f"nested tensor (N, j, E) as well for variable-length sequences, or {name}.to_padded_tensor(0.0) "
                "with a key_padding_mask"
            )
