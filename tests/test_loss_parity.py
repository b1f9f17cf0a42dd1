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


def script_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a launched study: its own corpus cache, one thread per run, and no
    CUDA_VISIBLE_DEVICES of the caller (``--parallel-gpus`` then numbers the devices 0..N-1)."""
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    return {**env, "LPDIST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


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
    env = script_env(tmp_path)
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
    env = script_env(tmp_path)
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
    """Runs cut off at different points: the gaps are taken at the largest token count every
    run evaluated at (the curves are keyed by training tokens)."""
    rows = [{"recipe": "bf16", "val_curve": {250: 1.0, 500: 0.8, 750: 0.7}},
            {"recipe": "fp8", "val_curve": {250: 1.1, 500: 0.84}},
            {"recipe": "nvfp4", "val_curve": {250: 1.2, 500: 0.78, 750: 0.69}},
            {"recipe": "fp4-dge", "error": "no run"}]
    assert load_parity_script().compare_at_common_tokens(rows) == 500
    assert [row.get("val_common") for row in rows] == [0.8, 0.84, 0.78, None]
    assert rows[1]["gap_common_pct"] == pytest.approx(5.0) and rows[2]["gap_common_pct"] == pytest.approx(-2.5)
    assert rows[0]["gap_common_pct"] == 0 and "gap_common_pct" not in rows[3]


def write_run(folder: Path, tokens_per_step: int, steps: int, val_every: int, val_loss: dict[int, float]) -> None:
    """A run folder's metrics.jsonl as the example writes it: one training record per step,
    then a validation record at every ``val_every``-th step (losses from ``val_loss``)."""
    folder.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "tokens": step * tokens_per_step})
        if step % val_every == 0:
            records.append({"step": step, "val_loss": val_loss[step]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_report_compares_runs_of_another_batch_at_equal_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """bf16 with 256 tokens per step (6 steps) and fp8 with 512 (3 steps), both evaluated every
    3 steps, for a 1536-token budget: both runs are finished; the common comparison is at
    1536 tokens (bf16's step 6, fp8's step 3), not at step 3 (768 tokens for bf16); fp8's
    other tokens per step is flagged in its row and in the table."""
    write_run(tmp_path / "bf16", 256, 6, 3, {3: 5.0, 6: 4.0})
    write_run(tmp_path / "fp8", 512, 3, 3, {3: 4.2})
    rows = {row["recipe"]: row for row in load_parity_script().main([
        "--report", "--recipes", "bf16", "fp8", "--model", "tiny", "--tokens", "1536", "--batch-size", "4",
        "--seq-len", "64", "--eval-every", "3", "--out", str(tmp_path)])}
    assert rows["bf16"]["val_loss"] == 4.0 and rows["fp8"]["val_loss"] == 4.2
    assert rows["fp8"]["gap_pct"] == pytest.approx(5.0)
    assert rows["bf16"]["val_common"] == 4.0 and rows["fp8"]["gap_common_pct"] == pytest.approx(5.0)
    assert rows["bf16"]["tokens_per_step"] == 256 and rows["fp8"]["tokens_per_step"] == 512
    assert "warning" not in rows["bf16"] and "512 tokens per step" in rows["fp8"]["warning"]
    table = capsys.readouterr().out
    assert "unfinished" not in table and "1,536 tokens" in table and "512 tokens per step" in table
    saved = json.loads((tmp_path / "loss_parity.json").read_text())["rows"]
    assert [row["val_curve"] for row in saved] == [{"768": 5.0, "1536": 4.0}, {"1536": 4.2}]
    assert (tmp_path / "loss_parity_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_lists_a_run_short_of_the_token_budget_as_unfinished(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    write_run(tmp_path / "bf16", 256, 6, 3, {3: 5.0, 6: 4.0})
    write_run(tmp_path / "fp8", 256, 3, 3, {3: 5.1})  # stopped at step 3 of 6 (--stop-at)
    rows = load_parity_script().main(["--report", "--recipes", "bf16", "fp8", "--model", "tiny", "--tokens", "1536",
                                      "--batch-size", "4", "--seq-len", "64", "--out", str(tmp_path)])
    assert "val_loss" not in rows[1] and rows[1]["val_common"] == 5.1 and rows[0]["val_common"] == 5.0
    assert "unfinished: 768 of 1,536 tokens" in capsys.readouterr().out


def test_exit_status_is_an_error_when_a_recipe_fails(tmp_path: Path) -> None:
    """A run that fails (here: its --data does not exist) makes the script exit non-zero, so a
    caller (scripts/parity_chunk.sh, gpu_check.sh) records the study as failed."""
    env = script_env(tmp_path)
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--recipes", "bf16", "--tokens", "256",
                             "--batch-size", "4", "--seq-len", "64", "--out", str(tmp_path / "out"),
                             "--", "--data", str(tmp_path / "missing")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bf16         FAILED" in result.stdout and "does not exist" in result.stdout
    assert "failed: bf16" in result.stderr


@pytest.mark.parametrize("visible, nproc, parallel, groups", [
    (None, 1, 2, {"0", "1"}),
    ("2,3", 1, 2, {"2", "3"}),
    ("4,5,6,7", 2, 4, {"4,5", "6,7"}),
    ("GPU-aa, GPU-bb,GPU-cc", 1, 2, {"GPU-aa", "GPU-bb"}),  # the first --parallel-gpus of the list
])
def test_parallel_runs_use_the_devices_the_study_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           visible: str | None, nproc: int, parallel: int,
                                                           groups: set[str]) -> None:
    """Each run's CUDA_VISIBLE_DEVICES is a group of ``--nproc`` entries of the study's own
    CUDA_VISIBLE_DEVICES (when set), so studies started on disjoint devices stay disjoint."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    script = load_parity_script()
    launched = []

    def fake_run(command: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
        launched.append(env["CUDA_VISIBLE_DEVICES"])
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    script.main(["--recipes", "bf16", "fp8", "--parallel-gpus", str(parallel), "--nproc", str(nproc),
                 "--model", "tiny", "--tokens", "100", "--out", str(tmp_path)])
    assert set(launched) == groups and len(launched) == 2


def test_more_parallel_gpus_than_visible_devices_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(SystemExit):
        load_parity_script().parse_args(["--parallel-gpus", "4"])
    assert "CUDA_VISIBLE_DEVICES" in capsys.readouterr().err
