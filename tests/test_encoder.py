"""mha.TransformerEncoderLayer: torch's encoder layer, whose masked calls are mha's: torch's
fused inference kernel serves only what it serves as mha would (it gives NaN for a fully
padded sequence, and reads a mask alone where is_causal is set too)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mha
from conftest import TOL, assert_same_layer

F64 = torch.float64
E, H, FF, N, S = 12, 2, 20, 3, 5
TOL64 = TOL[F64]


def _pair(norm_first: bool = False, batch_first: bool = True):
    """torch's layer and mha's with the same parameters (random biases), fp64, eval."""
    torch.manual_seed(0)
    kwargs = {"dim_feedforward": FF, "dropout": 0.0, "norm_first": norm_first, "batch_first": batch_first, "dtype": F64}
    theirs = nn.TransformerEncoderLayer(E, H, **kwargs)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = mha.TransformerEncoderLayer(E, H, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


def _calls(monkeypatch) -> list[int]:
    """A record of mha.MultiheadAttention.forward calls."""
    calls: list[int] = []
    forward = mha.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mha.MultiheadAttention, "forward", spy)
    return calls


def test_same_constructor_parameters_and_state_dict_both_ways():
    ours = assert_same_layer(nn.TransformerEncoderLayer, mha.TransformerEncoderLayer, E, H, FF, norm_first=True, batch_first=True)
    assert isinstance(ours.self_attn, mha.MultiheadAttention)


@pytest.mark.parametrize(("norm_first", "batch_first"), [(False, True), (True, False)])
@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
@pytest.mark.parametrize("length", [S, 131])
def test_masked_calls_match_torch(norm_first, batch_first, mode, length):
    """Padding and causal masks (boolean and float) give torch's outputs, over short
    sequences (torch's fused kernel in eval) and long ones (mha's attention)."""
    theirs, ours = _pair(norm_first, batch_first)
    for m in (theirs, ours):
        m.train(mode == "train")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*((N, length, E) if batch_first else (length, N, E)), generator=g, dtype=F64)
    kpm = torch.arange(length)[None, :] >= torch.tensor([length, 2, 4])[:, None]
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=F64)
    for kwargs in (
        {"src_key_padding_mask": kpm},
        {"src_key_padding_mask": torch.zeros(N, length, dtype=F64).masked_fill(kpm, float("-inf"))},
        {"src_mask": causal, "is_causal": True},
        {"src_mask": causal.isinf(), "src_key_padding_mask": kpm},
    ):
        with torch.set_grad_enabled(mode == "train"):
            torch.testing.assert_close(ours(x, **kwargs), theirs(x, **kwargs), **TOL64)


def test_which_calls_torchs_fused_kernel_serves_in_eval(monkeypatch):
    """In eval under no_grad: calls without a mask, and short masked calls that leave
    every row a key, run torch's kernel; the rest run through mha's attention."""
    theirs, ours = _pair()
    g = torch.Generator().manual_seed(5)
    x, long = torch.randn(N, S, E, generator=g, dtype=F64), torch.randn(N, 129, E, generator=g, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 2, 4])[:, None]
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=F64)
    calls = _calls(monkeypatch)

    def runs_mha(*args, **kwargs) -> bool:
        before = len(calls)
        with torch.no_grad():
            ours(*args, **kwargs)
        return len(calls) > before

    assert not runs_mha(x)
    assert not runs_mha(x, src_key_padding_mask=kpm)
    assert not runs_mha(x, src_mask=causal, is_causal=True)
    assert runs_mha(long, src_key_padding_mask=torch.zeros(N, 129, dtype=torch.bool))
    assert runs_mha(x, is_causal=True)  # torch's kernel would ignore is_causal
    with mha.use_backend("reference"):
        assert runs_mha(x)
    # is_causal with another mask: mha applies both, torch's kernel the mask alone.
    band = torch.ones(S, S, dtype=torch.bool).triu(2)
    assert runs_mha(x, src_mask=band, is_causal=True)
    with torch.no_grad():
        got = ours(x, src_mask=band, is_causal=True)
    torch.testing.assert_close(got, theirs(x, src_mask=band | causal.isinf()), **TOL64)


def test_a_row_emptied_by_a_per_head_mask_and_the_padding_mask_gives_no_nan_in_eval():
    """src_mask (N * nhead, S, S) leaves a row one key that src_key_padding_mask blocks: the
    row has no key, which torch's fused kernel turns into NaN; mha's layer gives that row
    zero attention, as in training mode."""
    _, ours = _pair()
    x = torch.randn(N, S, E, dtype=F64, generator=torch.Generator().manual_seed(4))
    src_mask = torch.zeros(N * H, S, S, dtype=torch.bool)
    src_mask[H : 2 * H, 2, :] = True
    src_mask[H : 2 * H, 2, 4] = False  # batch element 1, row 2: key 4 only
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, 4] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(x, src_mask=src_mask, src_key_padding_mask=kpm)
    assert got.isfinite().all()
    ours.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(got, ours(x, src_mask=src_mask, src_key_padding_mask=kpm).detach(), **TOL64)


def test_a_fully_padded_sequence_gives_no_nan_in_eval(monkeypatch):
    """torch's fused kernel gives NaN for a sequence whose every key is padded; mha's layer
    runs such a call through its attention (zero attention there, a warning), and the
    other sequences keep torch's outputs."""
    theirs, ours = _pair()
    x = torch.randn(N, S, E, dtype=F64, generator=torch.Generator().manual_seed(3))
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 0, 3])[:, None]
    with torch.no_grad():
        expected = theirs(x, src_key_padding_mask=kpm)
        with pytest.warns(UserWarning, match="blocks every key of some batch elements"):
            got = ours(x, src_key_padding_mask=kpm)
    assert expected[1].isnan().all()  # what torch's fused kernel gives
    assert got.isfinite().all()
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], **TOL64)
    # The padded sequence: its attention output is out_proj's bias, then the layer's own path.
    ours.train()
    torch.testing.assert_close(got, ours(x, src_key_padding_mask=kpm).detach(), **TOL64)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_swap_converts_encoder_layers_and_back():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True, dtype=F64)
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    ours = mha.swap(copy.deepcopy(theirs))
    assert all(type(m) is mha.TransformerEncoderLayer for m in ours.layers)
    assert all(type(m.self_attn) is mha.MultiheadAttention for m in ours.layers)
    x = torch.randn(N, S, E, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 2, 4])[:, None]
    with torch.no_grad():
        # The encoder turns right padding into nested tensors: its layers see no mask.
        torch.testing.assert_close(ours(x, src_key_padding_mask=kpm), theirs(x, src_key_padding_mask=kpm), **TOL64)
        causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=F64)
        torch.testing.assert_close(ours(x, mask=causal), theirs(x, mask=causal), **TOL64)
    back = mha.swap(ours, to="torch")
    assert all(type(m) is nn.TransformerEncoderLayer for m in back.layers)
    assert all(type(m.self_attn) is nn.MultiheadAttention for m in back.layers)


def test_scripted_layer_matches_eager():
    _, ours = _pair()
    x = torch.randn(N, S, E, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 2, 4])[:, None]
    scripted = torch.jit.script(ours)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kwargs in ({}, {"src_key_padding_mask": kpm}):
            torch.testing.assert_close(scripted(x, **kwargs), ours(x, **kwargs), **TOL64)


def test_compiled_layer_keeps_a_fully_padded_sequence_finite():
    """Traced by torch.compile the masks' values are not read, so a masked call cannot be
    checked for rows without a key: it runs through mha's attention, not torch's kernel."""
    _, ours = _pair()
    x = torch.randn(N, S, E, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 0, 3])[:, None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ours(x, src_key_padding_mask=kpm)
        got = torch.compile(ours, backend="eager")(x, src_key_padding_mask=kpm)
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected, **TOL64)


def test_float_masks_that_add_values_are_not_read_as_booleans_in_eval():
    """torch's fused kernel reads a float mask as booleans (nonzero = masked out): an added
    bias gave wrong outputs there, and a row of -1e9 NaN. Such calls run through mha's
    attention and give torch's standard path's result."""
    theirs, ours = _pair()
    x = torch.randn(N, S, E, dtype=F64, generator=torch.Generator().manual_seed(6))
    bias = torch.randn(S, S, dtype=F64, generator=torch.Generator().manual_seed(7))
    for kwargs in (
        {"src_mask": bias},
        {"src_mask": torch.full((S, S), -1e9, dtype=F64)},
        {"src_key_padding_mask": torch.randn(N, S, dtype=F64, generator=torch.Generator().manual_seed(8))},
    ):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                expected = theirs(x, **kwargs)  # torch's standard path
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        with torch.no_grad():
            got = ours(x, **kwargs)
        torch.testing.assert_close(got, expected, **TOL64)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_scripted_encoder_runs_its_nested_batches():
    """A scripted nn.TransformerEncoder (nested tensors enabled, as mha.swap leaves it) nests
    a right-padded batch in eval and its layers see no mask: mha's scripted layer runs torch's
    kernel on it, as torch's does (mha's scripted attention refused the nested tensor)."""
    torch.manual_seed(9)
    layer = mha.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True, dtype=F64)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(N, S, E, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 2, 4])[:, None]
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=kpm)
        got = torch.jit.script(encoder)(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(got, expected, **TOL64)
    # Without the biases the kernel needs, the layer still compiles (its encoder would not nest).
    torch.jit.script(mha.TransformerEncoderLayer(E, H, FF, batch_first=True, bias=False))


@pytest.mark.parametrize("case", ["sequence_first", "fastpath_disabled", "cuda_autocast"])
def test_masked_calls_torchs_kernel_would_not_serve_are_planned_once(monkeypatch, case):
    """Where torch's forward would not run its kernel (batch_first=False, torch's default,
    the fast path disabled, CUDA autocast) a masked call in eval goes straight to mha's path: planning it
    for the kernel first read the masks, and the attention planned them again (~10% of a
    small layer call)."""
    _, ours = _pair(batch_first=case != "sequence_first")
    x = torch.randn(S, N, E, dtype=F64) if case == "sequence_first" else torch.randn(N, S, E, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 2, 4])[:, None]
    plans: list[int] = []
    plan_forward = mha._encoder.plan_forward

    def spy(*args, **kwargs):
        plans.append(1)
        return plan_forward(*args, **kwargs)

    monkeypatch.setattr(mha._encoder, "plan_forward", spy)
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: case != "fastpath_disabled")
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: case == "cuda_autocast" and not device)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        ours(x, src_key_padding_mask=kpm)
    assert (plans, calls) == ([], [1])


def test_warnings_name_the_callers_line():
    """A pitfall warning from the attention inside the layer (in a TransformerEncoder, with a
    hook on the attention) names the line that called the model, not torch's _sa_block,
    which every layer of every model shares (the default filter then warned once for all)."""
    _, ours = _pair()
    encoder = nn.TransformerEncoder(ours, 2, enable_nested_tensor=False).eval()
    encoder.layers[0].self_attn.register_forward_hook(lambda *args: None)
    x = torch.randn(N, S, E, dtype=F64)
    kpm = torch.arange(S)[None, :] >= torch.tensor([S, 0, 4])[:, None]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours(x, src_key_padding_mask=kpm)
        encoder(x, src_key_padding_mask=kpm)
    assert len(caught) == 3
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]


def test_traced_layer_keeps_a_fully_padded_sequence_finite():
    """torch.jit.trace records one path: a masked call traced through torch's kernel (chosen
    from the example masks' values) gave NaN when replayed with a fully padded sequence.
    Traced masked calls record mha's attention, as the traced attention module does."""
    _, ours = _pair()
    x = torch.randn(N, S, E, dtype=F64)
    example = torch.arange(S)[None, :] >= torch.tensor([S, 2, 4])[:, None]
    padded = torch.arange(S)[None, :] >= torch.tensor([S, 0, 4])[:, None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ours, (x, torch.zeros(S, S, dtype=F64), example))
        expected = ours(x, src_key_padding_mask=padded)
        got = traced(x, torch.zeros(S, S, dtype=F64), padded)
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected, **TOL64)


@pytest.mark.parametrize("device", ["meta", "fake"])
def test_causal_call_in_eval_on_meta_or_fake_tensors_gives_torchs_shape(device):
    """In eval under no_grad, is_causal=True with the causal src_mask was compared to the
    standard causal mask before anything asked whether the mask's values can be read:
    aten::equal has no meta kernel (NotImplementedError) and a fake mask has no values
    (DataDependentOutputException). Torch's layer runs on both."""
    theirs, ours = _pair()
    kwargs = {"src_mask": nn.Transformer.generate_square_subsequent_mask(S, dtype=F64), "is_causal": True}
    x = torch.randn(N, S, E, dtype=F64)
    with torch.no_grad():
        if device == "meta":
            expected = theirs.to("meta")(x.to("meta"), **{**kwargs, "src_mask": kwargs["src_mask"].to("meta")})
            got = ours.to("meta")(x.to("meta"), **{**kwargs, "src_mask": kwargs["src_mask"].to("meta")})
            assert got.device.type == "meta"
        else:
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = {**kwargs, "src_mask": mode.from_tensor(kwargs["src_mask"])}
                expected = theirs(mode.from_tensor(x), **fake)
                got = ours(mode.from_tensor(x), **fake)
    assert got.shape == expected.shape


@pytest.mark.parametrize("pre_dispatch", [False, True])
@pytest.mark.parametrize("mode", ["real", "symbolic"])
def test_make_fx_graph_of_a_causal_call_in_eval_matches_torch(mode, pre_dispatch):
    """torch.fx.experimental.proxy_tensor.make_fx (under AOTAutograd and torch.func
    tooling) traces plain tensors in its "real" mode, whose values it refuses to read:
    the causal check's aten::equal raised there, and with symbolic sizes the mask cache
    was keyed on SymInts (TypeError). The graph now records mha's attention."""
    from torch.fx.experimental.proxy_tensor import make_fx

    theirs, ours = _pair()
    params = dict(ours.named_parameters())
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=F64)

    def call(params, x, mask):
        return torch.func.functional_call(ours, params, (x,), {"src_mask": mask, "is_causal": True})

    x = torch.randn(N, S, E, dtype=F64)
    with torch.no_grad():
        graph = make_fx(call, tracing_mode=mode, pre_dispatch=pre_dispatch)(params, x, causal)
        x = torch.randn(N, S, E, dtype=F64)
        torch.testing.assert_close(graph(params, x, causal), theirs(x, causal, is_causal=True), **TOL64)
