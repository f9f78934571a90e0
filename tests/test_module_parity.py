"""Differential tests: mha.MultiheadAttention against torch.nn.MultiheadAttention.

Hypothesis draws every option of the module and of ``forward``; both modules get
the same weights and inputs; outputs, weights and the gradients of every input
and parameter must agree. The one deliberate difference: a query row whose keys
are all masked gets zero attention in mha (output = out_proj bias, weights 0)
where torch may give NaN. Those rows are compared with what mha promises; the
rest with torch; gradients against torch given a merged mask in which those rows
are opened and left out of the loss.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import mha
from conftest import TOL, build_pair
from mha import _frontend

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
SIZES = [1, 2, 3, 7]


@dataclass(frozen=True)
class Config:
    dtype: torch.dtype
    E: int
    H: int
    kdim: int | None
    vdim: int | None
    bias: bool
    add_bias_kv: bool
    add_zero_attn: bool
    batch_first: bool
    batched: bool
    inputs: str  # "self" (query is key is value), "kv" (key is value), "separate"
    L: int
    S: int
    N: int
    kpm: str | None  # None, "right", "bool", "float"
    attn: str | None  # None, "bool", "float", "triu", "tril"
    attn_shape: str  # "LS", "3d", "4d", "4d_broadcast"
    density: float
    is_causal: bool
    need_weights: bool
    average: bool
    noncontiguous: bool
    training: bool
    seed: int


@st.composite
def configs(draw) -> Config:
    head_dim = draw(st.sampled_from([1, 2, 3, 5]))
    H = draw(st.sampled_from([1, 2, 3]))
    E = head_dim * H
    inputs = draw(st.sampled_from(["self", "kv", "separate"]))
    if inputs == "self":
        kdim = vdim = draw(st.sampled_from([None, E]))
    elif inputs == "kv":
        kdim = vdim = draw(st.sampled_from([None, E, 2, 7]))
    else:
        kdim = draw(st.sampled_from([None, E, 2, 7]))
        vdim = draw(st.sampled_from([None, E, 3, 4]))
    batched = draw(st.booleans())
    L = draw(st.sampled_from(SIZES))
    S = L if inputs == "self" else draw(st.sampled_from(SIZES))
    attn = draw(st.sampled_from([None, "bool", "float", "triu", "tril"]))
    shapes = ["LS", "3d", "4d", "4d_broadcast"] if batched else ["LS", "3d"]
    attn_shape = "LS" if attn in ("triu", "tril") else draw(st.sampled_from(shapes))
    return Config(
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        E=E,
        H=H,
        kdim=kdim,
        vdim=vdim,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        batched=batched,
        inputs=inputs,
        L=L,
        S=S,
        N=draw(st.sampled_from(SIZES)) if batched else 1,
        kpm=draw(st.sampled_from([None, "right", "bool", "float"])),
        attn=attn,
        attn_shape=attn_shape,
        density=draw(st.sampled_from([0.2, 0.5, 0.9])),
        is_causal=draw(st.booleans()),
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        noncontiguous=draw(st.booleans()),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _float_mask(blocked: Tensor, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A float mask: random finite values, -inf where ``blocked``."""
    values = torch.randn(blocked.shape, generator=g, dtype=dtype)
    return values.masked_fill(blocked, float("-inf"))


def make_masks(cfg: Config, g: torch.Generator) -> tuple[Tensor | None, Tensor | None]:
    """``(key_padding_mask, attn_mask)`` as the user passes them to mha."""
    N, H, L, S = cfg.N, cfg.H, cfg.L, cfg.S
    kpm = None
    if cfg.kpm is not None:
        if cfg.kpm == "right":
            lengths = torch.randint(0, S + 1, (N,), generator=g)
            kpm = torch.arange(S)[None, :] >= lengths[:, None]
        else:
            kpm = torch.rand(N, S, generator=g) < cfg.density
            if cfg.kpm == "float":
                kpm = _float_mask(kpm, g, cfg.dtype)
        if not cfg.batched:
            kpm = kpm[0]
    attn = None
    if cfg.attn in ("triu", "tril"):
        ones = torch.ones(L, S, dtype=torch.bool)
        attn = ones.triu(1) if cfg.attn == "triu" else ones.tril()
    elif cfg.attn is not None:
        shape = {
            "LS": (L, S),
            "3d": (N * H, L, S) if cfg.batched else (H, L, S),
            "4d": (N, H, L, S),
            "4d_broadcast": ((1, H, L, S), (N, 1, L, S), (1, 1, L, S))[int(torch.randint(3, (), generator=g))],
        }[cfg.attn_shape]
        attn = torch.rand(shape, generator=g) < cfg.density
        if cfg.attn == "float":
            attn = _float_mask(attn, g, cfg.dtype)
    if cfg.noncontiguous:
        kpm, attn = _strided(kpm), _strided(attn)
    return kpm, attn


def _strided(mask: Tensor | None) -> Tensor | None:
    """The same values through non-contiguous strides."""
    if mask is None:
        return None
    if mask.dim() == 1:
        return torch.stack([mask, mask], dim=-1)[..., 1]
    return mask.mT.contiguous().mT


def additive(cfg: Config, kpm: Tensor | None, attn: Tensor | None) -> Tensor:
    """Everything mha applies, as one additive ``(N, H, L, S)`` mask (causal included)."""
    N, H, L, S = cfg.N, cfg.H, cfg.L, cfg.S
    total = torch.zeros(N, H, L, S, dtype=cfg.dtype)

    def add(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=cfg.dtype).masked_fill(m, float("-inf"))
        return m

    if attn is not None:
        if attn.dim() == 3:
            attn = attn.view(N, H, L, S) if cfg.batched else attn[None]
        total = total + add(attn)
    if kpm is not None:
        total = total + add(kpm.view(N, S))[:, None, None, :]
    if cfg.is_causal:
        total = total.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    return total


def torch_attn_mask(cfg: Config, attn: Tensor | None) -> Tensor | None:
    """The attn_mask torch needs for the same result: (N, H, L, S) flattened to
    (N*H, L, S), and the causal mask merged in (torch requires a mask with is_causal)."""
    N, H, L, S = cfg.N, cfg.H, cfg.L, cfg.S
    if attn is not None and attn.dim() == 4:
        attn = attn.expand(N, H, L, S).reshape(N * H, L, S)
    if cfg.is_causal:
        causal = torch.ones(L, S, dtype=torch.bool).triu(1)
        if attn is None:
            attn = causal
        elif attn.dtype == torch.bool:
            attn = attn | causal
        else:
            attn = attn.masked_fill(causal, float("-inf"))
    return attn


def _leaf(shape: tuple[int, ...], g: torch.Generator, cfg: Config) -> Tensor:
    """A base tensor; inputs are views of it (transposed when ``noncontiguous``)."""
    if cfg.noncontiguous:
        shape = shape[::-1]
    return torch.randn(shape, generator=g, dtype=cfg.dtype)


def _view(leaf: Tensor, cfg: Config) -> Tensor:
    return leaf.permute(*reversed(range(leaf.dim()))) if cfg.noncontiguous else leaf


def _input_shape(cfg: Config, length: int, width: int) -> tuple[int, ...]:
    if not cfg.batched:
        return (length, width)
    return (cfg.N, length, width) if cfg.batch_first else (length, cfg.N, width)


def _rows_to_output(rows: Tensor, cfg: Config) -> Tensor:
    """A boolean ``(N, L)`` per query row, shaped to broadcast against the output."""
    if not cfg.batched:
        return rows[0][:, None]
    return rows[:, :, None] if cfg.batch_first else rows.T[:, :, None]


def _rows_to_weights(rows: Tensor, cfg: Config) -> Tensor:
    """A boolean ``(N, L)`` per query row, shaped to broadcast against the weights."""
    if not cfg.average:
        rows = rows[:, None]  # (N, 1, L)
    if not cfg.batched:
        rows = rows[0]
    return rows[..., None]


def _run(module: nn.Module, leaves: dict[str, Tensor], cfg: Config, kpm, attn, is_causal: bool):
    views = {name: _view(t, cfg) for name, t in leaves.items()}
    if cfg.inputs == "self":
        q = k = v = views["x"]
    elif cfg.inputs == "kv":
        q, k = views["q"], views["kv"]
        v = k
    else:
        q, k, v = views["q"], views["k"], views["v"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(
            q,
            k,
            v,
            key_padding_mask=kpm,
            need_weights=cfg.need_weights,
            attn_mask=attn,
            average_attn_weights=cfg.average,
            is_causal=is_causal,
        )


def _grads(module: nn.Module, leaves: dict[str, Tensor]) -> dict[str, Tensor | None]:
    grads = {f"input {name}": t.grad for name, t in leaves.items()}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return grads


def check_parity(cfg: Config) -> None:
    g = torch.Generator().manual_seed(cfg.seed)
    theirs, ours = build_pair(
        cfg.E,
        cfg.H,
        bias=cfg.bias,
        add_bias_kv=cfg.add_bias_kv,
        add_zero_attn=cfg.add_zero_attn,
        kdim=cfg.kdim,
        vdim=cfg.vdim,
        batch_first=cfg.batch_first,
        dtype=cfg.dtype,
        seed=cfg.seed,
    )
    theirs.train(cfg.training)
    ours.train(cfg.training)
    kd, vd = cfg.kdim or cfg.E, cfg.vdim or cfg.E
    if cfg.inputs == "self":
        base = {"x": _leaf(_input_shape(cfg, cfg.L, cfg.E), g, cfg)}
    elif cfg.inputs == "kv":
        base = {
            "q": _leaf(_input_shape(cfg, cfg.L, cfg.E), g, cfg),
            "kv": _leaf(_input_shape(cfg, cfg.S, kd), g, cfg),
        }
    else:
        base = {
            "q": _leaf(_input_shape(cfg, cfg.L, cfg.E), g, cfg),
            "k": _leaf(_input_shape(cfg, cfg.S, kd), g, cfg),
            "v": _leaf(_input_shape(cfg, cfg.S, vd), g, cfg),
        }
    kpm, attn = make_masks(cfg, g)
    total = additive(cfg, kpm, attn)
    extra_key = cfg.add_bias_kv or cfg.add_zero_attn
    empty = torch.isneginf(total).all(-1) & (not extra_key)  # (N, H, L): no key left
    bad_rows = empty.any(1)  # (N, L): some head of the row has no key
    all_empty_rows = empty.all(1)

    # Forward with the user's masks: torch must agree wherever it is finite.
    ours_leaves = {n: t.clone().requires_grad_() for n, t in base.items()}
    out, w = _run(ours, ours_leaves, cfg, kpm, attn, cfg.is_causal)
    with torch.no_grad():
        t_out, t_w = _run(theirs, base, cfg, kpm, torch_attn_mask(cfg, attn), False)
    tol = TOL[cfg.dtype]
    assert out.shape == t_out.shape
    assert out.dtype == t_out.dtype
    assert torch.isfinite(out).all(), "mha output has NaN/inf"
    finite = torch.isfinite(t_out)
    torch.testing.assert_close(out[finite], t_out[finite], **tol)
    # torch is non-finite only on rows where some head has no key.
    assert not (~finite & ~_rows_to_output(bad_rows, cfg)).any()
    bias = ours.out_proj.bias if cfg.bias else torch.zeros(cfg.E, dtype=cfg.dtype)
    want_bias = _rows_to_output(all_empty_rows, cfg).expand(out.shape)
    torch.testing.assert_close(out[want_bias], bias.detach().expand(out.shape)[want_bias], **tol)
    if cfg.need_weights:
        assert w is not None
        assert w.shape == t_w.shape
        assert torch.isfinite(w).all(), "mha weights have NaN/inf"
        finite_w = torch.isfinite(t_w)
        torch.testing.assert_close(w[finite_w], t_w[finite_w], **tol)
        if not cfg.average:
            head_empty = empty if cfg.batched else empty[0]
            assert (w[head_empty] == 0).all()
        zero_rows = _rows_to_weights(all_empty_rows, cfg).expand(w.shape)
        assert (w[zero_rows] == 0).all()
    else:
        assert w is None
        assert t_w is None

    # Gradients. Rows with an empty head are left out of the loss; torch gets one
    # merged float mask with those rows opened, so that its backward has no NaN.
    g_out = torch.randn(out.shape, generator=g, dtype=cfg.dtype).masked_fill(_rows_to_output(bad_rows, cfg), 0)
    loss = (out * g_out).sum()
    if w is not None:
        g_w = torch.randn(w.shape, generator=g, dtype=cfg.dtype).masked_fill(_rows_to_weights(bad_rows, cfg), 0)
        loss = loss + (w * g_w).sum()
    loss.backward()
    if bad_rows.any():
        merged = total.masked_fill(bad_rows[:, None, :, None], 0.0)
        t_kpm, t_attn = None, merged.reshape(-1, cfg.L, cfg.S)
    else:
        t_kpm, t_attn = kpm, torch_attn_mask(cfg, attn)
    theirs_leaves = {n: t.clone().requires_grad_() for n, t in base.items()}
    t_out, t_w = _run(theirs, theirs_leaves, cfg, t_kpm, t_attn, False)
    t_loss = (t_out * g_out).sum()
    if t_w is not None:
        t_loss = t_loss + (t_w * g_w).sum()
    t_loss.backward()
    ours_grads, their_grads = _grads(ours, ours_leaves), _grads(theirs, theirs_leaves)
    assert ours_grads.keys() == their_grads.keys()
    for name, grad in ours_grads.items():
        want = their_grads[name]
        if want is None:
            assert grad is None or not grad.any(), name
            continue
        assert grad is not None, f"{name} got no gradient, torch gives one"
        assert torch.isfinite(grad).all(), f"gradient of {name} has NaN/inf"
        torch.testing.assert_close(grad, want, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")


@settings(max_examples=200, **SETTINGS)
@given(configs())
def test_matches_torch(cfg):
    check_parity(cfg)


@pytest.mark.slow
@settings(max_examples=5000, **SETTINGS)
@given(configs())
def test_matches_torch_thousands(cfg):
    check_parity(cfg)


@contextlib.contextmanager
def _key_lengths_route_always():
    """Take the key-lengths route for every right-padded call, however small."""
    saved = _frontend._KEY_LENGTHS_MIN_SCORES, _frontend._KEY_LENGTHS_MIN_PADDED
    _frontend._KEY_LENGTHS_MIN_SCORES, _frontend._KEY_LENGTHS_MIN_PADDED = 0, 0.0
    try:
        yield
    finally:
        _frontend._KEY_LENGTHS_MIN_SCORES, _frontend._KEY_LENGTHS_MIN_PADDED = saved


@settings(max_examples=60, **SETTINGS)
@given(configs().filter(lambda cfg: cfg.kpm == "right"))
def test_matches_torch_on_the_key_lengths_route(cfg):
    with _key_lengths_route_always():
        check_parity(cfg)


@pytest.mark.parametrize(
    ("N", "L", "S", "lengths", "route"),
    [
        (4, 263, 1031, [1031, 97, 40, 1], "key_lengths"),  # large, 72% padding
        (4, 263, 1031, [1031, 1031, 1000, 990], "dense"),  # large, 2% padding
        (3, 7, 11, [11, 5, 1], "dense"),  # small: the route costs more than it saves
        (4, 0, 257, [257, 97, 40, 1], "dense"),  # no query: nothing to save
    ],
)
@pytest.mark.parametrize("kind", ["bool", "float"])  # float: 0 / -inf, as nn.TransformerEncoder passes it
def test_right_padding_is_dropped_where_it_pays(monkeypatch, N, L, S, lengths, route, kind):
    taken = []
    for name in ("_dense", "_key_lengths"):
        method = getattr(mha.MultiheadAttention, name)

        def spy(self, plan, method=method, name=name):
            taken.append(name)
            return method(self, plan)

        monkeypatch.setattr(mha.MultiheadAttention, name, spy)
    theirs, ours = build_pair(16, 2, batch_first=True)
    q, kv = torch.randn(N, L, 16), torch.randn(N, S, 16)
    kpm = torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]
    if kind == "float":
        kpm = torch.zeros(N, S).masked_fill(kpm, float("-inf"))
    got, want = ours(q, kv, kv, key_padding_mask=kpm), theirs(q, kv, kv, key_padding_mask=kpm)
    assert taken == ["_" + route]
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


def _routes_taken(monkeypatch) -> list[str]:
    """The module's route methods called from now on, in order."""
    taken: list[str] = []
    for name in mha.MultiheadAttention._ROUTES.values():
        method = getattr(mha.MultiheadAttention, name)

        def spy(self, plan, method=method, name=name):
            taken.append(name)
            return method(self, plan)

        monkeypatch.setattr(mha.MultiheadAttention, name, spy)
    return taken


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True}, {"bias": False}, {"kdim": 16, "vdim": 16}])
@pytest.mark.parametrize("masks", ["none", "causal-float", "causal-bool", "is_causal"])
@pytest.mark.parametrize("weights", [None, True, False])  # need_weights, average_attn_weights
def test_self_attention_over_one_position_is_the_value_without_scores(monkeypatch, kwargs, masks, weights):
    """L = S = 1, query is key is value, without autograd or dropout: the output is the
    value projected, exactly what torch computes through a softmax over one score."""
    theirs, ours = build_pair(16, 4, **kwargs)
    theirs.eval(), ours.eval()
    taken = _routes_taken(monkeypatch)
    x = torch.randn(3, 1, 16) if kwargs.get("batch_first") else torch.randn(1, 3, 16)
    call = {"need_weights": weights is not None, "average_attn_weights": bool(weights)}
    if masks != "none":
        causal = torch.zeros(1, 1, dtype=torch.bool)  # triu(ones(1, 1), 1): nothing blocked
        call["attn_mask"] = causal if masks == "causal-bool" else torch.zeros(1, 1)
        call["is_causal"] = masks == "is_causal"
    with torch.no_grad():
        got, want = ours(x, x, x, **call), theirs(x, x, x, **call)
    assert taken == ["_one_key"]
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    if weights is None:
        assert got[1] is None
        assert want[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_one_position_unbatched_matches_torch(monkeypatch):
    theirs, ours = build_pair(16, 4)
    taken = _routes_taken(monkeypatch)
    x = torch.randn(1, 16)
    with torch.inference_mode():
        got, want = ours(x, x, x), theirs(x, x, x)
    assert taken == ["_one_key"]
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_one_position_weights_are_nan_where_the_input_is_not_finite(monkeypatch, value, average, batch_first):
    """A NaN or an infinity in the input makes every head's one score non-finite, and
    torch's softmax over it NaN: the weights of the one-key route are NaN there too, not
    ones; the other sequences keep weights of exactly 1."""
    theirs, ours = build_pair(16, 4, batch_first=batch_first)
    taken = _routes_taken(monkeypatch)
    x = torch.randn(1, 3, 16)
    x[0, 1, 5] = value
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    with torch.no_grad():
        got, want = ours(x, x, x, average_attn_weights=average), theirs(x, x, x, average_attn_weights=average)
    assert taken == ["_one_key"]
    assert want[1][1].isnan().all()
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32], equal_nan=True)


@pytest.mark.parametrize(
    "case",
    ["grad", "dropout", "key_padding_mask", "attn_mask", "add_bias_kv", "add_zero_attn", "two_positions",
     "cross_attention", "nan_query"],
)
def test_one_position_without_scores_only_where_it_equals_attention(monkeypatch, case):
    """Autograd (torch gives the query and key projections zero gradients), dropout (its
    draws), any mask but causal (the key may be blocked), appended keys and a query
    that is not the value (a NaN in it must reach the output, as through torch's
    scores) keep the dense route."""
    kwargs = {"dropout": 0.5} if case == "dropout" else {case: True} if case.startswith("add_") else {}
    _theirs, ours = build_pair(16, 4, **kwargs)
    if case == "dropout":
        ours.train()
    taken = _routes_taken(monkeypatch)
    x = torch.randn(2 if case == "two_positions" else 1, 3, 16)
    q = torch.full_like(x, float("nan")) if case == "nan_query" else x.clone() if case == "cross_attention" else x
    call = {}
    if case == "key_padding_mask":
        call["key_padding_mask"] = torch.tensor([[False], [True], [False]])
    if case == "attn_mask":
        call["attn_mask"] = torch.randn(1, 1)
    with torch.set_grad_enabled(case == "grad"):
        out, _ = ours(q, x, x, **call)
    assert taken == ["_dense"]
    if case == "nan_query":
        assert out.isnan().all()


CONSTRUCTIONS = [
    {},
    {"bias": False},
    {"add_bias_kv": True},
    {"add_zero_attn": True, "batch_first": True},
    {"kdim": 7, "vdim": 3},
    {"kdim": 6, "vdim": 6, "bias": False, "add_bias_kv": True},
]


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS)
def test_same_seed_gives_same_parameters(kwargs):
    torch.manual_seed(3)
    theirs = nn.MultiheadAttention(6, 3, **kwargs)
    torch.manual_seed(3)
    ours = mha.MultiheadAttention(6, 3, **kwargs)
    theirs_params = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert list(ours_params) == list(theirs_params)
    for name, p in theirs_params.items():
        assert torch.equal(ours_params[name], p), name
    assert list(dict(ours.named_buffers())) == list(dict(theirs.named_buffers()))


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS)
def test_state_dict_loads_both_ways(kwargs):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(6, 3, **kwargs)
    ours = mha.MultiheadAttention(6, 3, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    fresh = nn.MultiheadAttention(6, 3, **kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_fully_masked_row_is_bias_where_torch_gives_nan():
    """The seed's Example 3 mask: the last query blocks every key. torch's default
    path gives NaN there; mha gives the out_proj bias and zero weights."""
    theirs, ours = build_pair(8, 2, dtype=torch.float64)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    mask = torch.tril(torch.ones(5, 5)).bool()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, w = ours(x, x, x, attn_mask=mask)
    t_out, t_w = theirs(x, x, x, attn_mask=mask)
    assert torch.isnan(t_out[4]).all()  # what mha exists to avoid
    torch.testing.assert_close(out[:4], t_out[:4], **TOL[torch.float64])
    torch.testing.assert_close(w[:, :4], t_w[:, :4], **TOL[torch.float64])
    torch.testing.assert_close(out[4], ours.out_proj.bias.detach().expand(3, 8))
    assert (w[:, 4] == 0).all()


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_without_attn_mask_is_causal(need_weights):
    """torch requires attn_mask with is_causal=True; mha takes is_causal alone."""
    theirs, ours = build_pair(12, 4, dtype=torch.float64, batch_first=True)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    out, w = ours(x, x, x, is_causal=True, need_weights=need_weights)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    t_out, t_w = theirs(x, x, x, attn_mask=causal, need_weights=need_weights)
    torch.testing.assert_close(out, t_out, **TOL[torch.float64])
    if need_weights:
        torch.testing.assert_close(w, t_w, **TOL[torch.float64])
        assert (w.triu(1) == 0).all()


def test_awkward_sizes_fp32():
    """Larger prime sizes than the hypothesis run, fp32, padding and weights per head."""
    theirs, ours = build_pair(40, 8, dtype=torch.float32, kdim=11, vdim=13)
    q = torch.randn(97, 3, 40)
    k = torch.randn(31, 3, 11)
    v = torch.randn(31, 3, 13)
    kpm = torch.arange(31)[None, :] >= torch.tensor([31, 5, 17])[:, None]
    out, w = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
    t_out, t_w = theirs(q, k, v, key_padding_mask=kpm, average_attn_weights=False)
    torch.testing.assert_close(out, t_out, **TOL[torch.float32])
    torch.testing.assert_close(w, t_w, **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["sequence_first", "batch_first", "unbatched"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_mask"])
@pytest.mark.parametrize("rows_per_block", [None, 2])  # one block of scores; blocks of 2 rows
def test_one_sequence_with_weights_without_autograd(layout, bias, masks, rows_per_block, monkeypatch):
    """One sequence with weights on the CPU takes the feature-major projection (the
    heads stored transposed) and, in one block, an output that out_proj reads as it
    is: the same results as torch, averaged and per head."""
    from mha._backends import tiled

    E, H, L = 24, 4, 7
    if rows_per_block is not None:
        monkeypatch.setattr(tiled, "_BLOCK_BYTES", H * L * rows_per_block * 8)  # fp64 scores
    batch_first = layout == "batch_first"
    theirs, ours = build_pair(E, H, dtype=torch.float64, bias=bias, batch_first=batch_first)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(L, E, generator=g, dtype=torch.float64)
    x = {"sequence_first": x[:, None], "batch_first": x[None], "unbatched": x}[layout]
    kwargs: dict[str, Tensor] = {}
    if masks == "key_padding":
        padding = torch.arange(L) >= L - 2
        kwargs["key_padding_mask"] = padding if layout == "unbatched" else padding[None]
    elif masks == "attn_mask":
        kwargs["attn_mask"] = torch.randn(L, L, generator=g, dtype=torch.float64)
    for average in (True, False):
        with torch.no_grad():
            out, w = ours(x, x, x, average_attn_weights=average, **kwargs)
            t_out, t_w = theirs(x, x, x, average_attn_weights=average, **kwargs)
        torch.testing.assert_close(out, t_out, **TOL[torch.float64])
        torch.testing.assert_close(w, t_w, **TOL[torch.float64])


@pytest.mark.parametrize("inputs", ["self", "kv"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_unbatched_inputs_keep_their_identity(monkeypatch, inputs, need_weights):
    """An unbatched call whose key is its query (or value its key) is projected as the
    same call with a batch of one: self-attention in one GEMM (with weights, the
    feature-major one), key and value together, not one projection per input."""
    import torch.nn.functional as F

    calls: list[tuple[int, ...]] = []
    linear = F.linear

    def spy(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    theirs, ours = build_pair(8, 2)

    def call(module, query, memory):
        key = query if inputs == "self" else memory
        return module(query, key, key, need_weights=need_weights)

    x, y = torch.randn(5, 8), torch.randn(6, 8)
    got = call(ours, x, y)
    unbatched = calls[:]
    calls.clear()
    call(ours, x[:, None], y[:, None])
    assert unbatched == calls
    want = call(theirs, x, y)
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    if need_weights:
        torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


# Dropout: checked statistically, not bit for bit. Copies of one sequence along the batch
# draw independent dropout masks, so one call gives many samples.

COPIES = 4000


def _copies(L: int, S: int, E: int, batch_first: bool = False):
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(L, 1, E, generator=g), torch.randn(S, 1, E, generator=g)
    q, k = q.expand(L, COPIES, E), k.expand(S, COPIES, E)
    return (q.transpose(0, 1), k.transpose(0, 1)) if batch_first else (q, k)


def _within_noise(samples: Tensor, expected: Tensor, dim: int) -> None:
    """The mean of ``samples`` over ``dim`` is ``expected`` within 5 standard errors."""
    mean, std = samples.mean(dim), samples.std(dim)
    bound = 5 * std / samples.shape[dim] ** 0.5 + 1e-6
    assert ((mean - expected).abs() <= bound).all(), (mean - expected).abs().max()


@pytest.mark.parametrize("module_cls", [mha.MultiheadAttention, nn.MultiheadAttention])
def test_dropout_zeroes_half_the_weights_and_rescales_the_rest(module_cls):
    torch.manual_seed(0)
    m = module_cls(8, 2, dropout=0.5)
    q, k = _copies(3, 5, 8)
    kpm = torch.zeros(COPIES, 5, dtype=torch.bool)
    kpm[:, 4] = True  # a padded key stays at 0 weight
    with torch.no_grad():
        m.eval()
        _, w_eval = m(q, k, k, key_padding_mask=kpm, average_attn_weights=False)
        m.train()
        out, w = m(q, k, k, key_padding_mask=kpm, average_attn_weights=False)
    assert torch.isfinite(out).all()
    assert (w[..., 4] == 0).all()
    open_weights = w[..., :4]
    zero_fraction = (open_weights == 0).float().mean().item()
    assert abs(zero_fraction - 0.5) < 0.01  # 96000 draws: standard error 0.0016
    kept = open_weights != 0
    torch.testing.assert_close(open_weights[kept], (2 * w_eval[..., :4])[kept])


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_is_unbiased(need_weights, batch_first):
    """Averaged over dropout masks, outputs and weights are the eval ones (torch's as well)."""
    theirs, ours = build_pair(8, 2, dropout=0.3, batch_first=batch_first)
    q, k = _copies(3, 5, 8, batch_first)
    batch = 0 if batch_first else 1
    with torch.no_grad():
        ours.eval()
        out_eval, w_eval = ours(q, k, k, need_weights=True)
        t_out_eval, _ = theirs.eval()(q, k, k)
        torch.testing.assert_close(out_eval, t_out_eval, **TOL[torch.float32])
        ours.train()
        out, w = ours(q, k, k, need_weights=need_weights)
    assert not torch.equal(out, out_eval)
    _within_noise(out, out_eval.select(batch, 0), dim=batch)
    if need_weights:
        _within_noise(w, w_eval[0], dim=0)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_of_one_matches_torch(need_weights, is_causal):
    """torch accepts dropout=1.0 (F.dropout takes p in [0, 1]): in training every weight is
    dropped, so the output is out_proj's bias and the weights are 0, with no NaN from the
    1 / (1 - p) rescaling; in eval the module attends as without dropout."""
    theirs, ours = build_pair(8, 2, dropout=1.0)
    q, k = torch.randn(3, 2, 8), torch.randn(5, 2, 8)
    mask = torch.ones(3, 5, dtype=torch.bool).triu(1) if is_causal else None
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        want = theirs(q, k, k, need_weights=need_weights, attn_mask=mask)
        got = ours(q, k, k, need_weights=need_weights, attn_mask=mask)
        torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
        if need_weights:
            torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])
        assert not got[0].isnan().any()
    theirs.train()
    ours.train()
    torch.testing.assert_close(ours(q, k, k)[0], ours.out_proj.bias.detach().expand(3, 2, 8))


@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_same_signature_as_torch(method):
    ours = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(mha.MultiheadAttention, method)).parameters.values()]
    theirs = inspect.signature(getattr(nn.MultiheadAttention, method))
    if method == "forward":  # torch's arguments, then the KV cache for decoding
        assert ours.pop() == ("cache", inspect.Parameter.POSITIONAL_OR_KEYWORD, None)
    assert ours == [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_module_attributes_match_torch():
    theirs, ours = build_pair(6, 3, kdim=5, vdim=4, batch_first=True, dropout=0.25)
    for name in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim", "_qkv_same_embed_dim"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("attn_shape", [(4, 5), (6, 4, 5)])
def test_float_masks_get_gradients(attn_shape, need_weights):
    """A float attn_mask / key_padding_mask is a learnable bias in torch; so it is in mha."""
    theirs, ours = build_pair(6, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(4, 3, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, 6, generator=g, dtype=torch.float64)
    attn, kpm = torch.randn(attn_shape, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    grads = []
    for m in (theirs, ours):
        a, k = attn.clone().requires_grad_(), kpm.clone().requires_grad_()
        out, w = m(q, kv, kv, attn_mask=a, key_padding_mask=k, need_weights=need_weights)
        (out.square().sum() + (w.square().sum() if need_weights else 0)).backward()
        grads.append((a.grad, k.grad))
    for theirs_grad, ours_grad in zip(*grads, strict=True):
        torch.testing.assert_close(ours_grad, theirs_grad, **TOL[torch.float64])


@pytest.mark.parametrize("route", ["dense", "key_lengths"])
@pytest.mark.parametrize(("batch_first", "training"), [(False, False), (False, True), (True, True)])
def test_output_is_laid_out_in_memory_as_torch_lays_it_out(monkeypatch, route, batch_first, training):
    """Without ``batch_first`` the output is ``(L, N, E)`` contiguous, as torch's: code after the
    module may ``view`` it. In training with ``batch_first`` it is torch's transposed ``(L, N,
    E)``: a dropout after the attention draws its random numbers in memory order, and drops
    the same elements as after torch's only over the same layout."""
    taken = _routes_taken(monkeypatch)
    theirs, ours = build_pair(16, 2, batch_first=batch_first)
    theirs.train(training), ours.train(training)
    N, L = 3, 5
    x = torch.randn(N, L, 16) if batch_first else torch.randn(L, N, 16)
    kpm = torch.arange(L)[None, :] >= torch.tensor([5, 2, 1])[:, None]
    with _key_lengths_route_always() if route == "key_lengths" else contextlib.nullcontext():
        got = ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    want = theirs(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    assert taken == ["_" + route]
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    if not batch_first:
        assert got.view(L * N, 16).shape == (L * N, 16)
