"""End-to-end pretraining throughput per recipe: examples/pretrain_llama.py on every GPU.

    python scripts/bench_pretrain.py                              # 1b, bf16 vs fp8 vs fp8-smooth
    python scripts/bench_pretrain.py --model 8b --recipes bf16 fp8 --batch-size 2
    python scripts/bench_pretrain.py --recipes bf16 fp8-smooth --ablate-each  # + one run per part off
    python scripts/bench_pretrain.py --recipes bf16 fp8 --compile-modes default reduce-overhead
    python scripts/bench_pretrain.py --parallel none --batch-size 16    # one GPU, the plain model

Each recipe runs as its own ``torchrun --nproc_per_node=<GPUs>`` job (one process with
``--parallel none``) with the same model,
batch and data (the default corpus; ``--vocab-size 32000`` by default so the 1b model has
the 1.1B shape of the end-to-end reference: d 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192,
vocab 32000). The first ``--warmup-steps`` steps (compilation, allocator
warm-up) are dropped; the table shows the median over the remaining steps of tokens/s (all
GPUs) and MFU (against the dense bf16 peak), the peak memory per GPU and the last loss; bf16
is the baseline measured in the same run. The step-time columns are medians over the timed
steps (every ``--time-every``-th step, CUDA events, see the example's docstring) of forward +
backward (with exposed gradient communication), optimizer step and the rest.
``--ablate-each`` adds, for every recipe, one run per part it switches on (``--ablate layers``,
``grad_comm``, ``all_gather``, ``moments``; the communication parts only on several GPUs),
labelled e.g. ``fp8-smooth -moments``. ``--profile`` traces the last three warm-up steps of every
run (``torch.profiler``, so the timed steps stay untraced) and adds their device time per step:
busy, communication kernels, and the exposed part of it that no compute kernel overlaps
(``lpdist.benchmark.kernel_time_breakdown``). With env OUT set, also writes ``$OUT/bench_pretrain.json``.
Exit status 1 when a run failed (its row holds the error).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lpdist.benchmark import write_result

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_llama.py"
BREAKDOWN = ("time_fwd_bwd_s", "time_optim_s", "time_other_s")
#: Device time per step of the traced steps (``--profile``), in ms.
PROFILED = ("profile_busy_ms", "profile_communication_ms", "profile_exposed_communication_ms")


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Parts that only act between processes: on one GPU, switching them off changes nothing.
COMMUNICATION_PARTS = ("grad_comm", "all_gather")


def variants(recipes: list[str], ablate_each: bool, nproc: int) -> list[tuple[str, list[str]]]:
    """``(recipe, ablated parts)`` runs: each recipe in full, then (``ablate_each``) without
    each part that it switches on (communication parts only with more than one process)."""
    parts_of = load_example().ablatable_parts if ablate_each else lambda recipe: []
    runs = []
    for recipe in recipes:
        parts = [part for part in parts_of(recipe) if nproc > 1 or part not in COMMUNICATION_PARTS]
        runs += [(recipe, []), *((recipe, [part]) for part in parts)]
    return runs


def run_recipe(recipe: str, ablate: list[str], mode: str, args: argparse.Namespace, nproc: int,
               folder: Path) -> dict:
    label = " ".join([recipe, *(f"-{part}" for part in ablate), *([f"@{mode}"] if mode != "default" else [])])
    out = folder / label.replace(" ", "_")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLE),
        "--model", args.model, "--recipe", recipe, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--vocab-size", str(args.vocab_size), "--eval-every", "0", "--monitor-every", "0",
        "--time-every", str(args.time_every), "--parallel", args.parallel, "--out", str(out),
        *(["--compile", "--compile-mode", mode] if args.compile else []),
        *(["--ablate", *ablate] if ablate else []),
        *(["--profile", str(args.warmup_steps - 2)] if args.profile else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"recipe": label, "error": (result.stdout + result.stderr)[-2000:]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_s" in r and r["step"] > args.warmup_steps]
    tokens_per_step = nproc * args.batch_size * args.seq_len
    tokens_per_s = statistics.median(tokens_per_step / r["step_s"] for r in timed)
    row = {"recipe": label, "tokens_per_s": tokens_per_s, "peak_mem_gib": max(r["mem_gib"] for r in timed),
           "last_loss": timed[-1]["loss"], "timed_steps": len(timed)}
    mfu_scale = [r["mfu"] / r["tokens_per_s"] for r in timed if "mfu" in r]
    if mfu_scale:
        row["mfu"] = tokens_per_s * mfu_scale[-1]
    for key in BREAKDOWN:
        values = [r[key] for r in timed if key in r]
        if values:
            row[key] = statistics.median(values)
    traced = [r for r in records if "profile_busy_ms" in r]
    if traced:
        row.update({key: value for key, value in traced[-1].items() if key.startswith("profile_")})
    return row


def print_kernel_kinds(rows: list[dict]) -> None:
    """Kernel time per step by kind (``--profile``: ``profile_kernels_<kind>_ms``), one line per run."""
    traced = next((row for row in rows if any(key.startswith("profile_kernels_") for key in row)), {})
    kinds = [key for key in traced if key.startswith("profile_kernels_")]
    names = [key.removeprefix("profile_kernels_").removesuffix("_ms") for key in kinds]
    print("\nkernel time per step by kind, ms (traced warm-up steps; concurrent kernels each count in full)")
    print(f"{'recipe':24} " + " ".join(f"{name:>13}" for name in names))
    for row in rows:
        if all(key in row for key in kinds):
            print(f"{row['recipe']:24} " + " ".join(f"{row[key]:13.1f}" for key in kinds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--recipes", nargs="+", default=["bf16", "fp8", "fp8-smooth"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-modes", nargs="+", default=["default"], choices=load_example().COMPILE_MODES,
                        help="run every recipe once per torch.compile mode (rows labelled @MODE; "
                             "the baseline is the bf16 row of the default mode when there is one)")
    parser.add_argument("--time-every", type=int, default=2, help="time the step phases every N steps")
    parser.add_argument("--ablate-each", action="store_true", help="also run each recipe once per part switched off")
    parser.add_argument("--profile", action="store_true",
                        help="trace the last 3 warm-up steps: device busy, communication and exposed communication ms")
    parser.add_argument("--parallel", default="fsdp", choices=load_example().PARALLEL_MODES,
                        help="the example's --parallel; none runs one process on the first GPU (default: %(default)s)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_pretrain needs CUDA GPUs")
    if args.steps <= args.warmup_steps:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    if args.profile and args.warmup_steps < 5:
        raise SystemExit(f"--profile traces the last 3 of the --warmup-steps, which must be >= 5 (the first "
                         f"steps compile), got {args.warmup_steps}")
    nproc = 1 if args.parallel == "none" else torch.cuda.device_count()
    device = f"{nproc}x {torch.cuda.get_device_name(0)}"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for (recipe, ablate), mode in itertools.product(variants(args.recipes, args.ablate_each, nproc),
                                                        args.compile_modes):
            rows.append(run_recipe(recipe, ablate, mode, args, nproc, Path(folder)))
            print(json.dumps(rows[-1]), flush=True)
            write_result("bench_pretrain", {"gpus": device, "config": vars(args), "rows": rows})  # so far
    bf16_rows = [r for r in rows if r["recipe"].split(" ")[0] == "bf16" and "tokens_per_s" in r]
    plain_bf16 = [r for r in bf16_rows if r["recipe"] == "bf16"]
    baseline = (plain_bf16 or bf16_rows or [{}])[0].get("tokens_per_s")
    print(f"{args.model}, {nproc} GPU(s) ({device}, {args.parallel}), batch {args.batch_size}x{args.seq_len} per GPU, "
          f"compile={args.compile}, median of {args.steps - args.warmup_steps} steps")
    print(f"{'recipe':24} {'tokens/s':>12} {'vs bf16':>8} {'MFU':>7} {'peak GiB':>9} {'last loss':>10} "
          f"{'fwd+bwd ms':>11} {'optim ms':>9} {'other ms':>9}"
          + (f" {'busy ms':>8} {'comm ms':>8} {'exposed ms':>10}" if args.profile else ""))
    for row in rows:
        if "error" in row:
            print(f"{row['recipe']:24} FAILED: {row['error'][-300:]}")
            continue
        ratio = f"{row['tokens_per_s'] / baseline:.2f}x" if baseline else "-"
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        phases = " ".join(f"{1e3 * row[key]:{width}.1f}" if key in row else f"{'-':>{width}}"
                          for key, width in zip(BREAKDOWN, (11, 9, 9)))
        traced = "".join(f" {row[key]:{width}.1f}" if key in row else f" {'-':>{width}}"
                         for key, width in zip(PROFILED, (8, 8, 10))) if args.profile else ""
        print(f"{row['recipe']:24} {row['tokens_per_s']:12,.0f} {ratio:>8} {mfu:>7} {row['peak_mem_gib']:9.1f} "
              f"{row['last_loss']:10.4f} {phases}{traced}")
    if args.profile:
        print_kernel_kinds(rows)
    write_result("bench_pretrain", {"gpus": device, "config": vars(args), "rows": rows})
    failed = [row["recipe"] for row in rows if "error" in row]
    if failed:
        raise SystemExit(f"bench_pretrain: {len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
