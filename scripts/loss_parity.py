"""Final validation loss of each recipe against bf16, at the same token budget.

    python scripts/loss_parity.py --model 125m --tokens 100e6 --parallel-gpus 4 --out runs/parity-125m -- --compile
    python scripts/loss_parity.py --model tiny --tokens 20000 --seq-len 64 --batch-size 4 --recipes bf16 fp8  # CPU

Every recipe runs examples/pretrain_llama.py with the same model, seed, data, batch and number
of steps, ``steps = ceil(tokens / tokens_per_step)`` with ``tokens_per_step = nproc * batch_size *
seq_len`` (so each sees the same ``steps * tokens_per_step`` >= ``--tokens`` training tokens in the
same order).
Arguments after ``--`` go to every run unchanged (``--compile``, ``--data``, ``--lr``, ...).
``--nproc`` processes per run (torchrun; one plain process when 1); ``--parallel-gpus N`` runs
up to ``N / nproc`` recipes at a time, each on its own ``nproc`` GPUs (``CUDA_VISIBLE_DEVICES``):
the first N entries of this process's own ``CUDA_VISIBLE_DEVICES`` when it is set (so studies
started on disjoint devices stay apart), else devices 0..N-1.
Runs with different ``--nproc`` see the same data in the same order when ``nproc x batch-size``
is the same (the global batch of a step does not depend on the number of processes), so slow
recipes may use more GPUs: launch them separately into the same ``--out`` and use ``--report``.

The example evaluates the validation loss at its last step; the table shows it per recipe and
its gap to bf16, ``100 * (loss - loss_bf16) / loss_bf16`` %, and the same at the largest number
of training tokens at which every run was evaluated (so unfinished runs are compared too). Runs
are compared by training tokens, not steps: a run is finished when it reached ``--tokens`` and
was evaluated there, and a run whose tokens per step differ from bf16's (another global batch
or sequence length, e.g. gathered from another study) is flagged in the table. Runs are launched
with ``--resume`` into ``--out/<recipe>``: with ``-- --stop-at K`` a long comparison can be done
in chunks (re-run the same command without ``--stop-at`` to finish; an unfinished run is listed
as such); the example refuses to resume a run of another step count, batch or schedule (another
``--tokens`` into the same ``--out``). ``--report`` launches nothing and tabulates the runs
already in ``--out`` (e.g. made on several machines and gathered in one folder). Writes
``--out/loss_parity.json``, ``--out/loss_parity.png`` (the loss curves overlaid against step,
``lpdist.monitor.plot_runs``), ``--out/loss_parity_gap.png`` (each recipe's validation loss
relative to bf16's at every token count both were evaluated at) and ``$OUT/loss_parity.json``
when env OUT is set. Exit status 1 when a recipe failed (its row holds the error).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lpdist.benchmark import write_result
from lpdist.monitor import plot_gaps, plot_runs, read_jsonl, validation_curve
from lpdist.nn import recipes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_llama.py"
DEFAULT_RECIPES = ["bf16", "fp8", "fp8-smooth", "fp4-quartet", "fp4-dge", "nvfp4"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=sorted(recipes), metavar="RECIPE")
    parser.add_argument("--model", default="125m")
    parser.add_argument("--tokens", type=float, default=100e6, help="training tokens per run (e.g. 100e6)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per process per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--nproc", type=int, default=1, help="processes per run")
    parser.add_argument("--parallel-gpus", type=int, default=0,
                        help="use N GPUs: N / nproc recipes at once, each on its own nproc GPUs")
    parser.add_argument("--eval-every", type=int, default=250, help="validation curve every N steps (and at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs") / "loss-parity")
    parser.add_argument("--report", action="store_true",
                        help="launch nothing: tabulate and plot the runs already in --out (e.g. made on several machines)")
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1:]
    for name in ("tokens", "batch_size", "seq_len", "nproc"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.parallel_gpus < 0 or args.eval_every < 0:
        parser.error("--parallel-gpus and --eval-every must be >= 0")
    if args.parallel_gpus % args.nproc:
        parser.error(f"--parallel-gpus ({args.parallel_gpus}) must be a multiple of --nproc ({args.nproc})")
    args.steps = math.ceil(args.tokens / tokens_per_step(args))
    devices = visible_devices(args.parallel_gpus)
    if len(devices) < args.parallel_gpus:
        parser.error(f"--parallel-gpus {args.parallel_gpus}: CUDA_VISIBLE_DEVICES lists only {len(devices)} device(s)")
    args.gpu_groups = [",".join(devices[first:first + args.nproc]) for first in range(0, args.parallel_gpus, args.nproc)]
    return args


def tokens_per_step(args: argparse.Namespace) -> int:
    """Training tokens of one optimizer step of this study: ``nproc * batch_size * seq_len``."""
    return args.nproc * args.batch_size * args.seq_len


def visible_devices(count: int) -> list[str]:
    """Up to ``count`` devices for the runs, as ``CUDA_VISIBLE_DEVICES`` entries: the first of
    this process's own ``CUDA_VISIBLE_DEVICES`` list when it is set, else ``0 .. count-1``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in visible.split(",") if entry.strip()][:count]


def launch_command(recipe: str, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return [
        *launcher, str(EXAMPLE), "--model", args.model, "--recipe", recipe, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
        "--eval-every", str(args.eval_every), "--out", str(args.out / recipe), "--resume", *args.extra,
    ]


def run_recipe(recipe: str, args: argparse.Namespace, gpus: queue.Queue | None) -> dict:
    """One run; its output goes to ``--out/<recipe>/launch.log``. With ``gpus``, takes a free
    group of GPU indices (``"0,1"``) from the queue for the run and returns it afterwards."""
    run_dir = args.out / recipe
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    gpu = gpus.get() if gpus is not None else None
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    started = time.perf_counter()
    try:
        with (run_dir / "launch.log").open("w") as log:
            code = subprocess.run(launch_command(recipe, args), env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        if gpu is not None:
            gpus.put(gpu)
    row = {"recipe": recipe, "wall_s": time.perf_counter() - started, **({"gpu": gpu} if gpu is not None else {})}
    if code != 0:
        return {**row, "error": (run_dir / "launch.log").read_text()[-2000:]}
    return summarize(recipe, args, row)


def summarize(recipe: str, args: argparse.Namespace, row: dict | None = None) -> dict:
    """The run's progress from ``--out/<recipe>/metrics.jsonl``: last step, its training tokens,
    tokens per step, the validation curve keyed by training tokens (``val_curve``) and, when the
    run reached ``--tokens`` and was evaluated there, its final validation loss."""
    row = {"recipe": recipe} if row is None else row
    metrics = args.out / recipe / "metrics.jsonl"
    if not metrics.exists():
        return {**row, "error": f"no run: {metrics} does not exist"}
    tokens_at = {r["step"]: r["tokens"] for r in read_jsonl(metrics) if "loss" in r}
    curve = validation_curve(args.out / recipe, x="tokens")
    last = max(tokens_at, default=0)
    row.update(step=last, tokens=tokens_at.get(last, 0), val_curve=curve)
    if last:
        row["tokens_per_step"] = row["tokens"] // last
    if row["tokens"] >= args.tokens and row["tokens"] in curve:
        row["val_loss"] = curve[row["tokens"]]
    return row


def flag_other_batches(rows: list[dict], args: argparse.Namespace) -> None:
    """Adds a ``warning`` to each run whose tokens per step differ from bf16's (from this
    study's :func:`tokens_per_step` without a bf16 run): at equal tokens it still took another
    number of optimizer steps on other batches."""
    reference = next((r["tokens_per_step"] for r in rows if r["recipe"] == "bf16" and "tokens_per_step" in r), None)
    name = "bf16"
    if reference is None:
        reference, name = tokens_per_step(args), "this study"
    for row in rows:
        if row.get("tokens_per_step", reference) != reference:
            row["warning"] = (f"{row['tokens_per_step']:,} tokens per step, {name} {reference:,}: another global "
                              "batch or sequence length (compared at equal tokens)")


def gap_pct(loss: float, baseline: float) -> float:
    """Relative gap of a validation loss to bf16's, in %."""
    return 100 * (loss - baseline) / baseline


def compare_at_common_tokens(rows: list[dict]) -> int | None:
    """The largest training-token count at which every run was evaluated (unfinished ones
    included): adds each row's ``val_common`` there and, with a bf16 run, ``gap_common_pct``
    (same formula as the final gap)."""
    curves = [row["val_curve"] for row in rows if "error" not in row]
    counts = set.intersection(*(set(curve) for curve in curves)) if curves else set()
    if not counts:
        return None
    common = max(counts)
    baseline = next((r["val_curve"][common] for r in rows if r["recipe"] == "bf16" and "error" not in r), None)
    for row in rows:
        if "error" not in row:
            row["val_common"] = row["val_curve"][common]
            if baseline is not None:
                row["gap_common_pct"] = gap_pct(row["val_common"], baseline)
    return common


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = None
    if args.parallel_gpus:
        gpus = queue.Queue()
        for group in args.gpu_groups:
            gpus.put(group)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel_gpus // args.nproc)) as pool:
        launch = summarize if args.report else lambda recipe, args: run_recipe(recipe, args, gpus)
        rows = list(pool.map(lambda recipe: launch(recipe, args), args.recipes))
    baseline = next((r["val_loss"] for r in rows if r["recipe"] == "bf16" and "val_loss" in r), None)
    for row in rows:
        if baseline is not None and "val_loss" in row:
            row["gap_pct"] = gap_pct(row["val_loss"], baseline)

    common = compare_at_common_tokens(rows)
    flag_other_batches(rows, args)
    step_tokens = tokens_per_step(args)
    print(f"{args.model}: {args.steps} steps x {step_tokens:,} tokens = {args.steps * step_tokens:,} tokens "
          f"per recipe (batch {args.batch_size}x{args.seq_len} x {args.nproc} process(es)), seed {args.seed}")
    common_label = f"val loss at {common:,} tokens" if common is not None else "val loss at common tokens"
    width = len(common_label)
    print(f"{'recipe':12} {'val loss':>9} {'vs bf16':>9} {'wall s':>8}   {common_label} {'vs bf16':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['recipe']:12} FAILED: {row['error'][-300:]}")
            continue
        if "val_loss" not in row:
            final = f"unfinished: {row['tokens']:,} of {args.tokens:,.0f} tokens"
            final = f"{final:37}"
        else:
            gap = f"{row['gap_pct']:+8.2f}%" if "gap_pct" in row else f"{'-':>9}"
            wall = f"{row['wall_s']:8.0f}" if "wall_s" in row else f"{'-':>8}"
            final = f"{row['val_loss']:9.4f} {gap} {wall}"
        common_gap = f"{row['gap_common_pct']:+8.2f}%" if "gap_common_pct" in row else f"{'-':>9}"
        common_loss = f"{row['val_common']:{width}.4f}" if "val_common" in row else f"{'-':>{width}}"
        print(f"{row['recipe']:12} {final}   {common_loss} {common_gap}")
        if "warning" in row:
            print(f"{'':12} ^ {row['warning']}")

    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "loss_parity.json").write_text(json.dumps(payload, indent=1))
    write_result("loss_parity", payload)
    plotted = [row["recipe"] for row in rows if "error" not in row]
    if plotted:
        try:
            plot_runs([args.out / r for r in plotted], args.out / "loss_parity.png", labels=plotted)
            if "bf16" in plotted and len(plotted) > 1:
                others = [r for r in plotted if r != "bf16"]
                plot_gaps([args.out / r for r in others], args.out / "bf16", args.out / "loss_parity_gap.png",
                          labels=others, x="tokens")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    failed = [row["recipe"] for row in main() if "error" in row]
    sys.exit(f"loss_parity: {len(failed)} recipe(s) failed: {', '.join(failed)}" if failed else 0)
