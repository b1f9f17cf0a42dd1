"""lpdist.monitor: JSONL logs, throughput/MFU arithmetic, per-layer telemetry, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lpdist import monitor
from lpdist.monitor import (LayerMonitor, MetricsLog, Throughput, plot_amax, plot_gaps, plot_runs, read_jsonl,
                            validation_gaps)
from script_loader import load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_metrics_log_appends_and_truncates_for_resume(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step})
    log.log({"step": 5, "val_loss": 0.3})
    with log.path.open("a") as handle:
        handle.write('{"step": 6, "lo')  # torn line of a killed run
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3, 4, 5, 5]
    log.truncate_after(3)
    assert read_jsonl(log.path) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    log.truncate_after(0)  # a fresh run in the folder: no record left, no file left
    assert not log.path.exists()


def test_throughput_and_mfu(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 10.5, 11.0, 12.0])
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    monkeypatch.setenv("LPDIST_PEAK_TFLOPS", "100")
    meter = Throughput(flops_per_token=6e6, world_size=4, device=torch.device("cpu"))
    meter.tick(1000)
    assert meter.rates() == {}  # one tick only starts the clock
    for _ in range(3):
        meter.tick(1000)
    rates = meter.rates()
    assert rates["tokens_per_s"] == pytest.approx(3000 / 2.0)
    assert rates["step_s"] == pytest.approx(1.0)
    assert rates["mfu"] == pytest.approx(1500 * 6e6 / (100e12 * 4))


def test_peak_is_unknown_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LPDIST_PEAK_TFLOPS", raising=False)
    assert monitor.peak_flops(torch.device("cpu")) is None
    assert "mfu" not in Throughput(1.0, 1, torch.device("cpu")).rates()


@pytest.mark.parametrize(
    "name, tflops",
    [
        # Dense bf16 tensor-core peaks from the vendor datasheets.
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),
        ("NVIDIA L4", 121),
        # Names that only contain a known name are unknown devices, not that device.
        ("NVIDIA RTX A1000", None),
        ("NVIDIA RTX A1000 6GB Laptop GPU", None),
        ("NVIDIA H1000", None),
    ],
)
def test_peak_flops_matches_whole_words_of_the_device_name(monkeypatch: pytest.MonkeyPatch, name: str,
                                                           tflops: int | None) -> None:
    monkeypatch.delenv("LPDIST_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = monitor.peak_flops(torch.device("cuda", 0))
    assert peak == (None if tflops is None else tflops * 1e12)


def test_wrapper_names_are_removed_as_whole_path_components(tmp_path: Path) -> None:
    """Wrappers (DDP ``module``, compile ``_orig_mod``, checkpointing, FSDP1) vanish from the logged
    path; names that merely contain a wrapper's name stay as they are."""
    model = nn.Module()
    model.submodule = nn.Sequential(nn.Linear(4, 4))
    model.my_module = nn.Module()
    model.my_module.fc = nn.Linear(4, 4)
    model.module = nn.Module()
    model.module._orig_mod = nn.Module()
    model.module._orig_mod._checkpoint_wrapped_module = nn.Sequential(nn.Linear(4, 4))
    layer_monitor = LayerMonitor(model, tmp_path / "telemetry.jsonl", every=1)
    layer_monitor.start_step(1)
    x = torch.randn(2, 4)
    model.my_module.fc(model.submodule(x))
    model.module._orig_mod._checkpoint_wrapped_module(x)
    layer_monitor.end_step(1)
    assert [r["layer"] for r in read_jsonl(tmp_path / "telemetry.jsonl")] == ["submodule.0", "my_module.fc", "0"]


class ReportingLayer(nn.Linear):
    """Stands in for an lpdist.nn layer: a Linear subclass with ``last_stats()``."""

    def last_stats(self) -> dict[str, float]:
        return {"input_amax": 2.5, "saturated_frac": 0.125}


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Linear(6, 8), ReportingLayer(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_layer_monitor_rows_every_n_steps(tmp_path: Path) -> None:
    model = Wrapper()
    layer_monitor = LayerMonitor(model, tmp_path / "telemetry.jsonl", every=2)
    inputs = {}
    for step in range(1, 5):
        x = torch.randn(5, 6) * step
        inputs[step] = x
        layer_monitor.start_step(step)
        model(x).sum().backward()
        layer_monitor.end_step(step)
    rows = read_jsonl(tmp_path / "telemetry.jsonl")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    for step in (2, 4):
        plain = next(r for r in rows if r["step"] == step and r["layer"] == "0")  # "module." stripped
        x = inputs[step].double()
        assert plain["input_amax"] == pytest.approx(x.abs().max().item(), rel=1e-6)
        assert plain["input_rms"] == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-6)
        assert {"step": step, "layer": "1", "input_amax": 2.5, "saturated_frac": 0.125} in rows
    layer_monitor.close()
    layer_monitor.start_step(6)
    model(torch.randn(1, 6))
    layer_monitor.end_step(6)
    assert {r["step"] for r in read_jsonl(tmp_path / "telemetry.jsonl")} == {2, 4, 6}
    assert [r["layer"] for r in read_jsonl(tmp_path / "telemetry.jsonl") if r["step"] == 6] == ["1"]  # hooks removed
    with pytest.raises(ValueError, match="every"):
        LayerMonitor(model, tmp_path / "x.jsonl", every=0)


def test_validation_gaps_pair_the_shared_evaluation_steps(tmp_path: Path) -> None:
    """Gaps in % at the steps both runs evaluated (a step logged twice: its last value), for
    the gap plot of a loss-parity study."""
    base, run = MetricsLog(tmp_path / "bf16" / "metrics.jsonl"), MetricsLog(tmp_path / "fp8" / "metrics.jsonl")
    for step, b, r in ((100, 2.0, 2.02), (200, 1.6, 1.592), (300, 1.5, 1.5)):
        base.log({"step": step, "loss": b + 0.1})
        base.log({"step": step, "val_loss": b})
        run.log({"step": step, "val_loss": r})
    run.log({"step": 400, "val_loss": 1.4})  # the baseline has no evaluation at 400
    run.log({"step": 300, "val_loss": 1.53})  # a repeated step (resumed run): the last record counts
    gaps = validation_gaps(tmp_path / "fp8", tmp_path / "bf16")
    assert [step for step, _ in gaps] == [100, 200, 300]
    assert [gap for _, gap in gaps] == pytest.approx([1.0, -0.5, 2.0], rel=1e-12)
    assert plot_gaps([tmp_path / "fp8"], tmp_path / "bf16", tmp_path / "gap.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="labels"):
        plot_gaps([tmp_path / "fp8"], tmp_path / "bf16", tmp_path / "x.png", labels=[])
    # one baseline per run (a study over several seeds, each with its own bf16 run)
    runs, baselines = [tmp_path / "fp8"] * 2, [tmp_path / "bf16"] * 2
    assert plot_gaps(runs, baselines, tmp_path / "seeds.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_gaps(runs, baselines[:1], tmp_path / "one.png").read_bytes()[:8] == PNG_MAGIC  # one for all
    with pytest.raises(ValueError, match="baseline"):
        plot_gaps(runs * 2, baselines + baselines[:1], tmp_path / "x.png")
    plot_run = load_script("scripts/plot_run.py")
    plot_run.main([str(r) for r in runs] + ["--out", str(tmp_path / "loss.png"), "--gap", str(tmp_path / "g.png"),
                                            "--baselines", *map(str, baselines), "--x", "step"])
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit):
        plot_run.main([str(runs[0]), "--gap", str(tmp_path / "x.png")])  # --gap needs --baselines


def test_plots_are_png_files(tmp_path: Path) -> None:
    for name, offset in (("a", 0.0), ("b", 0.2)):
        log = MetricsLog(tmp_path / name / "metrics.jsonl")
        for step in range(1, 11):
            log.log({"step": step, "loss": 5.0 / step + offset})
        log.log({"step": 10, "val_loss": 0.9 + offset})
    assert plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    telemetry = tmp_path / "telemetry.jsonl"
    telemetry.write_text("".join(json.dumps({"step": s, "layer": f"l{i}", "input_amax": 10.0**i * s}) + "\n"
                                 for s in range(1, 5) for i in range(3)))
    assert plot_amax(telemetry, tmp_path / "amax.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="labels"):
        plot_runs([tmp_path / "a"], tmp_path / "x.png", labels=["one", "two"])
    with pytest.raises(ValueError, match="grad_amax"):
        plot_amax(telemetry, tmp_path / "x.png", key="grad_amax")


def test_monitor_tracks_layer_statistics_only_on_sampled_steps(tmp_path):
    from lpdist.nn import Float8Linear, set_tracking

    model = torch.nn.Sequential(Float8Linear(32, 32), torch.nn.ReLU(), Float8Linear(32, 32))
    assert set_tracking(model, False) == 2 and not model[0].track_stats
    monitor = LayerMonitor(model, tmp_path / "t.jsonl", every=2)
    for step in range(4):
        monitor.start_step(step)
        assert model[0].track_stats == (step % 2 == 0)
        model(torch.randn(4, 32)).sum().backward()
        monitor.end_step(step)
        assert not model[2].track_stats
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 2]
    assert all(math.isfinite(r["input_amax"]) for r in rows)
