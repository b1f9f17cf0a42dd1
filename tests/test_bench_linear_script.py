"""scripts/bench_linear.py's check of each row's error (the timing itself needs a GPU)."""

import math

from script_loader import load_script


def test_wrong_result_flags_errors_above_the_precision_limit_and_nan():
    bench_linear = load_script("scripts/bench_linear.py")
    limits = bench_linear.WRONG_RESULT_ERROR

    def row(variant, err_y, err_dx):
        return {"variant": variant, "err_y": err_y, "err_dx": err_dx}

    assert not bench_linear.wrong_result(row("fp8-tensor", 0.065, 0.092))  # a typical FP8 row
    assert bench_linear.wrong_result(row("fp8-tensor", 0.065, 1.0))  # an all-zero input gradient
    assert bench_linear.wrong_result(row("fp8-row", 1.5 * limits["fp8"], 0.06))
    assert bench_linear.wrong_result(row("fp8-block", 0.06, math.nan))
    assert not bench_linear.wrong_result(row("fp4-dge", 0.5, 0.55))  # within the FP4 limit
    assert bench_linear.wrong_result(row("nvfp4", 0.5, 1.1 * limits["fp4"]))
    assert not bench_linear.wrong_result(row("bf16", 0.0036, 0.0042))
