"""examples/pretrain_llama.py: ``--ablate`` (recipe parts switched off) and ``--time-every``
(step-time breakdown in metrics.jsonl), on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lpdist.checkpoint import CheckpointError, read_meta
from lpdist.nn import get_recipe
from lpdist.optim import AdamW as LowPrecisionAdamW
from script_loader import load_script
from test_example import EXAMPLE, TINY, load_example, metrics

STEPS = 4
TIME_EVERY = 2


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "fp8", "--ablate", "weights"], "unknown part"),
    (["--recipe", "bf16", "--ablate", "layers"], "has no low-precision layers"),
    (["--recipe", "fp8", "--ablate", "all_gather"], "has no low-precision all_gather"),  # only fp8-gather has it
    (["--recipe", "fp8-row", "--ablate", "moments"], "has no low-precision moments"),  # fp8-row keeps fp32 moments
    (["--recipe", "fp8", "--ablate"], "expected at least one"),
    (["--time-every", "-1"], "--time-every must be >= 0"),
])
def test_bad_ablations_are_rejected(example, argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert message in capsys.readouterr().err


def test_ablations_reset_exactly_their_fields(example) -> None:
    args = example.parse_args(["--recipe", "fp8-smooth", "--ablate", "moments", "layers", "moments"])
    assert args.ablate == ["layers", "moments"]
    ablated, full = example.run_recipe(args), get_recipe("fp8-smooth")
    assert (ablated.linear, ablated.smooth_swiglu, ablated.moments) == ("bf16", None, "fp32")
    assert ablated.grad_comm == full.grad_comm == "e4m3"
    assert example.ablatable_parts("fp8-smooth") == ["layers", "grad_comm", "moments"]
    assert example.ablatable_parts("fp8-gather") == ["layers", "grad_comm", "all_gather", "moments"]
    assert example.ablatable_parts("fp4-quartet") == ["layers", "grad_comm"]
    assert example.ablatable_parts("bf16") == []


def test_step_timer_splits_known_phases(example, monkeypatch) -> None:
    """A scripted clock (no sleeps, so no scheduler slack to allow for): each phase is the time
    between its marks, unnamed stretches add up to ``time_other_s``, and the phases to the step."""
    readings = iter([10.0, 10.25, 10.5, 11.0])  # start, fwd_bwd, unnamed, optim
    monkeypatch.setattr(example.time, "perf_counter", lambda: next(readings))
    timer = example.StepTimer(3, torch.device("cpu"))
    timer.start(2)
    timer.mark("fwd_bwd")
    assert timer.times() == {}  # step 2 is not timed (and reads no clock)
    timer.start(3)
    timer.mark("fwd_bwd")
    timer.mark(None)
    timer.mark("optim")
    assert timer.times() == {"time_fwd_bwd_s": 0.25, "time_other_s": 0.25, "time_optim_s": 0.5,
                             "time_step_s": 1.0}


def test_ablated_moments_build_plain_fp32_adamw(example) -> None:
    """--ablate moments gives torch's AdamW with fp32 moments; the full recipe the wrapped one."""
    model = torch.nn.Linear(8, 8)
    model(torch.randn(2, 8)).square().mean().backward()
    full = example.build_optimizer(model, example.parse_args(["--recipe", "fp8-smooth", "--lr", "1e-3"]), torch.device("cpu"))
    ablated = example.build_optimizer(model, example.parse_args(["--recipe", "fp8-smooth", "--lr", "1e-3", "--ablate", "moments"]),
                                      torch.device("cpu"))
    assert isinstance(full, LowPrecisionAdamW) and not isinstance(ablated, LowPrecisionAdamW)
    ablated.step()
    state = ablated.state[model.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_two_rank_run_with_ablated_moments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, example) -> None:
    """A 2-rank FSDP2 fp8-smooth run without its fp8 moments: checkpoint state is plain AdamW's,
    the ablation is in the checkpoint metadata (resuming without it is refused), and every
    ``TIME_EVERY``-th step of metrics.jsonl carries the step-time breakdown."""
    env = {**os.environ, "LPDIST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    argv = [*TINY, "--recipe", "fp8-smooth", "--ablate", "moments", "--steps", str(STEPS), "--eval-every", "0",
            "--monitor-every", "0", "--time-every", str(TIME_EVERY), "--out", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE), *argv]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "recipe fp8-smooth without moments, fsdp x 2" in result.stdout

    checkpoint_dir = out / "checkpoints" / f"step_{STEPS:08d}"
    assert read_meta(checkpoint_dir)["meta"]["ablate"] == ["moments"]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    assert any(key.endswith(".fused") for key in saved)  # torch.optim.AdamW's param-group options
    assert not any(key.endswith(".moments") for key in saved)  # lpdist.optim.AdamW's are absent

    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for record in steps:
        timed = "time_step_s" in record
        assert timed == (record["step"] % TIME_EVERY == 0), record
        if timed:
            phases = record["time_fwd_bwd_s"] + record["time_optim_s"] + record["time_other_s"]
            assert phases == pytest.approx(record["time_step_s"], rel=1e-9)
            assert min(record["time_fwd_bwd_s"], record["time_optim_s"]) > 0

    monkeypatch.setenv("LPDIST_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    resume = [a for a in argv if a not in ("--ablate", "moments")][:-1] + [str(copy), "--resume", "--steps", str(STEPS + 1)]
    with pytest.raises(CheckpointError, match=r"ablate: saved \['moments'\], now \[\]"):
        example.main(resume)


@pytest.mark.parametrize("ablate", [[], ["all_gather"]])
def test_two_rank_fp8_gather(tmp_path: Path, ablate: list[str]) -> None:
    """The fp8-gather recipe installs the FP8 parameter all-gather on every FSDP2 module (and
    ``--ablate all_gather`` removes it, keeping the FP8 reduce-scatter); the loss stays finite."""
    env = {**os.environ, "LPDIST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    argv = [*TINY, "--recipe", "fp8-gather", *(["--ablate", *ablate] if ablate else []), "--steps", "2",
            "--eval-every", "0", "--monitor-every", "0", "--out", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE), *argv]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "gradient reduce-scatter in e4m3 (all_to_all) on" in result.stdout  # auto on CPU: all_to_all
    assert ("parameter all-gather in e4m3 on" in result.stdout) == (not ablate)
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_bench_pretrain_ablates_communication_only_on_several_gpus() -> None:
    """``bench_pretrain --ablate-each``: one run per part the recipe switches on; the parts that
    act between processes are skipped on one GPU, where switching them off changes nothing."""
    bench = load_script("scripts/bench_pretrain.py")
    full = [("bf16", []), ("fp8-gather", [])]
    assert bench.variants(["bf16", "fp8-gather"], True, 4) == full + [
        ("fp8-gather", [part]) for part in ("layers", "grad_comm", "all_gather", "moments")]
    assert bench.variants(["bf16", "fp8-gather"], True, 1) == full + [("fp8-gather", ["layers"]), ("fp8-gather", ["moments"])]
    assert bench.variants(["bf16", "fp8-gather"], False, 4) == full


def stubbed_bench_pretrain(monkeypatch: pytest.MonkeyPatch, step_s: dict[str, float], failing: set[str]):
    """scripts/bench_pretrain.py on a stubbed single GPU whose torchrun jobs write metrics with
    ``step_s[label]`` seconds per step (label: recipe, then ``@mode`` unless default), or fail
    (``failing`` recipes, as an out-of-memory job would). Returns the module and the commands run."""
    bench = load_script("scripts/bench_pretrain.py")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *args: "stub GPU")
    monkeypatch.setattr(bench, "write_result", lambda *args, **kwargs: None)
    commands = []

    def fake_run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        commands.append(command)
        recipe = command[command.index("--recipe") + 1]
        mode = command[command.index("--compile-mode") + 1]
        label = recipe if mode == "default" else f"{recipe} @{mode}"
        out = Path(command[command.index("--out") + 1])
        if recipe not in failing:
            out.mkdir(parents=True)
            (out / "metrics.jsonl").write_text("".join(
                f'{{"step": {step}, "loss": 3.0, "step_s": {step_s[label]}, "mem_gib": 1.0}}\n' for step in range(1, 5)))
        return subprocess.CompletedProcess(command, int(recipe in failing), "",
                                           "torch.OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    return bench, commands


def test_bench_pretrain_fails_when_a_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe run that exits non-zero (here an out-of-memory torchrun job, stubbed: no GPU)
    is a failed benchmark: the script exits with an error naming it, after the table."""
    failing = {"fp8"}
    bench, _ = stubbed_bench_pretrain(monkeypatch, {"bf16": 0.5, "fp8": 0.5}, failing)
    monkeypatch.setattr(sys, "argv", ["bench_pretrain.py", "--recipes", "bf16", "fp8", "--steps", "4",
                                      "--warmup-steps", "1"])
    with pytest.raises(SystemExit, match="fp8") as failure:
        bench.main()
    assert failure.value.code not in (0, None)
    failing.clear()
    bench.main()  # every run succeeded: returns normally (exit status 0)


def test_bench_pretrain_runs_each_compile_mode(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``--compile-modes``: one run per recipe and mode, each passing its mode to the example;
    ratios are against the default-mode bf16 row even when another bf16 row comes first."""
    step_s = {"bf16 @reduce-overhead": 2.0, "bf16": 0.5, "fp8 @reduce-overhead": 0.4, "fp8": 0.25}
    bench, commands = stubbed_bench_pretrain(monkeypatch, step_s, set())
    monkeypatch.setattr(sys, "argv", ["bench_pretrain.py", "--recipes", "bf16", "fp8", "--steps", "4",
                                      "--warmup-steps", "1", "--compile-modes", "reduce-overhead", "default"])
    bench.main()
    runs = [(c[c.index("--recipe") + 1], c[c.index("--compile-mode") + 1]) for c in commands]
    assert runs == [("bf16", "reduce-overhead"), ("bf16", "default"), ("fp8", "reduce-overhead"), ("fp8", "default")]
    table = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert "0.25x" in table["bf16 @reduce-overhead"] and "1.00x" in table["bf16"]
    assert "1.25x" in table["fp8 @reduce-overhead"] and "2.00x" in table["fp8"]
