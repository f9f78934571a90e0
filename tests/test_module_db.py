"""The samples torch's own test suite uses for nn.MultiheadAttention, run through both modules."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from conftest import TOL, build_pair

N_SAMPLES = 64  # what torch 2.13's module_inputs_func yields


@functools.cache
def _samples(training: bool) -> list:
    # Needs the test dependency expecttest.
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls is torch.nn.MultiheadAttention]
    return list(
        info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True, training=training)
    )


def test_sample_count():
    assert len(_samples(False)) == N_SAMPLES


def _detached(args, kwargs):
    def copy(x):
        return x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

    return [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_sample_matches_torch(index, training):
    sample = _samples(training)[index]
    kwargs = sample.constructor_input.kwargs
    theirs, ours = build_pair(*sample.constructor_input.args, seed=index, **kwargs)
    theirs.train(training)
    ours.train(training)
    t_args, t_kwargs = _detached(sample.forward_input.args, sample.forward_input.kwargs)
    o_args, o_kwargs = _detached(sample.forward_input.args, sample.forward_input.kwargs)
    t_out, t_w = theirs(*t_args, **t_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an all-masked row warns in mha
        out, w = ours(*o_args, **o_kwargs)
    assert out.shape == t_out.shape
    assert w.shape == t_w.shape
    assert torch.isfinite(out).all()
    assert torch.isfinite(w).all()
    finite = torch.isfinite(t_out).all(-1)  # (L,) query rows where torch is finite
    tol = TOL[torch.float32]
    torch.testing.assert_close(out[finite], t_out[finite], **tol)
    torch.testing.assert_close(w[finite], t_w[finite], **tol)
    if not finite.all():
        # A query row left with no key: mha gives the out_proj bias and zero weights.
        bias = ours.out_proj.bias if ours.out_proj.bias is not None else torch.zeros(out.shape[-1])
        torch.testing.assert_close(out[~finite], bias.detach().expand_as(out[~finite]))
        assert (w[~finite] == 0).all()

    (out.sum() + w.sum()).backward()
    grads = [a.grad for a in o_args] + [p.grad for p in ours.parameters()]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    if finite.all():
        (t_out.sum() + t_w.sum()).backward()
        t_grads = [a.grad for a in t_args] + [p.grad for p in theirs.parameters()]
        for grad, want in zip(grads, t_grads, strict=True):
            torch.testing.assert_close(grad, want, **tol)
