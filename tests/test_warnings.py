"""Warnings for the seed's pitfalls: the inverted tril mask and masks that empty rows.
Each names the argument and the rows, says what happens and how to fix it; none repeats
for the same situation; correct masks stay silent."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import mha

L, N, E, H = 6, 3, 8, 2


@pytest.fixture(scope="module")
def module():
    return mha.MultiheadAttention(E, H)


@pytest.fixture(scope="module")
def x():
    return torch.randn(L, N, E)


def _caught(fn, times: int = 1, action: str = "always") -> list[str]:
    """Messages of the UserWarnings raised by calling ``fn`` ``times`` times from one line."""
    sys.modules[__name__].__dict__.pop("__warningregistry__", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        for _ in range(times):
            fn()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _triu(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


def test_inverted_tril_mask(module, x):
    mask = torch.tril(torch.ones(L, L)).bool()
    (message,) = _caught(lambda: module(x, x, x, attn_mask=mask))
    assert "attn_mask" in message
    assert "True means *blocked*" in message
    assert "see only later ones" in message  # what the mask actually does
    assert f"row {L - 1}" in message
    assert f"torch.triu(torch.ones({L}, {L}, dtype=torch.bool), diagonal=1)" in message
    assert "is_causal=True" in message


def test_inverted_tril_mask_with_an_appended_key_is_not_empty(x):
    m = mha.MultiheadAttention(E, H, add_zero_attn=True)
    mask = torch.tril(torch.ones(L, L)).bool()
    (message,) = _caught(lambda: m(x, x, x, attn_mask=mask))
    assert "True means *blocked*" in message
    assert "add_bias_kv/add_zero_attn" in message
    assert "zero attention" not in message


def test_fully_padded_batch_element(module, x):
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True
    (message,) = _caught(lambda: module(x, x, x, key_padding_mask=kpm))
    assert "key_padding_mask blocks every key of some batch elements" in message
    assert "key_padding_mask.all(-1) finds them" in message
    assert "zero attention" in message
    assert "True means masked out" in message


@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_float_mask_of_zeros_and_ones(module, x, name):
    """A boolean mask cast to float adds 1 to the scores it meant to mask out."""
    blocked = torch.zeros((N, L) if name == "key_padding_mask" else (L, L), dtype=torch.bool)
    blocked[..., -2:] = True
    (message,) = _caught(lambda: module(x, x, x, **{name: blocked.float()}))
    assert f"{name} is a float mask of 0s and 1s" in message
    assert f"{name}.bool()" in message
    assert "-inf" in message


@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_float_masks_of_zeros_only_or_other_values_are_silent(module, x, name):
    shape = (N, L) if name == "key_padding_mask" else (L, L)
    padding = torch.zeros(shape).index_fill(-1, torch.tensor([L - 1]), float("-inf"))
    for mask in (torch.zeros(shape), torch.ones(shape), torch.full(shape, 0.5), padding, padding - 1.0):
        assert _caught(lambda m=mask: module(x, x, x, **{name: m})) == []


@pytest.mark.parametrize("kind", ["bool", "float", "3d"])
def test_attn_mask_with_empty_rows(module, x, kind):
    blocked = torch.zeros(L, L, dtype=torch.bool)
    blocked[[2, 4]] = True
    mask = {
        "bool": blocked,
        "float": torch.zeros(L, L).masked_fill(blocked, float("-inf")),
        "3d": blocked.expand(N * H, L, L),
    }[kind]
    (message,) = _caught(lambda: module(x, x, x, attn_mask=mask))
    # A 2-D mask is the same for every batch: its rows are listed.
    listed = "query row(s) [2, 4]" if mask.dim() == 2 else "some query rows"
    assert f"attn_mask blocks every key of {listed}" in message
    assert "out_proj's bias" in message


def test_rows_emptied_by_both_masks(module, x):
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, :3] = True  # left padding: the first queries of batch 0 see no earlier key
    (message,) = _caught(lambda: module(x, x, x, key_padding_mask=kpm, attn_mask=_triu(L)))
    assert "attn_mask and key_padding_mask together block every key of some query rows" in message
    (message,) = _caught(lambda: module(x, x, x, key_padding_mask=kpm, is_causal=True))
    assert "is_causal and key_padding_mask together block every key of some query rows" in message


@pytest.mark.parametrize("layout", ["(N*H, L, S)", "(N, H, L, S)", "(N, 1, L, S)", "(1, H, L, S)"])
def test_rows_emptied_by_a_per_batch_mask_and_the_padding_mask(module, x, layout):
    """A 3-D or 4-D attn_mask (one per batch element and head) that leaves row 4 of batch
    element 1 a single key, which the padding mask then blocks: only the two together empty
    the row. (Only 2-D masks were checked together with the padding mask.)"""
    per_row = torch.zeros(N, H, L, L, dtype=torch.bool)
    per_row[1, :, 4, :] = True
    per_row[1, :, 4, 5] = False  # row 4 of batch element 1: key 5 only
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 5] = True
    mask = {
        "(N*H, L, S)": per_row.flatten(0, 1), "(N, H, L, S)": per_row, "(N, 1, L, S)": per_row[:, :1],
        "(1, H, L, S)": per_row[1:2],  # one mask for every batch element, not expanded over N
    }[layout]
    assert not _caught(lambda: module(x, x, x, attn_mask=mask))
    (message,) = _caught(lambda: module(x, x, x, key_padding_mask=kpm, attn_mask=mask))
    assert "attn_mask and key_padding_mask together block every key of some query rows" in message


def test_long_listings_are_cut(module):
    x = torch.randn(30, 1, E)
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[::2] = True
    (message,) = _caught(lambda: module(x, x, x, attn_mask=mask))
    assert "[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, ... (5 more)]" in message


def test_warning_points_at_the_caller(module, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module(x, x, x, attn_mask=torch.tril(torch.ones(L, L)).bool())
        module(x, x, x, key_padding_mask=torch.ones(N, L, dtype=torch.bool))
    assert len(caught) == 2
    assert all(w.filename == __file__ for w in caught)


def test_not_repeated_for_the_same_situation(module, x):
    mask = torch.tril(torch.ones(L, L)).bool()
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[2] = True
    assert len(_caught(lambda: module(x, x, x, attn_mask=mask), times=3, action="default")) == 1
    assert len(_caught(lambda: module(x, x, x, key_padding_mask=kpm), times=3, action="default")) == 1
    # A fresh but equal mask is the same situation.
    masks = iter([mask.clone(), mask.clone()])
    assert len(_caught(lambda: module(x, x, x, attn_mask=next(masks)), times=2, action="default")) == 1


def test_batches_padded_differently_warn_once_and_other_situations_again(module, x):
    """The text does not name the batch's elements or rows: a training loop whose batches
    hold fully padded sequences in other places warns once under the default filter (it
    warned on every new set of places), and a different situation warns again."""
    kpms = []
    for n in range(N):
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[n] = True
        kpms.append(kpm)
    left = torch.zeros(N, L, dtype=torch.bool)
    left[1, :2] = True  # with is_causal, the first two queries of batch element 1 see no key
    calls = iter([{"key_padding_mask": kpm} for kpm in kpms] + [{"key_padding_mask": left, "is_causal": True}])
    messages = _caught(lambda: module(x, x, x, **next(calls)), times=N + 1, action="default")
    assert len(messages) == 2
    assert "key_padding_mask blocks every key of some batch elements" in messages[0]
    assert "is_causal and key_padding_mask together" in messages[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attn_mask": _triu(L)},
        {"attn_mask": torch.zeros(L, L).masked_fill(_triu(L), float("-inf"))},
        {"is_causal": True},
        {"is_causal": True, "attn_mask": _triu(L)},
        {"key_padding_mask": torch.arange(L)[None, :] >= torch.tensor([L, 1, 4])[:, None]},
        {
            "key_padding_mask": torch.arange(L)[None, :] >= torch.tensor([L, 1, 4])[:, None],
            "attn_mask": _triu(L),
        },
        {"key_padding_mask": torch.arange(L)[None, :] >= torch.tensor([L, 1, 4])[:, None], "is_causal": True},
        {"key_padding_mask": torch.zeros(N, L)},
        {"attn_mask": torch.randn(N * H, L, L)},
    ],
    ids=["triu", "float-causal", "is_causal", "both-causal", "padding", "padding-triu", "padding-causal", "float-padding", "float-3d"],
)
def test_correct_masks_are_silent(module, x, kwargs):
    assert _caught(lambda: module(x, x, x, **kwargs)) == []


def test_fully_padded_with_appended_key_is_silent(x):
    m = mha.MultiheadAttention(E, H, add_bias_kv=True)
    assert _caught(lambda: m(x, x, x, key_padding_mask=torch.ones(N, L, dtype=torch.bool))) == []


def test_mixed_mask_types_do_not_warn(module, x):
    """torch deprecates a bool key_padding_mask with a float attn_mask; mha takes both."""
    kpm = torch.arange(L)[None, :] >= torch.tensor([L, 2, 5])[:, None]
    float_attn = torch.zeros(L, L).masked_fill(_triu(L), float("-inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module(x, x, x, key_padding_mask=kpm, attn_mask=float_attn)
        module(x, x, x, key_padding_mask=kpm.float().masked_fill(kpm, float("-inf")), attn_mask=_triu(L))
    assert caught == []


def test_warning_inside_a_model_points_at_the_callers_line():
    """Through torch's transformer layer (after mha.swap) and Module calls, the warning
    names the line that called the layer, not torch's or mha's internals."""
    layer = mha.swap(torch.nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True))
    x, padding = torch.randn(2, 3, E), torch.tensor([[False] * 3, [True] * 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        layer(x, src_key_padding_mask=padding)
    (w,) = caught
    assert (w.filename, w.lineno) == (__file__, line)
