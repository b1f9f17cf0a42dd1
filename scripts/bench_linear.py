"""Llama MLP block (SwiGLU: gate/up d -> h, down h -> d) forward+backward time per layer type.

Variants: bf16 ``nn.Linear``; ``Float8Linear`` with tensor (E5M2 gradients), row and block
(E4M3 gradients) scaling; ``FP4Linear`` quartet / dge / nvfp4 (emulated: their cost is the
emulation overhead); torchao float8 tensorwise / rowwise when torchao is installed. Each in eager
mode and under ``torch.compile``. Weights and activations bf16, T tokens per step. Times are
medians of CUDA-event timings after warm-up; speed-ups are against bf16 + torch.compile of the
same shape in the same run.
Usage: python scripts/bench_linear.py [--shapes 8b,1b] [--variants bf16,fp8-tensor,...] [--reps 10]
Writes $OUT/bench_linear.json when OUT is set.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from lpdist.benchmark import cuda_time_ms, write_result
from lpdist.nn import Float8Linear, FP4Linear

SHAPES = {"8b": (16384, 4096, 14336), "1b": (16384, 2048, 5632)}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _swap(mlp: MLP, make) -> MLP:
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, make(getattr(mlp, name)))
    return mlp


def _torchao(recipe: str):
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def build(mlp: MLP) -> MLP:
        convert_to_float8_training(mlp, config=Float8LinearConfig.from_recipe_name(recipe))
        return mlp
    return build


def _fp8(scaling: str, grad_fmt: str, stats: bool = False):
    return lambda m: _swap(m, lambda lin: Float8Linear.from_linear(
        lin, scaling=scaling, grad_fmt=grad_fmt, track_stats=stats))


def _fp4(recipe: str):
    return lambda m: _swap(m, lambda lin: FP4Linear.from_linear(lin, recipe=recipe, track_stats=False))


VARIANTS = {
    "bf16": lambda m: m,
    "fp8-tensor": _fp8("tensor", "e5m2"),
    "fp8-row": _fp8("row", "e4m3"),
    "fp8-row-e5m2": _fp8("row", "e5m2"),
    "fp8-block": _fp8("block", "e4m3"),
    "fp8-tensor+stats": _fp8("tensor", "e5m2", stats=True),
    "fp4-quartet": _fp4("quartet"),
    "fp4-dge": _fp4("dge"),
    "nvfp4": _fp4("nvfp4"),
    "torchao-tensorwise": _torchao("tensorwise"),
    "torchao-rowwise": _torchao("rowwise"),
}


def run_case(base: MLP, variant: str, compiled: bool, x: torch.Tensor, grad: torch.Tensor,
             reps: int) -> dict:
    mlp = VARIANTS[variant](copy.deepcopy(base))
    fn = torch.compile(mlp) if compiled else mlp
    xr = x.detach().requires_grad_()

    def step():
        fn(xr).backward(grad)
    t0 = time.perf_counter()
    torch._dynamo.reset()
    ms = cuda_time_ms(step, reps)
    return {"ms": ms, "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    rows = []
    for shape in args.shapes.split(","):
        tokens, dim, hidden = SHAPES[shape]
        torch.manual_seed(0)
        base = MLP(dim, hidden).to("cuda", torch.bfloat16)
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        for variant in args.variants.split(","):
            for mode in args.modes.split(","):
                row = {"shape": shape, "tokens": tokens, "dim": dim, "hidden": hidden,
                       "variant": variant, "mode": mode}
                try:
                    row.update(run_case(base, variant, mode == "compiled", x, grad, args.reps))
                except Exception as err:  # one unavailable variant must not stop the run
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    for row in rows:
        ref = next((r for r in rows if r["shape"] == row["shape"] and r["variant"] == "bf16"
                    and r["mode"] == "compiled" and "ms" in r), None)
        if ref and "ms" in row:
            row["speedup_vs_bf16_compiled"] = ref["ms"] / row["ms"]
    print(f"\n{device}, torch {torch.__version__}: MLP block fwd+bwd")
    print(f"{'shape':6} {'variant':20} {'mode':9} {'ms':>9} {'vs bf16 compiled':>17}")
    for r in rows:
        ms = f"{r['ms']:9.2f}" if "ms" in r else f"{'error':>9}"
        sp = f"{r['speedup_vs_bf16_compiled']:16.2f}x" if "speedup_vs_bf16_compiled" in r else r.get("error", "")
        print(f"{r['shape']:6} {r['variant']:20} {r['mode']:9} {ms} {sp:>17}")
    write_result("bench_linear", {"rows": rows})


if __name__ == "__main__":
    main()
