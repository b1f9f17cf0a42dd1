"""Timing and result files shared by the ``scripts/bench_*.py`` benchmarks.

Device work is asynchronous, so times come from CUDA events around each repetition, after
warm-up (module load, compilation, autotuning), and the median of the repetitions is reported.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
from typing import Any, Callable

import torch


def cuda_time_ms(fn: Callable[[], Any], reps: int = 20, warmup: int = 3,
                 before_each: Callable[[], Any] | None = None, queued_behind_ms: float = 0.0) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream over ``reps`` repetitions.

    ``before_each`` runs outside the timed region (e.g. ``dist.barrier`` so ranks start together).
    By default each repetition starts on an idle device, so host time spent issuing ``fn``'s work
    counts wherever the device waits for it. ``queued_behind_ms > 0`` first queues a spin kernel of
    about that many milliseconds (untimed), so the host issues ``fn`` while the device is busy, as
    in a training step where the call is queued behind compute: the time is then the device's
    alone, as long as issuing takes less than the spin.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    spin_cycles = int(queued_behind_ms * _spin_cycles_per_ms(torch.cuda.current_device())) if queued_behind_ms else 0
    times = []
    for _ in range(reps):
        if before_each is not None:
            before_each()
            torch.cuda.synchronize()
        if spin_cycles:
            torch.cuda._sleep(spin_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@functools.cache
def _spin_cycles_per_ms(device: int) -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond on ``device`` (measured once)."""
    cycles = 1 << 22
    torch.cuda._sleep(cycles)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def host_cpu() -> str:
    """The host CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): a result
    that is bound by host time depends on it as much as on the GPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_result(name: str, payload: dict) -> str | None:
    """Write ``$OUT/<name>.json`` (with the device, host CPU and torch version) when ``OUT`` is set."""
    out = os.environ.get("OUT")
    if not out:
        return None
    payload = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "host_cpu": host_cpu(), "torch": torch.__version__, **payload}
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
