"""scripts/bench_pretrain.py's table of kernel time per kind (``--profile``)."""

from __future__ import annotations

from script_loader import load_script


def test_kernel_kinds_table_skips_failed_runs(capsys):
    bench = load_script("scripts/bench_pretrain.py")
    rows = [{"recipe": "bf16", "error": "out of memory"},
            {"recipe": "fp8", "tokens_per_s": 1.0, "profile_busy_ms": 90.5, "profile_kernels_gemm_ms": 39.04,
             "profile_kernels_triton_ms": 24.96},
            {"recipe": "fp8 -layers", "tokens_per_s": 1.0}]  # not traced: no line
    bench.print_kernel_kinds(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["recipe", "gemm", "triton"]
    assert lines[2].split() == ["fp8", "39.0", "25.0"]
    assert len(lines) == 3
