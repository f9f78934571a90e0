"""GPU benchmark and check of the triton backend. ``bash
benchmarks/gpu_all.sh`` runs every section in about 3 minutes on one H100
(checks in parallel processes); one section at a time::

    python benchmarks/gpu.py --sections check      # compiled kernels against the reference only
    python benchmarks/gpu.py --sections dense --lengths 1024 8192 --head-dims 128

Sections:

* ``check``: the compiled kernels (not the interpreter) against the fp64
  reference, every mask kind, fp16/bf16/fp32, forward, lse, weights, gradients
  (through the output and the averaged weights); error at most twice plain
  torch's in the same dtype.
* ``module``: ``mha.MultiheadAttention`` against ``torch.nn.MultiheadAttention``
  on CUDA in fp32, torch's fp64 module as the exact answer.
* ``tune``: the dense kernels at L = 8192 under other tile sizes.
* ``profile``: wall time against kernel time per call, host syncs, the top
  ops and the host's own time, for the jagged, padded, module and dense paths.
* ``dense``: bf16 forward TFLOP/s, head dims 64/128, L from 1k to 16k at a fixed
  number of tokens: the Triton forward alone, ``mha.attention`` through dispatch,
  SDPA's flash, cuDNN and efficient backends, FlexAttention (where it imports),
  and the modules ``mha.MultiheadAttention`` / ``torch.nn.MultiheadAttention``
  (their time includes the projections; TFLOP/s count attention only).
* ``train``: forward + backward, Triton against SDPA flash.
* ``varlen``: right-padded batch with causal masks (useful FLOPs only): mha
  (Triton), FlexAttention with the same mask, SDPA with a boolean mask, jagged
  nested tensors through mha, and the modules with ``key_padding_mask``.
* ``weights``: ``need_weights=True`` averaged, mha against torch's module, time
  and peak memory in inference, and the time of a training step whose loss
  takes the output and the weights (the fused backward of the weights).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import warnings

SECTIONS = ("check", "module", "tune", "profile", "dense", "train", "varlen", "weights")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run (default: all)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384], help="sequence lengths L = S")
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], help="head dims D")
    p.add_argument("--tokens", type=int, default=16384, help="N * L for dense cases (N = tokens // L)")
    p.add_argument("--width", type=int, default=2048, help="H * D: heads = width // D")
    p.add_argument("--rep", type=int, default=40, help="milliseconds of timed repetitions per measurement")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    p.add_argument("--check-cases", nargs="+", type=int, help="indices of the check cases to run (default: all); "
                   "separate processes can split them, as compiling dominates")
    return p.parse_args(argv)


def _bench(rep: int, fn, *args, **kwargs) -> float | None:
    """Median milliseconds of ``fn(*args, **kwargs)``, or None (with the reason printed) if it fails."""
    from triton.testing import do_bench

    try:
        return do_bench(functools.partial(fn, *args, **kwargs), warmup=10, rep=rep, return_mode="median")
    except Exception as e:  # a backend that cannot run this shape is reported, not fatal
        print(f"      ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return None


def _row(name: str, ms: float | None, flops: float, base: float | None) -> None:
    if ms is None:
        print(f"    {name:<34} {'n/a':>9}")
        return
    tflops = flops / ms / 1e9
    speed = f"{base / ms:6.2f}x" if base else ""
    print(f"    {name:<34} {ms:8.3f} ms {tflops:8.1f} TFLOP/s  {speed}")


def _flex():
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention), create_block_mask


def _sdpa_with(backend_name: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, **kw):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return run


def _modules(E: int, H: int):
    import torch
    from torch import nn

    import mha

    theirs = nn.MultiheadAttention(E, H, batch_first=True, device="cuda", dtype=torch.bfloat16).eval()
    ours = mha.MultiheadAttention(E, H, batch_first=True, device="cuda", dtype=torch.bfloat16).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def dense(args) -> None:
    import torch

    import mha
    from mha._backends import triton as tb

    flex = None if args.no_flex else _flex()
    print("\n== dense bf16 forward (speed-up vs SDPA's best backend) ==")
    for D in args.head_dims:
        H = args.width // D
        for L in args.lengths:
            N = max(1, args.tokens // L)
            q, k, v = (torch.randn(N, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * N * H * L * L * D
            print(f"  D={D} L={L} N={N} H={H}")
            sdpa = {name: _bench(args.rep, _sdpa_with(name), q, k, v) for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")}
            best = min((t for t in sdpa.values() if t is not None), default=None)
            scale = D**-0.5
            _row("triton forward alone", _bench(args.rep, tb.attention_fwd, q, k, v, None, None, None, scale, None, None), flops, best)
            _row("mha.attention (dispatch)", _bench(args.rep, mha.attention, q, k, v), flops, best)
            for name, ms in sdpa.items():
                _row(f"sdpa {name.split('_')[0].lower()}", ms, flops, best)
            if flex is not None:
                _row("flex_attention", _bench(args.rep, flex[0], q, k, v), flops, best)
            ours, theirs = _modules(H * D, H)
            x = torch.randn(N, L, H * D, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                _row("mha.MultiheadAttention (module)", _bench(args.rep, ours, x, x, x, need_weights=False), flops, best)
                _row("nn.MultiheadAttention (module)", _bench(args.rep, theirs, x, x, x, need_weights=False), flops, best)


def _step(dout, fn, *args):
    fn(*args).backward(dout)


def _triton_out(q, k, v):
    from mha._backends import triton as tb

    return tb.attention_fwd(q, k, v, None, None, None, q.shape[-1] ** -0.5, None, None)[0]


def _causal_padding_mod(lengths):
    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (kj < lengths[b])

    return mask_mod


def train(args) -> None:
    import torch

    print("\n== forward + backward bf16 (speed-up vs SDPA flash) ==")
    flash = _sdpa_with("FLASH_ATTENTION")
    for D in args.head_dims:
        H = args.width // D
        for L in [n for n in args.lengths if n in (4096, 16384)] or args.lengths[:1]:
            N = max(1, args.tokens // L)
            q, k, v = (torch.randn(N, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            dout = torch.randn(N, H, L, D, device="cuda", dtype=torch.bfloat16)
            flops = 4 * N * H * L * L * D * 3.5  # forward + backward (2.5x forward)
            print(f"  D={D} L={L} N={N} H={H}")

            base = _bench(args.rep, _step, dout, flash, q, k, v)
            _row("sdpa flash", base, flops, base)
            _row("triton", _bench(args.rep, _step, dout, _triton_out, q, k, v), flops, base)


def varlen(args) -> None:
    import torch

    import mha
    from mha.masks import Causal, KeyPadding

    print("\n== right padding + causal, bf16 forward (useful FLOPs; speed-up vs nn.MultiheadAttention) ==")
    flex = None if args.no_flex else _flex()
    for D in args.head_dims:
        H = args.width // D
        for L in [n for n in args.lengths if n <= 8192]:
            N = max(2, args.tokens // L)
            g = torch.Generator().manual_seed(0)
            lengths = torch.randint(L // 4, L + 1, (N,), generator=g).cuda()
            q, k, v = (torch.randn(N, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            pairs = sum(int(torch.clamp(torch.arange(1, L + 1), max=n).sum()) for n in lengths.tolist())
            flops = 4 * H * D * pairs
            print(f"  D={D} L={L} N={N} H={H} lengths {lengths.min().item()}..{lengths.max().item()}")
            ours_m, theirs_m = _modules(H * D, H)
            x = torch.randn(N, L, H * D, device="cuda", dtype=torch.bfloat16)
            pad = torch.arange(L, device="cuda")[None, :] >= lengths[:, None]
            causal = torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)
            with torch.inference_mode():
                base = _bench(args.rep, theirs_m, x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)
                _row("nn.MultiheadAttention (module)", base, flops, base)
                _row("mha.MultiheadAttention (module)", _bench(args.rep, ours_m, x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False), flops, base)
            mask = Causal() & KeyPadding(lengths)
            _row("mha.attention (triton)", _bench(args.rep, mha.attention, q, k, v, mask), flops, base)
            allowed = (~pad)[:, None, None, :] & ~causal
            _row("sdpa bool mask", _bench(args.rep, torch.nn.functional.scaled_dot_product_attention, q, k, v, attn_mask=allowed), flops, base)
            if flex is not None:
                block_mask = flex[1](_causal_padding_mod(lengths), N, None, L, L, device="cuda")
                _row("flex_attention (same mask)", _bench(args.rep, flex[0], q, k, v, block_mask=block_mask), flops, base)
            seqs = [torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16) for n in lengths.tolist()]
            nq = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
            _row("mha.attention jagged (causal)", _bench(args.rep, mha.attention, nq, nq, nq, Causal()), flops, base)


def weights(args) -> None:
    import torch

    print("\n== need_weights=True averaged, bf16 modules (speed-up vs nn.MultiheadAttention) ==")
    E, H = 1024, 16
    for L in [n for n in args.lengths if n <= 8192]:
        N = max(1, 8192 // L)
        ours, theirs = _modules(E, H)
        x = torch.randn(N, L, E, device="cuda", dtype=torch.bfloat16)
        flops = 4 * N * H * L * L * (E // H) * 1.5  # forward + weights recompute (QK^T again)
        print(f"  L={L} N={N} H={H} E={E}: weights (N, L, S) = {N * L * L * 2 / 2**20:.0f} MiB")
        results = {}
        with torch.inference_mode():
            for name, module in (("nn.MultiheadAttention", theirs), ("mha.MultiheadAttention", ours)):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                try:
                    module(x, x, x, need_weights=True)
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                except torch.cuda.OutOfMemoryError:
                    peak = math.nan
                results[name] = (_bench(args.rep, module, x, x, x, need_weights=True), peak)
        base = results["nn.MultiheadAttention"][0]
        for name, (ms, peak) in results.items():
            _row(name, ms, flops, base)
            print(f"    {'':<34} peak extra memory {peak:8.0f} MiB")
        print("    training step: forward + backward through the output and the averaged weights")
        xt = x.clone().requires_grad_()
        base = _bench(args.rep, _weights_step, theirs, xt)
        _row("nn.MultiheadAttention", base, flops * 3, base)
        _row("mha.MultiheadAttention", _bench(args.rep, _weights_step, ours, xt), flops * 3, base)


def _weights_step(module, x):
    """One training step of a loss on both the output and the averaged weights."""
    out, w = module(x, x, x, need_weights=True)
    (out.float().square().mean() + w.float().square().sum()).backward()


def _plain(q, k, v, mask):
    """Attention in plain torch ops in the inputs' dtype: the rounding yardstick."""
    import torch

    N, Hq, L, Dk = q.shape
    S = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * Dk**-0.5
    if mask is not None:
        s = s + mask.materialize(N, Hq, L, S, device=q.device, dtype=q.dtype)
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return torch.matmul(p, v), lse, p


def check(selected: list[int] | None = None) -> bool:
    """The compiled kernels against fp64, every mask kind, three dtypes; True if all pass."""
    import torch

    import mha
    from mha.masks import Allowed, Bias, Blocked, Causal, KeyPadding, Window

    print("\n== check: compiled Triton kernels vs fp64 (error <= 2x plain torch's + 1 ulp) ==")
    N, Hq, Hkv, L, S = 3, 6, 2, 97, 257
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    masks = {
        "none": None,
        "causal": Causal(),
        "causal_bottom_right": Causal("bottom_right"),
        "window_padding": Window(31, 7) & KeyPadding(torch.tensor([0, 100, 257], device=dev)),
        "allowed_blocked": Allowed(torch.rand(N, 1, L, S, generator=g, device=dev) < 0.8)
        & Blocked(torch.rand(S, generator=g, device=dev) < 0.2),
        "causal_padding_bias": Causal("bottom_right")
        & KeyPadding(torch.tensor([50, 200, 257], device=dev))
        & Bias(torch.randn(1, Hq, L, S, generator=g, device=dev)),
    }
    # Each (dims, dtype, mask kind) compiles four kernels: a few dozen compiles in all.
    cases = [
        ((64, 64), torch.bfloat16, list(masks)),
        ((128, 128), torch.bfloat16, list(masks)),
        ((128, 128), torch.float16, ["causal", "causal_padding_bias"]),
        ((40, 80), torch.float32, list(masks)),
        ((96, 96), torch.float16, ["window_padding"]),
        ((256, 256), torch.bfloat16, ["causal_padding_bias"]),
    ]
    if selected is not None:
        cases = [cases[i] for i in selected]
    ok = True
    for (Dk, Dv), dtype, names in cases:
        base = [torch.randn(shape, generator=g, device=dev, dtype=torch.float64) for shape in ((N, Hq, L, Dk), (N, Hkv, S, Dk), (N, Hkv, S, Dv))]
        dout = torch.randn(N, Hq, L, Dv, generator=g, device=dev, dtype=torch.float64)
        dw = torch.randn(N, L, S, generator=g, device=dev, dtype=torch.float64)
        for name in names:
            mask = masks[name]
            worst = 0.0
            res = {}
            for kind, dt in (("exact", torch.float64), ("plain", dtype), ("triton", dtype)):
                q, k, v = (t.to(dt).requires_grad_() for t in base)
                if kind == "triton":
                    out, w, lse = mha.attention(q, k, v, mask, weights="mean", return_lse=True, backend="triton")
                else:
                    out, lse, p = _plain(q, k, v, mask)
                    w = p.mean(dim=1)
                # the gradients flow through the output and the averaged weights
                loss = (out * dout.to(dt)).sum() + (w * dw.to(dt)).sum()
                grads = torch.autograd.grad(loss, (q, k, v))
                res[kind] = [t.detach() for t in (out, lse, w, *grads)]
            for got, exact, plain in zip(res["triton"], res["exact"], res["plain"], strict=True):
                finite = torch.isfinite(exact)
                if not finite.any():
                    continue
                err = (got.double() - exact)[finite].abs().max().item()
                ref = (plain.double() - exact)[finite].abs().max().item()
                ulp = torch.finfo(dtype).eps * max(1.0, exact[finite].abs().max().item())
                worst = max(worst, err / (2 * ref + ulp))
            passed = worst <= 1.0
            ok &= passed
            print(f"  {'PASS' if passed else 'FAIL'} D=({Dk},{Dv}) {str(dtype)[6:]:<9} {name:<20} worst error / budget {worst:.2f}")
    return ok


def _counting(backend):
    """Wrap ``backend.forward`` to count the calls it serves; returns the counter."""
    calls = [0]
    forward = backend.forward

    def counted(call):
        calls[0] += 1
        return forward(call)

    backend.forward = counted
    return calls


def module() -> bool:
    """The drop-in on CUDA: mha.MultiheadAttention against torch.nn.MultiheadAttention
    (same weights) in fp32, torch's fp64 module as the exact answer; True if all pass."""
    import torch
    from torch import nn

    import mha
    from mha._backends import triton as tb

    print("\n== module: mha.MultiheadAttention vs nn.MultiheadAttention on CUDA, fp32 (error <= 2x torch fp32's + 1 ulp vs torch fp64) ==")
    served = _counting(tb.BACKEND)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(1)
    N, L, S, E, H = 3, 37, 53, 64, 4
    lengths = torch.tensor([53, 20, 1], device=dev)
    kpm = torch.arange(S, device=dev)[None] >= lengths[:, None]
    causal = torch.ones(L, S, dtype=torch.bool, device=dev).triu(1)
    cases = {
        "no mask": {},
        "key_padding_mask": {"key_padding_mask": kpm},
        "kpm + causal bool": {"key_padding_mask": kpm, "attn_mask": causal},
        "float attn_mask (N*H, L, S)": {"attn_mask": torch.randn(N * H, L, S, generator=g, device=dev)},
        "float kpm + bool attn_mask": {"key_padding_mask": torch.zeros(N, S, device=dev).masked_fill(kpm, float("-inf")), "attn_mask": causal},
    }
    ok = True
    for kdim in (None, 48):
        ref = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=True, device=dev, dtype=torch.float64)
        x = [torch.randn(N, n, d, generator=g, device=dev, dtype=torch.float64) for n, d in ((L, E), (S, kdim or E), (S, kdim or E))]
        dout = torch.randn(N, L, E, generator=g, device=dev, dtype=torch.float64)
        for name, kwargs in cases.items():
            for need_weights, average in ((False, True), (True, True), (True, False)):
                results = {}
                for kind, cls, dt in (("exact", nn.MultiheadAttention, torch.float64), ("plain", nn.MultiheadAttention, torch.float32), ("mha", mha.MultiheadAttention, torch.float32)):
                    m = cls(E, H, kdim=kdim, vdim=kdim, batch_first=True, device=dev, dtype=dt)
                    m.load_state_dict(ref.state_dict())
                    kw = {key: (t.to(dt) if t.is_floating_point() else t) for key, t in kwargs.items()}
                    inputs = [t.to(dt).requires_grad_(not need_weights) for t in x]
                    with torch.set_grad_enabled(not need_weights), warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # torch's on the float/bool mask mix
                        out, w = m(*inputs, need_weights=need_weights, average_attn_weights=average, **kw)
                    tensors = [out.detach()] + ([w] if need_weights else [])
                    if not need_weights:
                        params = [p for p in m.parameters() if p.requires_grad]
                        tensors += [t for t in torch.autograd.grad(out, inputs + params, dout.to(dt)) if t is not None]
                    results[kind] = tensors
                worst = 0.0
                for got, exact, plain in zip(results["mha"], results["exact"], results["plain"], strict=True):
                    if not torch.isfinite(got).all():
                        worst = float("inf")
                        break
                    err = (got.double() - exact).abs().max().item()
                    budget = 2 * (plain.double() - exact).abs().max().item() + torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())
                    worst = max(worst, err / budget)
                passed = worst <= 1.0
                ok &= passed
                what = "grads" if not need_weights else ("weights mean" if average else "weights per head")
                print(f"  {'PASS' if passed else 'FAIL'} kdim={kdim} {name:<28} {what:<16} worst error / budget {worst:.2f}")
    m = mha.MultiheadAttention(E, H, batch_first=True, device=dev)
    torch.nn.init.normal_(m.out_proj.bias)
    q = torch.randn(N, L, E, device=dev, requires_grad=True)
    empty = torch.ones(N, S, dtype=torch.bool, device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that every key is padded is the point here
        out, w = m(q, torch.randn(N, S, E, device=dev), torch.randn(N, S, E, device=dev), key_padding_mask=empty)
    out.sum().backward()
    zero = bool((out == m.out_proj.bias).all() and (w == 0).all() and torch.isfinite(q.grad).all())
    ok &= zero
    print(f"  {'PASS' if zero else 'FAIL'} every key padded: output is out_proj's bias, weights 0, gradients finite")
    used = served[0] > 0  # the weights calls at least must reach it on CUDA
    print(f"  {'PASS' if used else 'FAIL'} the triton backend served {served[0]} calls")
    return ok and used


# Forward tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, and backward tiles.
_TUNE_FWD = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
}
_TUNE_BWD = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]


def tune(args) -> None:
    """Time the dense bf16 kernels at L = 8192 under other tile sizes than ``_blocks`` picks."""
    import torch

    from mha._backends import _triton_kernels as tk
    from mha._backends import triton as tb

    print("\n== tune: bf16 dense L=8192, tiles (BLOCK_M, BLOCK_N, warps, stages); speed-up vs the default tiles ==")
    default = tk._blocks
    L = 8192
    try:
        for D in args.head_dims:
            H = args.width // D
            N = max(1, args.tokens // L)
            q, k, v = (torch.randn(N, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            dout = torch.randn_like(q)
            flops = 4 * N * H * L * L * D
            print(f"  forward D={D} N={N} H={H}, default {default(D, D, torch.bfloat16, False)}")
            base = _bench(args.rep, tb.attention_fwd, q, k, v, None, None, None, D**-0.5, None, None)
            _row("default", base, flops, base)
            for bm, bn, w, st in _TUNE_FWD.get(D, []):
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                tk._blocks = lambda dk, dv, dtype, backward, cfg=cfg: cfg
                _row(f"{bm} {bn} {w} {st}", _bench(args.rep, tb.attention_fwd, q, k, v, None, None, None, D**-0.5, None, None), flops, base)
            tk._blocks = default
            print(f"  forward + backward D={D}, default backward {default(D, D, torch.bfloat16, True)}")
            base = _bench(args.rep, _step, dout, _triton_out, q, k, v)
            _row("default", base, flops * 3.5, base)
            for bm, bn, w, st in _TUNE_BWD:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                tk._blocks = lambda dk, dv, dtype, backward, cfg=cfg: cfg if backward else default(dk, dv, dtype, backward)
                _row(f"{bm} {bn} {w} {st}", _bench(args.rep, _step, dout, _triton_out, q, k, v), flops * 3.5, base)
            tk._blocks = default
    finally:
        tk._blocks = default


def _syncs(fn) -> list[str]:
    """The host-device synchronizations of one call of ``fn``, as CUDA's sync debug mode names them."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0][:90] for w in caught if "called a synchronizing" in str(w.message)]


def profile(args) -> None:
    """Where the time of the mha calls goes: wall time per call, kernel time, syncs, top ops."""
    import cProfile
    import pstats
    import time

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import mha
    from mha.masks import Causal, KeyPadding

    print("\n== profile: wall time vs kernel time per call, host syncs, top ops by device time ==")
    g = torch.Generator().manual_seed(0)
    N, H, D, L = 16, 32, 64, 1024
    lengths = torch.randint(L // 4, L + 1, (N,), generator=g)
    q = torch.randn(N, H, L, D, device="cuda", dtype=torch.bfloat16)
    seqs = [torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16) for n in lengths.tolist()]
    nq = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    padded_mask = Causal() & KeyPadding(lengths.cuda())
    E = 2048
    ours, _ = _modules(E, E // 128)
    x = torch.randn(N, L, E, device="cuda", dtype=torch.bfloat16)
    pad = torch.arange(L, device="cuda")[None, :] >= lengths.cuda()[:, None]
    causal = torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1)
    weighted, _ = _modules(1024, 16)
    xw = torch.randn(8, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    qd = torch.randn(1, 32, 16384, 64, device="cuda", dtype=torch.bfloat16)
    cases = {
        "jagged causal, N=16 H=32 D=64 L<=1024": lambda: mha.attention(nq, nq, nq, Causal()),
        "padded causal + KeyPadding, same": lambda: mha.attention(q, q, q, padded_mask),
        "module kpm + causal, N=16 L=1024 E=2048": lambda: ours(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False),
        "module need_weights, N=8 L=1024 E=1024": lambda: weighted(xw, xw, xw, need_weights=True),
        "dense attention, N=1 H=32 L=16384 D=64": lambda: mha.attention(qd, qd, qd),
    }
    key = "self_device_time_total"
    with torch.inference_mode():
        for name, fn in cases.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 10 * 1e3
            syncs = _syncs(fn)
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = [e for e in events if str(e.device_type).endswith("CUDA")]
            device_ms = sum(getattr(e, key) for e in kernels) / 5 / 1e3
            print(f"  {name}: wall {wall:.3f} ms per call, kernels {device_ms:.3f} ms, {len(syncs)} host syncs")
            for s in sorted(set(syncs)):
                print(f"      sync: {s}")
            print(events.table(sort_by=key, row_limit=8, max_name_column_width=50))
            host = cProfile.Profile()
            host.enable()
            for _ in range(20):
                fn()
            host.disable()
            torch.cuda.synchronize()
            print("    host time, 20 calls, by own time:")
            pstats.Stats(host, stream=sys.stdout).sort_stats("tottime").print_stats(12)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (the CPU runs the kernels only in tests, under TRITON_INTERPRET=1)")
        return 2
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    ok = True
    for section in args.sections:
        if section == "check":
            ok &= check(args.check_cases)
        elif section == "module":
            ok &= module()
        else:
            globals()[section](args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
