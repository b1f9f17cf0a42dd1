"""Timing and result files shared by the ``scripts/bench_*.py`` benchmarks.

Device work is asynchronous, so times come from CUDA events around each repetition, after
warm-up (module load, compilation, autotuning), and the median of the repetitions is reported.
:func:`kernel_time_breakdown` splits the device time of a profiled training step into compute and
(exposed) communication from the kernels of a ``torch.profiler`` trace, :func:`kernel_time_by_kind`
into GEMMs, attention, communication, optimizer and Triton kernels.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable

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
    with torch.cuda.device(device):
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


#: Kernels that move data between GPUs or exist only to do so: NCCL's collectives and lpdist.comm's
#: FP8 encode (``quantize_rows*``, also into a peer's memory), decode/sum (``dequant_rows*``) and
#: peer barrier. Everything else (FSDP2's copy-in/out included) counts as compute.
COMMUNICATION_KERNELS = re.compile(r"nccl|quantize_rows|dequant_rows|peer_barrier", re.IGNORECASE)


#: Kinds of kernels by name, first match wins (the rest is ``"other"``): cuBLAS(Lt) GEMMs,
#: attention, communication (``COMMUNICATION_KERNELS``), the fused AdamW step and torch's
#: multi-tensor kernels (clipping, zeroing), and Triton kernels (norms, RoPE, SwiGLU, FP8 casts).
KERNEL_KINDS = {
    "gemm": re.compile(r"nvjet|gemm|sm90_xmma|cutlass", re.IGNORECASE),
    "attention": re.compile(r"flash|fmha|sdpa", re.IGNORECASE),
    "communication": COMMUNICATION_KERNELS,
    "optimizer": re.compile(r"^adamw_|multi_tensor_apply", re.IGNORECASE),
    "triton": re.compile(r"^triton_"),
}


def kernel_time_by_kind(kernels: Iterable[tuple[str, float, float]], steps: int = 1) -> dict[str, float]:
    """Summed kernel durations per :data:`KERNEL_KINDS` kind (and ``"other"``), divided by
    ``steps``; concurrent kernels each count in full (unlike :func:`kernel_time_breakdown`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    totals = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for name, _, duration in kernels:
        kind = next((kind for kind, pattern in KERNEL_KINDS.items() if pattern.search(name)), "other")
        totals[kind] += duration
    return {kind: value / steps for kind, value in totals.items()}


def trace_kernels(path: str | Path) -> list[tuple[str, float, float]]:
    """``(name, start, duration)`` in microseconds of every GPU kernel of a Chrome trace written
    by ``torch.profiler.profile.export_chrome_trace``."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
            if e.get("cat") == "kernel" and e.get("ph") == "X"]


def kernel_time_breakdown(kernels: Iterable[tuple[str, float, float]], steps: int = 1) -> dict[str, float]:
    """Device time per step from kernel intervals ``(name, start, duration)`` (one time unit
    throughout; the results are in it, divided by ``steps``):

    * ``busy``: time in which any kernel runs (the union of all intervals, whatever the stream);
    * ``communication``: time in which a communication kernel (``COMMUNICATION_KERNELS``) runs;
    * ``exposed_communication``: time in which communication kernels run and no other kernel
      does: what overlapping with compute did not hide;
    * ``compute``: time in which a compute kernel runs (``busy - exposed_communication``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    edges = []
    for name, start, duration in kernels:
        comm = bool(COMMUNICATION_KERNELS.search(name))
        edges += [(start, 1, comm), (start + duration, -1, comm)]
    edges.sort(key=lambda edge: edge[0])
    active = {True: 0, False: 0}
    totals = dict.fromkeys(("busy", "communication", "exposed_communication"), 0.0)
    last = None
    for time, change, comm in edges:
        if last is not None and time > last:
            span = time - last
            if active[True] or active[False]:
                totals["busy"] += span
            if active[True]:
                totals["communication"] += span
                if not active[False]:
                    totals["exposed_communication"] += span
        active[comm] += change
        last = time
    totals["compute"] = totals["busy"] - totals["exposed_communication"]
    return {key: value / steps for key, value in totals.items()}
