"""scripts/profile_linear.py on CPU (tiny shape, eager): kernel table and GEMM split."""

import json
import sys

from script_loader import ROOT, load_script


def test_profile_linear_counts_the_nine_gemms_and_writes_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # the script imports bench_linear
    profile_linear = load_script("scripts/profile_linear.py")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["profile_linear.py", "--shapes", "tiny", "--eager",
                                      "--variants", "bf16,fp8-tensor", "--iters", "2",
                                      "--warmup", "1", "--reps", "1"])
    profile_linear.main()
    rows = json.loads((tmp_path / "profile_linear.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["bf16", "fp8-tensor"]
    for r in rows:
        assert "error" not in r, r
        # An MLP block step is 9 GEMMs (3 layers: Fprop, Dgrad, Wgrad), each one aten::mm on CPU
        # (FP8 GEMMs are emulated by dequantized fp32 matmuls there).
        assert sum(k["calls"] for k in r["kernels"] if k["gemm"]) == 9
        assert r["gemm_ms"] > 0 and r["non_gemm_ms"] > 0
        assert abs(r["gemm_ms"] + r["non_gemm_ms"] - r["kernel_ms"]) < 1e-9
        assert abs(sum(k["pct"] for k in r["kernels"]) - 100.0) < 1e-6
        ms = [k["ms"] for k in r["kernels"]]
        assert ms == sorted(ms, reverse=True)
    # The FP8 block adds casts (amax reductions, scaling, fp8 conversions) that bf16 lacks.
    names = {k["name"] for k in rows[1]["kernels"]}
    assert "aten::amax" in names and "aten::amax" not in {k["name"] for k in rows[0]["kernels"]}
