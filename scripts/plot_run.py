"""Plot pretraining runs: loss curves of several run folders overlaid, and amax traces.

    python scripts/plot_run.py runs/llama-20m-bf16 runs/llama-20m-fp8 --out loss.png
    python scripts/plot_run.py runs/llama-20m-fp8 --amax amax.png --amax-key grad_amax
    python scripts/plot_run.py s0/fp8 s1/fp8 --gap gap.png --baselines s0/bf16 s1/bf16 --x tokens

Each run folder is one written by examples/pretrain_llama.py (``metrics.jsonl``, and
``telemetry.jsonl`` for ``--amax``). PNG files via matplotlib (Agg backend).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpdist.monitor import GAP_AXES, plot_amax, plot_gaps, plot_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="legend label per run (default: folder names)")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="loss plot PNG (default: loss.png)")
    parser.add_argument("--amax", type=Path, help="also plot the first run's per-layer amax traces to this PNG")
    parser.add_argument("--amax-key", default="input_amax", help="telemetry field to trace (default: input_amax)")
    parser.add_argument("--top", type=int, default=8, help="number of layers in the amax plot (largest values)")
    parser.add_argument("--gap", type=Path, help="also plot each run's validation loss relative to its baseline (%%) "
                                                    "to this PNG")
    parser.add_argument("--baselines", nargs="+", type=Path,
                        help="with --gap: the baseline run folder, or one per run (e.g. each seed's bf16 run)")
    parser.add_argument("--x", choices=GAP_AXES, default="step", help="x axis of --gap (default: step)")
    args = parser.parse_args(argv)
    if (args.gap is None) != (args.baselines is None):
        parser.error("--gap and --baselines go together")
    missing = [str(run) for run in args.runs if not (run / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"no metrics.jsonl in: {', '.join(missing)}")
    print(plot_runs(args.runs, args.out, labels=args.labels))
    if args.gap is not None:
        print(plot_gaps(args.runs, args.baselines, args.gap, labels=args.labels, x=args.x))
    if args.amax is not None:
        print(plot_amax(args.runs[0] / "telemetry.jsonl", args.amax, key=args.amax_key, top=args.top))


if __name__ == "__main__":
    main()
