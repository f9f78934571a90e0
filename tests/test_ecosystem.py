"""mha in the ways the PyTorch ecosystem uses attention modules: torch.func transforms,
forward-mode AD, serialization, distributed training, each against torch's module."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, jvp, stack_module_state, vmap

import mha
from conftest import TOL, build_pair

E, H = 8, 2

MASKS = {
    "none": lambda: {},
    "padding": lambda: {"key_padding_mask": torch.tensor([False, False, False, True, True])},
    "causal": lambda: {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True},
    "per_head": lambda: {"average_attn_weights": False},
}


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("masks", list(MASKS))
def test_vmap_over_inputs(masks: str, grad: bool) -> None:
    """vmap over unbatched inputs, weights returned: torch's module runs there; mha's used
    to fail in ops with out= (which vmap does not batch)."""
    xs = torch.randn(3, 5, E)
    kwargs = MASKS[masks]()
    results = []
    with torch.set_grad_enabled(grad):
        for module in build_pair(E, H):
            results.append(_quiet(lambda m=module: vmap(lambda x, m=m: m(x, x, x, **kwargs))(xs)))
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])


@pytest.mark.parametrize("length", [5, 1])
def test_vmap_over_batched_masks(length: int) -> None:
    """Masks batched by vmap have no storage for mha to read its decisions from (right
    padding, the causal mask): they apply as tensors, as torch applies them."""
    xs = torch.randn(3, length, E)
    padding = torch.zeros(3, length, dtype=torch.bool)
    padding[1, length - 1 :] = length > 1
    causal = nn.Transformer.generate_square_subsequent_mask(length).expand(3, length, length).clone()
    results = []
    with torch.no_grad():
        for module in build_pair(E, H):
            run = vmap(lambda x, p, a, m=module: m(x, x, x, key_padding_mask=p, attn_mask=a))
            results.append(_quiet(lambda run=run: run(xs, padding, causal)))
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])


def test_vmap_one_position_without_autograd() -> None:
    """Self-attention over one position (the route without scores) under vmap."""
    xs = torch.randn(3, 1, E)
    with torch.no_grad():
        theirs, ours = (vmap(lambda x, m=m: m(x, x, x))(xs) for m in build_pair(E, H))
    torch.testing.assert_close(ours, theirs, **TOL[torch.float32])


def test_ensemble_with_stack_module_state() -> None:
    """The model-ensembling recipe: stacked parameters, vmap over functional_call."""
    x = torch.randn(5, 2, E)
    results = []
    for module in build_pair(E, H):
        members = [copy.deepcopy(module) for _ in range(3)]
        with torch.no_grad():
            for i, member in enumerate(members):
                for p in member.parameters():
                    p.add_(0.1 * i)
        params, buffers = stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")
        results.append(
            vmap(lambda p, b, x, base=base: functional_call(base, (p, b), (x, x, x)), in_dims=(0, 0, None))(
                params, buffers, x
            )
        )
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_forward_mode_ad(grad: bool) -> None:
    """torch.func.jvp, and forward AD with dual tensors (under no_grad too)."""
    x, tangent = torch.randn(5, 2, E), torch.randn(5, 2, E)
    results = []
    with torch.set_grad_enabled(grad):
        for module in build_pair(E, H):
            with forward_ad.dual_level():
                dual = forward_ad.make_dual(x, tangent)
                out, weights = module(dual, dual, dual)
                dual_out = forward_ad.unpack_dual(out)
                dual_weights = forward_ad.unpack_dual(weights)
            results.append(
                (
                    dual_out.primal, dual_out.tangent, dual_weights.primal, dual_weights.tangent,
                    jvp(lambda x, m=module: m(x, x, x)[0], (x,), (tangent,)),
                )
            )
    torch.testing.assert_close(results[1], results[0], **TOL[torch.float32])


def test_static_quantization_says_to_swap_back() -> None:
    """Eager-mode static quantization converts torch's attention to a quantized one (by exact
    type) and leaves mha's float: the quantized activations it then receives are refused
    with the fix, not with advice to cast to float."""
    import torch.ao.quantization as quantization

    class Wrapped(nn.Module):
        def __init__(self, attention: nn.Module) -> None:
            super().__init__()
            self.quant, self.attention, self.dequant = quantization.QuantStub(), attention, quantization.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            return self.dequant(self.attention(x, x, x)[0])

    engine = torch.backends.quantized.engine
    if engine == "none":
        pytest.skip("no quantized engine in this torch build")
    x = torch.randn(5, 2, E)
    theirs, ours = build_pair(E, H)
    for module in (theirs, ours):
        model = Wrapped(module).eval()
        model.qconfig = quantization.get_default_qconfig(engine)
        prepared = _quiet(lambda model=model: quantization.prepare(model))
        prepared(x)
        converted = _quiet(lambda prepared=prepared: quantization.convert(prepared))
        if module is theirs:
            assert converted(x).shape == x.shape
        else:
            with pytest.raises(TypeError, match=r"query is a quantized tensor .*mha\.swap\(model, to='torch'\)"):
                converted(x)


class _Blocks(nn.Module):
    """torch's attention and transformer layers as direct children, as models hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(E, H, batch_first=True)
        self.encoder_layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.decoder_layer = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True), 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        y = self.attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        y = self.encoder_layer(y, src_key_padding_mask=padding)
        y = self.decoder_layer(y, x, memory_key_padding_mask=padding)
        return self.decoder(y, x, tgt_is_causal=False)


def test_fx_symbolic_trace_records_the_modules_as_leaves() -> None:
    """torch.fx records torch.nn's modules as one call_module node each; mha's modules, traced
    into, would meet proxies where they check shapes and read masks. After mha.swap the
    trace holds the same nodes as before, and the graph gives the model's outputs."""
    torch.manual_seed(0)
    model = _Blocks().eval()
    x, padding = torch.randn(2, 5, E), torch.tensor([[False] * 5, [False, False, False, True, True]])
    nodes = [(n.op, n.target) for n in torch.fx.symbolic_trace(model).graph.nodes]
    mha.swap(model)
    traced = torch.fx.symbolic_trace(model)
    assert [(n.op, n.target) for n in traced.graph.nodes] == nodes
    torch.testing.assert_close(traced(x, padding), model(x, padding))


class _ConstantQuery(nn.Module):
    """Cross-attention from a constant query (a buffer: fx passes it as a tensor, not a proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(E, H, batch_first=True)
        self.register_buffer("query", torch.randn(2, 3, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.query, x, x, need_weights=False)[0]


def test_fx_records_a_call_whose_query_is_a_constant() -> None:
    """Only the key and value are proxies: the call is still one call_module node (mha's
    module checked the query alone, and its validation met the proxies)."""
    torch.manual_seed(0)
    model = mha.swap(_ConstantQuery())
    x = torch.randn(2, 5, E)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["attention"]
    torch.testing.assert_close(traced(x), model(x))


def test_fx_graph_of_a_swapped_model_runs_after_swapping_back() -> None:
    """The call_module nodes hold torch's arguments only (mha's cache= when given): the
    traced graph also runs torch's modules, after mha.swap(graph_module, to="torch")
    (it passed cache=None to them: TypeError)."""
    torch.manual_seed(0)
    model = mha.swap(_Blocks().eval())
    x, padding = torch.randn(2, 5, E), torch.tensor([[False] * 5, [False, False, False, True, True]])
    expected = model(x, padding)
    traced = mha.swap(torch.fx.symbolic_trace(model), to="torch")
    assert all(type(m).__module__.startswith("torch.") for m in traced.modules() if m is not traced)
    torch.testing.assert_close(traced(x, padding), expected)


def test_fsdp_size_based_policy_keeps_the_attention_whole_as_torchs() -> None:
    """FSDP's size_based_auto_wrap_policy never recurses into torch's attention (it is in the
    policy's FORCE_LEAF_MODULES): the forward reads out_proj's weight directly, and an FSDP
    unit of out_proj's own would leave it sharded there (torch's forward fails on the flat
    parameter's views; mha's calls the wrapped out_proj: test_distributed.py). mha's
    attention is kept whole the same way."""
    wrap = pytest.importorskip("torch.distributed.fsdp.wrap")
    policy = wrap.size_based_auto_wrap_policy
    theirs, ours = build_pair(E, H)
    for attention in (theirs, ours):
        assert not policy(attention, recurse=True, nonwrapped_numel=10**6, min_num_params=1)
    assert policy(nn.Sequential(nn.Linear(E, E)), recurse=True, nonwrapped_numel=10**6, min_num_params=1)


@pytest.mark.parametrize("pre_dispatch", [False, True])
@pytest.mark.parametrize("masks", ["causal", "float_causal", "padding_and_causal"])
def test_make_fx_real_mode_graph_runs_other_masks_like_torch(masks: str, pre_dispatch: bool) -> None:
    """make_fx in its "real" tracing mode (the default) sees plain tensors but refuses to
    read their values (aten::equal raised in the causal check) and bakes any it can read
    into the graph. mha reads no mask values there, as under torch.compile, so the graph
    serves other masks too. With ``pre_dispatch=True`` (export's pre-autograd graph) the
    tracing mode sits on the pre-dispatch mode stack, not the dispatch stack."""
    from torch.fx.experimental.proxy_tensor import make_fx

    theirs, ours = build_pair(E, H, batch_first=True)
    L = 5
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    other = torch.ones(L, L, dtype=torch.bool).triu(2)
    if masks == "float_causal":
        causal, other = (torch.zeros(L, L).masked_fill(m, float("-inf")) for m in (causal, other))
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    other_padding = torch.tensor([[False, True, True, True, True], [False] * 5])
    params = dict(ours.named_parameters())

    def call(module, params, q, attn_mask, key_padding_mask):
        kwargs = {"attn_mask": attn_mask}
        if masks == "padding_and_causal":
            kwargs["key_padding_mask"] = key_padding_mask
        return functional_call(module, params, (q, q, q), kwargs)

    q = torch.randn(2, L, E)
    graph = make_fx(lambda p, q, a, k: call(ours, p, q, a, k), pre_dispatch=pre_dispatch)(params, q, causal, padding)
    got = graph(params, q, other, other_padding)
    expected = call(theirs, dict(theirs.named_parameters()), q, other, other_padding)
    torch.testing.assert_close(got, expected)
