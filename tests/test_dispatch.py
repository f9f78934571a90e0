"""Dispatch by declared capabilities: what is picked on CPU, and why a forced backend refuses."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import mha
from conftest import spy_on_dispatch
from mha import _dispatch
from mha import masks as M
from mha._core import _validate_call
from mha._dispatch import backend_names, explain_dispatch, select_backend
from mha._types import Capabilities


@pytest.fixture(autouse=True)
def _triton_interpreter_on(monkeypatch):
    # The triton backend could run CPU tensors in Triton's interpreter; dispatch must
    # still pick the CPU backends on its own (triton only when forced).
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def call(mask=None, *, weights=None, return_lse=False, dropout_p=0.0, dtype=torch.float32, Hkv=2):
    q = torch.randn(2, 4, 5, 8, dtype=dtype)
    k = torch.randn(2, Hkv, 7, 8, dtype=dtype)
    v = torch.randn(2, Hkv, 7, 3, dtype=dtype)
    return _validate_call(q, k, v, mask, None, dropout_p, weights, return_lse)


MASKS = [
    None,
    M.Causal(),
    M.Causal("bottom_right") & M.KeyPadding(torch.tensor([3, 7])),
    M.Window(2, 2) & M.Bias(torch.zeros(5, 7)),
    M.Blocked(torch.zeros(2, 1, 1, 7, dtype=torch.bool)),
]


def test_reference_is_last_and_every_backend_is_named():
    names = backend_names()
    assert names[0] == "sdpa"
    assert names[-1] == "reference"
    assert {"sdpa", "tiled", "reference"} <= set(names)


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_without_weights_or_lse_picks_sdpa(mask, dtype):
    assert select_backend(call(mask, dtype=dtype)).name == "sdpa"
    assert select_backend(call(mask, dtype=dtype, dropout_p=0.1, Hkv=1)).name == "sdpa"


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize(
    "kwargs", [{"weights": "mean"}, {"weights": "per_head"}, {"return_lse": True}, {"weights": "mean", "return_lse": True}]
)
def test_cpu_with_weights_or_lse_picks_tiled(mask, kwargs):
    c = call(mask, **kwargs)
    assert select_backend(c).name == "tiled"
    reasons = explain_dispatch(c)
    assert reasons["tiled"] == []
    assert reasons["reference"] == []
    assert reasons["sdpa"], "sdpa must say why it cannot serve"


def test_explain_dispatch_gives_readable_reasons():
    reasons = explain_dispatch(call(weights="per_head", return_lse=True))
    assert list(reasons) == backend_names()
    assert reasons["sdpa"] == [
        "SDPA returns no attention weights (weights='per_head' requested)",
        "SDPA returns no log-sum-exp (return_lse=True requested)",
    ]
    assert explain_dispatch(call())["sdpa"] == []
    assert any("not cpu" in r or "not installed" in r for r in reasons["triton"])


def test_select_forced_backend():
    for name in ("sdpa", "tiled", "reference"):
        assert select_backend(call(), name).name == name
    with pytest.raises(ValueError, match=r"unknown backend 'cpu'; choose one of \['decode', 'reference', 'sdpa', 'tiled'"):
        select_backend(call(), "cpu")


def test_forced_sdpa_lists_every_reason():
    with pytest.raises(NotImplementedError) as info:
        select_backend(call(weights="mean", return_lse=True), "sdpa")
    lines = str(info.value).splitlines()
    assert lines[0] == "backend 'sdpa' cannot serve this call:"
    assert lines[1:] == [
        "  - SDPA returns no attention weights (weights='mean' requested)",
        "  - SDPA returns no log-sum-exp (return_lse=True requested)",
    ]


def test_attention_default_dispatch_gives_the_forced_results():
    """Whatever dispatch picks gives what the reference gives."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 3)
    mask = M.Causal("bottom_right") & M.KeyPadding(torch.tensor([3, 7]))
    for kwargs in ({}, {"weights": "mean", "return_lse": True}):
        got = mha.attention(q, k, v, mask, **kwargs)
        want = mha.attention(q, k, v, mask, backend="reference", **kwargs)
        for a, b in zip(got, want, strict=True):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masked_sdpa_declines_on_gpu_until_checked():
    q = torch.randn(1, 1, 3, 4, device="cuda")
    c = _validate_call(q, q, q, M.Causal("bottom_right"), None, 0.0, None, False)
    assert any("SDPA takes masks only on cpu" in r for r in explain_dispatch(c)["sdpa"])


def test_use_backend_forces_nests_and_restores(monkeypatch):
    picked = spy_on_dispatch(monkeypatch)
    q = torch.randn(2, 3, 5, 7)
    mha.attention(q, q, q)
    with mha.use_backend("tiled"):
        mha.attention(q, q, q)
        with mha.use_backend("reference"):
            mha.attention(q, q, q)
        mha.attention(q, q, q)
        mha.attention(q, q, q, backend="sdpa")  # an explicit backend= wins
    mha.attention(q, q, q)
    assert picked == ["sdpa", "tiled", "reference", "tiled", "sdpa", "sdpa"]


def test_use_backend_restores_after_an_exception(monkeypatch):
    picked = spy_on_dispatch(monkeypatch)
    q = torch.randn(1, 1, 2, 3)
    with pytest.raises(RuntimeError, match="inside"), mha.use_backend("reference"):
        raise RuntimeError("inside")
    mha.attention(q, q, q)
    assert picked == ["sdpa"]


def test_use_backend_reaches_modules_deep_in_a_model(monkeypatch):
    picked = spy_on_dispatch(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), mha.swap(torch.nn.TransformerEncoderLayer(8, 2, 16)))
    model.eval()
    x = torch.randn(5, 3, 8)
    with torch.no_grad(), mha.use_backend("reference"):
        want = model(x)
    assert picked
    assert set(picked) == {"reference"}
    picked.clear()
    with torch.no_grad():
        got = model(x)
    assert "reference" not in picked
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_use_backend_is_per_thread():
    seen: dict[str, str] = {}

    def other_thread():
        seen["other"] = select_backend(call()).name

    with mha.use_backend("reference"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        seen["here"] = select_backend(call()).name
    assert seen == {"other": "sdpa", "here": "reference"}


def test_use_backend_checks_its_name_and_forced_reasons():
    with pytest.raises(ValueError, match=r"unknown backend 'blocked'; choose one of \['decode', 'reference', 'sdpa', 'tiled'"):
        mha.use_backend("blocked").__enter__()
    with mha.use_backend("sdpa"), pytest.raises(NotImplementedError, match="SDPA returns no attention weights"):
        mha.attention(torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3), weights="mean")


def test_registry_is_built_once_and_capabilities_are_frozen_records():
    assert _dispatch.REGISTRY is _dispatch.REGISTRY
    assert list(_dispatch.REGISTRY) == backend_names()
    for backend in _dispatch.REGISTRY.values():
        assert isinstance(backend.caps, Capabilities)
        with pytest.raises(dataclasses.FrozenInstanceError):
            backend.caps.lse = not backend.caps.lse  # type: ignore[misc]


def test_no_backend_error_lists_every_backends_reasons(monkeypatch):
    blocked_all = {name: dataclasses.replace(b.caps, lse=False) for name, b in _dispatch.REGISTRY.items()}
    for name, b in _dispatch.REGISTRY.items():
        monkeypatch.setattr(b, "caps", blocked_all[name], raising=False)
    with pytest.raises(NotImplementedError) as info:
        select_backend(call(return_lse=True))
    text = str(info.value)
    assert text.startswith("no backend can serve this call:")
    for name in backend_names():
        assert f"  {name}:" in text
    assert "the reference backend returns no log-sum-exp" in text
