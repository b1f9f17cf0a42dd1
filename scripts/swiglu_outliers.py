"""SwiGLU weight alignment, down-projection outliers and Smooth-SwiGLU under FP8, at CPU scale.

Fishman et al. (arXiv 2409.12517; ALGORITHMS.md §2.2-2.3): when channel i of a SwiGLU MLP
has its up row aligned with its gate row (``w_up,i = c·w_gate,i``), its output
``c·(w·x)·Swish(w·x) ≈ c·(w·x)²·σ(w·x)`` is quadratic in x, so rare large inputs make outliers
in the input of ``down_proj`` that one per-tensor FP8 scale cannot represent together with the
rest of the tensor. Smooth-SwiGLU (per-token ``s_t = max_j |u_tj|``) divides the linear branch
by ``s_t`` before the FP8 down projection and multiplies the output rows back.

Two experiments:

1. ``sweep`` (one MLP layer, no training): K channels aligned with ``up_i := c·gate_i`` (and,
   for contrast, the same layer with random up rows); a few tokens get an input spike of growing
   size along an aligned gate row. The ``down_proj`` input and weight are fake-quantized to
   E4M3 with one scale per tensor, and the MLP output is compared with float64: with the current
   scale (amax of this batch) on the ordinary tokens, whose values the spike pushes into the
   subnormal range or to zero, and with a delayed scale (amax of a previous batch without spikes)
   on the spiked tokens, which saturate.
2. ``train``: a small Llama (``lpdist.models.llama``) with K aligned channels seeded in every
   MLP, trained on the same bytes with the same seed three ways: the ``bf16`` recipe (no layer
   swap; fp32 on CPU, the reference), ``fp8`` (``Float8Linear``, per-tensor current scaling)
   and ``fp8`` + Smooth-SwiGLU per token (the ``fp8-smooth`` recipe's layers; all runs use
   torch AdamW with fp32 moments so that only the MLP numerics differ). A forward pre-hook on
   every ``down_proj`` records what its FP8 cast sees.

Usage (2-core CPU, a few minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/swiglu_outliers.py --out docs/swiglu_outliers

writes ``docs/swiglu_outliers.json`` and ``docs/swiglu_outliers.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lpdist.models.llama import Llama, LlamaConfig
from lpdist.nn import convert
from lpdist.nn.recipes import get_recipe
from lpdist.quant import FORMATS, fake_quantize

E4M3 = FORMATS["e4m3"]
E4M3_MIN_NORMAL = 2.0 ** -6  # smallest normal E4M3 magnitude (ALGORITHMS.md §1.1)


# ---------------------------------------------------------------- FP8 statistics of a tensor

def e4m3_stats(x: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, float]:
    """What one per-tensor E4M3 cast with ``scale`` (default: current, amax/448) does to ``x``.

    ``underflow_frac``: nonzero elements that round to 0; ``subnormal_frac``: nonzero elements
    whose scaled magnitude is below the smallest normal 2^-6 (fewer than 3 mantissa bits left);
    ``saturated_frac``: elements whose scaled magnitude exceeds 448 (only with a stale scale);
    ``max_over_median``: amax / median |x|, the outlier strength.
    """
    x = x.detach().float()
    magnitude = x.abs()
    amax = magnitude.max()
    if scale is None:
        scale = torch.where(amax > 0, amax / E4M3.max, torch.ones_like(amax))
    nonzero = magnitude > 0
    scaled = magnitude / scale
    q = fake_quantize(x, "e4m3", scale=scale)
    count = max(int(nonzero.sum()), 1)
    return {
        "amax": float(amax),
        "max_over_median": float(amax / magnitude.median().clamp_min(1e-30)),
        "underflow_frac": float(((q == 0) & nonzero).sum()) / count,
        "subnormal_frac": float(((scaled < E4M3_MIN_NORMAL) & nonzero).sum()) / count,
        "saturated_frac": float((scaled > E4M3.max).sum()) / count,
    }


# ---------------------------------------------------------------- experiment 1: single layer

def align_channels(gate: torch.Tensor, up: torch.Tensor, channels: torch.Tensor, c: float,
                   boost: float = 1.0) -> None:
    """In place: ``gate[i] *= boost`` then ``up[i] := c·gate[i]`` for the rows ``channels``."""
    with torch.no_grad():
        gate[channels] *= boost
        up[channels] = c * gate[channels]


def fp8_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, *, smooth: bool,
            a_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU MLP with the down projection's input and weight fake-quantized to E4M3 (one scale
    per tensor; ``a_scale`` overrides the input's). Returns (output, down-projection input)."""
    g, u = x @ wg.T, x @ wu.T
    s = u.abs().amax(-1, keepdim=True).clamp_min(1e-30) if smooth else torch.ones_like(u[:, :1])
    a = F.silu(g) * (u / s)
    y = fake_quantize(a, "e4m3", scale=a_scale) @ fake_quantize(wd, "e4m3").T
    return y * s, a


def smoothed_input(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, smooth: bool) -> torch.Tensor:
    """The down-projection input of :func:`fp8_mlp` (used to take a delayed scale)."""
    return fp8_mlp(x, wg, wu, torch.zeros(1, wg.shape[0]), smooth=smooth, a_scale=None)[1]


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def alignment_sweep(gains: list[float], *, c: float = 4.0, dim: int = 64, hidden: int = 192,
                    tokens: int = 512, channels: int = 4, rare: int = 4, seed: int = 0) -> list[dict]:
    """Per-tensor E4M3 error of one SwiGLU MLP against the size of a rare input spike.

    ``rare`` of the ``tokens`` inputs get a spike ``gain·ŵ`` along the gate row ŵ of one of the
    first ``channels`` channels. With those channels aligned (``up_i := c·gate_i``) their output
    ``c·(w·x)·Swish(w·x)`` grows as gain²; with the original random up rows ("random") ``w_up·x``
    stays O(1) and it grows as gain. The delayed scale is the amax of a previous batch without
    spikes (so the spike saturates). Relative errors against float64, over the ordinary tokens
    (``*_err``: what the current scale flushes) and over the spiked ones (``*_err_spiked``: what
    the delayed scale saturates).
    """
    gen = torch.Generator().manual_seed(seed)
    ordinary_x = torch.randn(tokens, dim, generator=gen)
    previous = torch.randn(tokens, dim, generator=gen)
    base_g = torch.randn(hidden, dim, generator=gen) / math.sqrt(dim)
    base_u = torch.randn(hidden, dim, generator=gen) / math.sqrt(dim)
    wd = torch.randn(dim, hidden, generator=gen) / math.sqrt(hidden)
    directions = F.normalize(base_g[torch.arange(rare) % channels], dim=1)
    spiked, ordinary = slice(0, rare), slice(rare, None)
    rows = []
    for gain in gains:
        x = ordinary_x.clone()
        x[:rare] += gain * directions
        row = {"gain": gain}
        for wiring in ("aligned", "random"):
            wg, wu = base_g.clone(), base_u.clone()
            if wiring == "aligned":
                align_channels(wg, wu, torch.arange(channels), c)
            ref = (F.silu(x.double() @ wg.double().T) * (x.double() @ wu.double().T)) @ wd.double().T
            for smooth in (False, True):
                tag = f"{wiring}_{'smooth' if smooth else 'plain'}"
                delayed = smoothed_input(previous, wg, wu, smooth).abs().max() / E4M3.max
                for rule, scale in (("current", None), ("delayed", delayed)):
                    y, a = fp8_mlp(x, wg, wu, wd, smooth=smooth, a_scale=scale)
                    stats = e4m3_stats(a, scale)
                    row[f"{tag}_{rule}_err"] = relative_error(y[ordinary], ref[ordinary])
                    row[f"{tag}_{rule}_err_spiked"] = relative_error(y[spiked], ref[spiked])
                    row[f"{tag}_{rule}_underflow"] = stats["underflow_frac"]
                    row[f"{tag}_{rule}_saturated"] = stats["saturated_frac"]
                row[f"{tag}_max_over_median"] = stats["max_over_median"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- experiment 2: training

class DownProjProbe:
    """Forward pre-hooks on every ``down_proj``: per step, the worst (over layers) E4M3
    statistics of its input under current scaling, and the fraction that a delayed scale
    (amax of the layer's previous step) would saturate."""

    def __init__(self, model: nn.Module) -> None:
        self.previous_amax: dict[str, torch.Tensor] = {}
        self.step_stats: list[dict[str, float]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in model.named_modules()
                        if n.endswith("down_proj")]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            stats = e4m3_stats(x)
            prev = self.previous_amax.get(name)
            delayed = e4m3_stats(x, prev / E4M3.max) if prev is not None else {"saturated_frac": 0.0}
            stats["delayed_saturated_frac"] = delayed["saturated_frac"]
            self.previous_amax[name] = x.abs().max()
            self.step_stats.append(stats)

        return record

    def collect(self) -> dict[str, float]:
        """Max over the layers of each statistic since the last call."""
        merged = {k: max(s[k] for s in self.step_stats) for k in self.step_stats[0]}
        self.step_stats.clear()
        return merged


def gate_up_cosines(model: nn.Module) -> torch.Tensor:
    """|cos(w_gate,i, w_up,i)| of every FFN channel of every layer (concatenated)."""
    out = []
    for module in model.modules():
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            out.append(F.cosine_similarity(module.gate_proj.weight, module.up_proj.weight, dim=1).abs())
    return torch.cat(out).detach()


def byte_batches(steps: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Fixed training windows of the bytes of this repository's ``lpdist`` sources."""
    root = Path(__file__).resolve().parents[1] / "lpdist"
    data = np.frombuffer(b"".join(p.read_bytes() for p in sorted(root.rglob("*.py"))), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq_len - 1, size=(steps, batch))
    return [torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in row]).astype(np.int64))
            for row in starts]


def train_run(label: str, recipe, config: LlamaConfig, batches: list[torch.Tensor], *, c: float,
              boost: float, channels: int, lr: float, weight_decay: float, seed: int) -> dict:
    """One training run; returns per-step loss and down-projection statistics."""
    torch.manual_seed(seed)
    model = Llama(config)
    aligned = torch.arange(channels)
    for block in model.layers:
        align_channels(block.mlp.gate_proj.weight, block.mlp.up_proj.weight, aligned, c, boost)
    seeded = torch.zeros(config.ffn_dim, dtype=torch.bool)
    seeded[aligned] = True
    seeded = seeded.repeat(config.n_layers)
    cos_start = gate_up_cosines(model)
    if recipe is not None:
        convert(model, recipe)
    probe = DownProjProbe(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": []}
    start = time.perf_counter()
    for tokens in batches:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history["loss"].append(float(loss.detach()))
        for key, value in probe.collect().items():
            history.setdefault(key, []).append(value)
        if not math.isfinite(history["loss"][-1]):
            break
    cos_end = gate_up_cosines(model)
    return {
        "label": label, "seconds": time.perf_counter() - start, **history,
        "cos_ordinary_start": float(cos_start[~seeded].mean()),
        "cos_ordinary_end": float(cos_end[~seeded].mean()),
        "cos_ordinary_end_p99": float(cos_end[~seeded].quantile(0.99)),
        "cos_seeded_end": float(cos_end[seeded].mean()),
    }


# ---------------------------------------------------------------- plot and main

def _loss_gap(run: dict, reference: dict, window: int = 20) -> list[float]:
    """Moving average (``window`` steps) of ``run`` loss minus the reference run's loss."""
    gap = np.asarray(run["loss"]) - np.asarray(reference["loss"][:len(run["loss"])])
    return list(np.convolve(gap, np.ones(window) / window, mode="valid"))


def plot(sweep: list[dict], runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    gains = [r["gain"] for r in sweep]
    names = {"plain": "SwiGLU", "smooth": "Smooth-SwiGLU"}
    ax = axes[0, 0]
    for tag in ("aligned_plain", "aligned_smooth", "random_plain"):
        ax.plot(gains, [r[f"{tag}_max_over_median"] for r in sweep], marker="o", markersize=3,
                label=f"{tag.split('_')[0]} channels, {names[tag.split('_')[1]]}")
    ax.set(xscale="symlog", yscale="log", xlabel="input spike size (gain)", ylabel="down_proj input amax / median",
           title="single MLP: outlier strength")
    ax = axes[0, 1]
    for tag, style in (("aligned_plain", "-"), ("aligned_smooth", "--"), ("random_plain", ":")):
        for key, marker, what in (("current_err", "o", "current scale, ordinary tokens"),
                                  ("delayed_err_spiked", "s", "delayed scale, spiked tokens")):
            ax.plot(gains, [r[f"{tag}_{key}"] for r in sweep], style, marker=marker, markersize=3,
                    label=f"{tag.split('_')[0]}, {names[tag.split('_')[1]]}: {what}")
    ax.set(xscale="symlog", yscale="log", xlabel="input spike size (gain)",
           ylabel="rel. error of MLP output", title="single MLP: E4M3 per tensor")
    ax = axes[0, 2]
    for run in runs[1:]:
        ax.plot(_loss_gap(run, runs[0]), linewidth=1, label=run["label"])
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set(xlabel="step", ylabel="loss - reference loss (20-step mean)", title="small Llama: loss gap")
    ax = axes[1, 0]
    for run in runs:
        ax.plot(run["loss"], linewidth=1, label=run["label"])
    ax.set(xlabel="step", ylabel="training loss", title="small Llama, seeded aligned channels")
    ax = axes[1, 1]
    for run in runs:
        ax.plot(run["max_over_median"], linewidth=1, label=run["label"])
    ax.set(yscale="log", xlabel="step", ylabel="down_proj input amax / median (max over layers)")
    ax = axes[1, 2]
    for run in runs:
        line = ax.plot(run["underflow_frac"], linewidth=1, label=f"{run['label']}: flushed to 0 (current)")[0]
        ax.plot(run["delayed_saturated_frac"], ":", color=line.get_color(), linewidth=1,
                label=f"{run['label']}: saturated (delayed)")
    ax.set(xlabel="step", ylabel="fraction of down_proj input (max over layers)", title="E4M3 cast")
    ax.set_yscale("symlog", linthresh=1e-5)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=52)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/swiglu_outliers", help="output prefix (.json, .png)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=384)
    parser.add_argument("--channels", type=int, default=8, help="aligned channels seeded per MLP")
    parser.add_argument("--align", type=float, default=8.0, help="c in up_i := c·gate_i")
    parser.add_argument("--boost", type=float, default=4.0, help="gate_i *= boost before aligning")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    sweep = alignment_sweep([0, 2, 4, 8, 16, 32, 64, 128], c=args.align, seed=args.seed)
    sweep_seconds = time.perf_counter() - t0
    for row in sweep:
        print(f"gain={row['gain']:<4g} amax/median aligned {row['aligned_plain_max_over_median']:9.3g} "
              f"smoothed {row['aligned_smooth_max_over_median']:9.3g} random {row['random_plain_max_over_median']:9.3g} | "
              "rel err (current scale/ordinary tokens, delayed scale/spiked tokens): aligned SwiGLU "
              f"{row['aligned_plain_current_err']:.2e}, {row['aligned_plain_delayed_err_spiked']:.2e}; Smooth "
              f"{row['aligned_smooth_current_err']:.2e}, {row['aligned_smooth_delayed_err_spiked']:.2e}; "
              f"random SwiGLU {row['random_plain_current_err']:.2e}, {row['random_plain_delayed_err_spiked']:.2e}")
    print(f"sweep: {sweep_seconds:.1f} s")
    config = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, ffn_dim=args.ffn,
                         vocab_size=256, max_seq_len=args.seq_len)
    batches = byte_batches(args.steps, args.batch, args.seq_len, args.seed)
    fp8 = get_recipe("fp8")
    runs = []
    for label, recipe in (("bf16 recipe (fp32 on CPU)", None), ("fp8", fp8),
                          ("fp8 + Smooth-SwiGLU", fp8.with_options(name="fp8-smooth-swiglu", smooth_swiglu="token"))):
        run = train_run(label, recipe, config, batches, c=args.align, boost=args.boost, channels=args.channels,
                        lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
        runs.append(run)
        tail = run["loss"][-20:]
        print(f"{label:26s} {run['seconds']:6.1f} s  loss (mean of last 20) {sum(tail) / len(tail):.4f}  "
              f"amax/median max {max(run['max_over_median']):.3g} last {run['max_over_median'][-1]:.3g}  "
              f"flushed max {max(run['underflow_frac']):.2e} last {run['underflow_frac'][-1]:.2e}  "
              f"delayed-sat max {max(run['delayed_saturated_frac']):.2e}  "
              f"|cos| ordinary {run['cos_ordinary_start']:.3f}->{run['cos_ordinary_end']:.3f} "
              f"(p99 {run['cos_ordinary_end_p99']:.3f}), seeded {run['cos_seeded_end']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "sweep_seconds": sweep_seconds, "sweep": sweep, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(sweep, runs, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
