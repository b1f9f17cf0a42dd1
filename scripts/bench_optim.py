"""Optimizer step time per 1G parameters and state bytes per parameter.

1G fp32 parameters as 16 tensors of 64M (the setting of the peer reference figures), random fp32 gradients, one
optimizer at a time (freed in between). lpdist AdamW for every moments setting (the step
includes the non-finite gradient scan and its one host sync), and with fp8 moments also with
``step(grads_finite=flag)`` (the flag a trainer gets from its clipped gradient norm, so the step
reads every gradient once), against torch fused AdamW and,
when importable, torchao AdamWFp8/AdamW8bit/AdamW4bit and bitsandbytes AdamW8bit, all in the
same run. CUDA events around each step after warm-up; the median of the repetitions.
Usage: python scripts/bench_optim.py [--tensors 16] [--numel 67108864] [--reps 10]
"""

from __future__ import annotations

import argparse
import gc
import importlib

import torch

from lpdist.benchmark import cuda_time_ms, write_result
from lpdist.optim import AdamW


def tensor_bytes(obj) -> int:
    """Storage bytes of a state value: plain tensors, tensor subclasses (torchao), containers."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def candidates(finite_flag: torch.Tensor) -> list[tuple[str, callable, dict]]:
    """(name, constructor, keyword arguments of ``step``) of every optimizer measured."""
    out = [(f"lpdist AdamW moments={m}", lambda ps, m=m: AdamW(ps, lr=1e-4, moments=m), {})
           for m in ("fp8", "fp16", "bf16", "fp32")]
    out.append(("lpdist AdamW moments=fp8 grads_finite", lambda ps: AdamW(ps, lr=1e-4, moments="fp8"),
                {"grads_finite": finite_flag}))
    out.append(("torch AdamW fused=True", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), {}))
    for module, names in (("torchao.optim", ("AdamWFp8", "AdamW8bit", "AdamW4bit")),
                          ("bitsandbytes.optim", ("AdamW8bit",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out += [(f"{module.split('.')[0]} {n}", lambda ps, c=getattr(mod, n): c(ps, lr=1e-4), {})
                for n in names if hasattr(mod, n)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--numel", type=int, default=64 * 2**20)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    n_params = args.tensors * args.numel
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel, device="cuda", generator=gen)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(args.numel, device="cuda", generator=gen) * 1e-3
    results = []
    finite_flag = torch.ones((), dtype=torch.bool, device="cuda")
    for name, make, step_kwargs in candidates(finite_flag):
        try:
            opt = make(params)
            ms = cuda_time_ms(lambda: opt.step(**step_kwargs), reps=args.reps)
            state = opt.memory_bytes() if isinstance(opt, AdamW) else tensor_bytes(list(opt.state.values()))
            results.append({"optimizer": name, "ms_per_1G_params": ms * 2**30 / n_params,
                            "state_bytes_per_param": state / n_params})
        except (RuntimeError, TypeError, ValueError) as err:  # e.g. a baseline rejecting the setup
            results.append({"optimizer": name, "error": f"{type(err).__name__}: {err}"[:200]})
        finally:
            opt = None
            gc.collect()
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"{device}: {args.tensors} x {args.numel} fp32 params")
    print(f"{'optimizer':36s} {'ms / 1G params':>15s} {'state B/param':>14s}")
    for r in results:
        if "error" in r:
            print(f"{r['optimizer']:36s} {r['error']}")
        else:
            print(f"{r['optimizer']:36s} {r['ms_per_1G_params']:15.2f} {r['state_bytes_per_param']:14.3f}")
    write_result("bench_optim", {"tensors": args.tensors, "numel": args.numel, "results": results})


if __name__ == "__main__":
    main()
