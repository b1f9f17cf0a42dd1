"""Final validation loss of each recipe against bf16, at the same token budget.

    python scripts/loss_parity.py --model 125m --tokens 100e6 --parallel-gpus 4 --out runs/parity-125m -- --compile
    python scripts/loss_parity.py --model tiny --tokens 20000 --seq-len 64 --batch-size 4 --recipes bf16 fp8  # CPU

Every recipe runs examples/pretrain_llama.py with the same model, seed, data, batch and number
of steps, ``steps = ceil(tokens / (nproc * batch_size * seq_len))`` (so each sees the same
``steps * nproc * batch_size * seq_len`` >= ``--tokens`` training tokens in the same order).
Arguments after ``--`` go to every run unchanged (``--compile``, ``--data``, ``--lr``, ...).
``--nproc`` processes per run (torchrun; one plain process when 1); ``--parallel-gpus N`` runs
up to ``N / nproc`` recipes at a time, each on its own ``nproc`` GPUs (``CUDA_VISIBLE_DEVICES``).
Runs with different ``--nproc`` see the same data in the same order when ``nproc x batch-size``
is the same (the global batch of a step does not depend on the number of processes), so slow
recipes may use more GPUs: launch them separately into the same ``--out`` and use ``--report``.

The example evaluates the validation loss at its last step; the table shows it per recipe and
its gap to bf16, ``100 * (loss - loss_bf16) / loss_bf16`` %, and the same at the last evaluation
step every run reached (so unfinished runs are compared too, at equal tokens). Runs are launched with
``--resume`` into ``--out/<recipe>``: with ``-- --stop-at K`` a long comparison can be done in
chunks (re-run the same command without ``--stop-at`` to finish; an unfinished run is listed as
such). ``--report`` launches nothing and tabulates the runs already in ``--out`` (e.g. made on
several machines and gathered in one folder). Writes ``--out/loss_parity.json``,
``--out/loss_parity.png`` (the loss curves overlaid, ``lpdist.monitor.plot_runs``),
``--out/loss_parity_gap.png`` (each recipe's validation loss relative to bf16's at every
evaluation, ``lpdist.monitor.plot_gaps``) and ``$OUT/loss_parity.json`` when env OUT is set.
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
from lpdist.monitor import plot_gaps, plot_runs, read_jsonl
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
    args.steps = math.ceil(args.tokens / (args.nproc * args.batch_size * args.seq_len))
    return args


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
    """The run's progress from ``--out/<recipe>/metrics.jsonl``: last step, tokens and, when it
    reached ``--steps``, its final validation loss."""
    row = {"recipe": recipe} if row is None else row
    metrics = args.out / recipe / "metrics.jsonl"
    if not metrics.exists():
        return {**row, "error": f"no run: {metrics} does not exist"}
    records = read_jsonl(metrics)
    trained = [r for r in records if "loss" in r]
    curve = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}  # a step's last record wins
    row.update(step=trained[-1]["step"] if trained else 0, tokens=trained[-1]["tokens"] if trained else 0,
               val_curve=curve)
    if args.steps in curve:
        row["val_loss"] = curve[args.steps]
    return row


def gap_pct(loss: float, baseline: float) -> float:
    """Relative gap of a validation loss to bf16's, in %."""
    return 100 * (loss - baseline) / baseline


def compare_at_common_step(rows: list[dict]) -> int | None:
    """The last evaluation step every run reached (unfinished ones included): adds each row's
    ``val_common`` there and, with a bf16 run, ``gap_common_pct`` (same formula as the final gap)."""
    curves = [row["val_curve"] for row in rows if "error" not in row]
    steps = set.intersection(*(set(curve) for curve in curves)) if curves else set()
    if not steps:
        return None
    common = max(steps)
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
        for first in range(0, args.parallel_gpus, args.nproc):
            gpus.put(",".join(str(index) for index in range(first, first + args.nproc)))
    with ThreadPoolExecutor(max_workers=max(1, args.parallel_gpus // args.nproc)) as pool:
        launch = summarize if args.report else lambda recipe, args: run_recipe(recipe, args, gpus)
        rows = list(pool.map(lambda recipe: launch(recipe, args), args.recipes))
    baseline = next((r["val_loss"] for r in rows if r["recipe"] == "bf16" and "val_loss" in r), None)
    for row in rows:
        if baseline is not None and "val_loss" in row:
            row["gap_pct"] = gap_pct(row["val_loss"], baseline)

    common = compare_at_common_step(rows)
    tokens_per_step = args.nproc * args.batch_size * args.seq_len
    print(f"{args.model}: {args.steps} steps x {tokens_per_step:,} tokens = {args.steps * tokens_per_step:,} tokens "
          f"per recipe (batch {args.batch_size}x{args.seq_len} x {args.nproc} process(es)), seed {args.seed}")
    at = f"at step {common}" if common is not None else "at a common step"
    print(f"{'recipe':12} {'val loss':>9} {'vs bf16':>9} {'wall s':>8}   {'val loss ' + at:>22} {'vs bf16':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['recipe']:12} FAILED: {row['error'][-300:]}")
            continue
        if "val_loss" not in row:
            final = f"unfinished: step {row['step']} of {args.steps}"
            final = f"{final:37}"
        else:
            gap = f"{row['gap_pct']:+8.2f}%" if "gap_pct" in row else f"{'-':>9}"
            wall = f"{row['wall_s']:8.0f}" if "wall_s" in row else f"{'-':>8}"
            final = f"{row['val_loss']:9.4f} {gap} {wall}"
        common_gap = f"{row['gap_common_pct']:+8.2f}%" if "gap_common_pct" in row else f"{'-':>9}"
        common_loss = f"{row['val_common']:22.4f}" if "val_common" in row else f"{'-':>22}"
        print(f"{row['recipe']:12} {final}   {common_loss} {common_gap}")

    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "loss_parity.json").write_text(json.dumps(payload, indent=1))
    write_result("loss_parity", payload)
    plotted = [row["recipe"] for row in rows if "error" not in row]
    if plotted:
        try:
            plot_runs([args.out / r for r in plotted], args.out / "loss_parity.png", labels=plotted)
            others = [r for r in plotted if r != "bf16"]
            if "bf16" in plotted and others:
                plot_gaps([args.out / r for r in others], args.out / "bf16", args.out / "loss_parity_gap.png",
                          labels=others)
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
