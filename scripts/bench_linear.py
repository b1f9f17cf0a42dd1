"""Llama MLP block (SwiGLU: gate/up d -> h, down h -> d) forward+backward time per layer type.

Variants: bf16 ``nn.Linear``; ``Float8Linear`` with tensor (E5M2 gradients; also delayed,
``fp8-delayed``: X and E scaled from the amax of the last 16 steps, after the first timed call), row and block
(E4M3 gradients) scaling; ``FP4Linear`` quartet / dge / nvfp4 (emulated: their cost is the
emulation overhead); torchao float8 tensorwise / rowwise when torchao is installed. Each in eager
mode and under ``torch.compile``. Weights and activations bf16, T tokens per step. Times are
medians of CUDA-event timings after warm-up; speed-ups are against bf16 + torch.compile of the
same shape in the same run. Every variant's output and input gradient are also compared with
the bf16 block (``err_y``, ``err_dx``: relative L2; FP8 on random data gives 0.05-0.1, FP4 0.2-0.55
(one E2M1 rounding alone is ~0.1-0.2 per operand, three GEMMs deep; stochastic rounding in backward
adds variance), a broken path ~1 or more), so a fast but wrong path cannot pass unnoticed: rows
above ``WRONG_RESULT_ERROR`` of their precision (or NaN) are flagged, and the script then exits
with an error after writing its results.

Expected on H200 (8b shape, 9 GEMMs of 1.92 TFLOP each): bf16 at ~707 TFLOP/s is 24.5 ms plus
~1.2 ms of SwiGLU element-wise work (26.0 ms measured). FP8 at ~1280 TFLOP/s is 13.5 ms, plus
the same 1.2 ms, plus the casts: per step ~6.5 GB of amax reads, casts and transposed copies at
~3 TB/s, ~2.2 ms; about 17 ms, 1.5x bf16 (torchao tensorwise: 17.0 ms). Row scaling casts X
and E twice (once per direction; ~+1 ms), block scaling adds the 1x128 scale bookkeeping.
Usage: python scripts/bench_linear.py [--quick] [--shapes 8b,1b] [--variants bf16,fp8-tensor,...]
[--modes eager,compiled] [--reps 10]. ``--quick`` (~6 min on one GPU): compiled only, the 8b
shape with bf16, the three Float8Linear scalings (tensor also delayed) and torchao, the 1b shape
with bf16 and the same Float8Linear variants. Writes $OUT/bench_linear.json when OUT is set.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpdist.benchmark import cuda_time_ms, write_result
from lpdist.nn import Float8Linear, FP4Linear

SHAPES = {"8b": (16384, 4096, 14336), "1b": (16384, 2048, 5632)}
#: Relative L2 error (output or input gradient) above which a row is flagged as a broken path.
WRONG_RESULT_ERROR = {"fp8": 0.2, "fp4": 0.8}


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
    def build(mlp: MLP) -> MLP:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(mlp, config=Float8LinearConfig.from_recipe_name(recipe))
        return mlp
    return build


def _fp8(scaling: str, grad_fmt: str, stats: bool = False, amax_history: int = 0):
    return lambda m: _swap(m, lambda lin: Float8Linear.from_linear(
        lin, scaling=scaling, grad_fmt=grad_fmt, track_stats=stats, amax_history=amax_history))


def _fp4(recipe: str):
    return lambda m: _swap(m, lambda lin: FP4Linear.from_linear(lin, recipe=recipe, track_stats=False))


VARIANTS = {
    "bf16": lambda m: m,
    "fp8-tensor": _fp8("tensor", "e5m2"),
    "fp8-delayed": _fp8("tensor", "e5m2", amax_history=16),
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


QUICK = {"8b": ("bf16", "fp8-tensor", "fp8-delayed", "fp8-row", "fp8-block", "torchao-tensorwise",
                 "torchao-rowwise"),
         "1b": ("bf16", "fp8-tensor", "fp8-delayed", "fp8-row", "fp8-block")}


def wrong_result(row: dict) -> bool:
    """Whether a timed row's output or input gradient is further from the bf16 block than its
    precision allows (``WRONG_RESULT_ERROR``); a NaN error counts as wrong."""
    limit = WRONG_RESULT_ERROR["fp4" if "fp4" in row["variant"] else "fp8"]
    return not (row["err_y"] <= limit and row["err_dx"] <= limit)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def training_step(mlp: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  grad: torch.Tensor) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """``(step, xr)``: ``step()`` runs ``fn`` (``mlp`` or its compiled form) forward on ``xr``
    (a leaf copy of ``x``) and backward with ``grad``, returning the output; as a training step
    after ``zero_grad(set_to_none=True)``, so no gradient is accumulated into an earlier one."""
    xr = x.detach().requires_grad_()

    def step() -> torch.Tensor:
        xr.grad = None
        mlp.zero_grad(set_to_none=True)
        y = fn(xr)
        y.backward(grad)
        return y
    return step, xr


def run_case(base: MLP, variant: str, compiled: bool, x: torch.Tensor, grad: torch.Tensor,
             reps: int, reference: tuple[torch.Tensor, torch.Tensor]) -> dict:
    mlp = VARIANTS[variant](copy.deepcopy(base))
    step, xr = training_step(mlp, torch.compile(mlp) if compiled else mlp, x, grad)
    t0 = time.perf_counter()
    torch._dynamo.reset()
    ms = cuda_time_ms(step, reps)
    y = step()
    return {"ms": ms, "wall_s": time.perf_counter() - t0, "err_y": _rel(y.detach(), reference[0]),
            "err_dx": _rel(xr.grad, reference[1])}


def _bf16_reference(base: MLP, x: torch.Tensor, grad: torch.Tensor):
    xr = x.detach().requires_grad_()
    y = base(xr)
    y.backward(grad)
    base.zero_grad(set_to_none=True)
    return y.detach(), xr.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="8b,1b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="compiled only; 8b: bf16, fp8 scalings, torchao; 1b: bf16, fp8 scalings")
    args = ap.parse_args()
    if args.quick:
        args.modes = "compiled"
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    rows = []
    for shape in args.shapes.split(","):
        tokens, dim, hidden = SHAPES[shape]
        torch.manual_seed(0)
        base = MLP(dim, hidden).to("cuda", torch.bfloat16)
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
        reference = _bf16_reference(base, x, grad)
        variants = QUICK[shape] if args.quick else args.variants.split(",")
        for variant in variants:
            for mode in args.modes.split(","):
                row = {"shape": shape, "tokens": tokens, "dim": dim, "hidden": hidden,
                       "variant": variant, "mode": mode}
                try:
                    row.update(run_case(base, variant, mode == "compiled", x, grad, args.reps,
                                        reference))
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
    print(f"{'shape':6} {'variant':20} {'mode':9} {'ms':>9} {'vs bf16 compiled':>17} "
          f"{'err_y':>8} {'err_dx':>8}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['shape']:6} {r['variant']:20} {r['mode']:9} {'error':>9} {r['error']}")
            continue
        sp = r.get("speedup_vs_bf16_compiled")
        sp = f"{sp:16.2f}x" if sp is not None else f"{'-':>17}"
        flag = "  <- WRONG RESULT" if wrong_result(r) else ""
        print(f"{r['shape']:6} {r['variant']:20} {r['mode']:9} {r['ms']:9.2f} {sp} "
              f"{r['err_y']:8.1e} {r['err_dx']:8.1e}{flag}")
    write_result("bench_linear", {"rows": rows})
    wrong = [f"{r['shape']} {r['variant']} {r['mode']}" for r in rows if "ms" in r and wrong_result(r)]
    if wrong:
        raise SystemExit(f"bench_linear: results off by more than {WRONG_RESULT_ERROR} (relative L2 against "
                         f"the bf16 block): {', '.join(wrong)}")


if __name__ == "__main__":
    main()
