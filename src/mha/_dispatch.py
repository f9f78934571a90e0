"""Capability-based dispatch: each backend says why it cannot serve a call."""

from __future__ import annotations

from typing import Protocol

from ._core import AttentionOutput, Call


class Backend(Protocol):
    name: str

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Human-readable reasons this backend cannot serve ``call``; empty if it can."""
        ...

    def forward(self, call: Call) -> AttentionOutput: ...


def _registry() -> dict[str, Backend]:
    from ._backends import blocked, reference, sdpa

    backends: dict[str, Backend] = {
        "sdpa": sdpa.BACKEND,
        "blocked": blocked.BACKEND,
        "reference": reference.BACKEND,
    }
    return backends


def backend_names() -> list[str]:
    """Every backend, in the order dispatch tries them."""
    return list(_registry())


def explain_dispatch(call: Call) -> dict[str, list[str]]:
    """For each backend, the reasons it cannot serve ``call`` (empty list = it can)."""
    return {name: b.not_supported_reasons(call) for name, b in _registry().items()}


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
        if not b.not_supported_reasons(call):
            return b
    raise NotImplementedError(  # pragma: no cover - the reference backend serves every call
        "no backend can serve this call"
    )
