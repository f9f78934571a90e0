"""mha.masks: materialize against hand-written formulas, validation, repr, and the MaskPlan
that the fast backends read (at each piece's own broadcast shape, never (N, H, L, S))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mha._plan import Band, MaskPlan, plan_mask
from mha.masks import Allowed, Bias, Blocked, Causal, KeyPadding, Mask, Window

NEG_INF = float("-inf")
N, H, L, S = 2, 3, 5, 7


def brute(N, H, L, S, rule) -> torch.Tensor:
    """Additive (N, H, L, S) mask from a per-element rule(n, h, i, j) -> allowed."""
    out = torch.zeros(N, H, L, S, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    if not rule(n, h, i, j):
                        out[n, h, i, j] = NEG_INF
    return out


def assert_additive_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = ~torch.isneginf(want)
    torch.testing.assert_close(got[finite], want[finite].to(got.dtype), rtol=0, atol=0)


# ---------------------------------------------------------------- materialize vs formulas


@pytest.mark.parametrize(("Lq", "Sk"), [(3, 5), (5, 5), (5, 3), (1, 4), (4, 1)])
def test_causal_top_left_formula(Lq, Sk):
    got = Causal("top_left").materialize(1, 2, Lq, Sk, dtype=torch.float64)
    assert_additive_equal(got, brute(1, 2, Lq, Sk, lambda n, h, i, j: j <= i))


@pytest.mark.parametrize(("Lq", "Sk"), [(3, 5), (5, 5), (5, 3), (1, 4), (4, 1)])
def test_causal_bottom_right_formula(Lq, Sk):
    got = Causal("bottom_right").materialize(1, 2, Lq, Sk, dtype=torch.float64)
    assert_additive_equal(got, brute(1, 2, Lq, Sk, lambda n, h, i, j: j <= i + Sk - Lq))


def test_causal_default_is_top_left_and_equals_window():
    assert Causal().align == "top_left"
    for align in ("top_left", "bottom_right"):
        a = Causal(align).materialize(1, 1, 4, 6)
        b = Window(None, 0, align).materialize(1, 1, 4, 6)
        assert torch.equal(a, b)


def test_bottom_right_causal_with_more_queries_than_keys_has_empty_rows():
    got = Causal("bottom_right").materialize(1, 1, 6, 3)
    empty = torch.isneginf(got).all(dim=-1)[0, 0]
    assert empty.tolist() == [True, True, True, False, False, False]


def test_causal_pictures_of_the_docstring():
    tl = torch.isfinite(Causal("top_left").materialize(1, 1, 3, 5))[0, 0].int().tolist()
    br = torch.isfinite(Causal("bottom_right").materialize(1, 1, 3, 5))[0, 0].int().tolist()
    assert tl == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert br == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("before", [None, 0, 1, 3, 20])
@pytest.mark.parametrize("after", [None, 0, 2, 20])
@pytest.mark.parametrize(("Lq", "Sk"), [(4, 7), (7, 4), (5, 5)])
def test_window_formula(align, before, after, Lq, Sk):
    off = 0 if align == "top_left" else Sk - Lq

    def rule(n, h, i, j):
        lo_ok = before is None or i + off - before <= j
        hi_ok = after is None or j <= i + off + after
        return lo_ok and hi_ok

    got = Window(before, after, align).materialize(1, 1, Lq, Sk, dtype=torch.float64)
    assert_additive_equal(got, brute(1, 1, Lq, Sk, rule))


def test_key_padding_formula_with_zero_and_overlong_lengths():
    lengths = torch.tensor([0, 3, S + 4])
    got = KeyPadding(lengths).materialize(3, H, L, S, dtype=torch.float64)
    assert_additive_equal(got, brute(3, H, L, S, lambda n, h, i, j: j < lengths[n]))


def test_key_padding_from_right_padding_mask():
    pm = torch.tensor([[False, False, True, True], [False, False, False, False], [True, True, True, True]])
    kp = KeyPadding.from_padding_mask(pm)
    assert kp.lengths.tolist() == [2, 4, 0]
    want = torch.where(pm, NEG_INF, 0.0)[:, None, None, :].expand(3, 2, 3, 4)
    assert_additive_equal(kp.materialize(3, 2, 3, 4), want)


@pytest.mark.parametrize(
    "pm",
    [
        [[True, False, False]],  # left padding
        [[False, True, False]],  # a hole
        [[False, False, True], [True, False, True]],  # one good row, one bad
    ],
)
def test_key_padding_from_non_right_padding_raises(pm):
    with pytest.raises(ValueError, match=r"right padding.*Blocked\(padding_mask\[:, None, None, :\]\)"):
        KeyPadding.from_padding_mask(torch.tensor(pm))


def test_key_padding_from_padding_mask_rejects_non_bool_and_wrong_rank():
    # An integer mask would be silently misread by `~` (bitwise not): ~1 == -2.
    with pytest.raises(TypeError, match=r"boolean \(N, S\).*int64"):
        KeyPadding.from_padding_mask(torch.tensor([[0, 0, 1]]))
    with pytest.raises(ValueError, match=r"\(N, S\).*\(3,\)"):
        KeyPadding.from_padding_mask(torch.tensor([False, False, True]))
    with pytest.raises(TypeError, match="list"):
        KeyPadding.from_padding_mask([[False, True]])


# Every shape broadcastable to (N, H, L, S) = (2, 3, 5, 7), right-aligned like torch.
BROADCAST_SHAPES = [
    (L, S),
    (S,),
    (1, 1, L, S),
    (N, 1, 1, S),
    (N, H, L, S),
    (H, L, S),
    (1, H, 1, S),
    (H, 1, 1),
    (N, 1, L, 1),
    (1, 1, 1, 1),
    (),
]


@pytest.mark.parametrize("shape", BROADCAST_SHAPES)
def test_tensor_masks_broadcast_like_torch(shape):
    g = torch.Generator().manual_seed(0)
    b = torch.rand(shape, generator=g) < 0.6
    bias = torch.randn(shape, generator=g, dtype=torch.float64)
    want_allowed = torch.where(b, 0.0, NEG_INF).double().expand(N, H, L, S)
    want_blocked = torch.where(b, NEG_INF, 0.0).double().expand(N, H, L, S)
    assert_additive_equal(Allowed(b).materialize(N, H, L, S, dtype=torch.float64), want_allowed)
    assert_additive_equal(Blocked(b).materialize(N, H, L, S, dtype=torch.float64), want_blocked)
    assert_additive_equal(Bias(bias).materialize(N, H, L, S, dtype=torch.float64), bias.expand(N, H, L, S))


def test_bias_keeps_minus_inf_and_its_gradient():
    t = torch.randn(L, S, dtype=torch.float64)
    t[1, 2] = NEG_INF
    t.requires_grad_(True)
    m = Bias(t).materialize(N, H, L, S, dtype=torch.float64)
    assert torch.isneginf(m[:, :, 1, 2]).all()
    m.sum().backward()
    assert torch.equal(t.grad, torch.full_like(t, N * H))


def test_and_intersects_and_biases_add():
    g = torch.Generator().manual_seed(1)
    b1 = torch.randn(L, S, generator=g, dtype=torch.float64)
    b2 = torch.randn(N, 1, 1, S, generator=g, dtype=torch.float64)
    allowed = torch.rand(H, L, S, generator=g) < 0.7
    blocked = torch.rand(N, 1, L, 1, generator=g) < 0.2
    lengths = torch.tensor([4, 6])
    lengths2 = torch.tensor([7, 2])
    m = (
        Causal("bottom_right")
        & Window(2, None, "top_left")
        & KeyPadding(lengths)
        & KeyPadding(lengths2)
        & Allowed(allowed)
        & Blocked(blocked)
        & Bias(b1)
        & Bias(b2)
    )
    assert len(m.parts()) == 8

    def rule(n, h, i, j):
        return (
            j <= i + S - L
            and j >= i - 2
            and j < min(lengths[n], lengths2[n])
            and bool(allowed[h, i, j])
            and not bool(blocked[n, 0, i, 0])
        )

    want = brute(N, H, L, S, rule) + b1 + b2
    assert_additive_equal(m.materialize(N, H, L, S, dtype=torch.float64), want)


def test_and_is_flat_and_associative():
    a, b, c = Causal(), KeyPadding(torch.tensor([1, 2])), Window(1, 1)
    assert (a & b & c).parts() == ((a & b) & c).parts() == (a & (b & c)).parts() == (a, b, c)
    assert a.parts() == (a,)


def test_and_with_a_tensor_is_a_type_error():
    with pytest.raises(TypeError):
        Causal() & torch.ones(2, 2, dtype=torch.bool)


def test_materialize_dtype_and_default():
    assert Causal().materialize(1, 1, 2, 2).dtype == torch.float32
    assert Bias(torch.zeros(2, 2)).materialize(1, 1, 2, 2, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_materialize_refuses_a_dtype_without_minus_inf(dtype):
    """A bool dtype read -inf and 0 alike as True (every position "blocked"); int64 overflowed."""
    with pytest.raises(TypeError, match=r"floating-point dtype, got torch\.(bool|int64).*isfinite"):
        Causal().materialize(1, 1, 2, 3, dtype=dtype)


def test_materialize_checks_the_shape():
    with pytest.raises(ValueError, match="KeyPadding has 2 lengths but the batch has N=3"):
        KeyPadding(torch.tensor([1, 2])).materialize(3, 1, 2, 3)
    with pytest.raises(ValueError, match="dimension S is 2, expected 1 or 3"):
        (Causal() & Bias(torch.zeros(2, 2))).materialize(1, 1, 2, 3)


# ---------------------------------------------------------------- validation and repr


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: Window(-1, 0), ValueError, "before must be a non-negative int"),
        (lambda: Window(0, -2), ValueError, "after must be a non-negative int"),
        (lambda: Window(1.5, 0), TypeError, r"Window before must be a non-negative int .* or None, got float 1.5; pass a Python int"),
        (lambda: Window(True, 0), TypeError, "Window before .* got bool True"),
        (lambda: Window(0, "2"), TypeError, "Window after .* got str '2'"),
        (lambda: Window(0, torch.tensor(2.0)), TypeError, r"Window after .* got a Tensor of shape \(\), dtype torch.float32"),
        (lambda: Window(0, torch.tensor([1, 2])), TypeError, r"Window after .* got a Tensor of shape \(2,\)"),
        (lambda: Window(0, torch.tensor(True)), TypeError, "Window after .* dtype torch.bool"),
        (lambda: Window(np.int64(-1), 0), ValueError, "before must be a non-negative int"),
        (lambda: Window(1, 1, shift=0.5), TypeError, r"Window shift must be an int .*, got float 0.5"),
        (lambda: Window(1, 1, shift=None), TypeError, r"Window shift must be an int \(a number of keys\), got NoneType None"),
        (lambda: Window(1, 1, 3), TypeError, "align must be the str 'top_left' or 'bottom_right', got int 3"),
        # past int64 once offset: OverflowError, or wrapped to the wrong keys
        (lambda: Window(2**63 - 1, 2**63 - 1), ValueError, r"before must be at most 2\*\*60 .* use None"),
        (lambda: Window(None, 10**30), ValueError, r"after must be at most 2\*\*60"),
        (lambda: Window(1, 1, shift=-(2**61)), ValueError, r"shift must be within -2\*\*60..2\*\*60"),
        (lambda: Window(1, 1, "center"), ValueError, "top_left' or 'bottom_right"),
        (lambda: Causal("bottom-right"), ValueError, "top_left' or 'bottom_right"),
        (lambda: KeyPadding([1, 2]), TypeError, r"Tensor of shape \(N,\), got list; build it with torch.tensor\(lengths\)"),
        (lambda: KeyPadding(torch.ones(2, 1, dtype=torch.long)), ValueError, r"\(N,\)"),
        (lambda: KeyPadding(torch.tensor([1.0, 2.0])), TypeError, "integer"),
        (lambda: KeyPadding(torch.tensor([True])), TypeError, "integer"),
        (lambda: Allowed([[True]]), TypeError, "Allowed takes a Tensor"),
        (lambda: Allowed(torch.ones(2, 2)), TypeError, r"boolean.*Bias"),
        (lambda: Blocked(torch.ones(2, 2, dtype=torch.long)), TypeError, "boolean"),
        (lambda: Bias(torch.ones(2, 2, dtype=torch.bool)), TypeError, r"floating-point.*Allowed"),
        (lambda: Bias(torch.ones(1, 1, 1, 2, 2)), ValueError, "5 dimensions"),
        # sparse and nested tensors failed later inside torch with a RuntimeError
        (lambda: Allowed(torch.ones(3, 5, dtype=torch.bool).to_sparse()), TypeError, r"sparse_coo.*to_dense\(\)"),
        (lambda: Bias(torch.zeros(3, 5).to_sparse_csr()), TypeError, r"Bias takes a dense tensor.*sparse_csr"),
        (lambda: KeyPadding(torch.tensor([5, 2]).to_sparse()), TypeError, "KeyPadding lengths takes a dense"),
        (
            lambda: Bias(torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(1, 3)], layout=torch.jagged)),
            TypeError,
            r"nested one.*to_padded_tensor",
        ),
    ],
)
def test_constructor_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint8, torch.tensor])
def test_window_takes_any_integral_type_as_an_int(integer):
    """Sides and shifts read from numpy arrays or tensors (what operator.index takes) are
    stored as Python ints: the same mask, equal and with the same repr."""
    window = Window(integer(2), integer(0), "bottom_right", shift=integer(1))
    assert window == Window(2, 0, "bottom_right", shift=1)
    assert all(type(getattr(window, name)) is int for name in ("before", "after", "shift"))
    assert repr(window) == "Window(before=2, after=0, align='bottom_right', shift=1)"
    assert torch.equal(window.allowed(3, 5), Window(2, 0, "bottom_right", shift=1).allowed(3, 5))


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_widest_windows_and_shifts_stay_exact(align):
    """The largest sides and shifts a Window takes: no int64 overflow in the band test."""
    assert Window(2**60, 2**60, align).allowed(3, 5).all()
    assert not Window(2**60, 0, align, shift=-(2**60)).allowed(3, 5).any()  # j <= i - 2**60
    assert not Window(0, 2**60, align, shift=2**60).allowed(3, 5).any()  # j >= i + 2**60


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (KeyPadding(torch.tensor([1, 2, 3])), "3 lengths but the batch has N=2"),
        (Allowed(torch.ones(L + 1, S, dtype=torch.bool)), "dimension L is 6, expected 1 or 5"),
        (Bias(torch.zeros(4, 1, 1, S)), "dimension N is 4, expected 1 or 2"),
        (Blocked(torch.ones(2, L, S, dtype=torch.bool)), "dimension H is 2, expected 1 or 3"),
        (Causal() & Bias(torch.zeros(S + 1)), "dimension S is 8, expected 1 or 7"),
    ],
)
def test_check_shape(mask, match):
    with pytest.raises(ValueError, match=match):
        mask._check_shape(N, H, L, S)


def test_check_shape_accepts_broadcastable():
    for shape in BROADCAST_SHAPES:
        Bias(torch.zeros(shape))._check_shape(N, H, L, S)


def test_repr():
    assert repr(Causal("top_left") & KeyPadding(torch.tensor([3, 5]))) == "Causal('top_left') & KeyPadding(lengths=[3, 5])"
    assert repr(Causal("bottom_right")) == "Causal('bottom_right')"
    assert repr(Window(2, None)) == "Window(before=2, after=None, align='top_left')"
    assert repr(Bias(torch.zeros(1, 3, 1, 4))) == "Bias(shape=(1, 3, 1, 4), dtype=torch.float32)"
    assert repr(Blocked(torch.zeros(4, dtype=torch.bool))) == "Blocked(shape=(4,), dtype=torch.bool)"
    assert repr(Allowed(torch.zeros(2, 4, dtype=torch.bool))) == "Allowed(shape=(2, 4), dtype=torch.bool)"


def test_masks_are_masks():
    for m in (Causal(), Window(1, 1), KeyPadding(torch.tensor([1])), Bias(torch.zeros(1)), Causal() & Window(1, 2)):
        assert isinstance(m, Mask)


# ---------------------------------------------------------------- the plan the fast backends read


def plan_additive(plan: MaskPlan, N, H, L, S) -> torch.Tensor:
    add = plan.additive_rows(0, L, S, torch.float64, torch.device("cpu"))
    if add is None:
        return torch.zeros(N, H, L, S, dtype=torch.float64)
    return add.expand(N, H, L, S)


def test_plan_shapes_are_never_expanded():
    """Each piece stays at its own broadcast shape; nothing becomes (N, H, L, S)."""
    dev = torch.device("cpu")
    kp = plan_mask(KeyPadding(torch.tensor([3, 5])), L, S, torch.float32)
    assert kp.allowed_rows(0, L, S, dev).shape == (N, 1, 1, S)
    assert kp.additive_rows(0, L, S, torch.float32, dev).shape == (N, 1, 1, S)
    causal = plan_mask(Causal(), L, S, torch.float32)
    assert causal.allowed_rows(1, 4, S, dev).shape == (1, 1, 3, S)
    both = plan_mask(Causal() & KeyPadding(torch.tensor([3, 5])), L, S, torch.float32)
    assert both.allowed_rows(0, L, S, dev).shape == (N, 1, L, S)
    per_head = plan_mask(Bias(torch.zeros(1, H, 1, S)), L, S, torch.float32)
    assert per_head.bias_rows(0, L, torch.float32, dev).shape == (1, H, 1, S)
    assert per_head.additive_rows(2, 4, S, torch.float32, dev).shape == (1, H, 1, S)
    key_only = plan_mask(Blocked(torch.zeros(N, 1, 1, S, dtype=torch.bool)), L, S, torch.float32)
    assert key_only.allowed_rows(0, L, S, dev).shape == (N, 1, 1, S)
    t = torch.zeros(L, S)
    bias_plan = plan_mask(Bias(t), L, S, torch.float32)
    assert bias_plan.bias[0].data_ptr() == t.data_ptr()  # a view, not a copy
    assert plan_mask(None, L, S, torch.float32).is_empty
    assert plan_mask(None, L, S, torch.float32).additive_rows(0, L, S, torch.float32, dev) is None


def test_plan_reduces_bands_and_lengths():
    plan = plan_mask(
        Causal("bottom_right") & Window(2, 3) & KeyPadding(torch.tensor([4, 9])) & KeyPadding(torch.tensor([6, 1])),
        L,
        S,
        torch.float32,
    )
    assert plan.band == Band(-2, S - L)
    assert plan.lengths.tolist() == [4, 1]
    assert not plan.has_tensors


def make_mask(kind: int, N, H, L, S, g: torch.Generator) -> Mask:
    """One elementary mask of each kind, random, for combinations."""
    if kind == 0:
        return Causal("top_left")
    if kind == 1:
        return Causal("bottom_right")
    if kind == 2:
        return Window(int(torch.randint(0, 4, (), generator=g)), None, "bottom_right")
    if kind == 3:
        return Window(1, 2, "top_left")
    if kind == 4:
        return KeyPadding(torch.randint(0, S + 2, (N,), generator=g))
    if kind == 5:
        return Allowed(torch.rand(1, H, L, S, generator=g) < 0.7)
    if kind == 6:
        return Blocked(torch.rand(N, 1, 1, S, generator=g) < 0.3)
    return Bias(torch.randn(L, S, generator=g, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    Lq=st.integers(1, 6),
    Sk=st.integers(1, 6),
    start=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_plan_agrees_with_materialize(kinds, Lq, Sk, start, seed):
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(kinds[0], 2, 2, Lq, Sk, g)
    for kind in kinds[1:]:
        mask = mask & make_mask(kind, 2, 2, Lq, Sk, g)
    want = mask.materialize(2, 2, Lq, Sk, dtype=torch.float64)
    plan = plan_mask(mask, Lq, Sk, torch.float64)
    assert_additive_equal(plan_additive(plan, 2, 2, Lq, Sk), want)
    # A block of rows reads the same rows.
    start = min(start, Lq - 1)
    rows = plan.additive_rows(start, Lq, Sk, torch.float64, torch.device("cpu"))
    if rows is not None:
        assert_additive_equal(rows.expand(2, 2, Lq - start, Sk), want[:, :, start:])
    # One batch row, keys cut to a prefix (what padding removal does).
    for n in range(2):
        sub = plan.without_lengths().select_batch(n, Sk - 1 if Sk > 1 else Sk)
        s = Sk - 1 if Sk > 1 else Sk
        got = plan_additive(sub, 1, 2, Lq, s)
        want_n = want[n : n + 1, :, :, :s]
        if plan.lengths is not None:  # lengths were dropped: compare only where they allow
            keep = torch.arange(s) < plan.lengths[n]
            got, want_n = got[..., keep], want_n[..., keep]
        assert_additive_equal(got, want_n)
    # A slice of the batch.
    sl = plan.batch_slice(1, 2)
    assert_additive_equal(plan_additive(sl, 1, 2, Lq, Sk), want[1:2])


@settings(max_examples=200, deadline=None)
@given(
    lo=st.one_of(st.none(), st.integers(-8, 8)),
    hi=st.one_of(st.none(), st.integers(-8, 8)),
    Lq=st.integers(0, 7),
    Sk=st.integers(1, 7),
)
def test_band_rows_with_keys_brute_force(lo, hi, Lq, Sk):
    band = Band(lo, hi)
    have = band.allowed(torch.arange(Lq), Sk).any(dim=-1).tolist()
    first, last = band.rows_with_keys(Lq, Sk)
    assert have == [first <= i < last for i in range(Lq)]


def test_band_intersect():
    assert Band(None, 0).intersect(Band(-3, 5)) == Band(-3, 0)
    assert Band(-1, None).intersect(Band(None, None)) == Band(-1, None)
    assert Band(2, 4).intersect(Band(0, 1)) == Band(2, 1)
    assert Band(2, 1).rows_with_keys(5, 5) == (0, 0)
