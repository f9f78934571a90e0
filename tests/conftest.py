"""Shared helpers: a torch module and an mha module with identical weights, tolerances, and a spy on dispatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mha
from mha._dispatch import Backend
from mha._types import Call

# The tests run tiny tensors; torch's intra-op thread pool only adds overhead there, and on
# a loaded machine (or under xdist) a spinning pool makes each op ~100x slower.
torch.set_num_threads(1)

# Parity with torch: the same formulas through other kernels and summation orders. fp32
# (unit roundoff 6e-8) leaves a few hundred ulps over the projections' and softmax's sums;
# fp64 (1.1e-16) leaves nothing near 1e-9.
TOL = {
    torch.float32: {"rtol": 2e-4, "atol": 2e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
}


def build_pair(*args, seed: int = 0, **kwargs) -> tuple[nn.MultiheadAttention, mha.MultiheadAttention]:
    """``(theirs, ours)``: torch's module and mha's, with torch's weights loaded into mha.

    Biases are drawn at random (torch initialises them to 0, which would hide bugs)."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(*args, **kwargs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = mha.MultiheadAttention(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def assert_same_layer(theirs_class: type[nn.Module], ours_class: type[nn.Module], *args, **kwargs) -> nn.Module:
    """mha's transformer layer built like torch's: with the same seed the same parameters
    (names, order, values), a ``state_dict`` that loads both ways, and mha's attention.
    Returns mha's layer."""
    torch.manual_seed(1)
    theirs = theirs_class(*args, **kwargs)
    torch.manual_seed(1)
    ours = ours_class(*args, **kwargs)
    assert all(isinstance(m, mha.MultiheadAttention) for m in ours.modules() if "Multihead" in type(m).__name__)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # same seed, same initialisation
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours


def spy_on_dispatch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the backends dispatch picks from now on, in order."""
    from mha import _dispatch

    picked: list[str] = []
    select = _dispatch.select_backend

    def spy(call: Call, backend: str | None = None) -> Backend:
        chosen = select(call, backend)
        picked.append(chosen.name)
        return chosen

    monkeypatch.setattr(_dispatch, "select_backend", spy)
    return picked
