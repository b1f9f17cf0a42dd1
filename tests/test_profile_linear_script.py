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
    # As bench_linear's step, each profiled step starts with the weight gradients cleared: no
    # in-place accumulation into the previous step's three weight gradients is profiled, only
    # (at most) the sum of the gate and up projections' input gradients.
    for r in rows:
        in_place_adds = sum(k["calls"] for k in r["kernels"] if k["name"] == "aten::add_")
        assert in_place_adds <= 1, (r["variant"], in_place_adds)


def test_idle_gaps_sums_and_ranks_the_device_idle_time(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    profile_linear = load_script("scripts/profile_linear.py")
    # Kernels out of order, one nested inside another (no gap), idle 5 us then 20 us.
    kernels = [(30.0, 40.0, "c"), (0.0, 10.0, "a"), (2.0, 8.0, "nested"), (15.0, 25.0, "b"),
               (60.0, 61.0, "d")]
    gaps = profile_linear.idle_gaps(kernels, top=1)
    assert abs(gaps["idle_ms"] - (5.0 + 5.0 + 20.0) / 1e3) < 1e-12
    assert gaps["largest"] == [{"us": 20.0, "after": "c", "before": "d"}]
