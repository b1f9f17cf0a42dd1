"""Plot pretraining runs: loss curves of several run folders overlaid, and amax traces.

    python scripts/plot_run.py runs/llama-20m-bf16 runs/llama-20m-fp8 --out loss.png
    python scripts/plot_run.py runs/llama-20m-fp8 --amax amax.png --amax-key grad_amax

Each run folder is one written by examples/pretrain_llama.py (``metrics.jsonl``, and
``telemetry.jsonl`` for ``--amax``). PNG files via matplotlib (Agg backend).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpdist.monitor import plot_amax, plot_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="legend label per run (default: folder names)")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="loss plot PNG (default: loss.png)")
    parser.add_argument("--amax", type=Path, help="also plot the first run's per-layer amax traces to this PNG")
    parser.add_argument("--amax-key", default="input_amax", help="telemetry field to trace (default: input_amax)")
    parser.add_argument("--top", type=int, default=8, help="number of layers in the amax plot (largest values)")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"no metrics.jsonl in: {', '.join(missing)}")
    print(plot_runs(args.runs, args.out, labels=args.labels))
    if args.amax is not None:
        print(plot_amax(args.runs[0] / "telemetry.jsonl", args.amax, key=args.amax_key, top=args.top))


if __name__ == "__main__":
    main()
