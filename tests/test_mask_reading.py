"""The module reads torch-style masks' values (causal and right-padding recognition,
pitfall warnings) once per call, since on a GPU each read waits for the queue to
drain, and never keeps what it read across calls: a mask's memory can change
without torch's version counter moving."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mha
from conftest import TOL, build_pair
from mha import _frontend

N, L, E, H = 3, 7, 8, 2


def _masks(dtype=torch.float32):
    lengths = torch.tensor([7, 4, 1])
    padding = torch.arange(L)[None, :] >= lengths[:, None]
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    return {
        "bool causal attn_mask": {"attn_mask": causal},
        "float causal attn_mask": {"attn_mask": torch.zeros(L, L, dtype=dtype).masked_fill(causal, float("-inf"))},
        "right padding": {"key_padding_mask": padding},
        "right padding and causal": {"key_padding_mask": padding, "attn_mask": causal},
        "float padding": {"key_padding_mask": torch.zeros(N, L, dtype=dtype).masked_fill(padding, float("-inf"))},
    }


@pytest.mark.parametrize("case", list(_masks()))
def test_masks_made_in_inference_mode_match_torch(case):
    theirs, ours = build_pair(E, H, batch_first=True)
    with torch.inference_mode():
        x = torch.randn(N, L, E)
        kwargs = _masks()[case]
        want_out, want_w = theirs(x, x, x, **kwargs)
        got_out, got_w = ours(x, x, x, **kwargs)
    torch.testing.assert_close(got_out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(got_w, want_w, **TOL[torch.float32])


def _count_reads(monkeypatch) -> dict[str, int]:
    counts = {"key_padding_mask": 0, "attn_mask": 0}

    def counting(kind, summarize):
        def wrapped(mask, *args):
            counts[kind] += 1
            return summarize(mask, *args)

        return wrapped

    monkeypatch.setattr(
        _frontend, "summarize_key_padding_mask", counting("key_padding_mask", _frontend.summarize_key_padding_mask)
    )
    monkeypatch.setattr(_frontend, "summarize_attn_mask", counting("attn_mask", _frontend.summarize_attn_mask))
    return counts


def test_masks_are_read_once_per_call(monkeypatch):
    counts = _count_reads(monkeypatch)
    layers = [mha.MultiheadAttention(E, H, batch_first=True) for _ in range(4)]
    x = torch.randn(N, L, E)
    kwargs = _masks()["right padding and causal"]
    for layer in layers:
        x = layer(x, x, x, **kwargs)[0]
    assert counts == {"key_padding_mask": 4, "attn_mask": 4}


def test_a_mask_changed_in_place_is_read_again(monkeypatch):
    counts = _count_reads(monkeypatch)
    theirs, ours = build_pair(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    padding = _masks()["right padding"]["key_padding_mask"].clone()
    ours(x, x, x, key_padding_mask=padding)
    padding[0, 2] = True  # no longer right padding: a hole in the first sequence
    got = ours(x, x, x, key_padding_mask=padding)
    want = theirs(x, x, x, key_padding_mask=padding)
    assert counts["key_padding_mask"] == 2
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


def test_inference_tensors_are_read_on_every_call(monkeypatch):
    counts = _count_reads(monkeypatch)
    m = mha.MultiheadAttention(E, H, batch_first=True)
    with torch.inference_mode():
        x = torch.randn(N, L, E)
        kwargs = _masks()["right padding and causal"]
        for _ in range(3):
            m(x, x, x, **kwargs)
    assert counts == {"key_padding_mask": 3, "attn_mask": 3}


def _refill_numpy(mask, new):
    mask.numpy()[...] = new.numpy()  # a from_numpy buffer refilled: torch's version counter stays


def _assign_data_items(mask, new):
    mask.data[...] = new


def _assign_data(mask, new):
    mask.data = new.clone()


def _through_alias(mask, new):
    alias = torch.empty(0, dtype=mask.dtype).set_(mask.untyped_storage(), 0, mask.shape, mask.stride())
    alias.copy_(new)


@pytest.mark.parametrize("change", [_refill_numpy, _assign_data_items, _assign_data, _through_alias])
@pytest.mark.parametrize("kind", ["key_padding_mask", "attn_mask"])
def test_masks_changed_behind_the_version_counter_are_never_stale(change, kind):
    """Memory that changes without torch's version counter moving: every call reads the
    mask it is given."""
    theirs, ours = build_pair(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    if kind == "key_padding_mask":
        first = _masks()["right padding"]["key_padding_mask"]
        second = first.clone()
        second[0, 2] = True  # a hole: no longer right padding
    else:
        first = torch.ones(L, L, dtype=torch.bool).triu(1)  # standard causal
        second = first.clone()
        second[3, 0] = True
    mask = torch.from_numpy(first.numpy().copy())
    ours(x, x, x, **{kind: mask})
    version = mask._version
    change(mask, second)
    assert torch.equal(mask, second)
    got = ours(x, x, x, **{kind: mask})
    want = theirs(x, x, x, **{kind: second})
    if change is not _assign_data:
        assert mask._version == version  # the change is invisible to the version counter
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


@pytest.mark.parametrize("lengths_wanted", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize(
    ("rows", "empty"),
    [
        ([[0, 0, 1], [0, 1, 1]], ()),  # right padding
        ([[1, 0, 0], [1, 1, 0]], ()),  # left padding: first keys padded, no sequence empty
        ([[0, 0, 1], [1, 1, 1]], (1,)),  # the second sequence has no key
        ([[1, 1, 1], [1, 0, 1]], (0,)),
        ([[1, 1, 1], [1, 1, 1]], (0, 1)),
    ],
)
def test_key_padding_summary_finds_the_sequences_without_keys(rows, empty, kind, lengths_wanted):
    """The summary names exactly the sequences whose every key is padded, whether it
    reads the first column alone (lengths not wanted) or the whole mask."""
    from mha._mask_analysis import summarize_key_padding_mask

    padding = torch.tensor(rows, dtype=torch.bool)
    mask = padding if kind == "bool" else torch.zeros(padding.shape).masked_fill(padding, float("-inf"))
    assert summarize_key_padding_mask(mask, lengths_wanted).empty_batches == empty


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_key_padding_summary_of_no_keys_or_no_sequences(dtype):
    from mha._mask_analysis import summarize_key_padding_mask

    assert summarize_key_padding_mask(torch.zeros(2, 0, dtype=dtype), False).empty_batches == (0, 1)
    assert summarize_key_padding_mask(torch.zeros(0, 3, dtype=dtype), False).empty_batches == ()


def test_float_padding_mask_over_no_keys_gives_zero_attention():
    _, ours = build_pair(8, 2)
    q, kv, padding = torch.randn(3, 2, 8), torch.randn(0, 2, 8), torch.zeros(2, 0)
    with pytest.warns(UserWarning, match="blocks every key of some batch elements"):
        out = ours(q, kv, kv, key_padding_mask=padding, need_weights=False)[0]
    assert out.shape == (3, 2, 8)
    # No key: zero attention, the output is out_proj's bias (torch gives NaN there).
    torch.testing.assert_close(out, ours.out_proj.bias.detach().expand(3, 2, 8), **TOL[torch.float32])


_VALUES = [0.0, 1.0, -1.0, 0.5, -1e9, 1e308, float("-inf"), float("inf"), float("nan")]


@settings(max_examples=300, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6)),
    data=st.data(),
    dtype=st.sampled_from([torch.bool, torch.float32, torch.float64, torch.float16]),
)
def test_a_small_key_padding_mask_read_whole_is_summarised_as_its_first_column_read(shape, data, dtype):
    """Masks of at most _READ_WHOLE_ELEMENTS values are read whole and summarised in Python;
    larger ones by their first column in torch. Both give the same summary, and the same
    ValueError for a float mask holding NaN or +inf (not for large finite values whose
    sum overflows)."""
    from mha import _mask_analysis

    if dtype == torch.bool:
        values = data.draw(st.lists(st.booleans(), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    else:
        values = data.draw(st.lists(st.sampled_from(_VALUES), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    mask = torch.tensor(values, dtype=dtype).view(shape)

    def summary(whole: int) -> object:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_mask_analysis, "_READ_WHOLE_ELEMENTS", whole)
            try:
                return _mask_analysis.summarize_key_padding_mask(mask, False)
            except ValueError as error:
                return str(error)

    assert summary(mask.numel()) == summary(0)
