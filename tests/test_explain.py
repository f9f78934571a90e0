"""mha.explain agrees with what the module does: same errors, same shapes, same backend."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import mha
from conftest import spy_on_dispatch

E, H = 24, 4


def _module(**kwargs) -> mha.MultiheadAttention:
    torch.manual_seed(0)
    return mha.MultiheadAttention(E, H, **kwargs)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _right_padding(N: int, S: int) -> torch.Tensor:
    lengths = torch.tensor([S - (n % 3) for n in range(N)])
    return torch.arange(S)[None] >= lengths[:, None]


CASES = {
    "random_key_padding_mask": ({}, (_t(7, 3, E), _t(11, 3, E), _t(11, 3, E)), {"key_padding_mask": torch.rand(3, 11) < 0.4}),
    "batch_first": ({"batch_first": True}, (_t(3, 7, E), _t(3, 11, E), _t(3, 11, E)), {"need_weights": False}),
    "unbatched": ({}, (_t(7, E), _t(11, E), _t(11, E)), {"attn_mask": torch.rand(H, 7, 11) < 0.3}),
    "kdim_vdim_per_head": ({"kdim": 5, "vdim": 9}, (_t(7, 3, E), _t(11, 3, 5), _t(11, 3, 9)), {"average_attn_weights": False}),
    "bias_kv_zero_attn_causal": (
        {"add_bias_kv": True, "add_zero_attn": True}, (_t(7, 3, E), _t(7, 3, E), _t(7, 3, E)), {"is_causal": True},
    ),
    "right_padding_causal": (
        {}, (_t(6, 3, E), _t(6, 3, E), _t(6, 3, E)),
        {"key_padding_mask": _right_padding(3, 6), "attn_mask": torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)},
    ),
    "4d_float_mask_no_weights": (
        {}, (_t(7, 3, E), _t(11, 3, E), _t(11, 3, E)), {"attn_mask": torch.randn(3, H, 7, 11), "need_weights": False},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shapes_and_backend_match_the_module(case, monkeypatch):
    ctor, args, kwargs = CASES[case]
    module = _module(**ctor).eval()
    report = mha.explain(module, *args, **kwargs)

    used = spy_on_dispatch(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, weights = module(*args, **kwargs)
    assert report.output_shape == tuple(out.shape)
    assert report.weights_shape == (None if weights is None else tuple(weights.shape))
    assert set(used) == {report.backend}
    assert report.dispatch[report.backend] == []


BAD = {
    "wrong_embed_dim": ((_t(7, 3, 8), _t(11, 3, E), _t(11, 3, E)), {}),
    "value_d_without_vdim": ((_t(7, 3, E), _t(11, 3, E), _t(11, 3, 9)), {}),
    "kpm_transposed": ((_t(7, 3, E), _t(11, 3, E), _t(11, 3, E)), {"key_padding_mask": torch.zeros(11, 3, dtype=torch.bool)}),
    "batch_first_tensors": ((_t(3, 7, E), _t(3, 11, E), _t(3, 11, E)), {"key_padding_mask": torch.zeros(3, 11, dtype=torch.bool)}),
    "attn_mask_per_batch": ((_t(7, 3, E), _t(11, 3, E), _t(11, 3, E)), {"attn_mask": torch.zeros(3, 7, 11, dtype=torch.bool)}),
    "int_mask": ((_t(7, 3, E), _t(11, 3, E), _t(11, 3, E)), {"attn_mask": torch.zeros(7, 11, dtype=torch.int64)}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_calls_raise_what_the_module_raises(case):
    args, kwargs = BAD[case]
    module = _module()
    with pytest.raises((ValueError, TypeError)) as from_module:
        module(*args, **kwargs)
    with pytest.raises(from_module.type) as from_explain:
        mha.explain(module, *args, **kwargs)
    assert str(from_explain.value) == str(from_module.value)


def test_report_text_and_rich_rendering():
    module = _module()
    report = mha.explain(
        module, _t(10, 3, E), _t(15, 3, E), _t(15, 3, E), key_padding_mask=torch.rand(3, 15) < 0.5
    )
    text = str(report)
    assert "L=10  N=3  E=24" in text
    assert "S=15  N=3  D=24" in text
    assert "key_padding_mask  (3, 15) bool" in text
    assert "attn_output_weights  (3, 10, 15)" in text
    assert report.backend == "tiled"
    assert "SDPA returns no attention weights" in text
    assert "torch.nn.MultiheadAttention weights  (12, 10, 15)" in text

    from rich.console import Console

    console = Console(file=io.StringIO(), width=160)
    console.print(report)
    rendered = console.file.getvalue()
    assert "L=10  N=3  E=24" in rendered
    assert "Dispatch" in rendered


def test_inverted_tril_mask_is_reported():
    module = _module()
    x = _t(10, 2, E)
    report = mha.explain(module, x, x, x, attn_mask=torch.tril(torch.ones(10, 10)).bool())
    assert any("torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)" in n for n in report.notes)
    causal = mha.explain(module, x, x, x, attn_mask=torch.triu(torch.ones(10, 10, dtype=torch.bool), 1))
    assert "Causal('top_left')" in causal.path
    assert not causal.notes


def test_meta_call_is_explained_by_shape_for_cpu():
    module = mha.MultiheadAttention(64, 8, device="meta")
    q = torch.empty(10, 32, 64, device="meta")
    k = torch.empty(15, 32, 64, device="meta")
    kpm = torch.empty(32, 15, dtype=torch.bool, device="meta")
    report = mha.explain(module, q, k, k, key_padding_mask=kpm, need_weights=False)
    assert report.output_shape == (10, 32, 64)
    assert report.backend == "sdpa"
    assert "on cpu" in report.summary
    assert any("shapes alone" in n for n in report.notes)


def test_rejects_torch_module():
    with pytest.raises(TypeError, match=r"mha.swap\(model, to='mha'\)"):
        mha.explain(torch.nn.MultiheadAttention(E, H), _t(2, E), _t(2, E), _t(2, E))


def test_memory_workspace_is_the_chosen_backends_own_estimate():
    """explain asks the backend it reports for its scratch memory; every registered
    backend gives one."""
    from mha._dispatch import REGISTRY

    for backend in REGISTRY.values():
        description, size = backend.workspace(2, 3, 5, 7, 4)
        assert isinstance(description, str), backend.name
        assert size >= 0, backend.name
    assert REGISTRY["reference"].workspace(2, 3, 5, 7, 4)[1] == 3 * 2 * 3 * 5 * 7 * 4
    module = mha.MultiheadAttention(12, 3)
    x = torch.randn(5, 2, 12)
    with mha.use_backend("reference"):
        report = mha.explain(module, x, x, x, need_weights=True)
    assert report.backend == "reference"
    rows = {row[0]: row for row in report.sections[-1].rows}
    assert rows["scores workspace"][1] == "(2, 3, 5, 5) scores x3"


def test_malformed_nested_call_raises_what_the_module_raises():
    module = _module(batch_first=True)
    x = torch.nested.nested_tensor([_t(3, E), _t(5, E)], layout=torch.jagged)
    bad = torch.nested.nested_tensor([_t(3, E + 1), _t(5, E + 1)], layout=torch.jagged)
    with pytest.raises(ValueError, match="nested key has 25 features") as from_module:
        module(x, bad, bad)
    with pytest.raises(ValueError, match="nested key") as from_explain:
        mha.explain(module, x, bad, bad)
    assert str(from_explain.value) == str(from_module.value)
    with pytest.raises(NotImplementedError, match="nested"):
        mha.explain(module, x, x, x)


def test_context_parallel_call_is_not_explained_as_a_dense_one():
    # Under context_parallel the module runs ring attention and refuses need_weights=True;
    # explain must not describe a one-device dense call instead.
    module = _module()
    x = _t(7, 3, E)
    with mha.distributed.context_parallel(), pytest.raises(NotImplementedError, match="context_parallel"):
        mha.explain(module, x, x, x, need_weights=False)


@pytest.mark.parametrize("grad", [False, True])
def test_one_key_is_explained_as_the_module_runs_it(grad, monkeypatch):
    """Without autograd, self-attention over one position runs no backend (the value is
    the output); with autograd it is dense, and explain says which."""
    module = _module().eval()
    x = _t(1, 3, E)
    args = (x, x, x)
    with torch.set_grad_enabled(grad):
        report = mha.explain(module, *args)
        used = spy_on_dispatch(monkeypatch)
        out, weights = module(*args)
    assert report.output_shape == tuple(out.shape)
    assert report.weights_shape == tuple(weights.shape)
    if grad:
        assert set(used) == {report.backend}
        assert report.path.startswith("dense")
    else:
        assert used == []
        assert report.backend == "none"
        assert report.path.startswith("one key")
        assert all(reasons for reasons in report.dispatch.values())
        assert "scores workspace" not in str(report)
