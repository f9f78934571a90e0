"""Capability-based dispatch: each backend declares what it serves, as data.

Every backend is an object with a ``name``, a :class:`~mha._types.Capabilities`
record ``caps`` and a ``forward(call)``. One function,
:func:`not_supported_reasons`, turns a record and a call into the human-readable
reasons the backend cannot serve the call; dispatch picks the first backend with
none, or the one forced by ``backend=`` or :func:`use_backend`, and a forced
backend that cannot serve raises ``NotImplementedError`` listing its reasons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

import torch

from ._backends import decode, reference, sdpa, tiled, triton
from ._types import ALL_MASK_KINDS, AttentionOutput, Call, Capabilities, device_type


class Backend(Protocol):
    """A backend names itself, declares its capabilities and serves a call."""

    @property
    def name(self) -> str: ...

    @property
    def caps(self) -> Capabilities: ...

    def forward(self, call: Call) -> AttentionOutput: ...

    def workspace(self, N: int, H: int, L: int, S: int, score_bytes: int) -> tuple[str, int]:
        """Its own estimate of the scratch memory a call ``(N, H, L, S)`` needs beyond
        inputs and outputs: a description and bytes (``score_bytes`` per score)."""
        ...


# The order dispatch tries them in: built once, here.
REGISTRY: dict[str, Backend] = {
    b.name: b for b in (sdpa.BACKEND, triton.BACKEND, tiled.BACKEND, decode.BACKEND, reference.BACKEND)
}

_forced: ContextVar[str | None] = ContextVar("mha_backend", default=None)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` here. Inside a graph that ``torch.compile``
    traces, none: dynamo cannot trace a ContextVar (pass ``backend=`` there instead)."""
    if torch.compiler.is_compiling():
        return None
    return _forced.get()


def backend_names() -> list[str]:
    """Every backend, in the order dispatch tries them."""
    return list(REGISTRY)


def check_backend_name(name: str) -> None:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(REGISTRY)}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the backend of every :func:`mha.attention` call inside the ``with`` block,
    including calls made deep inside a model by :class:`mha.MultiheadAttention`.

    Like :func:`torch.nn.attention.sdpa_kernel`: blocks nest (the innermost wins), the
    previous choice comes back on exit, even on an exception, and the choice is
    per thread and per asyncio task (a :class:`contextvars.ContextVar`). An explicit
    ``backend=`` on a call wins over it. A forced backend that cannot serve a call
    raises ``NotImplementedError`` listing why. Graphs traced by ``torch.compile`` do
    not see it (dynamo cannot trace a ContextVar): pass ``backend=`` there.

    Example::

        >>> import torch, mha
        >>> model = mha.MultiheadAttention(64, 8)
        >>> x = torch.randn(10, 2, 64)                     # (L, N, E)
        >>> with mha.use_backend("reference"):
        ...     out, weights = model(x, x, x)
        >>> out.shape, weights.shape
        (torch.Size([10, 2, 64]), torch.Size([2, 10, 10]))
    """
    check_backend_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def not_supported_reasons(caps: Capabilities, call: Call) -> list[str]:
    """Human-readable reasons a backend with capabilities ``caps`` cannot serve ``call``;
    empty if it can."""
    return list(_reasons(caps, call))


def _reasons(caps: Capabilities, call: Call) -> Iterator[str]:
    """:func:`not_supported_reasons` one at a time: dispatch stops at the first."""
    device = device_type(call.query.device)
    if caps.devices is not None and device not in caps.devices:
        yield f"{caps.label} runs on {', '.join(sorted(caps.devices))} tensors, got {device}"
    if caps.dtypes is not None and call.query.dtype not in caps.dtypes:
        names = [str(d).removeprefix("torch.") for d in caps.dtypes]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        yield f"{caps.label} takes {listed}, got {call.query.dtype}"
    if caps.max_head_dim is not None:
        _, _, _, _, _, Dk, Dv = call.shape
        if max(Dk, Dv) > caps.max_head_dim:
            yield f"{caps.label} takes head dims up to {caps.max_head_dim}, got Dk={Dk}, Dv={Dv}"
    if call.weights is not None and call.weights not in caps.weights:
        yield f"{caps.label} returns no attention weights (weights={call.weights!r} requested)"
    if call.return_lse and not caps.lse:
        yield f"{caps.label} returns no log-sum-exp (return_lse=True requested)"
    if call.dropout_p > 0 and not caps.dropout:
        yield f"{caps.label} has no dropout (dropout_p={call.dropout_p}); pass 0.0 in eval"
    if call.is_varlen:
        if not caps.varlen:
            yield f"{caps.label} takes no variable-length (varlen) calls"
        if call.weights is not None and not caps.varlen_weights:
            yield f"{caps.label} returns no weights on variable-length calls (weights={call.weights!r} requested)"
    if caps.mask_kinds is not ALL_MASK_KINDS:  # the default: every kind
        missing = sorted(call.mask_kinds() - caps.mask_kinds)
        if missing:
            yield f"{caps.label} reads no {', '.join(missing)} mask pieces (mask {call.mask!r})"
    if caps.masked_devices is not None and not call.plan.is_empty and device not in caps.masked_devices:
        yield (
            f"{caps.label} takes masks only on {', '.join(sorted(caps.masked_devices))}, where fully masked rows "
            f"are checked to give zeros, not on {device}"
        )
    grad = torch.is_grad_enabled()
    if (
        call.weights is not None
        and not caps.weights_grad
        and grad
        and any(t.requires_grad for t in (call.query, call.key, call.value))
    ):
        yield f"{caps.label}'s weights={call.weights!r} are not differentiable and the inputs require grad"
    if not caps.bias_grad and grad and any(t.requires_grad for t in call.plan.bias):
        yield f"{caps.label} computes no gradient for a Bias tensor that requires grad"
    if caps.extra is not None:
        yield from caps.extra(call)


def _auto_reasons(b: Backend, call: Call) -> list[str]:
    """Why dispatch, left to itself, does not pick ``b`` for ``call``."""
    reasons = not_supported_reasons(b.caps, call)
    devices = b.caps.auto_devices
    if reasons or devices is None:
        return reasons
    device = device_type(call.query.device)
    if device not in devices:
        where = f"only on {', '.join(sorted(devices))}, not {device}" if devices else "never (only when asked for)"
        reasons.append(
            f"picked automatically {where} "
            f"(force it with backend={b.name!r} or mha.use_backend({b.name!r}))"
        )
    return reasons


def explain_dispatch(call: Call) -> dict[str, list[str]]:
    """For each backend, the reasons dispatch does not pick it for ``call`` (empty list = it may)."""
    return {name: _auto_reasons(b, call) for name, b in REGISTRY.items()}


def select_backend(call: Call, backend: str | None = None) -> Backend:
    """The backend for ``call``: ``backend`` if given, else the one forced by
    :func:`use_backend`, else the first in :data:`REGISTRY` that can serve it."""
    if backend is None:
        backend = forced_backend()
    if backend is not None:
        check_backend_name(backend)
        chosen = REGISTRY[backend]
        reasons = not_supported_reasons(chosen.caps, call)
        if reasons:
            kind = "variable-length (varlen) call" if call.is_varlen else "call"
            raise NotImplementedError(
                f"backend {backend!r} cannot serve this {kind}:\n" + "\n".join(f"  - {r}" for r in reasons)
            )
        return chosen
    for b in REGISTRY.values():
        if _picks(b, call):
            return b
    why = explain_dispatch(call)
    raise NotImplementedError(
        "no backend can serve this call:\n"
        + "\n".join(f"  {name}:\n" + "\n".join(f"    - {r}" for r in rs) for name, rs in why.items())
    )


def _picks(b: Backend, call: Call) -> bool:
    """Whether dispatch, left to itself, may pick ``b``: :func:`_auto_reasons` is empty,
    found without building every reason (a backend not picked automatically on this
    device is passed over before any check runs, the others at their first reason)."""
    devices = b.caps.auto_devices
    if devices is not None and device_type(call.query.device) not in devices:
        return False
    return next(_reasons(b.caps, call), None) is None
