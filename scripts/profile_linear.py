"""Where the time of the Llama MLP block goes: top device kernels per layer type.

Builds the MLP block of ``scripts/bench_linear.py`` (its ``MLP``, ``VARIANTS`` and training step,
which clears the weight gradients first), compiles it, warms up, then records ``--iters``
forward+backward steps with ``torch.profiler``. Per variant it
prints the step time (CUDA events, median), the kernels ranked by total time (calls and
milliseconds per step, share of the summed kernel time) and the split between GEMM kernels
(cuBLAS/cuBLASLt/CUTLASS: names with ``gemm``, ``nvjet``, ``xmma`` or ``cutlass``, except Triton
kernels, whose names list the fused ops, e.g. the casts feeding ``fp8_gemm``) and the rest
(casts, amax reductions, transposes, SwiGLU, gradient sums). Step time minus summed kernel time is
device idle time (launch gaps); on CUDA the profiled steps start on an idle device, as the timed
ones do, and the largest idle gaps between consecutive kernels are listed with the kernels on
either side (with the host-side synchronizations per step), which tells where the device waits
for the host.

On a machine without CUDA it profiles CPU operators instead (self time, GEMMs = ``mm``-like ops),
so that ``--shapes tiny`` checks the script anywhere; the numbers then say nothing about a GPU.

Usage: python scripts/profile_linear.py [--shapes 8b] [--variants fp8-tensor,fp8-block,...]
[--iters 3] [--top 15] [--eager]. Default variants: fp8-tensor, fp8-block, torchao-tensorwise
(when torchao is importable), bf16. About a minute on one H200, mostly compilation.
Writes $OUT/profile_linear.json when OUT is set.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench_linear import MLP, SHAPES, VARIANTS, training_step
from lpdist.benchmark import cuda_time_ms, write_result

#: bench_linear's shapes plus one small enough for a CPU (all dims multiples of the 128 tiles).
PROFILE_SHAPES = {**SHAPES, "tiny": (256, 128, 384)}
_GEMM_KERNEL = re.compile(r"^(?!triton_).*(gemm|nvjet|xmma|cutlass)", re.IGNORECASE)
_GEMM_CPU_OP = re.compile(r"^aten::(mm|addmm|bmm|_scaled_mm|_scaled_mm_v2)$")


def default_variants() -> list[str]:
    torchao = ["torchao-tensorwise"] if importlib.util.find_spec("torchao") else []
    return ["fp8-tensor", "fp8-block", *torchao, "bf16"]


def _cpu_time_ms(step, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_table(events, iters: int, device_type: DeviceType) -> list[dict]:
    """Kernels (CUDA) or operators (CPU, self time) from ``prof.key_averages()``, per step,
    largest first."""
    rows = []
    for e in events:
        if e.device_type != device_type:
            continue
        us = e.self_device_time_total if device_type == DeviceType.CUDA else e.self_cpu_time_total
        if us <= 0:
            continue
        pattern = _GEMM_KERNEL if device_type == DeviceType.CUDA else _GEMM_CPU_OP
        rows.append({"name": e.key, "calls": e.count / iters, "ms": us / 1e3 / iters,
                     "gemm": bool(pattern.search(e.key))})
    rows.sort(key=lambda r: r["ms"], reverse=True)
    total = sum(r["ms"] for r in rows)
    for r in rows:
        r["pct"] = 100.0 * r["ms"] / total if total else 0.0
    return rows


def idle_gaps(kernels: list[tuple[float, float, str]], top: int) -> dict:
    """Device idle time between consecutive kernels ``(start_us, end_us, name)`` of one stream:
    the total (ms) and the ``top`` largest gaps with the kernel before and after each."""
    ordered = sorted(kernels)
    gaps, busy_until, last = [], None, None
    for start, end, name in ordered:
        if busy_until is not None and start > busy_until:
            gaps.append({"us": start - busy_until, "after": last, "before": name})
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    gaps.sort(key=lambda g: g["us"], reverse=True)
    return {"idle_ms": sum(g["us"] for g in gaps) / 1e3, "largest": gaps[:top]}


def profile_variant(base: MLP, variant: str, x: torch.Tensor, grad: torch.Tensor, *,
                    compiled: bool, iters: int, warmup: int, reps: int) -> dict:
    """Step time and per-kernel device time of one variant's MLP block, per fwd+bwd step."""
    torch._dynamo.reset()
    mlp = VARIANTS[variant](copy.deepcopy(base))
    step, _ = training_step(mlp, torch.compile(mlp) if compiled else mlp, x, grad)
    on_cuda = x.is_cuda
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    step_ms = cuda_time_ms(step, reps, warmup=0) if on_cuda else _cpu_time_ms(step, reps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
            if on_cuda:  # as the step time is taken: each step starts on an idle device
                torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = kernel_table(averages, iters, DeviceType.CUDA if on_cuda else DeviceType.CPU)
    gemm_ms = sum(k["ms"] for k in kernels if k["gemm"])
    total_ms = sum(k["ms"] for k in kernels)
    gaps = None
    if on_cuda:
        gaps = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                          if e.device_type == DeviceType.CUDA], top=8)
        gaps["host_syncs_per_step"] = {  # the loop's own synchronize counts once per step
            e.key: e.count / iters for e in averages
            if e.device_type == DeviceType.CPU and "Synchronize" in e.key}
    return {"variant": variant, "step_ms": step_ms, "kernel_ms": total_ms, "gemm_ms": gemm_ms,
            "non_gemm_ms": total_ms - gemm_ms, "wall_s": time.perf_counter() - t0,
            "kernels": kernels, "gaps": gaps}


def _short(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters (with "..." when cut)."""
    return name if len(name) <= width else name[:width - 3] + "..."


def print_variant(r: dict, top: int, width: int = 72) -> None:
    unit = "kernel" if r["device"] == "cuda" else "op (CPU self time)"
    print(f"\n== {r['shape']} {r['variant']} ({r['mode']}): step {r['step_ms']:.2f} ms, "
          f"{unit} sum {r['kernel_ms']:.2f} ms = GEMM {r['gemm_ms']:.2f} + other "
          f"{r['non_gemm_ms']:.2f} ms/step  [{r['wall_s']:.0f} s]")
    print(f"{unit[:width]:{width}} {'calls':>6} {'ms/step':>8} {'%':>6}  gemm")
    for k in r["kernels"][:top]:
        print(f"{_short(k['name'], width):{width}} {k['calls']:6.1f} {k['ms']:8.3f} {k['pct']:6.1f}  "
              f"{'*' if k['gemm'] else ''}")
    if r.get("gaps"):
        print(f"device idle between kernels over the profiled steps: {r['gaps']['idle_ms']:.3f} ms; "
              f"host syncs per step {r['gaps']['host_syncs_per_step']}; largest gaps:")
        for g in r["gaps"]["largest"]:
            print(f"  {g['us']:8.1f} us  after {_short(g['after'], 40)}  before {_short(g['before'], 40)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8b", help=f"comma list of {sorted(PROFILE_SHAPES)}")
    ap.add_argument("--variants", default=",".join(default_variants()),
                    help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--iters", type=int, default=3, help="profiled fwd+bwd steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps for step_ms (median)")
    ap.add_argument("--top", type=int, default=15, help="kernels printed per variant")
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    args = ap.parse_args()
    for name, allowed in (("shapes", PROFILE_SHAPES), ("variants", VARIANTS)):
        bad = [v for v in getattr(args, name).split(",") if v not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; allowed: {sorted(allowed)}")
    if min(args.iters, args.warmup, args.reps) < 1:
        ap.error("--iters, --warmup and --reps must be positive")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for shape in args.shapes.split(","):
        tokens, dim, hidden = PROFILE_SHAPES[shape]
        torch.manual_seed(0)
        base = MLP(dim, hidden).to(device, torch.bfloat16)
        x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
        grad = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16)
        for variant in args.variants.split(","):
            r = {"shape": shape, "tokens": tokens, "dim": dim, "hidden": hidden,
                 "mode": "eager" if args.eager else "compiled", "device": device}
            try:
                r.update(profile_variant(base, variant, x, grad, compiled=not args.eager,
                                         iters=args.iters, warmup=args.warmup, reps=args.reps))
            except Exception as err:  # one unavailable variant must not stop the run
                r.update(variant=variant, error=f"{type(err).__name__}: {err}".splitlines()[0])
                print(json.dumps(r), flush=True)
            else:
                print_variant(r, args.top)
            results.append(r)
            if device == "cuda":
                torch.cuda.empty_cache()
    write_result("profile_linear", {"rows": results})


if __name__ == "__main__":
    main()
