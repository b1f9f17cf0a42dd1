"""scripts/bench_comm.py's ratio table over rounds (the timing itself needs GPUs)."""

import sys

import pytest

from script_loader import load_script


def _bench_comm(monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["bench_comm.py", *argv])
    return load_script("scripts/bench_comm.py")


def _row(name: str, round_index: int, ms: float, queued_ms: float) -> dict:
    return dict(name=name, collective="reduce_scatter", elements=1 << 28, ms=ms, queued_ms=queued_ms,
                round=round_index)


def test_ratios_are_taken_against_the_baseline_of_the_same_round(monkeypatch, capsys):
    bench_comm = _bench_comm(monkeypatch, "--rounds", "3")
    baseline, fp8 = "nccl reduce_scatter bf16", "lpdist reduce_scatter p2p e4m3"
    rows = [_row(baseline, 0, 1.0, 0.8), _row(fp8, 0, 0.7, 0.4),
            _row(baseline, 1, 2.0, 1.0), _row(fp8, 1, 0.8, 0.6),
            _row(baseline, 2, 1.0, 1.0), _row(fp8, 2, 0.9, 0.5)]
    bench_comm.print_ratios(rows)
    assert [r["ratio_to_bf16"] for r in rows[1::2]] == pytest.approx([0.7, 0.4, 0.9])
    assert [r["queued_ratio_to_bf16"] for r in rows[1::2]] == pytest.approx([0.5, 0.6, 0.5])
    assert "ratio_to_bf16" not in rows[0]
    printed = capsys.readouterr().out
    assert "0.700 0.400 0.900  median 0.700x" in printed
    assert "0.500 0.600 0.500  median 0.500x" in printed


def test_rounds_below_one_are_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _bench_comm(monkeypatch, "--rounds", "0")
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
