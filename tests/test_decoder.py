"""mha.TransformerDecoderLayer / TransformerDecoder: drop-ins for torch's, with caches,
and mha.swap on decoders (inside nn.Transformer too) and back."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import mha
from conftest import TOL, assert_same_layer

F64 = torch.float64
E, H, FF, N = 30, 5, 37, 3


def _pair(norm_first: bool = False, batch_first: bool = False, layers: int = 2):
    """torch's decoder and mha's with the same parameters (random biases), fp64, eval."""
    torch.manual_seed(0)
    kwargs = {"dim_feedforward": FF, "dropout": 0.0, "norm_first": norm_first, "batch_first": batch_first, "dtype": F64}
    theirs = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, **kwargs), layers, norm=nn.LayerNorm(E, dtype=F64))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = mha.TransformerDecoder(mha.TransformerDecoderLayer(E, H, **kwargs), layers, norm=nn.LayerNorm(E, dtype=F64))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


def _causal(L: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)


def test_same_constructor_parameters_and_state_dict_both_ways():
    ours = assert_same_layer(nn.TransformerDecoderLayer, mha.TransformerDecoderLayer, E, H, FF, norm_first=True, batch_first=True)
    assert isinstance(ours.self_attn, mha.MultiheadAttention)
    assert isinstance(ours.multihead_attn, mha.MultiheadAttention)


@pytest.mark.parametrize(("norm_first", "batch_first"), [(False, False), (True, True)])
def test_full_sequences_match_torch(norm_first, batch_first):
    theirs, ours = _pair(norm_first, batch_first)
    g = torch.Generator().manual_seed(2)
    shape = (N, 7, E) if batch_first else (7, N, E)
    tgt = torch.randn(*shape, generator=g, dtype=F64)
    memory = torch.randn(*((N, 11, E) if batch_first else (11, N, E)), generator=g, dtype=F64)
    kpm = torch.arange(11)[None, :] >= torch.tensor([11, 4, 9])[:, None]
    args = {"tgt_mask": _causal(7), "memory_key_padding_mask": kpm, "tgt_is_causal": True}
    torch.testing.assert_close(ours(tgt, memory, **args), theirs(tgt, memory, **args), **TOL[F64])


@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_steps_match_full_forward(norm_first):
    """A prompt of 3 tokens then single tokens: each output row equals torch's full
    causal forward over the whole target so far; memory is read once."""
    theirs, ours = _pair(norm_first)
    g = torch.Generator().manual_seed(3)
    tgt = torch.randn(8, N, E, generator=g, dtype=F64)
    memory = torch.randn(11, N, E, generator=g, dtype=F64)
    kpm = torch.rand(N, 11, generator=g) < 0.3
    cache = ours.new_cache(N, 9, memory_length=11)
    outs = [ours(tgt[:3], memory, memory_key_padding_mask=kpm, cache=cache)]
    for i in range(3, 8):
        # The memory is stored: what is passed after the first call is not read.
        outs.append(ours(tgt[i : i + 1], memory.new_full(memory.shape, float("nan")), cache=cache))
    ref = theirs(tgt, memory, tgt_mask=_causal(8), memory_key_padding_mask=kpm)
    torch.testing.assert_close(torch.cat(outs), ref, **TOL[F64])
    assert cache.lengths.tolist() == [8] * N


def test_ragged_prompts_and_reorder():
    """Right-padded prompts, then a beam-search reorder: each sequence matches torch on
    its own tokens."""
    theirs, ours = _pair()
    g = torch.Generator().manual_seed(4)
    prompt_lengths = [2, 4, 1]
    seqs = [torch.randn(p + 3, E, generator=g, dtype=F64) for p in prompt_lengths]
    memory = torch.randn(5, N, E, generator=g, dtype=F64)
    cache = ours.new_cache(N, 8, memory_length=5)
    prompt = torch.stack([torch.cat([s[:p], s.new_zeros(4 - p, E)]) for s, p in zip(seqs, prompt_lengths, strict=True)], 1)
    kpm = torch.arange(4)[None, :] >= torch.tensor(prompt_lengths)[:, None]
    out = ours(prompt, memory, tgt_key_padding_mask=kpm, cache=cache)
    outs = [[out[:p, n]] for n, p in enumerate(prompt_lengths)]
    x = torch.stack([s[p] for s, p in zip(seqs, prompt_lengths, strict=True)])[None]
    out = ours(x, memory, cache=cache)
    for n in range(N):
        outs[n].append(out[:, n])
    index = [1, 1, 0]
    cache.reorder(torch.tensor(index))
    seqs = [seqs[i][: prompt_lengths[i] + 1] for i in index]
    outs = [list(outs[i]) for i in index]
    memory = memory[:, index]
    extra = torch.randn(1, N, E, generator=g, dtype=F64)
    out = ours(extra, memory, cache=cache)
    for n in range(N):
        outs[n].append(out[:, n])
        full = torch.cat([seqs[n], extra[0, n : n + 1]])[:, None]
        ref = theirs(full, memory[:, n : n + 1], tgt_mask=_causal(len(full)))
        torch.testing.assert_close(torch.cat(outs[n]), ref[:, 0], **TOL[F64])


@pytest.mark.parametrize("layer", [False, True])
def test_memory_is_causal_with_a_cache_is_refused_not_ignored(layer):
    """Without a cache memory_is_causal=True masks the memory causally; with one it was
    dropped silently, so the cached output was that of another call."""
    _, ours = _pair()
    module = ours.layers[0] if layer else ours
    x = torch.ones(2, N, E, dtype=F64)
    cache = module.new_cache(N, 8)
    with pytest.raises(NotImplementedError, match="memory_is_causal=True is not supported"):
        module(x, x, memory_is_causal=True, cache=cache)
    lengths = cache.self_attn.lengths if layer else cache.lengths
    assert lengths.tolist() == [0] * N


def test_cache_errors():
    _, ours = _pair()
    x = torch.ones(2, N, E, dtype=F64)
    cache = ours.new_cache(N, 8)
    with pytest.raises(NotImplementedError, match="tgt_mask and memory_mask are not supported"):
        ours(x, x, tgt_mask=_causal(2), cache=cache)
    with pytest.raises(TypeError, match="one entry per layer"):
        ours(x, x, cache=cache.layers[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        ours.layers[0](x, x, cache=cache)  # type: ignore[arg-type]
    # A memory the cross-attention cache cannot take fails before the target is cached.
    memory = torch.ones(9, N, E, dtype=F64)
    with pytest.raises(ValueError, match=r"the memory has S=9 tokens, more than the cache's max_length=8; .*memory_length=9"):
        ours(x, memory, cache=cache)
    with pytest.raises(ValueError, match="the memory has N=2 sequences but the cache holds batch_size=3"):
        ours(x, memory[:4, :2], cache=cache)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(N, T\) = \(3, 4\)"):
        ours(x, memory[:4], memory_key_padding_mask=torch.zeros(N, 9, dtype=torch.bool), cache=cache)
    # The caches of a decoder of another width name the module and the fix.
    other = mha.TransformerDecoder(mha.TransformerDecoderLayer(E, 3, dtype=F64), 2).new_cache(N, 8)
    with pytest.raises(ValueError, match=r"num_heads=3, head_dim=10.* not made for this module .* new_cache"):
        ours(x, memory[:4], cache=other)
    assert other.lengths.tolist() == [0] * N
    assert cache.lengths.tolist() == [0] * N
    ours(x, memory[:4], cache=cache)
    assert cache.lengths.tolist() == [2] * N


def _layer_states(cache) -> list[torch.Tensor | bool | None]:
    """Everything a decoder cache holds: per layer, both caches' lengths and buffers, the
    stored padding mask and whether the memory is stored."""
    out: list[torch.Tensor | bool | None] = []
    for layer in cache.layers:
        for kv in (layer.self_attn, layer.cross_attn):
            out += [kv.lengths.clone(), kv.key.clone(), kv.value.clone(), kv.key_padding_mask]
        out.append(layer.memory_stored)
    return out


def _assert_same(before: list, after: list) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a is b


@pytest.mark.parametrize("norm_first", [False, True])
def test_memory_of_another_dtype_fails_before_the_cache_is_written(norm_first):
    """A float32 memory for a float64 decoder: torch's full forward raises (in F.linear), so
    does mha's; with a cache the call raises naming memory, its dtype and the fix before
    the self-attention cache is written."""
    theirs, ours = _pair(norm_first)
    tgt, memory = torch.ones(2, N, E, dtype=F64), torch.ones(5, N, E)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        theirs(tgt, memory)
    with pytest.raises(TypeError, match=r"torch\.float64, key torch\.float32"):
        ours(tgt, memory)
    cache = ours.new_cache(N, 8, memory_length=5)
    before = _layer_states(cache)
    match = r"memory has dtype torch.float32 but the layer's parameters are torch.float64; pass memory.to\(torch.float64\)"
    with pytest.raises(TypeError, match=match):
        ours(tgt, memory, cache=cache)
    with pytest.raises(TypeError, match=match):
        ours.layers[0](tgt, memory, cache=cache.layers[0])
    with pytest.raises(ValueError, match=r"memory is on meta but the layer's parameters on cpu; pass memory\.to\('cpu'\)"):
        ours(tgt, memory.double().to("meta"), cache=cache)
    _assert_same(before, _layer_states(cache))
    torch.testing.assert_close(ours(tgt, memory.double(), cache=cache), theirs(tgt, memory.double(), tgt_mask=_causal(2)), **TOL[F64])


def _decoding(ours, steps: int = 2):
    """A cache after a prompt of 2 tokens and ``steps`` more, the memory padded, and the
    next token."""
    g = torch.Generator().manual_seed(9)
    memory = torch.randn(5, N, E, generator=g, dtype=F64)
    padding = torch.arange(5)[None, :] >= torch.tensor([5, 2, 4])[:, None]
    cache = ours.new_cache(N, 8, memory_length=5)
    ours(torch.randn(2, N, E, generator=g, dtype=F64), memory, memory_key_padding_mask=padding, cache=cache)
    for _ in range(steps):
        ours(torch.randn(1, N, E, generator=g, dtype=F64), memory, cache=cache)
    return cache, torch.randn(1, N, E, generator=g, dtype=F64), memory


def test_a_layer_whose_memory_cache_was_emptied_fails_before_writing():
    """A cross-attention cache emptied by hand (its LayerCache still says the memory is
    stored) fails, naming the fix, before any self-attention cache is written."""
    _, ours = _pair()
    cache, x, memory = _decoding(ours)
    cache.layers[1].cross_attn.reset()
    before = _layer_states(cache)
    with pytest.raises(ValueError, match=r"is empty: .*reset\(\) the LayerCache"):
        ours(x, memory, cache=cache)
    with pytest.raises(ValueError, match=r"is empty: .*reset\(\) the LayerCache"):
        ours.layers[1](x, memory, cache=cache.layers[1])
    _assert_same(before, _layer_states(cache))


def test_a_decoder_step_checks_each_layer_once(monkeypatch):
    """The decoder checks every layer's step before the first write, and the layers do
    not check again (a step's Python is what a decode step costs beyond its products);
    a layer called alone still checks itself, also after a decoder step that raised."""
    _, ours = _pair(layers=3)
    cache, x, memory = _decoding(ours)
    checked = []
    original = mha.TransformerDecoderLayer._check_cached

    def spy(self, *args):
        checked.append(self)
        return original(self, *args)

    monkeypatch.setattr(mha.TransformerDecoderLayer, "_check_cached", spy)
    ours(x, memory, cache=cache)
    assert checked == list(ours.layers)
    checked.clear()
    ours.layers[0](x, memory, cache=cache.layers[0])
    assert checked == [ours.layers[0]]
    # A step whose layer raises while running leaves no later layer marked as checked.
    monkeypatch.setattr(mha.TransformerDecoderLayer, "_ff_block", lambda self, x: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ours(x, memory, cache=cache)
    assert not any(layer_cache._checked_for_step for layer_cache in cache.layers)


def test_a_layer_cache_of_another_batch_fails_before_any_layer_writes():
    """Layer caches that disagree (one reordered alone): the decoder checks every layer
    before the first writes, so the failure leaves every layer's cache as it was."""
    _, ours = _pair()
    cache, x, memory = _decoding(ours)
    cache.layers[1].reorder(torch.tensor([0, 2]))
    before = _layer_states(cache)
    with pytest.raises(ValueError, match="tgt holds N=3 sequences but the layer's self-attention cache holds batch_size=2"):
        ours(x, memory, cache=cache)
    _assert_same(before, _layer_states(cache))
    # A torch layer (no cache= route) after an mha one: also found before the first writes.
    cache, x, memory = _decoding(ours)
    ours.layers[1] = nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, dtype=F64)
    before = _layer_states(cache)
    with pytest.raises(TypeError, match=r"layers\[1\] is a torch.nn.modules.transformer.TransformerDecoderLayer, not an mha"):
        ours(x, memory, cache=cache)
    _assert_same(before, _layer_states(cache))


def test_a_layer_cache_with_less_room_fails_before_any_layer_writes():
    """Layer caches built by hand with different max_length: the step that fits the first
    layer's cache and not a later one's fails before the first layer writes (a decoder
    whose caches disagree would otherwise hold the step in some layers only). With right
    padding that leaves room, the step runs."""
    _, ours = _pair()
    layers = [layer.new_cache(N, length, memory_length=11) for layer, length in zip(ours.layers, (8, 5), strict=True)]
    cache = mha.DecoderCache(layers)
    g = torch.Generator().manual_seed(7)
    memory = torch.randn(11, N, E, generator=g, dtype=F64)
    ours(torch.randn(4, N, E, generator=g, dtype=F64), memory, cache=cache)
    before = _layer_states(cache)
    x = torch.randn(2, N, E, generator=g, dtype=F64)
    with pytest.raises(ValueError, match=r"goes past max_length=5"):
        ours(x, memory, cache=cache)
    _assert_same(before, _layer_states(cache))
    # One real token per sequence (the second is padding) fits both layers' caches.
    padding = torch.tensor([[False, True]] * N)
    ours(x, memory, tgt_key_padding_mask=padding, cache=cache)
    assert cache.lengths.tolist() == [5] * N


def test_forced_backend_refusing_the_memory_attention_fails_before_writing(monkeypatch):
    """A forced backend that serves a step's self-attention but not its cross-attention
    (SDPA on CUDA takes no masks, and the stored memory is padded; emulated on CPU)
    raises before the self-attention cache of any layer is written."""
    import dataclasses

    from mha._backends import sdpa

    _, ours = _pair()
    cache, x, memory = _decoding(ours)
    monkeypatch.setattr(sdpa.BACKEND, "caps", dataclasses.replace(sdpa.CAPABILITIES, masked_devices=frozenset()))
    before = _layer_states(cache)
    with mha.use_backend("sdpa"), pytest.raises(NotImplementedError, match="SDPA takes masks only on"):
        ours(x, memory, cache=cache)
    _assert_same(before, _layer_states(cache))
    with mha.use_backend("sdpa"), pytest.raises(NotImplementedError, match="SDPA takes masks only on"):
        ours.layers[0](x, memory, cache=cache.layers[0])
    _assert_same(before, _layer_states(cache))


def _transformer(dtype=F64, random_biases=True):
    torch.manual_seed(5)
    with warnings.catch_warnings():  # torch's note that its nested-tensor fast path needs batch_first
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Transformer(
            d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF, dropout=0.0,
            dtype=dtype,
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if random_biases and "attn" in name and "bias" in name:
                p.normal_()
    return model.eval()


def test_swap_converts_decoders_inside_transformer_and_back():
    model = _transformer()
    reference = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(6)
    src, tgt = torch.randn(9, N, E, generator=g, dtype=F64), torch.randn(6, N, E, generator=g, dtype=F64)
    ref = reference(src, tgt, tgt_mask=_causal(6))

    model = mha.swap(model)
    assert type(model.decoder) is mha.TransformerDecoder
    assert all(type(layer) is mha.TransformerDecoderLayer for layer in model.decoder.layers)
    assert all(type(layer.self_attn) is mha.MultiheadAttention for layer in model.decoder.layers)
    assert type(model.encoder.layers[0].self_attn) is mha.MultiheadAttention
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.testing.assert_close(model(src, tgt, tgt_mask=_causal(6)), ref, **TOL[F64])

    model = mha.swap(model, to="torch")
    assert type(model.decoder) is nn.TransformerDecoder
    assert type(model.decoder.layers[0]) is nn.TransformerDecoderLayer
    assert type(model.decoder.layers[0].multihead_attn) is nn.MultiheadAttention
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.testing.assert_close(model(src, tgt, tgt_mask=_causal(6)), ref, **TOL[F64])
    # A bare layer converts too.
    assert type(mha.swap(nn.TransformerDecoderLayer(E, H))) is mha.TransformerDecoderLayer


def _greedy_torch(model, embed, head, src, bos, steps):
    """Greedy decoding with torch, recomputing the whole prefix each step. ``embed``
    maps tokens ``(T, N)`` and their first position to ``(T, N, E)``."""
    memory = model.encoder(src)
    tokens = bos[None]
    for _ in range(steps):
        out = model.decoder(embed(tokens, 0), memory, tgt_mask=_causal(len(tokens)))
        tokens = torch.cat([tokens, head(out[-1]).argmax(-1)[None]])
    return tokens


def _greedy_cached(model, embed, head, src, bos, steps):
    """Greedy decoding with mha's decoder cache: one new token per step."""
    memory = model.encoder(src)
    cache = model.decoder.new_cache(src.shape[1], steps, memory_length=len(src))
    tokens = bos[None]
    for _ in range(steps):
        out = model.decoder(embed(tokens[-1:], len(tokens) - 1), memory, cache=cache)
        tokens = torch.cat([tokens, head(out[-1]).argmax(-1)[None]])
    return tokens


def test_greedy_decoding_after_swap_gives_torch_tokens():
    model = _transformer(random_biases=False)
    torch.manual_seed(7)
    table, positions, head = nn.Embedding(13, E, dtype=F64), torch.randn(13, 1, E, dtype=F64), nn.Linear(E, 13, dtype=F64)

    with torch.no_grad():
        head.weight.normal_()
        head.bias.zero_()

    def embed(tokens, start):
        return table(tokens) + positions[start : start + len(tokens)]

    g = torch.Generator().manual_seed(8)
    src = torch.randn(9, N, E, generator=g, dtype=F64)
    bos = torch.tensor([0, 5, 11])
    with torch.no_grad():
        expected = _greedy_torch(model, embed, head, src, bos, 12)
        tokens = _greedy_cached(mha.swap(model), embed, head, src, bos, 12)
    assert torch.equal(tokens, expected)
    assert len(set(expected.flatten().tolist())) > 5  # not one token repeated


def test_scripted_transformer_after_swap_matches_eager():
    """torch's nn.Transformer scripts; after mha.swap (mha's decoder and decoder layers,
    whose cache= route TorchScript leaves out) it still does, with the same outputs."""
    torch.manual_seed(0)
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dropout=0.0)
    mha.swap(model).eval()
    scripted = torch.jit.script(model)
    src, tgt = torch.randn(5, 2, 16), torch.randn(4, 2, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(4)
    torch.testing.assert_close(scripted(src, tgt, tgt_mask=mask), model(src, tgt, tgt_mask=mask))


def test_hot_paths_read_submodules_and_parameters_from_the_registries(monkeypatch):
    """mha's own code on a decode step and on a dense self-attention call never goes
    through nn.Module.__getattr__ (a failed attribute lookup, then the registries: ~10 us
    each between kernels on the development machine, where tight loops show 0.5 us)."""
    _, ours = _pair(layers=2)
    cache, x, memory = _decoding(ours)
    attention = mha.MultiheadAttention(E, H, dtype=F64).eval()
    y = torch.randn(4, N, E, dtype=F64)
    callers = []
    original = nn.Module.__getattr__

    def spy(self, name):
        caller = sys._getframe(1).f_code.co_filename
        if f"{os.sep}mha{os.sep}" in caller:
            callers.append((type(self).__name__, name, caller))
        return original(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", spy)
    with torch.no_grad():
        ours(x, memory, cache=cache)
        attention(y, y, y, is_causal=True, attn_mask=nn.Transformer.generate_square_subsequent_mask(4, dtype=F64))
    assert callers == []
