"""Types shared by every layer: the call backends see, what they return, what they declare.

A leaf module: it imports nothing of mha but :mod:`mha.masks` and :mod:`mha._plan`,
so the core, dispatch and every backend may import it without a cycle.

Shape legend: N batch (or number of sequences), Hq query heads, Hkv key/value
heads, L queries, S keys, Dk query/key head dim, Dv value head dim; for a
variable-length ("varlen") call, Tq and Tk are the packed query and key tokens.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import masks as _masks
from ._plan import MaskPlan

WeightsMode = Literal["mean", "per_head"]
MaskKind = Literal["band", "lengths", "allowed", "bias"]


class AttentionOutput(NamedTuple):
    """What :func:`mha.attention` returns.

    Attributes:
        output: ``(N, Hq, L, Dv)``
        weights: ``(N, L, S)`` for ``weights="mean"``, ``(N, Hq, L, S)`` for
            ``"per_head"``, else None
        lse: ``(N, Hq, L)`` natural log-sum-exp of the scaled, masked scores
            (``-inf`` for a fully masked row) when ``return_lse=True``, else None

    A backend serving a varlen call returns the packed output ``(Tq, Hq, Dv)``, the
    packed lse ``(Hq, Tq)``, and the weights packed flat: each sequence's ``(L_n, S_n)``
    (mean) or ``(Hq, L_n, S_n)`` (per head) weights, row-major, one after the other
    (:func:`split_weights` cuts them apart).
    """

    output: Tensor
    weights: Tensor | None
    lse: Tensor | None


class Offsets:
    """Where the sequences of a packed batch lie, cu_seqlens style: sequence ``n``
    owns rows ``offsets[n]:offsets[n + 1]``.

    Held as a host list, an integer tensor on the data's device, or both; either is
    made from the other only when asked for, since reading a CUDA tensor on the host
    waits for the GPU. The varlen kernels need only the tensor and the longest
    length, so a jagged batch whose nested tensors know their longest sequence runs
    without a single host-device synchronization."""

    def __init__(
        self, host: Sequence[int] | None = None, device: Tensor | None = None, longest: int | None = None
    ) -> None:
        if host is None and device is None:
            raise ValueError("Offsets needs a host list or a device tensor of offsets (N + 1,), got neither")
        self._host = None if host is None else list(host)
        self._device = device
        self._longest = longest
        self._len: int | None = None
        self._int32: Tensor | None = None  # what on() returned last

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self._host) if self._host is not None else int(self._tensor().shape[0])
        return self._len

    def _tensor(self) -> Tensor:
        if self._device is None:
            raise ValueError("Offsets holds no device tensor")
        return self._device

    @property
    def count(self) -> int:
        """The number of sequences, ``len(self) - 1``."""
        return len(self) - 1

    def same_as(self, other: Offsets) -> bool:
        """Whether both are known equal without reading anything: the same object, or
        built on the same device tensor."""
        return self is other or (self._device is not None and self._device is other._device)

    @property
    def on_host(self) -> bool:
        """Whether the list is at hand (reading it costs nothing)."""
        return self._host is not None

    def host(self) -> list[int]:
        """The offsets as a host list (reads the device tensor back once if needed)."""
        if self._host is None:
            self._host = [int(o) for o in self._tensor().tolist()]
        return self._host

    def on(self, device: torch.device) -> Tensor:
        """The offsets as an int32 tensor on ``device`` (converted once: a varlen call asks
        for its query's and its key's offsets, often the same)."""
        if self._device is None:
            self._device = torch.tensor(self.host(), dtype=torch.int32, device=device)
        if self._int32 is None or self._int32.device != device:
            self._int32 = self._device.to(device=device, dtype=torch.int32)
        return self._int32

    def check(self, name: str, rows: int) -> None:
        """ValueError unless these offsets ``(N + 1,)`` of a packed ``name`` of ``rows``
        tokens are at least one, the first at least 0, none below the one before, the
        last at most ``rows``.

        Checked only where the host list is at hand: a device tensor is not read back
        for it, as that would wait for the device (the paths that read it check it then)."""
        if self._host is None:
            return
        host = self._host
        if not host or host[0] < 0 or host[-1] > rows or any(b < a for a, b in itertools.pairwise(host)):
            raise ValueError(
                f"attention: {name} offsets (N + 1,) must rise from 0 or more to at most its {rows} packed "
                f"rows, never decreasing (sequence n owns rows offsets[n]:offsets[n + 1]), got {host}; "
                "build nested tensors with torch.nested.nested_tensor or from offsets that span their values"
            )

    def lengths(self) -> list[int]:
        """Each sequence's length, on the host."""
        return [b - a for a, b in itertools.pairwise(self.host())]

    def longest(self) -> int:
        """The longest sequence's length (0 for none)."""
        if self._longest is None:
            if self._host is None and self._device is not None and self._device.shape[0] > 1:
                self._longest = int(self._device.diff().max())
            else:
                self._longest = max([0, *self.lengths()])
        return self._longest

    def appended(self, count: int) -> Offsets:
        """The offsets after ``count`` rows are appended to every sequence (and the rows
        that follow each moved down): ``offsets[n] + count * n``."""
        if count == 0:
            return self
        return Offsets(
            None if self._host is None else [o + count * n for n, o in enumerate(self._host)],
            None if self._device is None else self._device + count * torch.arange(
                self._device.shape[0], device=self._device.device, dtype=self._device.dtype
            ),
            None if self._longest is None else self._longest + count,
        )

    def shifted(self, by: int) -> Offsets:
        """The offsets minus ``by``."""
        if by == 0:
            return self
        return Offsets(
            None if self._host is None else [o - by for o in self._host],
            None if self._device is None else self._device - by,
            self._longest,
        )


class Call(NamedTuple):
    """One validated call of :func:`mha.attention`, as backends see it: immutable, and a
    NamedTuple, as it is built on every call (a frozen dataclass costs microseconds more).

    Dense: query ``(N, Hq, L, Dk)``, key ``(N, Hkv, S, Dk)``, value ``(N, Hkv, S, Dv)``,
    ``plan`` the mask for ``(L, S)``.

    Varlen (``q_offsets`` set): query ``(Tq, Hq, Dk)``, key ``(Tk, Hkv, Dk)``, value
    ``(Tk, Hkv, Dv)`` packed tokens first; sequence ``n`` owns query rows
    ``q_offsets[n]:q_offsets[n + 1]`` and key rows ``k_offsets[n]:k_offsets[n + 1]``;
    the mask is a band (``Causal``/``Window``) aligned per sequence, and ``plan`` is
    its band for a square sequence (``L_n == S_n``).
    """

    query: Tensor
    key: Tensor
    value: Tensor
    mask: _masks.Mask | None
    plan: MaskPlan
    scale: float
    dropout_p: float
    weights: WeightsMode | None
    return_lse: bool
    q_offsets: Offsets | None = None
    k_offsets: Offsets | None = None

    @property
    def is_varlen(self) -> bool:
        return self.q_offsets is not None

    def offsets(self) -> tuple[Offsets, Offsets]:
        """``(q_offsets, k_offsets)`` of a varlen call."""
        if self.q_offsets is None or self.k_offsets is None:
            raise ValueError("this call is dense: it has no offsets (only a varlen call has)")
        return self.q_offsets, self.k_offsets

    @property
    def shape(self) -> tuple[int, int, int, int, int, int, int]:
        """``(N, Hq, Hkv, L, S, Dk, Dv)``; for a varlen call ``(N, Hq, Hkv, Tq, Tk, Dk, Dv)``."""
        if self.q_offsets is not None:
            Tq, Hq, Dk = self.query.shape
            Tk, Hkv, Dv = self.key.shape[0], self.key.shape[1], self.value.shape[-1]
            return self.q_offsets.count, Hq, Hkv, Tq, Tk, Dk, Dv
        N, Hq, L, Dk = self.query.shape
        Hkv, S, Dv = self.key.shape[1], self.key.shape[2], self.value.shape[-1]
        return N, Hq, Hkv, L, S, Dk, Dv

    def mask_kinds(self) -> set[MaskKind]:
        """Which primitive pieces the call's mask plan holds."""
        kinds: set[MaskKind] = set()
        if self.plan.band is not None:
            kinds.add("band")
        if self.plan.lengths is not None:
            kinds.add("lengths")
        if len(self.plan.allowed) > 0:
            kinds.add("allowed")
        if len(self.plan.bias) > 0:
            kinds.add("bias")
        return kinds


ALL_MASK_KINDS: frozenset[MaskKind] = frozenset({"band", "lengths", "allowed", "bias"})
ALL_WEIGHTS: frozenset[WeightsMode] = frozenset({"mean", "per_head"})


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve, as data; :func:`mha._dispatch.not_supported_reasons`
    turns a record and a call into the reasons it cannot.

    label:            how reasons name the backend ("SDPA", "the triton backend").
    devices:          device types it runs on (``"cpu"``, ``"cuda"``, ...), None for any.
    auto_devices:     device types on which dispatch picks it by itself; elsewhere it
                      runs only when forced (None: wherever it runs).
    dtypes:           input dtypes, in the order reasons list them; None for every floating dtype.
    max_head_dim:     largest ``Dk``/``Dv``, None for no limit.
    weights:          the weights modes it returns.
    lse:              whether it returns the log-sum-exp.
    dropout:          whether it applies dropout.
    varlen:           whether it takes packed variable-length calls.
    varlen_weights:   whether it returns weights on varlen calls.
    mask_kinds:       the mask pieces it reads (band, lengths, allowed, bias).
    weights_grad:     whether its weights are differentiable.
    bias_grad:        whether it gives a gradient to a Bias tensor that requires grad.
    masked_devices:   device types on which it takes masks (fully masked rows checked), None for any.
    extra:            backend-specific checks (installed? grid limits?) giving more reasons.
    """

    label: str
    devices: frozenset[str] | None = None
    auto_devices: frozenset[str] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    max_head_dim: int | None = None
    weights: frozenset[WeightsMode] = ALL_WEIGHTS
    lse: bool = True
    dropout: bool = True
    varlen: bool = True
    varlen_weights: bool = True
    mask_kinds: frozenset[MaskKind] = ALL_MASK_KINDS
    weights_grad: bool = True
    bias_grad: bool = True
    masked_devices: frozenset[str] | None = None
    extra: Callable[[Call], list[str]] | None = None


_DEVICE_TYPES: dict[torch.device, str] = {}


def device_type(device: torch.device) -> str:
    """``device.type`` (``"cpu"``, ``"cuda"``, ...), remembered per device: torch builds
    that string through a C++ ostringstream on every read, 0.25 us in a loop and a few
    microseconds between large kernels, on every dispatch. (A dict, not functools.cache,
    which torch.compile warns about.) Not read while compiling: dynamo would guard on the
    dict's contents, and a call that fills it (compiled or eager) would force a recompile."""
    if torch.compiler.is_compiling():
        return device.type
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def in_functorch_transform() -> bool:
    """Whether this runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``,
    ...): tensors there may be batched wrappers, whose values cannot be read on the host
    and which ``out=`` ops and writes into fresh buffers do not batch."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def split_weights(flat: Tensor, call: Call) -> list[Tensor]:
    """A varlen call's weights, packed flat by its backend, as per-sequence views
    ``(L_n, S_n)`` (mean) or ``(Hq, L_n, S_n)`` (per head)."""
    q_offsets, k_offsets = call.offsets()
    heads = () if call.weights == "mean" else (call.query.shape[1],)
    shapes = [(*heads, L, S) for L, S in zip(q_offsets.lengths(), k_offsets.lengths(), strict=True)]
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


def zeros_in_graph(shape: tuple[int, ...], *inputs: Tensor) -> Tensor:
    """Zeros of ``shape`` whose gradient to each input is zero, not missing.

    For outputs that no key contributes to (every key masked or padded): a plain
    ``new_zeros`` would cut the graph, and ``backward()`` would then raise or leave
    ``.grad`` unset where torch's users expect zeros."""
    first = inputs[0]
    zero = sum(t.flatten()[:0].sum() for t in inputs)
    return torch.zeros(shape, dtype=first.dtype, device=first.device) + zero
