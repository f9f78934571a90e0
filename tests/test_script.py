"""torch.jit.script and torch.jit.trace of mha.MultiheadAttention, and of torch's transformer
layers after mha.swap: mha's results (no NaN rows, both masks, is_causal without attn_mask),
against the eager module and against torch where torch gives no NaN. fp64 throughout, so
the tolerances are fp64 rounding."""

from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
from torch import nn

import mha
from conftest import TOL, build_pair

# torch marks torch.jit deprecated; it still works, and people deploy with it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

L, S, N, E, H = 5, 7, 3, 12, 3  # distinct, so a swapped axis fails; head dim 4
KDIM, VDIM = 11, 13
F64 = torch.float64
TOL64 = TOL[F64]

CONFIGS = {
    "plain": {},
    "kdim_vdim": {"kdim": KDIM, "vdim": VDIM},
    "extra_keys": {"add_bias_kv": True, "add_zero_attn": True},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False},
}
CALLS = [
    "none", "kpm_bool", "kpm_float", "attn_bool", "attn_float_heads", "attn_4d",
    "both", "causal", "causal_and_attn",
]
# Calls torch runs the same way (no is_causal without a mask, no 4-D mask).
TORCH_CALLS = ["none", "kpm_bool", "kpm_float", "attn_bool", "attn_float_heads", "both"]


@functools.cache
def _modules(config: str) -> tuple[nn.MultiheadAttention, mha.MultiheadAttention, torch.jit.ScriptModule]:
    """torch's module, mha's with the same weights, and mha's scripted; eval, fp64."""
    theirs, ours = build_pair(E, H, dtype=F64, **CONFIGS[config])
    theirs.eval()
    ours.eval()
    return theirs, ours, torch.jit.script(ours)


def _inputs(config: str, batched: bool = True, seed: int = 0, length: int = L):
    g = torch.Generator().manual_seed(seed)
    kdim = CONFIGS[config].get("kdim", E)
    vdim = CONFIGS[config].get("vdim", E)
    bf = CONFIGS[config].get("batch_first", False)

    def seq(n: int, width: int) -> torch.Tensor:
        if not batched:
            return torch.randn(n, width, generator=g, dtype=F64)
        shape = (N, n, width) if bf else (n, N, width)
        return torch.randn(shape, generator=g, dtype=F64)

    return seq(length, E), seq(S, kdim), seq(S, vdim)


def _masks(call: str, batched: bool = True, seed: int = 1, length: int = L) -> dict:
    """Random masks that leave every query row at least one key (key 0), so torch has no NaN."""
    g = torch.Generator().manual_seed(seed)
    lead = (N,) if batched else ()
    kpm = torch.rand(*lead, S, generator=g) < 0.4
    kpm[..., 0] = False
    attn = torch.rand(length, S, generator=g) < 0.4
    attn[:, 0] = False
    heads = torch.rand((N * H if batched else H), length, S, generator=g) < 0.4
    heads[..., 0] = False

    def additive(blocked: torch.Tensor) -> torch.Tensor:
        return torch.randn(blocked.shape, generator=g, dtype=F64).masked_fill(blocked, float("-inf"))

    return {
        "none": {},
        "kpm_bool": {"key_padding_mask": kpm},
        "kpm_float": {"key_padding_mask": additive(kpm)},
        "attn_bool": {"attn_mask": attn},
        "attn_float_heads": {"attn_mask": additive(heads)},
        "attn_4d": {"attn_mask": heads.view(N, H, length, S)[:, :1]} if batched else {"attn_mask": heads},
        "both": {"key_padding_mask": kpm, "attn_mask": additive(attn)},
        "causal": {"is_causal": True},
        "causal_and_attn": {"is_causal": True, "attn_mask": attn},
    }[call]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _assert_same(got, expected):
    out, weights = got
    ref_out, ref_weights = expected
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out, **TOL64)
    if ref_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, ref_weights, **TOL64)


WEIGHTS = [{"need_weights": False}, {"average_attn_weights": True}, {"average_attn_weights": False}]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_scripted_matches_eager(config, call, batched):
    _, ours, scripted = _modules(config)
    q, k, v = _inputs(config, batched)
    masks = _masks(call, batched)
    for weights in WEIGHTS:
        _assert_same(scripted(q, k, v, **masks, **weights), _quiet(ours, q, k, v, **masks, **weights))


@pytest.mark.parametrize("call", TORCH_CALLS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_scripted_matches_torch(config, call):
    theirs, _, scripted = _modules(config)
    q, k, v = _inputs(config)
    masks = _masks(call)
    for weights in WEIGHTS:
        _assert_same(scripted(q, k, v, **masks, **weights), _quiet(theirs, q, k, v, **masks, **weights))


def test_scripted_self_attention_with_one_query_and_one_key():
    theirs, _, scripted = _modules("plain")
    x = torch.randn(1, N, E, dtype=F64)
    _assert_same(scripted(x, x, x), theirs(x, x, x))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("config", ["plain", "extra_keys"])
def test_scripted_fully_masked_rows_give_zero_attention(config, need_weights):
    """Batch row 0 pads every key, query row 2 blocks every key: those rows get zero
    attention (output = out_proj.bias, weights 0), no NaN, and finite gradients."""
    _, ours, scripted = _modules(config)
    q, k, v = (t.clone().requires_grad_() for t in _inputs(config))
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0] = True
    attn = torch.zeros(L, S, dtype=torch.bool)
    attn[2] = True
    kwargs = {"key_padding_mask": kpm, "attn_mask": attn, "need_weights": need_weights, "average_attn_weights": False}
    out, weights = scripted(q, k, v, **kwargs)
    _assert_same((out, weights), _quiet(ours, q, k, v, **kwargs))
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    if config == "plain":  # with extra keys, every row keeps the appended keys
        bias = ours.out_proj.bias.detach()
        torch.testing.assert_close(out[:, 0], bias.expand(L, E))
        torch.testing.assert_close(out[2], bias.expand(N, E))
        if need_weights:
            assert (weights[0] == 0).all()
            assert (weights[:, :, 2] == 0).all()


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scripted_low_precision_error_is_eager_mha_error(dtype, need_weights):
    """Against an fp64 run of the same module: the scripted module's error in ``dtype`` is at
    most twice eager mha's in the same dtype, plus one ulp of the output's scale."""
    _, ours = build_pair(E, H, dtype=F64)
    low = copy.deepcopy(ours).to(dtype)
    scripted = torch.jit.script(low)
    q, k, v = _inputs("plain")
    masks = _masks("both")
    reference = _quiet(ours, q, k, v, **masks, need_weights=need_weights)
    low_inputs = (q.to(dtype), k.to(dtype), v.to(dtype))
    low_masks = {"key_padding_mask": masks["key_padding_mask"], "attn_mask": masks["attn_mask"].to(dtype)}
    got = scripted(*low_inputs, **low_masks, need_weights=need_weights)
    eager = _quiet(low, *low_inputs, **low_masks, need_weights=need_weights)
    for g, e, r in zip(got, eager, reference, strict=True):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype
        ulp = torch.finfo(dtype).eps * r.abs().max().item()
        assert (g.double() - r).abs().max() <= 2 * (e.double() - r).abs().max() + ulp


@pytest.mark.parametrize("need_weights", [True, False])
def test_scripted_float_mask_of_a_wider_dtype_is_added_in_the_inputs_dtype(need_weights):
    """A float32 attn_mask on a float16 module: the scripted weights path added it in
    float32 (a row of -1e9 finite: uniform attention) and its path without weights in
    float16 (-inf: blocked, output out_proj.bias), as eager mha does in both."""
    module = mha.MultiheadAttention(E, H).half()
    scripted = torch.jit.script(module)
    x = torch.randn(L, N, E).half()
    mask = torch.zeros(L, L)
    mask[1] = -1e9  # -inf in float16
    got, _ = scripted(x, x, x, attn_mask=mask, need_weights=need_weights)
    want, _ = _quiet(module, x, x, x, attn_mask=mask, need_weights=need_weights)
    torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-3)
    assert torch.equal(got[1], module.out_proj.bias.expand(N, E))


@pytest.mark.parametrize("config", ["plain", "kdim_vdim", "extra_keys"])
def test_scripted_gradients_match_eager(config):
    _, ours = build_pair(E, H, dtype=F64, **CONFIGS[config])
    scripted = torch.jit.script(copy.deepcopy(ours))
    masks = _masks("both")
    masks["attn_mask"].requires_grad_()
    grads = []
    for module in (ours, scripted):
        q, k, v = (t.requires_grad_() for t in _inputs(config))
        out, weights = _quiet(module, q, k, v, **masks)
        (out.sum() + (weights * weights).sum()).backward()
        grads.append([q.grad, k.grad, v.grad, masks["attn_mask"].grad.clone()] + [p.grad for p in module.parameters()])
        masks["attn_mask"].grad = None
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, **TOL64)


def test_scripted_dropout_scales_the_kept_weights():
    """Training with dropout p: each weight is 0 or its eval value / (1 - p), about half of them 0."""
    _, ours = build_pair(E, H, dropout=0.5, dtype=F64)
    scripted = torch.jit.script(ours)
    q = torch.randn(16, 4, E, dtype=F64)
    torch.manual_seed(0)
    dropped = scripted(q, q, q, average_attn_weights=False)[1]
    kept = scripted.eval()(q, q, q, average_attn_weights=False)[1]
    zero = dropped == 0
    assert 0.45 < zero.double().mean().item() < 0.55
    torch.testing.assert_close(dropped[~zero], kept[~zero] / 0.5, **TOL64)


def test_scripted_module_shares_parameters_and_round_trips_through_save_and_load():
    _, ours, scripted = _modules("extra_keys")
    assert scripted.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(scripted.state_dict().values(), ours.state_dict().values(), strict=True))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    q, k, v = _inputs("extra_keys")
    masks = _masks("both")
    _assert_same(loaded(q, k, v, **masks), _quiet(ours, q, k, v, **masks))


BAD_CALLS = {
    "key_width": (lambda q, k, v: (q, k[..., :-1], v), {}, ValueError, r"kdim = 12"),
    "value_width": (lambda q, k, v: (q, k, v[..., :-1]), {}, ValueError, r"vdim = 12"),
    "key_2d": (lambda q, k, v: (q, k[:, 0], v), {}, ValueError, r"3 dimensions"),
    "value_length": (lambda q, k, v: (q, k, v[:-1]), {}, ValueError, r"same S"),
    "batch": (lambda q, k, v: (q, k[:, :-1], v[:, :-1]), {}, ValueError, r"same batch size N"),
    "dtype": (lambda q, k, v: (q, k.float(), v), {}, TypeError, r"one floating-point dtype"),
    "kpm_1d": (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.zeros(S, dtype=torch.bool)}, ValueError, r"\(N, S\) = \(3, 7\)"),
    "kpm_s_n": (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.zeros(S, N, dtype=torch.bool)}, ValueError, r"key_padding_mask\.T"),
    "kpm_int": (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.zeros(N, S, dtype=torch.int64)}, TypeError, r"bool tensor"),
    "attn_1d": (lambda q, k, v: (q, k, v), {"attn_mask": torch.zeros(S, dtype=torch.bool)}, ValueError, r"got 1-D \(7,\)"),
    "attn_heads": (lambda q, k, v: (q, k, v), {"attn_mask": torch.zeros(H, L, S, dtype=torch.bool)}, ValueError, r"\(N\*num_heads, L, S\) = \(9, 5, 7\)"),
    "attn_s_l": (lambda q, k, v: (q, k, v), {"attn_mask": torch.zeros(S, L, dtype=torch.bool)}, ValueError, r"transpose"),
    "query_sparse": (lambda q, k, v: (q.to_sparse(), k, v), {}, TypeError, r"query\.to_dense\(\)"),
    "kpm_sparse": (lambda q, k, v: (q, k, v), {"key_padding_mask": torch.zeros(N, S).to_sparse()}, TypeError, r"key_padding_mask\.to_dense\(\)"),
    "attn_sparse": (lambda q, k, v: (q, k, v), {"attn_mask": torch.zeros(L, S).to_sparse()}, TypeError, r"attn_mask\.to_dense\(\)"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_scripted_errors_name_the_argument_and_the_eager_error_type(case):
    """TorchScript raises its own torch.jit.Error; its message carries the eager error's type."""
    _, ours, scripted = _modules("plain")
    change, masks, error, message = BAD_CALLS[case]
    q, k, v = change(*_inputs("plain"))
    with pytest.raises(error):
        _quiet(ours, q, k, v, **masks)
    with pytest.raises(torch.jit.Error, match=f"{error.__name__}: .*{message}"):
        scripted(q, k, v, **masks)


def test_scripted_nested_input_is_refused_with_the_way_out():
    _, _, scripted = _modules("batch_first")
    x = torch.nested.nested_tensor([torch.randn(2, E, dtype=F64), torch.randn(4, E, dtype=F64)], layout=torch.jagged)
    with pytest.raises(torch.jit.Error, match=r"NotImplementedError: nested .* eager mode"):
        scripted(x, x, x)


# Torch's transformer layers, scripted after mha.swap.


class _EncoderLayerSubclass(nn.TransformerEncoderLayer):
    """A user's subclass, as people write them to change one piece."""


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(E, E)
        layer = _EncoderLayerSubclass(E, H, 2 * E, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(x), mask=mask, src_key_padding_mask=padding)


def _layer_case(kind: str):
    """(model, positional inputs, keyword inputs) for the scripted and eager calls."""
    x = torch.randn(L, N, E, dtype=F64)
    padding = torch.rand(N, L) < 0.4
    padding[:, 0] = False
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    if kind == "encoder_layer":
        model = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0)
        return model, (x,), {"src_mask": causal, "src_key_padding_mask": padding, "is_causal": True}
    if kind == "decoder_layer":
        model = nn.TransformerDecoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)
        memory = torch.randn(N, S, E, dtype=F64)
        memory_padding = torch.rand(N, S) < 0.4
        memory_padding[:, 0] = False
        kwargs = {"tgt_mask": causal, "tgt_is_causal": True, "memory_key_padding_mask": memory_padding}
        return model, (x.transpose(0, 1), memory), kwargs
    if kind == "encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0), 2, enable_nested_tensor=False)
        return model, (x,), {"mask": causal, "src_key_padding_mask": padding}
    return _Model(), (x, causal, padding), {}


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer", "encoder", "model"])
def test_scripted_transformer_after_swap_matches_eager_and_torch(kind, mode):
    torch.manual_seed(0)
    model, args, kwargs = _layer_case(kind)
    model = model.to(F64).train(mode == "train")
    theirs = copy.deepcopy(model)
    mha.swap(model)
    assert any(isinstance(m, mha.MultiheadAttention) for m in model.modules())
    scripted = torch.jit.script(model)
    with torch.set_grad_enabled(mode == "train"):
        expected = _quiet(theirs, *args, **kwargs)
        torch.testing.assert_close(_quiet(model, *args, **kwargs), expected, **TOL64)
        torch.testing.assert_close(_quiet(scripted, *args, **kwargs), expected, **TOL64)


# torch.jit.trace: the same dense forward, recorded with the shapes of the example.


class _Call(nn.Module):
    """Masks are tensors a trace can take; need_weights and average_attn_weights are fixed."""

    def __init__(self, attention: mha.MultiheadAttention, need_weights: bool, average: bool) -> None:
        super().__init__()
        self.attention = attention
        self.need_weights = need_weights
        self.average = average

    def forward(self, q, k, v, key_padding_mask, attn_mask):
        out, weights = self.attention(
            q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            need_weights=self.need_weights, average_attn_weights=self.average,
        )
        return out if weights is None else (out, weights)


@pytest.mark.parametrize(("need_weights", "average"), [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("config", ["plain", "kdim_vdim", "extra_keys", "batch_first"])
def test_traced_module_matches_eager_on_new_inputs_without_tracer_warnings(config, need_weights, average):
    _, ours, _ = _modules(config)
    call = _Call(ours, need_weights, average)
    example = (*_inputs(config, seed=0), *_masks("both", seed=1).values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(call, example)
    new = (*_inputs(config, seed=2), *_masks("both", seed=3).values())
    # A fully padded batch row and a fully blocked query row: zeros, in the trace too.
    new[3][1] = True
    new[4][2] = float("-inf")
    got, expected = traced(*new), _quiet(call, *new)
    _assert_same(got if need_weights else (got, None), expected if need_weights else (expected, None))


def test_traced_swapped_encoder_matches_eager_and_torch():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0), 2, enable_nested_tensor=False)
    model = model.to(F64)
    theirs = copy.deepcopy(model)
    mha.swap(model)
    x = torch.randn(L, N, E, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,))
    x = torch.randn(L, N, E, dtype=F64)
    torch.testing.assert_close(traced(x), theirs(x), **TOL64)


def test_traced_call_with_a_bad_shape_raises_the_eager_error():
    _, ours, _ = _modules("plain")
    q, k, v = _inputs("plain")
    with pytest.raises(ValueError, match=r"kdim = 12"):
        torch.jit.trace(ours, (q, k[..., :-1], v))


def test_trace_of_self_attention_serves_distinct_query_key_value():
    """Traced with one tensor as query, key and value, the trace still reads all three."""
    _, ours, _ = _modules("batch_first")
    x = _inputs("batch_first")[0]
    traced = torch.jit.trace(ours, (x, x, x))
    q, k, v = _inputs("batch_first", seed=5, length=S)
    _assert_same(traced(q, k, v), ours(q, k, v))


@pytest.mark.parametrize(("batch_first", "training"), [(False, False), (False, True), (True, True)])
def test_scripted_output_is_laid_out_in_memory_as_torch_lays_it_out(batch_first, training):
    """``(L, N, E)`` contiguous without ``batch_first`` (a scripted model may ``view`` it),
    torch's transposed ``(L, N, E)`` in training with it (a dropout after the attention then
    drops the same elements as after torch's)."""
    theirs, ours = build_pair(16, 2, batch_first=batch_first)
    scripted = torch.jit.script(ours)
    theirs.train(training), scripted.train(training)
    x = torch.randn(3, 5, 16)
    got, want = scripted(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0]
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, **TOL[torch.float32])
