"""Float8Linear and its FP8 casts/GEMM against lpdist.quant and float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lpdist.nn import Float8Linear
from lpdist.nn.fp8_cast import cast_fp8, cast_fp8_blocks, cast_fp8_both_ways, dequantize_fp8
from lpdist.quant import FORMATS, fake_quantize, quantize

from helpers import operand_with_outliers

SCALINGS = ("tensor", "row", "block")
T, K, N = 256, 256, 384  # multiples of the 128 tiles


def _group(scaling: str, n: int) -> int | None:
    return {"tensor": None, "row": n, "block": 128}[scaling]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("group", [None, 96, 128, 200])
def test_cast_matches_quant_oracle(fmt, group, generator):
    x = torch.randn(64, 200, generator=generator) * torch.logspace(-3, 2, 200)
    x[:, 7] = 3.0 * x[:, 7].abs().max()  # amax 3·m: scale not a power of two, 1/s inexact
    c = cast_fp8(x, fmt, group)
    q = quantize(x, fmt, block=group)
    assert torch.equal(c.data.view(torch.uint8), q.data.view(torch.uint8))
    assert torch.equal(c.scale, q.scale)
    assert torch.equal(dequantize_fp8(c, group, torch.float32), q.dequantize(torch.float32))


@pytest.mark.parametrize("shape,transpose", [((64, 200), False), ((66, 200), False), ((64, 200), True),
                                             ((3, 8, 40), False), ((1, 7), False)],
                         ids=["rows-by-4", "rows-not-by-4", "non-contiguous", "3-d", "one-row"])
def test_per_tensor_amax_is_the_amax_of_the_finite_and_infinite_values(shape, transpose, generator):
    """The per-tensor scale comes from ``max |x|`` over every non-NaN value, whatever the partial
    maxima it is taken through: NaN never sets it, an infinity does."""
    x = torch.randn(*shape, generator=generator) * torch.logspace(-3, 2, shape[-1])
    x = x.transpose(-1, -2) if transpose else x
    nan_at, inf_at = (torch.unravel_index(i, x.shape) for i in torch.randperm(x.numel(), generator=generator)[:2])
    c = cast_fp8(x, "e4m3")
    assert c.amax.double() == x.abs().double().max() and torch.equal(c.scale, quantize(x, "e4m3").scale)
    x = x.clone()
    x[nan_at] = float("nan")
    assert cast_fp8(x, "e4m3").amax.double() == x[~x.isnan()].abs().double().max()
    x[inf_at] = -float("inf")
    assert cast_fp8(x, "e4m3").amax == float("inf")


def test_block_cast_matches_quant_with_tile_scales(generator):
    w = torch.randn(256, 384, generator=generator)
    c = cast_fp8_blocks(w, "e4m3", 128)
    tiles = w.reshape(2, 128, 3, 128).abs().amax(dim=(1, 3))
    assert torch.equal(c.scale, tiles / 448.0)
    row_scale = c.scale.repeat_interleave(128, dim=0)  # [256, 3]: one per 1x128 run of each row
    q = quantize(w, "e4m3", block=128, scale=row_scale)
    assert torch.equal(c.data.view(torch.uint8), q.data.view(torch.uint8))
    assert torch.equal(cast_fp8_blocks(w.t().contiguous(), "e4m3", 128).data, c.data.t())


def test_transposed_cast_with_forward_scale_is_the_transpose(generator):
    """Dgrad re-casts Wᵀ with W's forward scale (per tensor, or per 128x128 block): it must be
    bit for bit the transpose of the forward cast, with no amax taken."""
    w = torch.randn(256, 384, generator=generator) * torch.logspace(-2, 1, 384)
    fwd = cast_fp8(w, "e4m3")
    again = cast_fp8(w.t(), "e4m3", scale=fwd.scale)
    assert again.amax is None and torch.equal(again.scale, fwd.scale)
    assert torch.equal(again.data.view(torch.uint8), fwd.data.t().view(torch.uint8))
    fwd_b = cast_fp8_blocks(w, "e4m3", 128)
    again_b = cast_fp8_blocks(w.t(), "e4m3", 128, scale=fwd_b.scale.t())
    assert torch.equal(again_b.data.view(torch.uint8), fwd_b.data.t().view(torch.uint8))
    with pytest.raises(ValueError, match="group=None"):
        cast_fp8(w, "e4m3", 128, scale=fwd.scale)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_both_ways_is_both_casts(fmt, generator):
    """The pair of casts equals cast_fp8 of x and of xᵀ, with cuBLASLt's column-major scales;
    the custom op's fake (compile-time) outputs have the real shapes and strides."""
    x = operand_with_outliers(256, 384, generator)
    rows, cols = cast_fp8_both_ways(x, fmt, 128, track=True)
    want_rows, want_cols = cast_fp8(x, fmt, 128, track=True), cast_fp8(x.t(), fmt, 128)
    assert torch.equal(rows.data.view(torch.uint8), want_rows.data.view(torch.uint8))
    assert torch.equal(cols.data.view(torch.uint8), want_cols.data.view(torch.uint8))
    assert cols.data.is_contiguous() and cols.data.shape == (384, 256)
    for got, want in ((rows.scale, want_rows.scale), (cols.scale, want_cols.scale)):
        assert torch.equal(got, want) and got.stride() == (1, got.shape[0])
    for field in ("amax", "saturated", "underflow"):
        assert torch.equal(getattr(rows, field), getattr(want_rows, field)), field
    finite = torch.where(x.isfinite(), x, 1.0)  # opcheck compares outputs with NaN != NaN (±inf casts to NaN)
    torch.library.opcheck(torch.ops.lpdist.fp8_cast_both_ways.default, (finite, fmt, 128, True))
    with pytest.raises(ValueError, match="2-D"):
        cast_fp8_both_ways(x[None], fmt, 128)
    with pytest.raises(ValueError, match="fmt"):
        cast_fp8_both_ways(x, "e2m1", 128)


def _oracle(x, w, e, scaling, grad_fmt):
    """Fprop, Dgrad, Wgrad rebuilt from lpdist.quant.fake_quantize, in float64."""
    def fq(t, fmt, n):  # quantize t [rows, n] along its last dim
        return fake_quantize(t, fmt, block=_group(scaling, n)).double()

    def fq_weight(w2):  # w2 [rows, cols] quantized along cols (128x128 tiles for block)
        if scaling != "block":
            return fq(w2, "e4m3", w2.shape[1])
        tile = w2.reshape(w2.shape[0] // 128, 128, -1, 128).abs().amax(dim=(1, 3)).float() / 448
        return fake_quantize(w2, "e4m3", block=128, scale=tile.repeat_interleave(128, 0)).double()

    y = fq(x, "e4m3", K) @ fq_weight(w).t()
    dx = fq(e, grad_fmt, N) @ fq_weight(w.t().contiguous()).t()
    dw = fq(e.t().contiguous(), grad_fmt, T) @ fq(x.t().contiguous(), "e4m3", T).t()
    return y, dx, dw


def _bound(a, fmt_a, b, fmt_b, n_a, n_b):
    """Frobenius bound of ‖AB - ÂB̂‖ from the formats: |a - â| ≤ 2^-(m+1)|a| + s·2^(emin-m-1)
    (relative half-step for normals, half the smallest subnormal step), s ≤ amax/max, and
    ‖AB - ÂB̂‖ ≤ ‖A-Â‖‖B‖ + ‖Â‖‖B-B̂‖."""
    def err(t, fmt):
        f = FORMATS[fmt]
        s = t.abs().max() / f.max
        return 2.0 ** -(f.mbits + 1) * t.norm() + s * 2.0 ** (f.emin - f.mbits - 1) * t.numel() ** 0.5
    ea, eb = err(a, fmt_a), err(b, fmt_b)
    return ea * b.norm() + (a.norm() + ea) * eb


@pytest.mark.parametrize("grad_fmt", ["e5m2", "e4m3"])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_float8_linear_matches_oracle_and_format_bound(scaling, grad_fmt, generator):
    layer = Float8Linear(K, N, scaling=scaling, grad_fmt=grad_fmt).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(N, K, generator=generator, dtype=torch.float64) * 0.05)
    x = (torch.randn(T, K, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    e = torch.randn(T, N, generator=generator, dtype=torch.float64)
    y = layer(x)
    y.backward(e)
    w = layer.weight.detach()
    y_ref, dx_ref, dw_ref = _oracle(x.detach(), w, e, scaling, grad_fmt)
    # Same FP8 operands, fp64 products: only the oracle's fp32 rounding of each dequantized
    # value (2^-24 relative) differs, so |diff| ≤ 2^-23·Σ|a||b| ≤ 1e-6·(sum of magnitudes).
    for got, want in ((y, y_ref), (x.grad, dx_ref), (layer.weight.grad, dw_ref)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    xd = x.detach()
    exact = ((xd @ w.t()), e @ w, e.t() @ xd)
    bounds = (_bound(xd, "e4m3", w.t(), "e4m3", K, K), _bound(e, grad_fmt, w, "e4m3", N, N),
              _bound(e.t(), grad_fmt, xd, "e4m3", T, T))
    for got, want, bound in zip((y, x.grad, layer.weight.grad), exact, bounds):
        assert (got - want).norm() <= bound


def test_bias_batch_dims_and_dtypes(generator):
    layer = Float8Linear(64, 32, bias=True)
    x = torch.randn(2, 5, 64, generator=generator, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float32
    y.sum().backward()
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, torch.full((32,), 10.0))
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_from_linear_shares_parameters_and_state_dict(generator):
    lin = nn.Linear(64, 48, bias=True)
    f8 = Float8Linear.from_linear(lin, scaling="row")
    assert f8.weight is lin.weight and f8.bias is lin.bias
    assert list(f8.state_dict()) == list(lin.state_dict())
    x = torch.randn(8, 64, generator=generator)
    rel = (f8(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.1  # e4m3: 2^-4 per operand


def test_last_stats(generator):
    layer = Float8Linear(128, 64)
    assert set(layer.last_stats()) == {"input_amax", "weight_amax", "grad_amax",
                                       "saturated_frac", "underflow_frac"}
    x = torch.randn(32, 128, generator=generator)
    x[0, :64] = 1e-9  # far below amax·2^-10: flushed to zero
    x[1, 0] = float("nan")  # stays NaN (neither saturated nor flushed), never sets the scale
    y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[torch.arange(32) != 1]).all()
    y[torch.arange(32) != 1].sum().backward()
    s = layer.last_stats()
    assert s["input_amax"] == pytest.approx(x[torch.isfinite(x)].abs().max().item())
    assert s["weight_amax"] == pytest.approx(layer.weight.abs().max().item())
    assert s["grad_amax"] == 1.0
    n = x.numel() + layer.weight.numel() + 32 * 64
    assert s["underflow_frac"] == pytest.approx(64 / n)
    assert s["saturated_frac"] == 0.0  # current scaling saturates nothing finite (see the delayed tests)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_infinite_input_makes_its_scaling_group_non_finite_and_reports_it(sign, generator):
    """±inf is never saturated into a number: it sets its group's amax (reported as inf) and
    scale, so every result from the group is non-finite: the whole output with one scale per
    tensor, its own row with row scaling, where the other rows are exactly those of the same
    input without the ±inf (their scales do not change)."""
    x = torch.randn(32, 128, generator=generator)
    clean = x.clone()
    x[5, 7] = sign * float("inf")
    tensor = Float8Linear(128, 64)
    y = tensor(x)
    assert not torch.isfinite(y).any()
    assert tensor.last_stats()["input_amax"] == float("inf")
    row = Float8Linear.from_linear(tensor, scaling="row")
    y, want = row(x), row(clean)
    assert not torch.isfinite(y[5]).any()
    others = torch.arange(32) != 5
    assert torch.equal(y[others], want[others]) and torch.isfinite(want).all()
    off = Float8Linear(128, 64, track_stats=False)
    off(x[2:]).sum().backward()
    assert off.last_stats() == {}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_stay_fp32_when_the_model_is_cast(dtype, generator):
    """Counts above fp16's max (65504) or bf16's 2^8 exact integers must stay exact: the
    telemetry buffer keeps fp32 (integers exact to 2^24) through .half()/.to(dtype), and the
    statistics already recorded survive the cast; state_dict keys remain nn.Linear's."""
    layer = Float8Linear(512, 512)
    layer(torch.randn(4, 512, generator=generator))
    recorded = layer._lp_stats.clone()
    layer = layer.to(dtype)
    assert layer._lp_stats.dtype == torch.float32
    torch.testing.assert_close(layer._lp_stats, recorded, rtol=0, atol=0, equal_nan=True)
    assert list(layer.half().state_dict()) == list(nn.Linear(512, 512, bias=False).state_dict())
    layer = layer.to(dtype)
    x = torch.randn(64, 512, generator=generator).to(dtype)
    x[:, :256] *= 2.0 ** -20  # below amax·2^-10 for e4m3: flushed to zero
    layer(x)
    flushed = sum(int(((quantize(t, "e4m3").dequantize() == 0) & (t != 0)).sum())
                  for t in (x, layer.weight.detach()))
    count = x.numel() + layer.weight.numel()  # 294912: inf in fp16
    assert flushed > 8192 and layer.last_stats()["underflow_frac"] == flushed / count


@pytest.mark.parametrize("scaling", SCALINGS)
def test_compile_matches_eager(scaling, generator):
    torch._dynamo.reset()
    layer = Float8Linear(128, 128, scaling=scaling)
    x = torch.randn(64, 128, generator=generator)
    e = torch.randn(64, 128, generator=generator)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x1).backward(e)
    g_eager = layer.weight.grad.clone()
    layer.weight.grad = None
    torch.compile(layer, fullgraph=True)(x2).backward(e)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, g_eager, rtol=1e-5, atol=1e-6)
    assert layer.last_stats()["grad_amax"] == pytest.approx(e.abs().max().item())


def test_bad_arguments():
    with pytest.raises(ValueError, match="scaling"):
        Float8Linear(128, 128, scaling="col")
    with pytest.raises(ValueError, match="grad_fmt"):
        Float8Linear(128, 128, grad_fmt="e3m4")
    with pytest.raises(ValueError, match="block"):
        Float8Linear(100, 128, scaling="block")
    with pytest.raises(ValueError, match="in_features"):
        Float8Linear(128, 128)(torch.randn(4, 64))
    with pytest.raises(TypeError, match="linear"):
        Float8Linear.from_linear(nn.Conv1d(2, 2, 1))
