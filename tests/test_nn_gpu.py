"""GPU checks of lpdist.nn: tensor-core FP8 GEMMs equal the emulation, compiled layers on CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from lpdist.nn import Float8Linear, FP4Linear, SmoothSwiGLU, swiglu
from lpdist.kernels import fp8_tiles
from lpdist.nn.fp8_cast import cast_fp8, cast_fp8_blocks, cast_fp8_both_ways
from lpdist.nn.float8_swiglu import fusable, swiglu_grad_values, swiglu_values
from lpdist.nn.fp8_gemm import _emulated_gemm, fp8_gemm, hardware_fp8_available

from helpers import operand_with_outliers

pytestmark = pytest.mark.gpu

M, K, N = 512, 1024, 768
COMBOS = [("tensor", "e4m3", "e4m3"), ("tensor", "e5m2", "e4m3"), ("row", "e4m3", "e4m3"),
          ("row", "e5m2", "e4m3"), ("block", "e4m3", "e4m3")]


def _operands(kind, fmt_a, fmt_b, b_blocks):
    gen = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(M, K, device="cuda", generator=gen)
    b = torch.randn(N, K, device="cuda", generator=gen) * 0.02
    group = {"tensor": None, "row": K, "block": 128}[kind]
    qa = cast_fp8(a, fmt_a, group)
    qb = cast_fp8_blocks(b, fmt_b, 128) if b_blocks else cast_fp8(b, fmt_b, group)
    return qa, qb


# 128x128 weight blocks exist only for block scaling.
CASES = [(*combo, False) for combo in COMBOS] + [(*c, True) for c in COMBOS if c[0] == "block"]


@pytest.mark.parametrize("kind,fmt_a,fmt_b,b_blocks", CASES)
def test_scaled_mm_equals_emulation(kind, fmt_a, fmt_b, b_blocks):
    qa, qb = _operands(kind, fmt_a, fmt_b, b_blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused combination must not hide behind the fallback
        assert hardware_fp8_available(kind, qa.data.dtype, qb.data.dtype, b_blocks, qa.data.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    got = fp8_gemm(qa, qb, kind, torch.bfloat16, b_blocks=b_blocks).float()
    want = _emulated_gemm(qa, qb, kind, b_blocks, torch.float32)
    # bf16 output rounding (2^-9 relative) plus fp32 accumulation-order differences.
    torch.testing.assert_close(got, want, rtol=2 ** -8, atol=1e-3 * want.abs().max().item())


TILE_SOURCES = {"plain": lambda x: (x,), "swiglu": swiglu_values, "swiglu_grad": swiglu_grad_values}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("source", sorted(TILE_SOURCES))
@pytest.mark.parametrize("per_tensor", [False, True])
def test_cast_tiles_kernel_equals_torch_twin(dtype, fmt, source, per_tensor):
    """csrc/fp8_tiles.cu writes both casts of each value of the source bit for bit as the torch
    twin (the SwiGLU values of lpdist.nn.float8_swiglu, then cast_fp8 of the value and of its
    transpose, run with torch on the same GPU), with 1x128 tile scales or one per-tensor scale,
    on non-square operands with outliers, NaN, ±inf and a zero tile, including the telemetry."""
    gen = torch.Generator().manual_seed(3)
    inputs = tuple(operand_with_outliers(384, 640, gen, dtype=dtype, device="cuda")
                   for _ in range(fp8_tiles.SOURCES[source][1]))
    assert fp8_tiles.tiles_fit(*inputs)
    casts = fp8_tiles.cast_tiles(source, inputs, fmt, per_tensor=per_tensor, track=True)
    values = TILE_SOURCES[source](*inputs)
    assert len(casts) == len(values)
    for cast, value in zip(casts, values):
        group = None if per_tensor else 128
        want_rows, want_cols = cast_fp8(value, fmt, group, track=True), cast_fp8(value.t(), fmt, group)
        assert torch.equal(cast.q_row.view(torch.uint8), want_rows.data.view(torch.uint8))
        assert torch.equal(cast.q_col.view(torch.uint8), want_cols.data.contiguous().view(torch.uint8))
        assert torch.equal(cast.s_row, want_rows.scale) and torch.equal(cast.s_col, want_cols.scale)
        amax = cast.amax if per_tensor else cast.tile_stats[:, 0].amax()
        assert amax == want_rows.amax
        saturated, flushed = cast.tile_stats[:, 1:].sum(dim=0)
        assert saturated == want_rows.saturated
        # SwiGLU's gradient passes through fp32 products that can be subnormal; where the CUDA math
        # flushes one to zero and torch keeps it, both values cast to the FP8 code 0 (codes are
        # compared bit for bit above) but only the nonzero one counts as flushed. Measured: 2 of
        # 245,760 elements; allowed: 1e-4 of them. Other sources are counted exactly.
        allowed = 1e-4 * value.numel() if source == "swiglu_grad" else 0
        assert abs(flushed - want_rows.underflow) <= allowed
        assert want_rows.underflow > 0  # the counts were exercised
        if source == "plain":
            assert want_rows.saturated > 0
    if source == "plain":
        rows, cols = cast_fp8_both_ways(inputs[0], fmt, None if per_tensor else 128)  # the layers' entry point
        assert torch.equal(rows.data.view(torch.uint8), casts[0].q_row.view(torch.uint8))
        assert torch.equal(cols.scale, casts[0].s_col)


@pytest.mark.parametrize("scaling,grad_fmt", [(k, g) for k in ("tensor", "row", "block")
                                              for g in ("e4m3", "e5m2")])
def test_float8_linear_cuda_compiled_matches_emulation(scaling, grad_fmt):
    """Output, input and weight gradients of the compiled CUDA layer against the fp64 CPU
    emulation, and against the eager CUDA layer (same GEMM path: equal up to fusion order)."""
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(2)
    layer = Float8Linear(K, N, scaling=scaling, grad_fmt=grad_fmt, device="cuda")
    x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    e = torch.randn(M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
    runs = {}
    for mode, fn in (("eager", layer), ("compiled", torch.compile(layer))):
        xr = x.clone().requires_grad_()
        y = fn(xr)
        y.backward(e)
        runs[mode] = (y.detach(), xr.grad, layer.weight.grad)
        layer.weight.grad = None
    ref = Float8Linear(K, N, scaling=scaling, grad_fmt=grad_fmt).to(torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.double().cpu())
    x_cpu = x.double().cpu().requires_grad_()
    y_cpu = ref(x_cpu)
    y_cpu.backward(e.double().cpu())
    want = (y_cpu.detach(), x_cpu.grad, ref.weight.grad)
    rel = lambda a, b: ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()  # noqa: E731
    for name, got, exp, eager in zip(("y", "dx", "dw"), runs["compiled"], want, runs["eager"]):
        assert got.abs().max() > 0, f"{name} is all zeros"
        # bf16 activations/outputs on GPU vs fp64 emulation: ~2^-8 relative each.
        assert rel(got, exp) < 2e-2, name
        # Same casts and GEMMs; the casts may differ by one FP8 rounding where a fused kernel
        # rounds an fp32 product differently, far below the FP8 error itself.
        assert rel(got, eager) < 2e-2, name
    assert layer.last_stats()["grad_amax"] == pytest.approx(e.abs().max().item(), rel=1e-3)


@pytest.mark.parametrize("scaling,grad_fmt", [("tensor", "e5m2"), ("block", "e4m3")])
def test_fused_swiglu_cuda_matches_the_layers(scaling, grad_fmt):
    """The fused FP8 SwiGLU MLP on CUDA (SwiGLU's values and casts by csrc/fp8_tiles.cu,
    tensor-core GEMMs), compiled, is as accurate against float64 as the three compiled
    Float8Linear layers: the same casts and GEMMs, but inductor casts h, dg and du from fp32
    without rounding them to bf16 first, so about 2^-8 / 2^-3 of them land on a neighbouring FP8
    code in one path and not the other (a few % relative between the paths, each ~6e-2 from
    float64); the fused error may exceed the layers' by 10% at most."""
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(4)
    layers = [Float8Linear(a, b, scaling=scaling, grad_fmt=grad_fmt, device="cuda", dtype=torch.bfloat16)
              for a, b in ((K, N), (K, N), (N, K))]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.02, generator=gen)
    x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    e = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    runs = []
    assert fusable(x, *layers)
    for fuse in (True, False):
        fn = torch.compile(lambda t, fuse=fuse: swiglu(t, *layers, smooth=None, fuse=fuse))
        xr = x.clone().requires_grad_()
        y = fn(xr)
        y.backward(e)
        runs.append((y.detach(), xr.grad, *(layer.weight.grad for layer in layers)))
        for layer in layers:
            layer.weight.grad = None
    x64 = x.double().requires_grad_()
    w64 = [layer.weight.detach().double().requires_grad_() for layer in layers]
    y64 = (torch.nn.functional.silu(x64 @ w64[0].t()) * (x64 @ w64[1].t())) @ w64[2].t()
    y64.backward(e.double())
    exact = (y64.detach(), x64.grad, *(w.grad for w in w64))
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    for name, fused, layered, want in zip(("y", "dx", "d_gate", "d_up", "d_down"), *runs, exact):
        assert fused.abs().max() > 0, name
        assert rel(fused, want) <= 1.1 * rel(layered, want), (name, rel(fused, want), rel(layered, want))


@pytest.mark.parametrize("recipe", ["quartet", "dge", "nvfp4"])
def test_fp4_linear_cuda_matches_cpu_forward(recipe):
    gen = torch.Generator().manual_seed(3)
    layer = FP4Linear(256, 128, recipe=recipe)
    x = torch.randn(64, 256, generator=gen)
    y_cpu = layer(x)
    y_gpu = layer.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4 * y_cpu.abs().max().item())


@pytest.mark.parametrize("recipe", ["quartet", "dge", "nvfp4"])
def test_fp4_linear_cuda_bf16_gemm(recipe):
    """bf16 inputs use the bf16 tensor-core GEMM with fp32 output (``torch.mm(out_dtype=)``).

    Eager: the forward equals the CPU path (same RNE operands, fp32 accumulation) up to
    accumulation order and one bf16 output rounding (2^-8 relative with margin). Compiled: the
    quantizers are inductor kernels whose fp32 division need not be IEEE-exact, so a scale can
    differ by an ulp and move a value sitting on a rounding midpoint to the neighbouring E2M1 code.
    One such flip moves its output row by a grid step times a weight (~1e-3 relative L2 over this
    layer), so the compiled forward must stay within 2^-6 relative L2 of eager: far below FP4's
    own error (~0.1) and the ~1 of a broken path (e.g. mismatched rotations)."""
    gen = torch.Generator().manual_seed(5)
    layer = FP4Linear(256, 128, recipe=recipe).bfloat16()
    x = torch.randn(64, 256, generator=gen).bfloat16()
    y_cpu = layer(x).float()
    layer = layer.cuda()
    outputs = []
    for fn in (layer, torch.compile(layer)):
        xg = x.cuda().requires_grad_()
        y = fn(xg)
        y.float().pow(2).sum().backward()
        assert y.dtype == torch.bfloat16 and torch.isfinite(xg.grad).all()
        outputs.append(y.float().cpu())
    eager, compiled = outputs
    torch.testing.assert_close(eager, y_cpu, rtol=2**-7, atol=1e-3 * y_cpu.abs().max().item())
    assert ((compiled - eager).norm() / eager.norm()).item() < 2**-6


def test_smooth_swiglu_float8_cuda_autocast():
    mlp = SmoothSwiGLU(1024, 2816, linear=lambda i, o: Float8Linear(i, o, device="cuda"),
                       smooth="token")
    x = torch.randn(4, 128, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.compile(mlp)(x)
    y.float().pow(2).mean().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
