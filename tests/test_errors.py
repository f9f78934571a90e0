"""Every malformed call raises ValueError or TypeError with a message that teaches:
the argument, the expected shape in the seed's notation, the shape received, the fix."""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mha
from mha import _validate

E, H = 64, 8
L, S, N = 10, 15, 32


def check(exc: type[Exception], fn, *parts: str) -> str:
    """``fn()`` raises exactly ``exc`` and the message contains every part."""
    with pytest.raises(Exception) as info:  # noqa: PT011 - the exact type is checked below
        fn()
    assert info.type is exc, f"expected {exc.__name__}, got {info.type.__name__}: {info.value}"
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in message: {message}"
    return message


@pytest.fixture(scope="module")
def module():
    return mha.MultiheadAttention(E, H)


@pytest.fixture(scope="module")
def qkv():
    return torch.randn(L, N, E), torch.randn(S, N, E), torch.randn(S, N, E)


def _bool(*shape):
    return torch.zeros(shape, dtype=torch.bool)


# Constructor


def test_embed_dim_not_divisible_by_num_heads():
    check(ValueError, lambda: mha.MultiheadAttention(10, 3), "embed_dim=10", "num_heads=3", "divisible", "[1, 2, 5, 10]")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"embed_dim": 0, "num_heads": 1}, "embed_dim"),
        ({"embed_dim": -8, "num_heads": 2}, "embed_dim"),
        ({"embed_dim": 8, "num_heads": 0}, "num_heads"),
        ({"embed_dim": 8, "num_heads": -2}, "num_heads"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": 0}, "kdim"),
        ({"embed_dim": 8, "num_heads": 2, "vdim": -1}, "vdim"),
    ],
)
def test_non_positive_sizes(kwargs, name):
    check(ValueError, lambda: mha.MultiheadAttention(**kwargs), name, "positive", f"{name}={kwargs[name]}")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"embed_dim": 8.0, "num_heads": 2}, "embed_dim"),
        ({"embed_dim": 8, "num_heads": "2"}, "num_heads"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": 3.5}, "kdim"),
        ({"embed_dim": 8, "num_heads": 2, "dropout": "0.1"}, "dropout"),
    ],
)
def test_non_numeric_sizes(kwargs, name):
    check(TypeError, lambda: mha.MultiheadAttention(**kwargs), name)


@pytest.mark.parametrize("integer", [np.int64, np.int32, torch.tensor])
def test_sizes_of_any_integral_type_as_torch_takes_them(integer):
    """torch's constructor takes numpy integers (and integer tensors) for the sizes; mha
    takes them too, stored as ints, and gives torch's results."""
    kwargs = {"embed_dim": integer(8), "num_heads": integer(2), "kdim": integer(6), "vdim": integer(4)}
    theirs = torch.nn.MultiheadAttention(**kwargs)
    ours = mha.MultiheadAttention(**kwargs)
    for name in ("embed_dim", "num_heads", "kdim", "vdim", "head_dim"):
        assert type(getattr(ours, name)) is int
        assert getattr(ours, name) == getattr(theirs, name)
    ours.load_state_dict(theirs.state_dict())
    q, k, v = torch.randn(3, 2, 8), torch.randn(5, 2, 6), torch.randn(5, 2, 4)
    torch.testing.assert_close(ours(q, k, v)[0], theirs(q, k, v)[0])


@pytest.mark.parametrize("dropout", [1.5, -0.1, float("nan"), float("inf")])
def test_dropout_outside_unit_interval(dropout):
    check(ValueError, lambda: mha.MultiheadAttention(8, 2, dropout=dropout), "dropout", "[0, 1]", str(dropout))


@pytest.mark.parametrize("dropout", [0, 1, 1.0, 0.5])
def test_dropout_in_the_closed_unit_interval_is_accepted_as_torch_accepts_it(dropout):
    assert mha.MultiheadAttention(8, 2, dropout=dropout).dropout == torch.nn.MultiheadAttention(8, 2, dropout=dropout).dropout


@pytest.mark.parametrize("dropout", [True, "0.1", torch.tensor(0.1), None])
def test_dropout_of_another_type(dropout):
    check(TypeError, lambda: mha.MultiheadAttention(8, 2, dropout=dropout), "dropout", type(dropout).__name__, "float")


# Inputs: rank, width, lengths, batch sizes


def test_query_of_wrong_rank(module, qkv):
    q, k, v = qkv
    check(ValueError, lambda: module(q[None], k, v), "query", "(L, N, E)", "(L, E)", "4-D (1, 10, 32, 64)", "merge")
    check(ValueError, lambda: module(q[0, 0], k, v), "query", "(L, N, E)", "1-D (64,)")


def test_key_of_wrong_rank(module, qkv):
    q, k, v = qkv
    check(ValueError, lambda: module(q, k[:, 0], v), "key", "(S, N, E)", "2-D (15, 64)", "key.unsqueeze(1)")


def test_query_of_wrong_width(module, qkv):
    _, k, v = qkv
    check(ValueError, lambda: module(torch.randn(L, N, 60), k, v), "query (L, N, E) = (10, 32, 60)", "embed_dim=64", "embed_dim=60")


def test_key_of_wrong_width(module, qkv):
    q, _, v = qkv
    check(ValueError, lambda: module(q, torch.randn(S, N, 60), v), "key (S, N, E) = (15, 32, 60)", "kdim=60")


def test_key_and_value_with_different_s(module, qkv):
    q, k, _ = qkv
    check(
        ValueError,
        lambda: module(q, k, torch.randn(14, N, E)),
        "key (S, N, E) = (15, 32, 64)",
        "value (S, N, D) = (14, 32, 64)",
        "same S",
    )


def test_batch_sizes_differ(module, qkv):
    q, _, _ = qkv
    k = torch.randn(S, 31, E)
    check(ValueError, lambda: module(q, k, k), "key (S, N, E) = (15, 31, 64)", "N = 31", "query (L, N, E) = (10, 32, 64)", "N = 32")


def test_value_width_differs_without_vdim(module, qkv):
    q, k, _ = qkv
    check(
        ValueError,
        lambda: module(q, k, torch.randn(S, N, 48)),
        "value (S, N, D) = (15, 32, 48)",
        "D = 48",
        "build the module with vdim=48",
    )


def test_kdim_mismatch():
    m = mha.MultiheadAttention(E, H, kdim=20, vdim=30)
    q = torch.randn(L, N, E)
    check(
        ValueError,
        lambda: m(q, torch.randn(S, N, 21), torch.randn(S, N, 30)),
        "key (S, N, E) = (15, 32, 21)",
        "kdim=20",
        "pass a key with 20 features",
        "kdim=21",
    )


def test_vdim_mismatch():
    m = mha.MultiheadAttention(E, H, kdim=20, vdim=30)
    q = torch.randn(L, N, E)
    check(
        ValueError,
        lambda: m(q, torch.randn(S, N, 20), torch.randn(S, N, 31)),
        "value (S, N, D) = (15, 32, 31)",
        "vdim=30",
        "vdim=31",
    )


# key_padding_mask


def test_key_padding_mask_given_as_s_n(module, qkv):
    check(ValueError, lambda: module(*qkv, key_padding_mask=_bool(S, N)), "key_padding_mask", "(15, 32) = (S, N)", "(N, S) = (32, 15)", ".T")


def test_key_padding_mask_with_wrong_s(module, qkv):
    check(ValueError, lambda: module(*qkv, key_padding_mask=_bool(N, 14)), "key_padding_mask (N, S) = (32, 14)", "S = 15")


def test_key_padding_mask_with_wrong_n(module, qkv):
    check(ValueError, lambda: module(*qkv, key_padding_mask=_bool(31, S)), "key_padding_mask (N, S) = (31, 15)", "N = 32")


def test_key_padding_mask_of_wrong_rank(module, qkv):
    check(ValueError, lambda: module(*qkv, key_padding_mask=_bool(N, S, 1)), "key_padding_mask", "(N, S) = (32, 15)", "3-D (32, 15, 1)")


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
def test_key_padding_mask_of_integer_dtype(module, qkv, dtype):
    check(
        TypeError,
        lambda: module(*qkv, key_padding_mask=torch.zeros(N, S, dtype=dtype)),
        "key_padding_mask (N, S) = (32, 15)",
        str(dtype),
        "key_padding_mask.bool()",
    )


@pytest.mark.parametrize("which", [0, 1, 2])
def test_sparse_query_key_or_value_is_a_type_error_with_to_dense(module, qkv, which):
    name = ("query", "key", "value")[which]
    args = list(qkv)
    args[which] = args[which].to_sparse()
    check(TypeError, lambda: module(*args), name, "torch.sparse_coo", f"{name}.to_dense()")


@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_mask_is_a_type_error_with_to_dense(module, qkv, name, layout):
    dense = torch.zeros((N, S) if name == "key_padding_mask" else (L, S))
    mask = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    check(TypeError, lambda: module(*qkv, **{name: mask}), name, str(mask.layout), f"{name}.to_dense()")


# attn_mask


def test_attn_mask_given_as_s_l(module, qkv):
    check(ValueError, lambda: module(*qkv, attn_mask=_bool(S, L)), "attn_mask", "(15, 10) = (S, L)", "(L, S) = (10, 15)", "attn_mask.T")


def test_attn_mask_of_wrong_shape(module, qkv):
    check(
        ValueError, lambda: module(*qkv, attn_mask=_bool(L, 14)), "attn_mask", "(L, S) = (10, 15)", "(10, 14)",
        "one column per key",
    )


def test_attn_mask_with_rows_for_other_queries_says_one_row_per_query(module, qkv):
    check(ValueError, lambda: module(*qkv, attn_mask=_bool(12, S)), "(12, 15)", "one row per query", "L = 10")


def test_attn_mask_of_another_square_size_says_how_to_build_one(module):
    """An encoder's causal mask made for one more token than the input has, as in a
    nn.Transformer call with src_mask for the wrong length."""
    x = torch.randn(L, N, E)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L + 1)
    check(ValueError, lambda: module(x, x, x, attn_mask=mask), "(L, S) = (10, 10)", "(11, 11)", "generate_square_subsequent_mask(10)")


@pytest.mark.parametrize("batch_first", [False, True])
def test_attn_mask_made_for_the_other_layout_says_so(batch_first):
    """Batch-first tensors (2, 3, E) in a sequence-first module read as L = S = 2 with N = 3;
    the caller's (3, 3) causal mask is (L, S) in the layout they meant, so the module's
    batch_first is the fix (and the same the other way round)."""
    m = mha.MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn(2, 3, E)
    meant = 2 if batch_first else 3
    mask = torch.nn.Transformer.generate_square_subsequent_mask(meant)
    check(ValueError, lambda: m(x, x, x, attn_mask=mask), "attn_mask", f"({meant}, {meant})", f"batch_first={not batch_first}")


@pytest.mark.parametrize("shape", [(S,), (1, 1, 1, L, S)])
def test_attn_mask_of_wrong_rank(module, qkv, shape):
    check(
        ValueError,
        lambda: module(*qkv, attn_mask=_bool(*shape)),
        "attn_mask",
        "(L, S) = (10, 15)",
        "(N*num_heads, L, S) = (256, 10, 15)",
        f"{len(shape)}-D {shape}",
    )


def test_attn_mask_3d_with_wrong_first_dimension(module, qkv):
    check(ValueError, lambda: module(*qkv, attn_mask=_bool(7, L, S)), "attn_mask", "N*num_heads = 32*8 = 256", "got 7")


def test_attn_mask_3d_per_batch_row_suggests_the_fix(module, qkv):
    check(
        ValueError,
        lambda: module(*qkv, attn_mask=_bool(N, L, S)),
        "N*num_heads = 32*8 = 256",
        "got 32",
        "(N, num_heads, L, S)",
        "repeat_interleave(8, dim=0)",
    )


def test_attn_mask_3d_transposed(module, qkv):
    check(ValueError, lambda: module(*qkv, attn_mask=_bool(N * H, S, L)), "(N*num_heads, S, L)", "(256, 10, 15)", "transpose(1, 2)")


def test_attn_mask_4d_with_wrong_heads(module, qkv):
    check(ValueError, lambda: module(*qkv, attn_mask=_bool(N, 7, L, S)), "(N, num_heads, L, S) = (32, 8, 10, 15)", "(32, 7, 10, 15)")


@pytest.mark.parametrize("shape", [(L, S), (N * H, L, S)])
def test_attn_mask_of_integer_dtype(module, qkv, shape):
    check(
        TypeError,
        lambda: module(*qkv, attn_mask=torch.zeros(shape, dtype=torch.int64)),
        f"attn_mask {'(L, S)' if len(shape) == 2 else '(N*num_heads, L, S)'} = {shape}",
        "torch.int64",
        "attn_mask.bool()",
    )


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["attn_mask", "key_padding_mask"])
def test_float_mask_holding_plus_inf_or_nan(module, qkv, name, bad):
    """torch returns NaN rows for these; a right-padding key_padding_mask (0 then -inf) with
    one bad entry, and a requires-grad mask, are read too."""
    shape = (L, S) if name == "attn_mask" else (N, S)
    mask = torch.zeros(shape).masked_fill(torch.arange(S) >= 12, float("-inf"))
    mask[1, 3] = bad
    what = "+inf" if bad > 0 else "NaN"
    check(ValueError, lambda: module(*qkv, **{name: mask}), f"{name} {shape} holds {what}", "-inf", "finite")
    check(ValueError, lambda: module(*qkv, **{name: mask.requires_grad_()}), f"{name} {shape} holds {what}")


def test_mask_on_another_device(module, qkv):
    check(ValueError, lambda: module(*qkv, attn_mask=_bool(L, S).to("meta")), "attn_mask", "meta", "cpu", ".to(")
    check(ValueError, lambda: module(*qkv, key_padding_mask=_bool(N, S).to("meta")), "key_padding_mask", "meta")


# Unbatched inputs


def test_unbatched_query_with_batched_key_value(module, qkv):
    q, k, v = qkv
    check(
        ValueError,
        lambda: module(q[:, 0], k, v),
        "query is unbatched (L, E) = (10, 64)",
        "key",
        "(S, E)",
        "3-D (15, 32, 64)",
        "query.unsqueeze(1)",
    )


def test_batched_query_with_unbatched_value(module, qkv):
    q, k, v = qkv
    check(ValueError, lambda: module(q, k, v[:, 0]), "value", "(S, N, D)", "2-D (15, 64)", "value.unsqueeze(1)")


def test_2d_key_padding_mask_with_unbatched_inputs(module, qkv):
    q, k, v = qkv
    check(
        ValueError,
        lambda: module(q[:, 0], k[:, 0], v[:, 0], key_padding_mask=_bool(1, S)),
        "key_padding_mask",
        "(S,) = (15,)",
        "2-D (1, 15)",
        "key_padding_mask[0]",
    )


def test_unbatched_attn_mask_with_wrong_heads(module, qkv):
    q, k, v = qkv
    check(ValueError, lambda: module(q[:, 0], k[:, 0], v[:, 0], attn_mask=_bool(3, L, S)), "num_heads = 8", "got 3")
    check(
        ValueError,
        lambda: module(q[:, 0], k[:, 0], v[:, 0], attn_mask=_bool(1, H, L, S)),
        "(num_heads, L, S) = (8, 10, 15)",
        "unbatched",
        "4-D (1, 8, 10, 15)",
    )


# dtypes and types


def test_inputs_of_different_dtypes(module, qkv):
    q, k, v = qkv
    check(TypeError, lambda: module(q, k.double(), v), "query torch.float32", "key torch.float64", "key.to(query.dtype)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_inputs_and_module_of_different_dtypes(module, qkv, dtype):
    q, k, v = (t.to(dtype) for t in qkv)
    check(TypeError, lambda: module(q, k, v), str(dtype), "torch.float32", f"module.to({dtype})")


def test_integer_inputs(module, qkv):
    q, k, v = qkv
    check(TypeError, lambda: module(q.long(), k, v), "query", "floating-point", "torch.int64", "query.float()")


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("bad", [None, [[1.0]], 3.0])
def test_non_tensor_inputs(module, qkv, position, bad):
    args = list(qkv)
    args[position] = bad
    name = ("query", "key", "value")[position]
    check(TypeError, lambda: module(*args), name, "torch.Tensor", type(bad).__name__)


@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_non_tensor_masks(module, qkv, name):
    check(TypeError, lambda: module(*qkv, **{name: [[True]]}), name, "torch.Tensor", "list")


# Layout: batch-first tensors in a sequence-first module and the reverse


def test_seed_batch_first_tensors_in_sequence_first_module():
    """The seed README's case: torch fails with an unreadable RuntimeError from a view."""
    m = mha.MultiheadAttention(E, H)
    q, k, v = torch.randn(32, 10, 64), torch.randn(32, 15, 64), torch.randn(32, 15, 64)
    kpm = _bool(32, 15)
    check(ValueError, lambda: m(q, k, v, key_padding_mask=kpm), "batch_first=True", "(N, L, E)", "(32, 10, 64)")
    check(ValueError, lambda: m(q, k, v), "batch_first=True", "(N, L, E)")


def test_batch_first_self_attention_in_sequence_first_module():
    """Equal lengths hide the layout in query/key/value; the padding mask shows it."""
    m = mha.MultiheadAttention(E, H)
    x = torch.randn(32, 10, 64)
    check(ValueError, lambda: m(x, x, x, key_padding_mask=_bool(32, 10)), "key_padding_mask", "batch_first=True")


def test_sequence_first_tensors_in_batch_first_module(qkv):
    m = mha.MultiheadAttention(E, H, batch_first=True)
    check(
        ValueError,
        lambda: m(*qkv, key_padding_mask=_bool(N, S)),
        "batch_first=True",
        "batch_first=False",
        "(L, N, E)",
        "(10, 32, 64)",
    )


# Fuzz: any shapes at all end in a result or in ValueError/TypeError, never deeper.

_dims = st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=0, max_size=4).map(tuple)
_mask_dims = st.one_of(_dims, st.sampled_from([(1, 1), (2, 2), (3, 3), (2, 3), (3, 2), (1, 3), (3, 1)]))
_lengths = st.sampled_from([1, 2, 3])


@st.composite
def _inputs(draw):
    """(query, key, value) shapes: mostly well formed for E=6, kdim=4, vdim=6, sometimes anything."""
    if draw(st.booleans()):
        return draw(_dims), draw(_dims), draw(_dims)
    L, S, N = draw(_lengths), draw(_lengths), draw(_lengths)
    if draw(st.booleans()):
        return (L, 6), (S, 4), (S, 6)
    return (L, N, 6), (S, N, 4), (S, N, 6)
_mask_dtypes = st.sampled_from([torch.bool, torch.float32, torch.int64])


@settings(max_examples=150, deadline=None)
@given(
    qkv=_inputs(),
    kpm=st.none() | st.tuples(st.one_of(_dims, _lengths.map(lambda n: (n,))) | _mask_dims, _mask_dtypes),
    attn=st.none() | st.tuples(_mask_dims, _mask_dtypes),
    batch_first=st.booleans(),
    is_causal=st.booleans(),
)
def test_any_shapes_give_a_result_or_a_teaching_error(qkv, kpm, attn, batch_first, is_causal):
    q, k, v = qkv
    m = mha.MultiheadAttention(6, 2, kdim=4, batch_first=batch_first)
    kwargs = {}
    if kpm is not None:
        kwargs["key_padding_mask"] = torch.zeros(kpm[0], dtype=kpm[1])
    if attn is not None:
        kwargs["attn_mask"] = torch.zeros(attn[0], dtype=attn[1])
    error: ValueError | TypeError | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out, _ = m(torch.randn(q), torch.randn(k), torch.randn(v), is_causal=is_causal, **kwargs)
        except (ValueError, TypeError) as e:
            error = e
    if error is None:
        event("accepted")
        assert out.shape == q
        return
    event("rejected")
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename.endswith("_validate.py"), f"raised past validation: {error!r}"


@settings(max_examples=400, deadline=None)
@given(
    sizes=st.tuples(_lengths, _lengths, _lengths),
    widths=st.tuples(st.sampled_from([6, 6, 4]), st.sampled_from([4, 4, 6]), st.sampled_from([6, 6, 4])),
    share=st.sampled_from(["none", "key_value", "all"]),
    kpm=st.sampled_from(["none", "fits", "fits"]) | st.tuples(_mask_dims, _mask_dtypes),
    attn=st.sampled_from(["none", "fits", "fits"]) | st.tuples(_mask_dims, _mask_dtypes),
    kdim=st.sampled_from([4, 4, 6]),
    batch_first=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]),
)
def test_quick_validation_accepts_only_what_the_full_checks_accept(
    sizes, widths, share, kpm, attn, kdim, batch_first, dtype
):
    """validate_forward's quick test of the common call either declines or returns exactly
    what its one-by-one checks return."""
    L, S, N = sizes
    m = mha.MultiheadAttention(6, 2, kdim=kdim, batch_first=batch_first)
    layout = (lambda t, n, e: (n, t, e)) if batch_first else (lambda t, n, e: (t, n, e))
    q = torch.zeros(layout(L, N, widths[0]), dtype=dtype)
    k = q if share == "all" else torch.zeros(layout(S, N, widths[1]), dtype=dtype)
    v = k if share != "none" else torch.zeros(layout(S, N, widths[2]), dtype=dtype)
    fits = {"kpm": (N, k.shape[1 if batch_first else 0]), "attn": (L, k.shape[1 if batch_first else 0])}
    masks = []
    for name, spec in (("kpm", kpm), ("attn", attn)):
        if spec == "none":
            masks.append(None)
        elif spec == "fits":
            masks.append(torch.zeros(fits[name], dtype=torch.bool))
        else:
            masks.append(torch.zeros(spec[0], dtype=spec[1]))
    quick = _validate._common_call_shapes(m, q, k, v, *masks)
    with mock.patch.object(_validate, "_common_call_shapes", return_value=None):
        try:
            full = _validate.validate_forward(m, q, k, v, *masks)
        except (ValueError, TypeError):
            full = None
    event("quick" if quick is not None else "declined")
    assert quick is None or quick == full
