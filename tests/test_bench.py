"""Smoke tests of ``mha bench`` (``mha._bench``) at tiny sizes; no timing assertions."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mha import _bench
from mha._cli import main


def _run(tmp_path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    path = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--quick", "--threads", "1", "--repeats", "2", "--warmup", "1", "--json", str(path), *extra]
    )
    assert _bench.run(args) == 0
    return json.loads(path.read_text())


def test_quick_run_writes_every_case(tmp_path, capsys):
    threads = torch.get_num_threads()
    report = _run(tmp_path)
    assert torch.get_num_threads() == threads
    assert set(report) == {"machine", "config", "roofline", "cases"}
    machine = report["machine"]
    assert {"cpu", "torch", "threads", "dtype", "device"} <= set(machine)
    assert (machine["threads"], machine["dtype"], machine["device"]) == (1, "float32", "cpu")
    roofline = report["roofline"]
    assert roofline["gflops"] == max(roofline["samples_gflops"]) > 0
    assert len(roofline["samples_gflops"]) == len(_bench.CASE_NAMES) + 1
    assert [case["name"] for case in report["cases"]] == list(_bench.CASE_NAMES)
    for case in report["cases"]:
        assert case["status"] == "ok", case
        assert case["max_abs_diff"] < 1e-4
        for side in ("torch", "mha"):
            stats = case[side]
            assert len(stats["times_s"]) == 2
            assert stats["min_s"] <= stats["median_s"]
            assert stats["gflops"] > 0
            assert stats["roofline_fraction"] > 0
        assert case["speedup_median"] > 0
        assert case["speedup_min"] > 0
    assert "speed-up" in capsys.readouterr().out


def test_unsupported_side_is_reported_not_raised(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no nested input yet")

    monkeypatch.setattr(_bench.MultiheadAttention, "_nested", refuse)
    (case,) = _run(tmp_path, "--cases", "jagged")["cases"]
    assert case["status"] == "unsupported"
    assert case["reason"] == "mha: NotImplementedError: no nested input yet"


def test_quick_says_indicative_and_no_file_without_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    args = parser.parse_args(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0", "--cases", "dense"])
    assert _bench.run(args) == 0
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert "indicative only" in " ".join(out.split())
    assert "wrote" not in out
    (row,) = [line for line in out.splitlines() if line.strip().startswith("dense")]
    assert " 0.0 " not in f"{row} "


def test_json_is_written_where_asked_and_said(tmp_path, capsys):
    _run(tmp_path, "--cases", "dense")
    assert str(tmp_path / "bench.json") in capsys.readouterr().out.replace("\n", "")


def test_small_rates_keep_their_digits():
    assert _bench._fmt_rate(0.0421) == "0.0421"
    assert _bench._fmt_rate(7.514) == "7.51"
    assert _bench._fmt_rate(180.4) == "180"
    assert _bench._fmt_percent(0.00635) == "0.64%"
    assert _bench._fmt_percent(0.82) == "82%"


def test_unknown_case_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser()
    _bench.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cases", "dense,sparse"])
    assert "unknown case(s) sparse" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--threads", "2147483648"], "expected a positive integer below 2**31"),  # torch.set_num_threads raised
        (["--threads", "0"], "expected a positive integer below 2**31"),
        (["--repeats", "ten"], "expected a positive integer, got 'ten'"),
        (["--warmup", "-1"], "expected an integer >= 0, got -1"),
    ],
)
def test_bad_counts_are_usage_errors(argv, expected, capsys):
    """Checked while parsing, before any case runs: exit 2 and the reason on stderr."""
    assert main(["bench", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_useful_flops_counts_real_pairs_only():
    # Two sequences of 3 and 1 tokens, E = 2: projections 2*E*E*(2*4 + 2*4) = 128;
    # pairs 3*3 + 1*1 = 10, attention 4*E*10 = 80.
    assert _bench.useful_flops([3, 1], [3, 1], 2) == 128 + 80
    # Causal: pairs 3*4/2 + 1 = 7.
    assert _bench.useful_flops([3, 1], [3, 1], 2, causal=True) == 128 + 4 * 2 * 7
    assert _bench.useful_flops([3, 1], [3, 1], 2, backward=True) == 3 * (128 + 80)


def test_decode_cases_match_torch_recomputing(tmp_path):
    report = _run(tmp_path, "--cases", "decode,decode-step")
    greedy, step = report["cases"]
    assert (greedy["name"], greedy["status"], greedy["steps"]) == ("decode", "ok", _bench.QUICK.decode_steps)
    assert (step["name"], step["status"], step["cached"]) == ("decode-step", "ok", _bench.QUICK.length)
    for case in (greedy, step):
        assert case["max_abs_diff"] < 1e-5
        assert case["flops"] > 0
