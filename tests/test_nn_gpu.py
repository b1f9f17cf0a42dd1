"""GPU checks of lpdist.nn: tensor-core FP8 GEMMs equal the emulation, compiled layers on CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from lpdist.nn import Float8Linear, FP4Linear, SmoothSwiGLU
from lpdist.kernels import fp8_tiles
from lpdist.nn.fp8_cast import cast_fp8, cast_fp8_blocks, cast_fp8_both_ways
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_tiles_kernel_equals_torch_twin(dtype, fmt):
    """csrc/fp8_tiles.cu writes both 1x128 casts bit for bit as cast_fp8 of x and of xᵀ (run
    with torch on the same GPU), on a non-square operand with outliers, NaN, ±inf and a zero
    tile, including the telemetry counts."""
    gen = torch.Generator().manual_seed(3)
    x = operand_with_outliers(384, 640, gen, dtype=dtype, device="cuda")
    assert fp8_tiles.tiles_fit(x)
    q_row, s_row, q_col, s_col, tile_stats = fp8_tiles.cast_tiles_both(x, fmt, track=True)
    want_rows, want_cols = cast_fp8(x, fmt, 128, track=True), cast_fp8(x.t(), fmt, 128)
    assert torch.equal(q_row.view(torch.uint8), want_rows.data.view(torch.uint8))
    assert torch.equal(q_col.view(torch.uint8), want_cols.data.contiguous().view(torch.uint8))
    assert torch.equal(s_row, want_rows.scale) and torch.equal(s_col, want_cols.scale)
    assert tile_stats[:, 0].amax() == want_rows.amax
    assert torch.equal(tile_stats[:, 1:].sum(dim=0), torch.stack((want_rows.saturated, want_rows.underflow)))
    # Flushed values were exercised; nothing saturates: ±inf casts to NaN, and a scale taken from
    # the group's own amax leaves every finite value within the format's range.
    assert want_rows.saturated == 0 and want_rows.underflow > 0
    assert torch.isnan(q_row.float()).sum() == torch.isnan(q_col.float()).sum() == (~torch.isfinite(x)).sum()
    rows, cols = cast_fp8_both_ways(x, fmt, 128)  # the layer's entry point takes the kernel
    assert torch.equal(rows.data.view(torch.uint8), q_row.view(torch.uint8))
    assert torch.equal(cols.scale, s_col)


def test_delayed_scaling_cuda_compiled_matches_the_cpu_layer():
    """Float8Linear(amax_history=4) on CUDA, compiled, over three steps of growing and shrinking
    inputs (the second saturates against the first's range) against the same layer in fp64 on
    the CPU: outputs and gradients within bf16/GEMM rounding, and the same amax histories."""
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = Float8Linear(K, N, amax_history=4, device="cuda")
    ref = Float8Linear(K, N, amax_history=4).to(torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.double().cpu())
    compiled = torch.compile(layer)
    rel = lambda a, b: ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()  # noqa: E731
    for size in (1.0, 4.0, 0.5):
        x = (torch.randn(M, K, device="cuda", generator=gen) * size).to(torch.bfloat16)
        e = torch.randn(M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
        xr, x_cpu = x.clone().requires_grad_(), x.double().cpu().requires_grad_()
        y = compiled(xr)
        y.backward(e)
        y_cpu = ref(x_cpu)
        y_cpu.backward(e.double().cpu())
        for name, got, want in (("y", y, y_cpu), ("dx", xr.grad, x_cpu.grad), ("dw", layer.weight.grad, ref.weight.grad)):
            assert rel(got.detach(), want.detach()) < 2e-2, (size, name)
        layer.weight.grad = ref.weight.grad = None
    for name in ("_x_amax_history", "_grad_amax_history"):
        torch.testing.assert_close(getattr(layer, name).cpu(), getattr(ref, name), rtol=1e-2, atol=0)


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


@pytest.mark.parametrize("scaling", ["tensor", "row", "block"])
def test_float8_linear_cuda_does_not_saturate_an_infinite_input(scaling):
    """±inf in the input gives its scaling group an infinite scale on the tensor-core path too,
    eager and compiled: the whole output is non-finite with one scale per tensor, only the row
    of the ±inf with row and 1x128-tile scaling; the weight gradient is non-finite, the other
    rows of the output finite."""
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(4)
    layer = Float8Linear(K, N, scaling=scaling, grad_fmt="e4m3", device="cuda")
    x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    x[5, 7] = -float("inf")
    others = torch.arange(M, device="cuda") != 5
    for fn in (layer, torch.compile(layer)):
        y = fn(x.clone().requires_grad_())
        y.float().sum().backward()
        assert not torch.isfinite(y[5]).any()
        assert (not torch.isfinite(y[others]).any()) if scaling == "tensor" else torch.isfinite(y[others]).all()
        assert not torch.isfinite(layer.weight.grad).all()
        layer.weight.grad = None


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
