"""Quantize / dequantize bandwidth: lpdist CUDA kernels vs eager torch and torch.compile.

Effective bandwidth counts the bytes a kernel must move: input read plus payload and scales
written (quantize), or payload and scales read plus output written (dequantize).
Usage: python scripts/bench_quant.py [--numel 268435456]
"""

from __future__ import annotations

import argparse

import torch

from lpdist import quant as Q
from lpdist.benchmark import cuda_time_ms, write_result
from lpdist.quant.qtensor import _dequantize_reference, _quantize_reference


def copy_bandwidth_tbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time_ms(lambda: dst.copy_(src)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--numel", type=int, default=256 * 2 ** 20)
    args = ap.parse_args()
    n_cols = 4096
    rows = args.numel // n_cols
    cases = [("bf16", "e4m3", 128), ("fp32", "e4m3", 128), ("bf16", "e4m3", None),
             ("fp32", "e4m3", None), ("bf16", "mxfp4", None), ("bf16", "nvfp4", None)]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    copy_tbps = copy_bandwidth_tbps(args.numel * 2)
    results = []
    for dname, fmt, block in cases:
        x = torch.randn(rows, n_cols, device="cuda", dtype=dtypes[dname])
        scheme = Q.resolve(fmt, block)
        q = Q.quantize(x, fmt, block=block)
        q_bytes = q.nbytes
        in_bytes = x.numel() * x.element_size()
        ref = lambda: _quantize_reference(x, scheme, "nearest", None, None, "floor")  # noqa: E731
        compiled = torch.compile(ref)
        row = {"input": dname, "fmt": fmt, "block": block, "numel": x.numel()}
        row["quant_ms"] = cuda_time_ms(lambda: Q.quantize(x, fmt, block=block))
        row["quant_eager_ms"] = cuda_time_ms(ref, reps=5)
        try:
            row["quant_compiled_ms"] = cuda_time_ms(compiled, reps=10)
        except Exception as err:  # report, don't hide: compile may not support every op
            row["quant_compiled_ms"] = None
            row["compile_error"] = repr(err)[:200]
        row["dequant_ms"] = cuda_time_ms(lambda: q.dequantize())
        row["dequant_eager_ms"] = cuda_time_ms(lambda: _dequantize_reference(q, x.dtype), reps=5)
        for key in ("quant_ms", "quant_eager_ms", "quant_compiled_ms", "dequant_ms", "dequant_eager_ms"):
            if row.get(key):
                row[key.replace("_ms", "_TBps")] = (in_bytes + q_bytes) / row[key] / 1e9
        results.append(row)
        torch.cuda.empty_cache()
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write)")
    print(f"{'input':6} {'fmt':6} {'block':>6} | {'quant TB/s':>10} {'eager':>7} {'compiled':>8} | "
          f"{'dequant TB/s':>12} {'eager':>7}")
    for r in results:
        c = r.get("quant_compiled_TBps")
        print(f"{r['input']:6} {r['fmt']:6} {str(r['block']):>6} | {r['quant_TBps']:10.2f} "
              f"{r['quant_eager_TBps']:7.2f} {c if c is None else round(c, 2)!s:>8} | "
              f"{r['dequant_TBps']:12.2f} {r['dequant_eager_TBps']:7.2f}")
    write_result("bench_quant", {"copy_TBps": copy_tbps, "results": results})


if __name__ == "__main__":
    main()
