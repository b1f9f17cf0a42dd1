"""scripts/loss_parity.py on CPU: two tiny recipes side by side at one token budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from script_loader import load_script
from test_example import DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "loss_parity.py"


def load_parity_script():
    return load_script("scripts/loss_parity.py")


@pytest.mark.parametrize("tokens, nproc, batch, seq, steps", [(1e8, 1, 32, 1024, 3052), (1e8, 4, 8, 1024, 3052),
                                                                (2560, 1, 4, 64, 10), (2561, 1, 4, 64, 11)])
def test_steps_cover_the_token_budget(tokens: float, nproc: int, batch: int, seq: int, steps: int) -> None:
    args = load_parity_script().parse_args(["--tokens", str(tokens), "--nproc", str(nproc), "--batch-size", str(batch),
                                     "--seq-len", str(seq)])
    assert args.steps == steps


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--recipes", "fp9"], ["--parallel-gpus", "3", "--nproc", "2"]])
def test_bad_arguments_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        load_parity_script().parse_args(argv)


def test_two_recipes_in_parallel(tmp_path: Path) -> None:
    """bf16 and fp8 on the tiny model, both at once: same token count, final validation loss
    of each read back from its own metrics.jsonl, the gap computed from those, and the plot."""
    out = tmp_path / "parity"
    env = {**os.environ, "LPDIST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--recipes", "bf16", "fp8", "--tokens", "1536",
               "--batch-size", "4", "--seq-len", "64", "--parallel-gpus", "2", "--eval-every", "3", "--out", str(out),
               "--", "--data", DATA, "--monitor-every", "0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["recipe"]: row for row in json.loads((out / "loss_parity.json").read_text())["rows"]}
    assert sorted(rows) == ["bf16", "fp8"] and {rows[r]["gpu"] for r in rows} == {"0", "1"}
    final = {}
    for recipe in rows:
        records = [json.loads(line) for line in (out / recipe / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
        assert max(r["tokens"] for r in records if "loss" in r) == 6 * 4 * 64 == rows[recipe]["tokens"]
        final[recipe] = records[-1]["val_loss"]
        assert math.isfinite(final[recipe]) and rows[recipe]["val_loss"] == final[recipe]
    assert rows["fp8"]["gap_pct"] == pytest.approx(100 * (final["fp8"] - final["bf16"]) / final["bf16"], rel=1e-12)
    assert "gap_pct" in rows["bf16"] and rows["bf16"]["gap_pct"] == 0
    assert "fp8" in result.stdout and "%" in result.stdout
    assert (out / "loss_parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss_parity_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --report re-reads the same folder without launching anything: the same losses and gap.
    (out / "loss_parity.png").unlink()
    report = subprocess.run([*command[:2], "--report", *command[2:]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    again = {row["recipe"]: row for row in json.loads((out / "loss_parity.json").read_text())["rows"]}
    assert {r: again[r]["val_loss"] for r in again} == final and "wall_s" not in again["fp8"]
    assert again["fp8"]["gap_pct"] == rows["fp8"]["gap_pct"]
    assert (out / "loss_parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_a_missing_run(tmp_path: Path) -> None:
    rows = load_parity_script().main(["--report", "--recipes", "bf16", "--out", str(tmp_path)])
    assert "no run" in rows[0]["error"] and "metrics.jsonl" in rows[0]["error"]


def test_two_process_runs_share_the_gpus(tmp_path: Path) -> None:
    """``--parallel-gpus 4 --nproc 2``: two recipes at once, each a 2-process torchrun job on its
    own pair of devices, with the steps counted from the 2-process global batch."""
    out = tmp_path / "pairs"
    env = {**os.environ, "LPDIST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--recipes", "bf16", "fp8", "--tokens", "1024",
               "--batch-size", "2", "--seq-len", "64", "--nproc", "2", "--parallel-gpus", "4", "--eval-every", "0",
               "--out", str(out), "--", "--data", DATA, "--monitor-every", "0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["recipe"]: row for row in json.loads((out / "loss_parity.json").read_text())["rows"]}
    assert {rows[r]["gpu"] for r in rows} == {"0,1", "2,3"}
    assert all(rows[r]["tokens"] == 4 * 2 * 2 * 64 and math.isfinite(rows[r]["val_loss"]) for r in rows)
    assert "fsdp x 2" in (out / "fp8" / "launch.log").read_text()


def test_unfinished_runs_are_compared_at_the_last_common_evaluation() -> None:
    """Runs cut off at different steps: the gaps are taken at the last step every run evaluated."""
    rows = [{"recipe": "bf16", "val_curve": {250: 1.0, 500: 0.8, 750: 0.7}},
            {"recipe": "fp8", "val_curve": {250: 1.1, 500: 0.84}},
            {"recipe": "nvfp4", "val_curve": {250: 1.2, 500: 0.78, 750: 0.69}},
            {"recipe": "fp4-dge", "error": "no run"}]
    assert load_parity_script().compare_at_common_step(rows) == 500
    assert [row.get("val_common") for row in rows] == [0.8, 0.84, 0.78, None]
    assert rows[1]["gap_common_pct"] == pytest.approx(5.0) and rows[2]["gap_common_pct"] == pytest.approx(-2.5)
    assert rows[0]["gap_common_pct"] == 0 and "gap_common_pct" not in rows[3]
