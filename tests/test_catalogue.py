"""One catalogue of mask cases, run over every backend in the registry.

Each case (every mask kind and ``&`` combination of ``test_attention.MASKS``, with
GQA, ``Dv != Dk``, all-distinct odd sizes, fully masked rows and non-contiguous
heads-last inputs) asks every backend of :data:`mha._dispatch.REGISTRY` for the
output, the lse, and both kinds of weights, with gradients, in fp32, and compares
with the reference backend in fp64: each result's error is at most twice plain
torch's own fp32 error (the reference backend on the fp32 inputs) plus a few ulps.
A backend that cannot serve a request is skipped with its own reasons, so a new
backend is tested by adding it to the registry.

The triton backend runs in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be
set when its kernels are defined, so they are imported here under it, and the
variable is set for each test.
"""

from __future__ import annotations

import os

import pytest
import torch

import mha
from mha._core import _validate_call
from mha._dispatch import REGISTRY, not_supported_reasons
from test_attention import MASKS, bias_tensors

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # only while the kernels are defined
    try:
        from mha._backends import _triton_kernels  # noqa: F401
    except ImportError:  # triton not installed: its backend says so in its reasons
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]

# N, Hq, Hkv, L, S, Dk, Dv: all distinct, GQA (3 query heads per key head), Dv != Dk.
SIZES = (2, 3, 1, 5, 7, 11, 13)
REQUESTS = {
    "output": {},
    "lse": {"return_lse": True},
    "mean": {"weights": "mean"},
    "per_head": {"weights": "per_head"},
}
GRAD_ULPS = 16  # gradients: ulps of their largest value, or of 1; dq of a one-key row is 0 in plain torch, rounding elsewhere


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, ...]:
    """Heads-last, hence non-contiguous, q ``(N, Hq, L, Dk)``, k, v."""
    N, Hq, Hkv, L, S, Dk, Dv = SIZES
    g = torch.Generator().manual_seed(0)
    shapes = ((N, L, Hq, Dk), (N, S, Hkv, Dk), (N, S, Hkv, Dv))
    return tuple(
        torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2).requires_grad_(grad)
        for shape in shapes
    )


def _mask(name: str):
    N, Hq, _, L, S, _, _ = SIZES
    return MASKS[name](N, Hq, L, S, torch.Generator().manual_seed(7))


def _run(backend: str, mask_name: str, dtype: torch.dtype, request: dict, grad: bool) -> dict:
    """Every tensor a request gives: outputs, and the gradients of a loss touching them all."""
    mask = _mask(mask_name)
    q, k, v = _inputs(dtype, grad)
    with torch.set_grad_enabled(grad):
        res = mha.attention(q, k, v, mask, backend=backend, **request)
    got = {"output": res.output, "weights": res.weights, "lse": res.lse}
    if grad:
        g = torch.Generator().manual_seed(1)
        loss = sum(
            (t.masked_fill(torch.isneginf(t), 0.0) * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
            for t in got.values()
            if t is not None
        )
        inputs = [q, k, v, *bias_tensors(mask)]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        got.update({f"grad{i}": gr for i, gr in enumerate(grads)})
    return {key: None if t is None else t.detach().double() for key, t in got.items()}


def _close(key: str, actual, exact, plain) -> None:
    if exact is None:
        assert actual is None, key
        return
    assert actual.shape == exact.shape, key
    assert not torch.isnan(actual).any(), f"NaN in {key}"
    assert torch.equal(torch.isneginf(actual), torch.isneginf(exact)), f"{key}: -inf entries differ"
    finite = torch.isfinite(exact)
    if not finite.any():
        return
    err = (actual - exact)[finite].abs().max().item()
    ref = (plain - exact)[finite].abs().max().item()
    ulps = GRAD_ULPS if key.startswith("grad") else 2
    floor = ulps * torch.finfo(torch.float32).eps * max(1.0, exact[finite].abs().max().item())
    assert err <= 2 * ref + floor, f"{key}: error {err:.3g}, plain torch's {ref:.3g}"


def _reasons(backend: str, mask_name: str, request: dict, grad: bool) -> list[str]:
    q, k, v = _inputs(torch.float32, grad)
    call = _validate_call(
        q, k, v, _mask(mask_name), None, 0.0, request.get("weights"), request.get("return_lse", False)
    )
    with torch.set_grad_enabled(grad):
        return not_supported_reasons(REGISTRY[backend].caps, call)


@pytest.mark.parametrize("request_name", list(REQUESTS))
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", list(REGISTRY))
def test_catalogue_against_the_reference(backend, mask_name, request_name):
    request = REQUESTS[request_name]
    # With gradients where the backend serves them; its results without, where it serves only those.
    grad = not _reasons(backend, mask_name, request, True)
    reasons = _reasons(backend, mask_name, request, grad)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    exact = _run("reference", mask_name, torch.float64, request, grad)
    plain = _run("reference", mask_name, torch.float32, request, grad)
    got = _run(backend, mask_name, torch.float32, request, grad)
    assert got.keys() == exact.keys()
    for key, want in exact.items():
        _close(key, got[key], want, plain[key])
