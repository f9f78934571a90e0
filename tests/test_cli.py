"""The mha command through its entry point: exit codes, key output lines, files written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import mha
from mha import _cli
from mha.__main__ import main

EXPLAIN = [
    "explain", "--embed-dim", "64", "--num-heads", "8", "--query", "10,32,64",
    "--key", "15,32,64", "--value", "15,32,64", "--key-padding-mask", "32,15",
]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # rich output unwrapped, so lines can be matched


def test_python_dash_m_entry_point_and_lazy_imports():
    explain = subprocess.run(
        [sys.executable, "-m", "mha", *EXPLAIN, "--attn-mask", "10,15:bool"],
        capture_output=True, text=True, timeout=120,
    )
    assert explain.returncode == 0, explain.stderr
    assert "(10, 32, 64)" in explain.stdout
    probe = "import sys, mha; print('matplotlib' in sys.modules, 'rich' in sys.modules)"
    imports = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert imports.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["explain", "--help"], ["plot", "--help"], ["--version"]])
def test_help_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "mha" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["explain", "--embed-dim", "64"], ["explain", "--embed-dim", "64", "--num-heads", "8", "--query", "10,x"],
     ["demo", "--bogus"],
     # sizes past what a tensor can hold: an argparse error, not torch's overflow traceback
     ["explain", "--embed-dim", "8", "--num-heads", "2", "--query", "4294967296,4294967296,8"],
     ["explain", "--embed-dim", "8", "--num-heads", "2", "--query", "3,2,8", "--key", "99999999999999999999,2,8"],
     ["explain", "--embed-dim", "8", "--num-heads", "2", "--query", "3,2,8", "--attn-mask", "0,18446744073709551616"]],
)
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--version", "bench"], ["-h", "bench"]])
def test_top_level_options_answer_before_the_subcommand_runs(argv, monkeypatch, capsys):
    monkeypatch.setattr(_cli, "_bench", lambda *_: pytest.fail("mha bench ran"))
    assert main(argv) == 0
    assert "mha" in capsys.readouterr().out


def test_bench_is_wired_and_missing_bench_exits_2(monkeypatch, capsys):
    assert main(["bench", "--help"]) == 0
    assert "usage: mha bench" in capsys.readouterr().out
    assert main(["bench", "--no-such-option"]) == 2
    monkeypatch.setitem(sys.modules, "mha._bench", None)
    assert main(["bench", "--quick"]) == 2
    assert "mha bench is not available" in capsys.readouterr().err


def test_explain_cross_attention_with_padding(capsys):
    assert main([*EXPLAIN, "--attn-mask", "10,15:bool", "--need-weights"]) == 0
    out = capsys.readouterr().out
    for line in ("L=10  N=32  E=64", "S=15  N=32  D=64", "key_padding_mask", "(32, 15) bool", "(32, 10, 15)",
                 "tiled", "picked", "SDPA returns no attention weights", "torch.nn.MultiheadAttention weights"):
        assert line in out


def test_explain_without_weights_picks_sdpa(capsys):
    assert main([*EXPLAIN, "--no-need-weights", "--batch-first", "--query", "32,10,64",
                 "--key", "32,15,64", "--value", "32,15,64"]) == 0
    out = capsys.readouterr().out
    assert "N=32  L=10  E=64" in out
    assert re.search(r"sdpa\W+picked", out)


@pytest.mark.parametrize(
    ("extra", "kwargs"),
    [
        (["--key-padding-mask", "15,32"], {"key_padding_mask": torch.zeros(15, 32, dtype=torch.bool)}),
        (["--value", "15,32,40"], {"value": torch.zeros(15, 32, 40)}),
        (["--attn-mask", "32,10,15"], {"attn_mask": torch.zeros(32, 10, 15, dtype=torch.bool)}),
    ],
)
def test_explain_invalid_call_prints_the_module_error(extra, kwargs, capsys):
    module = mha.MultiheadAttention(64, 8)
    call = {"query": torch.zeros(10, 32, 64), "key": torch.zeros(15, 32, 64), "value": torch.zeros(15, 32, 64),
            "key_padding_mask": torch.zeros(32, 15, dtype=torch.bool), **kwargs}
    with pytest.raises(ValueError, match=r"key_padding_mask|value|attn_mask") as expected:
        module(**call)
    assert main([*EXPLAIN, *extra]) == 2
    assert capsys.readouterr().err.strip() == f"ValueError: {expected.value}"


def test_explain_bad_constructor_exits_2(capsys):
    assert main(["explain", "--embed-dim", "63", "--num-heads", "8", "--query", "10,32,63"]) == 2
    assert "embed_dim=63 must be divisible by num_heads=8" in capsys.readouterr().err


def _png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_walks_the_examples_and_writes_the_heatmap(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("1. Shapes", "2. Padding", "3. An inverted boolean mask", "4. Errors", "(10, 32, 64)",
                 "(32, 15) bool", "L=10  N=32  E=64", "S=15  N=32  D=64", "True = key j of batch row n is",
                 "query row(s) [9] of all 32 batch rows",  # torch's NaN row
                 "all 10 query rows of batch row(s) [5]",  # a fully padded sequence
                 "is torch.tril(torch.ones(10, 10)).bool()",  # mha's warning
                 "torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)", "Causal('top_left')",
                 "AssertionError: Expected key_padded_mask.shape[0] to be 32",  # torch's error
                 "key_padding_mask has shape (15, 32) = (S, N), expected (N, S) = (32, 15)",  # mha's
                 str(out)):
        assert line in text, line
    assert "seed" not in text.lower()
    assert _png(out)


def test_demo_without_matplotlib_skips_the_picture_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "heatmap skipped" in text
    assert "pip install 'mha[plot]'" in text
    assert not out.exists()


@pytest.mark.parametrize("command", [["demo", "--out"], ["plot", "--out"], ["bench", "--quick", "--json"]])
@pytest.mark.parametrize("where", ["missing-folder/x.png", "."])
def test_unwritable_output_exits_2_before_any_work(command, where, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command, where]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message = captured.err.strip()
    assert message.startswith(f"mha {command[0]}: cannot write {command[-1]} {where}: ")
    assert ("does not exist" in message) if where != "." else ("is a folder" in message)
    assert sorted(tmp_path.iterdir()) == []


def test_write_error_at_save_time_exits_2(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", refuse)
    assert main(["plot", "--out", str(tmp_path / "x.png")]) == 2
    assert "mha plot: cannot write --out" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "y.png")]) == 2
    assert "mha demo: cannot write the heatmap to --out" in capsys.readouterr().err


def test_plot_default_and_saved_weights(tmp_path, capsys):
    default = tmp_path / "default.png"
    assert main(["plot", "--out", str(default)]) == 0
    assert _png(default)
    saved = tmp_path / "w.pt"
    torch.save(torch.softmax(torch.randn(2, 3, 5, 7), -1), saved)
    out = tmp_path / "saved.png"
    assert main(["plot", "--weights", str(saved), "--batch", "1", "--out", str(out)]) == 0
    assert _png(out)
    assert str(out) in capsys.readouterr().out


def test_plot_errors(tmp_path, capsys, monkeypatch):
    """Errors go to stderr, as every other subcommand's, with the documented exit codes."""
    assert main(["plot", "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "mha plot: cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save(torch.zeros(2, 2, 2, 2, 2), bad)
    assert main(["plot", "--weights", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "must be (L, S), (N, L, S) averaged over heads or (N, H, L, S) per head" in capsys.readouterr().err
    assert main(["plot", "--weights", str(bad), "--layout", "NHLS", "--out", str(tmp_path / "x.png")]) == 2
    assert "layout='NHLS' means weights (N, H, L, S) per head, got 5-D" in capsys.readouterr().err
    not_a_tensor = tmp_path / "dict.pt"
    torch.save({"w": torch.zeros(2, 2)}, not_a_tensor)
    assert main(["plot", "--weights", str(not_a_tensor), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a dict, not a tensor" in capsys.readouterr().err
    for shape in ((0, 3, 4), (2, 0, 4)):  # no batch row, no query: nothing to draw
        torch.save(torch.zeros(shape), bad)
        assert main(["plot", "--weights", str(bad), "--out", str(tmp_path / "x.png")]) == 2
        assert "hold no element: nothing to draw" in capsys.readouterr().err
    for content in (b"", b"hello", b"\x80\x02}q\x00."):  # empty, text, not torch's format
        bad.write_bytes(content)
        assert main(["plot", "--weights", str(bad), "--out", str(tmp_path / "x.png")]) == 2
        assert "mha plot: cannot read" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["plot", "--out", str(tmp_path / "y.png")]) == 1
    captured = capsys.readouterr()
    assert "pip install 'mha[plot]'" in captured.err
    assert captured.out == ""


def _titles(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def test_plot_weights_library_function(monkeypatch):
    figure = mha.plot.weights(torch.softmax(torch.randn(4, 6, 6), -1), layout="HLS", title="t")
    assert _titles(figure) == ["head 0", "head 1", "head 2", "head 3", "mean over heads"]
    single = mha.plot.weights(torch.softmax(torch.randn(6, 6), -1))
    assert [ax.get_title() for ax in single.axes if ax.get_title()] == ["weights"]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'mha\[plot\]'"):
        mha.plot.weights(torch.zeros(3, 3))


def test_plot_compare_draws_named_maps_and_refuses_none():
    maps = {"torch": torch.softmax(torch.randn(3, 7), -1), "mha": torch.softmax(torch.randn(3, 7), -1)}
    assert _titles(mha.plot.compare(maps, title="t")) == ["torch", "mha"]
    with pytest.raises(ValueError, match=r"compare takes at least one named \(L, S\) map in panels, got none"):
        mha.plot.compare({})
    with pytest.raises(ValueError, match=r"compare takes non-empty \(L, S\) maps, got 'mha' of shape \(0, 7\)"):
        mha.plot.compare({**maps, "mha": torch.zeros(0, 7)})


def test_plot_labels_the_module_default_weights_as_batch_rows(tmp_path, capsys):
    """need_weights=True gives (N, L, S) averaged over heads: panels are batch rows, not heads."""
    module = mha.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        _, averaged = module(*(torch.randn(3, 5, 8),) * 3)
        _, per_head = module(*(torch.randn(3, 5, 8),) * 3, average_attn_weights=False)
    expected = ["batch 0, mean over heads", "batch 1, mean over heads", "batch 2, mean over heads"]
    assert _titles(mha.plot.weights(averaged)) == expected
    assert _titles(mha.plot.weights(averaged, layout="NLS")) == expected
    assert _titles(mha.plot.weights(averaged[:1])) == ["mean over heads"]
    assert _titles(mha.plot.weights(per_head, batch=2)) == ["head 0", "head 1", "mean over heads"]
    with pytest.raises(ValueError, match=r"layout='HLS' means weights \(H, L, S\) per head, got 4-D"):
        mha.plot.weights(per_head, layout="HLS")
    with pytest.raises(ValueError, match="layout must be one of 'LS', 'HLS', 'NLS', 'NHLS', got 'HNLS'"):
        mha.plot.weights(per_head, layout="HNLS")
    saved = tmp_path / "averaged.pt"
    torch.save(averaged, saved)
    assert main(["plot", "--weights", str(saved), "--out", str(tmp_path / "a.png")]) == 0
    assert main(["plot", "--weights", str(saved), "--layout", "HLS", "--out", str(tmp_path / "h.png")]) == 0
