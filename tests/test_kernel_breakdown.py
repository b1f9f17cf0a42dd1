"""lpdist.benchmark.kernel_time_breakdown / kernel_time_by_kind / trace_kernels: compute,
communication and the part of the communication that no compute kernel hides, and the time per
kind of kernel, from the kernel intervals of a profiler trace."""

from __future__ import annotations

import json

import pytest

from lpdist.benchmark import kernel_time_breakdown, kernel_time_by_kind, trace_kernels

GEMM = "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"
CAST = "triton_poi_fused__scaled_mm__to_copy_clamp_mul_reciprocal_t_16"
RS = "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
ENCODE = "void quantize_rows_to_peers<__nv_bfloat16, E4M3, 8>(__nv_bfloat16 const*, long, int)"
DECODE = "dequant_rows_f32_v8"
BARRIER = "peer_barrier"


def test_overlap_splits_into_hidden_and_exposed_communication():
    # compute [0, 10) and [22, 30) on one stream; communication [5, 15) and [20, 25) on another.
    kernels = [(GEMM, 0.0, 10.0), (RS, 5.0, 10.0), (ENCODE, 20.0, 3.0), (DECODE, 23.0, 2.0), (CAST, 22.0, 8.0)]
    got = kernel_time_breakdown(kernels)
    # busy [0, 15) + [20, 30); communication [5, 15) + [20, 25); exposed [10, 15) + [20, 22).
    assert got == {"busy": 25.0, "communication": 15.0, "exposed_communication": 7.0, "compute": 18.0}
    assert kernel_time_breakdown(kernels, steps=2) == {key: value / 2 for key, value in got.items()}


def test_concurrent_kernels_of_one_kind_count_once_and_a_barrier_is_communication():
    kernels = [(GEMM, 0.0, 4.0), (CAST, 1.0, 2.0), (BARRIER, 6.0, 1.0), (RS, 6.5, 1.5)]
    assert kernel_time_breakdown(kernels) == {"busy": 6.0, "communication": 2.0, "exposed_communication": 2.0,
                                              "compute": 4.0}
    assert kernel_time_breakdown([]) == dict.fromkeys(("busy", "communication", "exposed_communication", "compute"), 0.0)
    with pytest.raises(ValueError, match="steps"):
        kernel_time_breakdown([], steps=0)


def test_trace_kernels_reads_only_gpu_kernels(tmp_path):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1.0, "dur": 50.0},
        {"ph": "X", "cat": "kernel", "name": GEMM, "ts": 10.5, "dur": 4.25},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 2.0, "dur": 1.0},
        {"ph": "f", "cat": "ac2g", "name": "flow", "ts": 3.0},
        {"ph": "X", "cat": "kernel", "name": RS, "ts": 12.0, "dur": 8.0},
    ]}
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps(trace))
    assert trace_kernels(path) == [(GEMM, 10.5, 4.25), (RS, 12.0, 8.0)]
    # GEMM [10.5, 14.75) hides the reduce-scatter until 14.75; it runs alone until 20.
    assert kernel_time_breakdown(trace_kernels(path))["exposed_communication"] == pytest.approx(5.25)


def test_time_by_kind_sums_each_kernel_in_its_kind():
    kernels = [(GEMM, 0.0, 10.0), ("nvjet_sm90_qqtst_320x128_128x3_1x2_h_bz_coopB_TNT", 10.0, 6.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", 16.0, 5.0),
               (RS, 5.0, 10.0), (ENCODE, 20.0, 3.0), ("adamw_c1_f32_e4m3_e5m2", 30.0, 4.0),
               ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<1> >", 34.0, 1.0),
               (CAST, 22.0, 8.0), ("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float> >", 40.0, 2.0)]
    got = kernel_time_by_kind(kernels, steps=2)
    assert got == {"gemm": 8.0, "attention": 2.5, "communication": 6.5, "optimizer": 2.5, "triton": 4.0, "other": 1.0}
    with pytest.raises(ValueError, match="steps"):
        kernel_time_by_kind(kernels, steps=0)
