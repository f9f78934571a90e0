"""Capability-based dispatch: each backend says why it cannot serve a call."""

from __future__ import annotations

from typing import Protocol

from ._core import AttentionOutput, Call


class Backend(Protocol):
    """A backend names itself, says why it cannot serve a call, and serves it.

    A backend may also set ``auto_devices``, the device types on which dispatch
    picks it by itself; elsewhere it runs only when forced with ``backend=...``
    (the Triton kernels on CPU run in Triton's interpreter, for tests only)."""

    name: str

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Human-readable reasons this backend cannot serve ``call``; empty if it can."""
        ...

    def forward(self, call: Call) -> AttentionOutput: ...


def _registry() -> dict[str, Backend]:
    from ._backends import blocked, decode, reference, sdpa, triton

    backends: dict[str, Backend] = {
        "sdpa": sdpa.BACKEND,
        "triton": triton.BACKEND,
        "blocked": blocked.BACKEND,
        # After blocked, which serves every call, so never picked by itself: the cached
        # route of mha.attention asks for it.
        "decode": decode.BACKEND,
        "reference": reference.BACKEND,
    }
    return backends


def backend_names() -> list[str]:
    """Every backend, in the order dispatch tries them."""
    return list(_registry())


def _auto_reasons(b: Backend, call: Call) -> list[str]:
    """Why dispatch, left to itself, does not pick ``b`` for ``call``."""
    reasons = b.not_supported_reasons(call)
    devices = getattr(b, "auto_devices", None)
    device = call.query.device.type
    if not reasons and devices is not None and device not in devices:
        reasons.append(f"picked automatically only on {', '.join(sorted(devices))}, not {device} (force it with backend={b.name!r})")
    return reasons


def explain_dispatch(call: Call) -> dict[str, list[str]]:
    """For each backend, the reasons dispatch does not pick it for ``call`` (empty list = it may)."""
    return {name: _auto_reasons(b, call) for name, b in _registry().items()}


def select_backend(call: Call, backend: str | None = None) -> Backend:
    """The forced ``backend``, or the first that supports ``call``."""
    registry = _registry()
    if backend is not None:
        if backend not in registry:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(registry)}")
        chosen = registry[backend]
        reasons = chosen.not_supported_reasons(call)
        if reasons:
            raise NotImplementedError(
                f"backend {backend!r} cannot serve this call:\n" + "\n".join(f"  - {r}" for r in reasons)
            )
        return chosen
    for b in registry.values():
        if not _auto_reasons(b, call):
            return b
    raise NotImplementedError(  # pragma: no cover - the reference backend serves every call
        "no backend can serve this call"
    )
