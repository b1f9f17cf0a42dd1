"""Training telemetry: metrics and per-layer amax/saturation as JSONL, throughput/MFU, plots.

* ``MetricsLog``: one JSON object per line (``metrics.jsonl`` of a run folder).
* ``Throughput``: tokens/s over a sliding window of steps and model FLOPs utilisation
  (MFU = achieved model FLOP/s / peak dense bf16 FLOP/s; Chowdhery et al. 2022, App. B).
* ``LayerMonitor``: every ``every`` steps, one JSONL row per layer. Modules with a
  ``last_stats()`` method (the lpdist.nn low-precision layers: input/weight/grad amax,
  fraction saturated at the format maximum and flushed to zero) report that dict; plain
  ``nn.Linear`` layers get a forward pre-hook that records the amax and RMS of their input,
  whose ratio shows the activation outliers that FP8 scaling must absorb (arXiv 2409.12517).
  Statistics are the local rank's (its micro-batch).
* ``plot_runs`` / ``plot_amax``: loss curves of several runs overlaid, and amax traces, as
  PNG (matplotlib with the Agg backend, imported only when plotting).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "MetricsLog",
    "read_jsonl",
    "peak_flops",
    "memory_gib",
    "Throughput",
    "LayerMonitor",
    "plot_runs",
    "validation_curve",
    "validation_gaps",
    "plot_gaps",
    "plot_amax",
]

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts; the L40 datasheet gives 181.05
# dense, 362.1 with sparsity), keyed by a whole word of the CUDA device name, so that
# "NVIDIA L40" is not an L4 nor "NVIDIA RTX A1000" an A100.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
}

# Path components that FSDP/DDP/compile/activation checkpointing insert into module names.
_WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Append-only JSONL file; ``truncate_after(step)`` drops records of steps after
    ``step`` (used when a run resumes from an earlier checkpoint), and the file itself when no
    record is left (a fresh run in the folder of an earlier one)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        if not kept:
            self.path.unlink()
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from ``PEAK_BF16_FLOPS``; None if unknown
    (or not a CUDA device). ``LPDIST_PEAK_TFLOPS`` overrides it."""
    if "LPDIST_PEAK_TFLOPS" in os.environ:
        return float(os.environ["LPDIST_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    words = re.split(r"[^0-9A-Za-z]+", torch.cuda.get_device_name(device))  # "NVIDIA A100-SXM4-80GB"
    return next((PEAK_BF16_FLOPS[word] for word in words if word in PEAK_BF16_FLOPS), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Throughput:
    """Tokens/s and MFU over the last ``window`` steps (the first tick only starts the clock,
    so start-up and compilation are not counted)."""

    def __init__(self, flops_per_token: float, world_size: int, device: torch.device, *, window: int = 20) -> None:
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_flops(device)
        self._ticks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def tick(self, tokens: int) -> None:
        """Call after each step with the tokens that step processed on all ranks."""
        self._ticks.append((time.perf_counter(), tokens))

    def rates(self) -> dict[str, float]:
        """``tokens_per_s`` (all ranks, over the window), ``step_s`` (the last step's wall
        time) and, where the peak is known, ``mfu`` in [0, 1]."""
        if len(self._ticks) < 2:
            return {}
        elapsed = self._ticks[-1][0] - self._ticks[0][0]
        tokens = sum(t for _, t in list(self._ticks)[1:])
        tokens_per_s = tokens / elapsed if elapsed > 0 else math.nan
        rates = {"tokens_per_s": tokens_per_s, "step_s": self._ticks[-1][0] - self._ticks[-2][0]}
        if self.peak is not None:
            rates["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
        return rates


def _clean_name(name: str) -> str:
    """``name`` without the wrapper components: ``module._orig_mod.layers.0`` -> ``layers.0``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


class LayerMonitor:
    """Per-layer telemetry written as JSONL every ``every`` steps.

    Call ``start_step(step)`` before the forward and ``end_step(step)`` after the backward.
    ``input_hooks=False`` leaves plain ``nn.Linear`` layers unobserved (e.g. with
    ``torch.compile``, where hooks would break graphs); ``last_stats()`` layers still report.
    """

    def __init__(self, model: nn.Module, path: str | os.PathLike, *, every: int = 10, input_hooks: bool = True) -> None:
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.log = MetricsLog(path)
        self.every = every
        self._active = False
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reporters = [(_clean_name(n), m) for n, m in model.named_modules() if callable(getattr(m, "last_stats", None))]
        self._handles = []
        if input_hooks:
            for name, module in model.named_modules():
                if type(module) is nn.Linear:
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(_clean_name(name))))

    def _input_hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if self._active and name not in self._inputs:
                x = args[0].detach()
                self._inputs[name] = (x.abs().amax().float(), x.float().pow(2).mean().sqrt())

        return record

    def start_step(self, step: int) -> None:
        self._active = step % self.every == 0
        self._set_tracking(self._active)
        self._inputs.clear()

    def _set_tracking(self, enabled: bool) -> None:
        """Layer statistics cost extra passes: they are kept only on the sampled steps."""
        for _, module in self._reporters:
            if hasattr(module, "track_stats"):
                module.track_stats = enabled

    def end_step(self, step: int) -> None:
        if not self._active:
            return
        self._active = False
        for name, module in self._reporters:
            stats = module.last_stats()
            if stats:
                self.log.log({"step": step, "layer": name, **stats})
        for name, (amax, rms) in self._inputs.items():
            self.log.log({"step": step, "layer": name, "input_amax": amax.item(), "input_rms": rms.item()})
        self._inputs.clear()
        self._set_tracking(False)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, figure, axes, path: str | os.PathLike, *, ylabel: str, legend_size: float | None = None,
            xlabel: str = "step") -> Path:
    """Label the axes, add grid and legend, write the PNG and release the figure."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _labelled_runs(run_dirs: Iterable[str | os.PathLike], labels: Iterable[str] | None) -> tuple[list[Path], list[str]]:
    """Run folders as paths and their labels (default: the folder names), one label per run."""
    run_dirs = [Path(d) for d in run_dirs]
    labels = list(labels) if labels is not None else [d.name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    return run_dirs, labels


def plot_runs(
    run_dirs: Iterable[str | os.PathLike], path: str | os.PathLike, *, labels: Iterable[str] | None = None
) -> Path:
    """Training loss (line) and validation loss (markers) against step for each run folder
    (its ``metrics.jsonl``), overlaid in one PNG. Returns ``path``."""
    run_dirs, labels = _labelled_runs(run_dirs, labels)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for run, label in zip(run_dirs, labels):
        records = read_jsonl(run / "metrics.jsonl")
        train = sorted((r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"]))
        val = sorted((r["step"], r["val_loss"]) for r in records if "val_loss" in r)
        line = axes.plot(*zip(*train), label=f"{label} train", linewidth=1)[0] if train else None
        if val:
            color = line.get_color() if line is not None else None
            axes.plot(*zip(*val), "o--", color=color, label=f"{label} val", markersize=4)
    return _finish(plt, figure, axes, path, ylabel="loss (nats/token)")


GAP_AXES = ("step", "tokens")


def validation_curve(run_dir: str | os.PathLike, *, x: str = "step") -> dict[int, float]:
    """``{x: validation loss}`` from ``run_dir``'s ``metrics.jsonl`` (the last record of a step
    wins). ``x``: ``"step"``, or ``"tokens"``, the training tokens of the step (runs of different
    global batches compare at equal tokens, not at equal steps; an evaluation without its step's
    training record is left out)."""
    if x not in GAP_AXES:
        raise ValueError(f"x must be one of {GAP_AXES}, got {x!r}")
    records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if x == "step":
        return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    tokens_at = {r["step"]: r["tokens"] for r in records if "loss" in r}
    return {tokens_at[r["step"]]: r["val_loss"] for r in records if "val_loss" in r and r["step"] in tokens_at}


def validation_gaps(run_dir: str | os.PathLike, baseline_dir: str | os.PathLike, *,
                    x: str = "step") -> list[tuple[int, float]]:
    """``(x, 100 * (val - val_baseline) / val_baseline)`` at every ``x`` where both runs hold a
    validation loss (:func:`validation_curve`)."""
    run, base = validation_curve(run_dir, x=x), validation_curve(baseline_dir, x=x)
    return [(at, 100.0 * (run[at] - base[at]) / base[at]) for at in sorted(run.keys() & base.keys())]


def plot_gaps(run_dirs: Iterable[str | os.PathLike], baseline_dir: str | os.PathLike | Sequence[str | os.PathLike],
              path: str | os.PathLike, *, labels: Iterable[str] | None = None, x: str = "step") -> Path:
    """Validation loss of each run relative to its baseline's, in % (:func:`validation_gaps`),
    against ``x`` (step or training tokens), one line per run, in one PNG: the differences of a
    loss-parity study, which are too small to read on the loss curves themselves.
    ``baseline_dir``: one baseline run for all (a path, or a sequence of one), or one per run
    (e.g. each seed's own bf16 run). Returns ``path``."""
    run_dirs, labels = _labelled_runs(run_dirs, labels)
    baselines = [Path(b) for b in ([baseline_dir] if isinstance(baseline_dir, (str, os.PathLike)) else baseline_dir)]
    if len(baselines) == 1:
        baselines *= len(run_dirs)
    if len(baselines) != len(run_dirs):
        raise ValueError(f"got {len(baselines)} baseline runs for {len(run_dirs)} runs (give one, or one per run)")
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.axhline(0.0, color="black", linewidth=0.8)
    for run, baseline, label in zip(run_dirs, baselines, labels):
        gaps = validation_gaps(run, baseline, x=x)
        if gaps:
            axes.plot(*zip(*gaps), "o-", label=label, markersize=3)
    names = sorted({b.name for b in baselines})
    return _finish(plt, figure, axes, path, ylabel=f"validation loss vs {', '.join(names)} (%)",
                   xlabel="step" if x == "step" else "training tokens")


def plot_amax(telemetry: str | os.PathLike, path: str | os.PathLike, *, key: str = "input_amax", top: int = 8) -> Path:
    """``key`` (default the input amax) against step for the ``top`` layers with the largest
    values, from a ``LayerMonitor`` JSONL file. Layers reading the same input (q/k/v,
    gate/up) have identical traces; only the first of each is drawn. Log scale when the
    values span more than a decade. Returns ``path``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_jsonl(telemetry):
        value = record.get(key)
        if value is not None and math.isfinite(value):
            series.setdefault(record["layer"], []).append((record["step"], value))
    if not series:
        raise ValueError(f"{telemetry} has no finite {key!r} values to plot")
    distinct: dict[tuple, str] = {}
    for name, points in series.items():
        distinct.setdefault(tuple(sorted(points)), name)
    largest = sorted(distinct.items(), key=lambda item: max(v for _, v in item[0]), reverse=True)[:top]
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for points, name in largest:
        axes.plot(*zip(*points), label=name, linewidth=1)
    values = [v for points, _ in largest for _, v in points]
    if min(values) > 0 and max(values) > 10 * min(values):
        axes.set_yscale("log")
    return _finish(plt, figure, axes, path, ylabel=key, legend_size=7)
