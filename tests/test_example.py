"""examples/pretrain_llama.py end to end on CPU.

One ``torch.distributed.run --nproc_per_node=2`` launch (gloo) runs every 2-rank job of this
module in sequence over one process group (see ``run_jobs`` at the bottom): each recipe on a
tiny model, an uninterrupted bf16 run, and the same run stopped half way and resumed. Checks
that need one process (resume with another world size, argument errors, the non-finite
stop) run in the pytest process itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import OPEN_MPI_ENV
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_llama.py"
# Real text, small enough to tokenize in milliseconds: the stdlib logging package.
DATA = str(Path(sysconfig.get_paths()["stdlib"]) / "logging")
TINY = ["--model", "tiny", "--seq-len", "64", "--batch-size", "4", "--data", DATA, "--lr", "3e-3", "--warmup", "2"]
STEPS = 12
RECIPE_JOBS = {  # recipe -> data-parallel wrapper used for its 2-rank run
    "fp8": "ddp",
    "fp8-smooth": "fsdp",
    "fp8-delayed": "fsdp",
    "fp8-block": "fsdp",
    "fp4-dge": "fsdp",
    "fp4-quartet": "ddp",
    "nvfp4": "fsdp",
}
# Same world size, same reduction order, same data and RNG: a resumed run is bit-identical
# in principle; 1e-6 leaves room only for fp32 printing/round-trip noise.
RESUME_TOL = 1e-6
# Another world size sums the same per-sample gradients in another order (fp32, ~1e-7
# relative per step); over a handful of Adam steps that stays well below 1e-3 in the loss.
RESHARD_TOL = 1e-3


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """In-process runs use one intra-op thread, like each rank of the 2-process launch (two
    OpenMP threads contending with other processes for 2 cores are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example():
    return load_script("examples/pretrain_llama.py")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Launch all 2-rank jobs once; returns the folder holding one run folder per job."""
    root = tmp_path_factory.mktemp("runs")
    common = [*TINY, "--steps", str(STEPS), "--monitor-every", "4", "--eval-every", "6"]
    jobs = {
        "bf16": [*common, "--ckpt-every", "6"],
        "bf16-ddp": [*common, "--parallel", "ddp"],
        "stopped": [*common, "--ckpt-every", "6", "--stop-at", "6"],
        "resumed": [*common, "--ckpt-every", "6", "--resume"],
        **{recipe: [*common, "--recipe", recipe, "--parallel", parallel] for recipe, parallel in RECIPE_JOBS.items()},
    }
    argv_lists = [[*argv, "--out", str(root / ("stopped" if name == "resumed" else name))] for name, argv in jobs.items()]
    (root / "jobs.json").write_text(json.dumps(argv_lists))
    env = {**os.environ, "LPDIST_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(root / "jobs.json")]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return root


@pytest.mark.parametrize("name", ["bf16", "bf16-ddp", *RECIPE_JOBS])
def test_loss_falls_for_every_recipe(runs: Path, name: str) -> None:
    losses = train_losses(runs / name)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = losses[1], sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.85 * first, losses  # from ~ln(320) = 5.8 nats


def test_run_folder_has_metrics_telemetry_plots_and_checkpoint(runs: Path) -> None:
    out = runs / "fp8-smooth"
    records = metrics(out)
    step_record = next(r for r in records if r.get("step") == STEPS and "loss" in r)
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mem_gib"} <= set(step_record)
    assert step_record["tokens"] == STEPS * 2 * 4 * 64
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    telemetry = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    fp8_rows = [r for r in telemetry if "saturated_frac" in r]
    assert {r["step"] for r in fp8_rows} == {4, 8, 12}
    assert any(r["layer"] == "layers.0.mlp.down_proj" for r in fp8_rows)
    assert any(r["layer"] == "lm_head" and "input_rms" in r for r in telemetry)  # kept nn.Linear
    for png in ("loss.png", "amax.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def test_resume_continues_exactly(runs: Path) -> None:
    uninterrupted, resumed = train_losses(runs / "bf16"), train_losses(runs / "stopped")
    assert sorted(resumed) == sorted(uninterrupted)
    for step in uninterrupted:
        assert abs(resumed[step] - uninterrupted[step]) <= RESUME_TOL, (step, resumed[step], uninterrupted[step])


@pytest.mark.parametrize("parallel", ["fsdp", "none"])
def test_resume_with_another_world_size(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        parallel: str) -> None:
    """The 2-rank FSDP2 checkpoint of step 6 resumes in one process (FSDP2 or the plain model)
    with the same global batch (8 sequences) and reproduces the 2-rank losses of steps 7..12."""
    monkeypatch.setenv("LPDIST_CACHE", str(runs / "cache"))
    out = tmp_path / "one-rank"
    shutil.copytree(runs / "bf16" / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000006")
    (out / "checkpoints" / "latest").write_text("step_00000006\n")
    args = [*TINY, "--steps", str(STEPS), "--monitor-every", "4", "--eval-every", "6", "--batch-size", "8",
            "--parallel", parallel]
    load_example().main([*args, "--resume", "--out", str(out)])
    one_rank, two_ranks = train_losses(out), train_losses(runs / "bf16")
    assert sorted(one_rank) == list(range(7, STEPS + 1))
    for step, loss in one_rank.items():
        assert abs(loss - two_ranks[step]) <= RESHARD_TOL, (step, loss, two_ranks[step])


def test_plain_model_checkpoint_resumes_under_fsdp(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps 1..6 as the plain model in one process (global batch 8), then steps 7..12 resumed
    from its checkpoint by two FSDP2 ranks (4 sequences each): the losses of 7..12 are those of
    the uninterrupted 2-rank FSDP2 run."""
    monkeypatch.setenv("LPDIST_CACHE", str(runs / "cache"))
    out = tmp_path / "plain-then-fsdp"
    common = [*TINY, "--steps", str(STEPS), "--monitor-every", "4", "--eval-every", "6", "--ckpt-every", "6"]
    load_example().main([*common, "--batch-size", "8", "--parallel", "none", "--stop-at", "6", "--out", str(out)])
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([[*common, "--resume", "--out", str(out)]]))
    env = {**os.environ, "LPDIST_CACHE": str(runs / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(jobs)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    resumed, two_ranks = train_losses(out), train_losses(runs / "bf16")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert abs(resumed[step] - two_ranks[step]) <= RESHARD_TOL, (step, resumed[step], two_ranks[step])


def test_resume_into_another_model_is_refused(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lpdist.checkpoint import CheckpointError

    monkeypatch.setenv("LPDIST_CACHE", str(runs / "cache"))
    out = tmp_path / "copy"
    shutil.copytree(runs / "bf16", out)
    with pytest.raises(CheckpointError, match="seq_len: saved 64, now 32"):
        load_example().main([*TINY, "--seq-len", "32", "--steps", str(STEPS), "--resume", "--out", str(out)])
    with pytest.raises(CheckpointError, match="val_fraction: saved 0.005, now 0.01"):
        load_example().main([*TINY, "--val-fraction", "0.01", "--steps", str(STEPS), "--resume", "--out", str(out)])
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        load_example().main([*TINY, "--steps", str(STEPS), "--out", str(out)])


@pytest.mark.parametrize("change, message", [
    (["--steps", "24"], "steps: saved 12, now 24"),  # another token budget: another LR schedule
    (["--batch-size", "4"], "global_batch: saved 8, now 4"),  # 1 process x 4 sequences; the run had 2 x 4
    (["--lr", "1e-3"], "lr: saved 0.003, now 0.001"),
    (["--warmup", "3"], "warmup: saved 2, now 3"),
])
def test_resume_with_another_schedule_or_batch_is_refused(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          change: list[str], message: str) -> None:
    """The checkpoint of the 2 x 4-sequence run stopped at step 6: resuming it with one process
    of 8 sequences is the same run; another step count, global batch, peak LR or warm-up is
    another run, refused before anything is loaded or logged."""
    from lpdist.checkpoint import CheckpointError

    monkeypatch.setenv("LPDIST_CACHE", str(runs / "cache"))
    out = tmp_path / "copy"
    shutil.copytree(runs / "bf16", out)
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    (out / "checkpoints" / "latest").write_text("step_00000006\n")
    logged = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=message):
        load_example().main([*TINY, "--batch-size", "8", "--steps", str(STEPS), *change, "--resume", "--out", str(out)])
    assert (out / "metrics.jsonl").read_text() == logged


#: Resume checks added after the first checkpoints were written: such checkpoints lack them.
LATER_META_KEYS = ("val_fraction", "steps", "global_batch", "lr", "warmup", "tokenizer")


def test_checkpoint_saved_without_later_entries_resumes(runs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written before ``--val-fraction`` and the schedule entries were recorded:
    it held out the default tail, so a run with the default resumes from it (here at its last
    step: nothing left to train) and one with another fraction is refused; the schedule
    entries it lacks are not checked."""
    from lpdist.checkpoint import CheckpointError

    monkeypatch.setenv("LPDIST_CACHE", str(runs / "cache"))
    out = tmp_path / "copy"
    shutil.copytree(runs / "bf16", out)
    meta_file = out / "checkpoints" / f"step_{STEPS:08d}" / "meta.json"
    record = json.loads(meta_file.read_text())
    for key in LATER_META_KEYS:
        del record["meta"][key]
    meta_file.write_text(json.dumps(record))
    argv = [*TINY, "--batch-size", "8", "--steps", str(STEPS), "--resume", "--out", str(out)]
    with pytest.raises(CheckpointError, match="val_fraction: saved None, now 0.01"):
        load_example().main([*argv, "--val-fraction", "0.01"])
    load_example().main(argv)
    assert sorted(train_losses(out)) == list(range(1, STEPS + 1))


def test_non_finite_loss_skips_steps_then_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An absurd learning rate blows the weights up after one update; every later step has a
    non-finite loss, is skipped, and the run stops once the limit is passed."""
    monkeypatch.setenv("LPDIST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "blowup"
    with pytest.raises(SystemExit, match="non-finite loss"):
        load_example().main([*TINY, "--lr", "1e30", "--warmup", "0", "--steps", "20", "--max-bad-steps", "2", "--out", str(out)])
    records = [r for r in metrics(out) if "loss" in r]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert len(skipped) == 3 and records[-1]["step"] == skipped[-1]
    assert not (out / "checkpoints").exists()


def test_profile_writes_a_trace_of_three_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--profile 2`` traces steps 2-4: a Chrome trace whose events include the model's matmuls
    and the optimizer step, and a summary table."""
    monkeypatch.setenv("LPDIST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "profiled"
    load_example().main([*TINY, "--steps", "5", "--eval-every", "0", "--profile", "2", "--out", str(out)])
    trace = json.loads((out / "profile" / "rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("mm" in name for name in names) and any("Optimizer.step" in name for name in names)
    optimizer_steps = [e for e in trace["traceEvents"] if e.get("name", "").startswith("Optimizer.step")]
    assert len(optimizer_steps) == 3, sorted(names)[:50]
    assert "Self CPU" in (out / "profile" / "rank0.txt").read_text()



def telemetry_rows(out: Path) -> list[dict]:
    """Every line of ``telemetry.jsonl`` parsed (a torn or merged line fails the test)."""
    return [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]


def test_resume_and_fresh_start_rewrite_telemetry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run monitored every 2 steps is interrupted after step 6 with its last checkpoint at
    step 4 and a torn telemetry line; the resumed run logs steps 6 and 8 once each, like
    ``metrics.jsonl``. A fresh run in a folder without checkpoints starts a new file."""
    monkeypatch.setenv("LPDIST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = [*TINY, "--seq-len", "32", "--batch-size", "2", "--steps", "8", "--monitor-every", "2",
            "--eval-every", "0", "--time-every", "0", "--ckpt-every", "4", "--out", str(out)]
    load_example().main([*argv, "--stop-at", "6"])
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / "latest").write_text("step_00000004\n")
    with (out / "telemetry.jsonl").open("a") as handle:
        handle.write('{"step": 6, "layer": "torn')
    load_example().main([*argv, "--resume"])
    rows = telemetry_rows(out)
    layers = sorted({row["layer"] for row in rows})
    assert sorted((row["step"], row["layer"]) for row in rows) == [(s, name) for s in (2, 4, 6, 8) for name in layers]

    shutil.rmtree(checkpoints)
    load_example().main([*argv, "--steps", "2"])
    assert sorted((row["step"], row["layer"]) for row in telemetry_rows(out)) == [(2, name) for name in layers]



def test_validation_tail_shorter_than_a_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The held-out 0.5% of the logging package (900 byte tokens) holds no window of 1025
    tokens: the run stops naming the validation split, its size and the fix; with a 1%
    tail (1,800 tokens) the same run trains and evaluates."""
    monkeypatch.setenv("LPDIST_CACHE", str(tmp_path / "cache"))
    argv = [*TINY, "--seq-len", "1024", "--batch-size", "1", "--steps", "1", "--eval-every", "0", "--monitor-every", "0"]
    with pytest.raises(SystemExit, match=r"validation split .*900 tokens.*1025.*--val-fraction"):
        load_example().main([*argv, "--out", str(tmp_path / "default")])
    assert not (tmp_path / "default" / "metrics.jsonl").exists()
    out = tmp_path / "larger-tail"
    load_example().main([*argv, "--val-fraction", "0.01", "--out", str(out)])
    assert "1,800 val" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [1]


@pytest.mark.parametrize("n_train, n_val, split, message", [
    (100, 10, "validation", r"corpus .* has 110 tokens, too few for a training and a validation window of --seq-len "
                            r"\+ 1 = 65 tokens each: lower --seq-len or use more --data"),
    (1000, 10, "validation", r"validation split \(the last --val-fraction 0.01 of the 1,010 tokens .*\) has 10 tokens, "
                             r"fewer than one window of --seq-len \+ 1 = 65 tokens: raise --val-fraction to 0.0644 or "
                             r"more, or lower --seq-len to 9 or less"),
    (10, 1000, "training", r"training split \(10 of the 1,010 tokens .*\) has fewer than one window of --seq-len \+ 1 = "
                           r"65 tokens: lower --val-fraction \(0.01\) or --seq-len"),
])
def test_split_shorter_than_a_window_names_what_to_change(n_train: int, n_val: int, split: str, message: str) -> None:
    """The sampler of a split too short for a window of --seq-len + 1 tokens stops the run,
    saying which arguments to change."""
    from lpdist.data import Corpus

    corpus = Corpus(np.arange(n_train), np.arange(n_val), 257, "byte", "corpus.txt")
    with pytest.raises(SystemExit, match=message):
        load_example().split_sampler(corpus, split, argparse.Namespace(seq_len=64, val_fraction=0.01))


@pytest.mark.parametrize("argv, allowed", [(["--steps", "4", "--profile", "3"], "1..2"),
                                           (["--steps", "10", "--stop-at", "5", "--profile", "4"], "1..3"),
                                           (["--steps", "2", "--profile", "1"], None)])
def test_profile_past_the_last_step_is_refused(argv: list[str], allowed: str | None, capsys: pytest.CaptureFixture) -> None:
    """``--profile STEP`` traces steps STEP..STEP+2, which must all run in this invocation."""
    with pytest.raises(SystemExit):
        load_example().parse_args(argv)
    message = capsys.readouterr().err
    assert "--profile" in message
    if allowed is not None:
        assert f"STEP in {allowed}" in message
    else:
        assert "at least 3 steps" in message


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1", "nan"])
def test_val_fraction_outside_zero_one_is_refused(fraction: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        load_example().parse_args(["--val-fraction", fraction])
    assert "--val-fraction must be in (0, 1)" in capsys.readouterr().err


def mpiexec() -> str | None:
    found = Path(sys.executable).parent / "mpiexec"
    return str(found) if found.exists() else shutil.which("mpiexec")


@pytest.mark.skipif(mpiexec() is None or importlib.util.find_spec("mpi4py") is None, reason="no MPI (mpiexec + mpi4py)")
def test_mpiexec_launch(tmp_path: Path) -> None:
    """``mpiexec -n 2 python examples/pretrain_llama.py``: lpdist.init finds the MPI ranks."""
    env = {
        **os.environ,
        "LPDIST_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        **OPEN_MPI_ENV,
    }
    out = tmp_path / "mpi-run"
    command = [mpiexec(), "-n", "2", "--oversubscribe", sys.executable, str(EXAMPLE), *TINY, "--steps", "3", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fsdp x 2" in result.stdout
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch-size", "-1"], ["--recipe", "fp9"], ["--parallel", "zero"],
                                  ["--compile-mode", "reduce-overhead"], ["--compile", "--compile-mode", "fast"],
                                  ["--seed", "-1"]])
def test_bad_flags_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        load_example().parse_args(argv)


def test_plain_model_needs_a_single_process(tmp_path: Path) -> None:
    """``--parallel none`` in a job of two processes is refused before anything is loaded."""
    example = load_example()
    args = example.parse_args([*TINY, "--parallel", "none", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="--parallel none .* 2 processes"):
        example.train(args, 0, 2, torch.device("cpu"))
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("recipe, extra", [("bf16", []), ("bf16", ["--compile"]), ("fp8", ["--compile"]),
                                           ("fp8-smooth", []), ("nvfp4", []), ("fp8", ["--parallel", "ddp"]),
                                           ("fp8", ["--compile", "--compile-mode", "reduce-overhead"]),
                                           ("fp8", ["--parallel", "none", "--compile"]),
                                           ("fp8", ["--parallel", "none", "--compile", "--compile-mode", "reduce-overhead"])],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_gpu_training(tmp_path: Path, recipe: str, extra: list[str]) -> None:
    """The 20m model on up to 2 GPUs (NCCL, bf16 compute; one with ``--parallel none``): loss
    falls, MFU is reported."""
    nproc = 1 if "none" in extra else min(2, torch.cuda.device_count())
    out = tmp_path / "run"
    argv = ["--model", "20m", "--seq-len", "256", "--batch-size", "8", "--steps", "40", "--warmup", "4",
            "--data", DATA, "--recipe", recipe, "--out", str(out), *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLE), *argv]
    env = {**os.environ, "LPDIST_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    records = [r for r in metrics(out) if "loss" in r]
    assert records[-1]["loss"] < 0.85 * records[0]["loss"], [r["loss"] for r in records]
    assert records[-1]["tokens_per_s"] > 0 and 0 < records[-1].get("mfu", 0.5) < 1


def test_learning_rate_schedule() -> None:
    example = load_example()
    args = example.parse_args(["--lr", "1.0", "--warmup", "10", "--steps", "110"])
    lrs = [example.learning_rate(step, args) for step in range(1, 111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[59] == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def run_jobs(jobs_file: str) -> None:
    """Run each argument list of ``jobs_file`` through the example, one after the other,
    sharing one process group (created here once; re-creating gloo groups is flaky)."""
    from lpdist.dist import destroy, init

    example = load_example()
    rank, world_size, _, device = init()
    for argv in json.loads(Path(jobs_file).read_text()):
        example.train(example.parse_args(argv), rank, world_size, device)
    destroy()


if __name__ == "__main__":
    run_jobs(sys.argv[1])
