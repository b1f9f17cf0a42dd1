"""lpdist.comm codec, wire layout and op parsing on one process (torch path, the kernels' twin)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import rel_error

from lpdist.comm import rms_error_bound
from lpdist.comm.codec import (FAST_BLOCKS, fast_path_applies, block_amax_into, dequant_into,
                               quantize_into, shared_scales, wire_order)
from lpdist.comm.ops import reduction_factor
from lpdist.comm.wire import WireLayout, pieces
from lpdist.quant import quantize, round_to_format
from lpdist.quant.noise import hashed_uniform


def _packed(x: torch.Tensor, block: int, fmt: str, residual=None, rounding="nearest", seed=0):
    rows, cols = x.shape
    layout = WireLayout(cols, block)
    buf = layout.empty(rows, x.device)
    quantize_into(x, residual, col0=0, cols=cols, block=block, fmt=fmt, payload=layout.payload(buf),
                  scales=layout.scales(buf), rounding=rounding, seed=seed)
    return layout, buf


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols,block", [(1000, 256), (37, 16), (512, 128)])
def test_quantize_matches_quant_oracle(generator, fmt, dtype, cols, block):
    x = (torch.randn(3, cols, generator=generator) * 5).to(dtype)
    layout, buf = _packed(x, block, fmt)
    ref = quantize(x, fmt, block=block)
    assert torch.equal(layout.payload(buf), ref.data.view(torch.uint8))
    assert torch.equal(layout.scales(buf), ref.scale)


def test_dequant_sums_rows_in_fp32_with_factor(generator):
    x = torch.randn(4, 300, generator=generator)
    layout, buf = _packed(x, 64, "e4m3")
    out = torch.empty(1, 300)
    dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=4, block=64, fmt="e4m3",
                 factor=0.25, out=out)
    deq = quantize(x, "e4m3", block=64).dequantize(torch.float32)
    expected = (((deq[0] + deq[1]) + deq[2]) + deq[3]) * 0.25
    assert torch.equal(out[0], expected)
    rows = torch.empty(4, 300, dtype=torch.bfloat16)
    dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=64, fmt="e4m3",
                 factor=1.0, out=rows)
    assert torch.equal(rows, deq.to(torch.bfloat16))



@pytest.mark.parametrize("own_row", [0, 2, 3])
def test_own_row_goes_last_on_the_wire_and_decodes_in_rank_order(generator, own_row):
    x = torch.randn(4, 300, generator=generator)
    layout, plain = _packed(x, 64, "e4m3")
    wire = layout.empty(4, x.device)
    quantize_into(x, None, col0=0, cols=300, block=64, fmt="e4m3", payload=layout.payload(wire),
                  scales=layout.scales(wire), own_row=own_row)
    order = wire_order(4, own_row)
    assert order[-1] == own_row and sorted(order) == [0, 1, 2, 3]
    assert torch.equal(layout.payload(wire), layout.payload(plain)[order])
    assert torch.equal(layout.scales(wire), layout.scales(plain)[order])
    received, own = wire[:3].clone(), wire[3:]  # what the other ranks send, then the own row
    out = torch.empty(1, 300)
    dequant_into(layout.payload(received), layout.scales(received), sum_rows=4, block=64, fmt="e4m3",
                 factor=0.25, out=out, own=(layout.payload(own), layout.scales(own)), own_row=own_row)
    deq = quantize(x, "e4m3", block=64).dequantize(torch.float32)
    assert torch.equal(out[0], (((deq[0] + deq[1]) + deq[2]) + deq[3]) * 0.25)


def test_dequant_from_agreed_amax_equals_shared_scales(generator):
    x = torch.randn(1, 512, generator=generator)
    amax = torch.tensor([[3.0, 0.0]])  # second block: amax 0 -> scale 1
    codes = torch.empty(1, 512, dtype=torch.uint8)
    quantize_into(x, None, col0=0, cols=512, block=256, fmt="e4m3", payload=codes, amax=amax, target=224.0)
    from_amax, from_scales = torch.empty(1, 512), torch.empty(1, 512)
    dequant_into(codes, amax, sum_rows=1, block=256, fmt="e4m3", factor=0.5, out=from_amax, amax_target=224.0)
    dequant_into(codes, shared_scales(amax, 224.0), sum_rows=1, block=256, fmt="e4m3", factor=0.5,
                 out=from_scales)
    assert torch.equal(from_amax, from_scales)
    expected = codes.view(torch.float8_e4m3fn).float() * torch.tensor([3.0 / 224.0] * 256 + [1.0] * 256) * 0.5
    assert torch.equal(from_amax, expected)

def _tiny_blocks(generator: torch.Generator, block: int) -> torch.Tensor:
    """fp32 blocks whose amax runs from 1e-30 down into the float32 subnormals (1e-40)."""
    magnitudes = torch.tensor([1e-30, 1e-34, 3e-36, 1e-37, 1e-39, 1e-40])
    return (torch.randn(1, magnitudes.numel(), block, generator=generator) * magnitudes[:, None]).reshape(1, -1)


@pytest.mark.parametrize("with_residual", [False, True])
def test_float32_subnormals_count_as_signed_zeros(generator, with_residual):
    """The kernels run in flush-to-zero mode, and the twin does what they do: a subnormal input
    (or residual) element is a zero of its sign, so it neither sets the block's scale nor gets a
    code other than the zero of its sign (+0 after adding a zero residual), and it decodes to 0 (the fp32 sum starts at +0); its normal neighbours are
    quantized as usual."""
    from lpdist.quant.scaling import MIN_SCALE

    block = 32
    x = torch.randn(1, 2 * block, generator=generator)
    x[0, :block] = torch.randn(block, generator=generator) * 1e-39  # block 0: subnormals only
    x[0, block] = 3e-39  # a positive subnormal in block 1
    x[0, block + 1] = -5e-40  # a negative one
    residual = torch.zeros_like(x) if with_residual else None
    codes = torch.empty(x.shape, dtype=torch.uint8)
    scales = torch.empty(1, 2)
    quantize_into(x, residual, col0=0, cols=x.shape[1], block=block, fmt="e4m3", payload=codes, scales=scales)
    assert float(scales[0, 0]) == 1.0  # an all-zero block, as after the flush
    assert torch.equal(scales[0, 1], x[0, block:].abs().max() / torch.tensor(448.0))
    # e4m3 -0 and +0; with a residual, x + r = -0 + 0 = +0 (IEEE), in the kernels as in the twin
    signs = torch.signbit(x[0]) & (residual is None)
    zero_codes = torch.where(signs, 0x80, 0x00).to(torch.uint8)
    flushed = x[0].abs() < MIN_SCALE
    assert torch.equal(codes[0][flushed], zero_codes[flushed])
    out = torch.empty(x.shape)
    dequant_into(codes, scales, sum_rows=1, block=block, fmt="e4m3", factor=1.0, out=out)
    assert bool((out[0][flushed] == 0).all())
    normal = ~flushed
    # e4m3: half an ulp (2^-4 relative) in its normal range, half its smallest subnormal (2^-10) below
    bound = x[0][normal].abs() * 2.0 ** -4 + 2.0 ** -10 * scales[0].repeat_interleave(block)[normal]
    assert bool(((out[0][normal] - x[0][normal]).abs() <= bound).all())
    if with_residual:  # the residual of a flushed element is the flush itself: at most 2^-126
        assert bool((residual[0][flushed].abs() < MIN_SCALE).all())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("shared", [False, True])
def test_tiny_blocks_keep_a_normal_scale(generator, fmt, shared):
    """Own and agreed (shared) scales are at least MIN_SCALE = 2^-126: a block of tiny values never
    gets a subnormal scale whose reciprocal overflows (which turned zeros into -max codes). Per
    element the error is at most half an ulp of the format (2^-(m+1) |v|) or, below its normal
    range, half its smallest subnormal times the scale, plus 2^-126 for the float32 subnormals
    that the kernels' flush-to-zero mode (and so the twin) turns into zeros."""
    from lpdist.quant import FORMATS
    from lpdist.quant.scaling import MIN_SCALE

    block, target = 128, 224.0
    x = _tiny_blocks(generator, block)
    amax = x.abs().view(-1, block).amax(dim=1)[None] if shared else None
    codes = torch.empty(x.shape, dtype=torch.uint8)
    scales = torch.empty(1, x.shape[1] // block)
    quantize_into(x, None, col0=0, cols=x.shape[1], block=block, fmt=fmt, payload=codes, scales=scales,
                  amax=amax, target=target)
    out = torch.empty(x.shape)
    if shared:
        dequant_into(codes, amax, sum_rows=1, block=block, fmt=fmt, factor=1.0, out=out, amax_target=target)
    else:
        dequant_into(codes, scales, sum_rows=1, block=block, fmt=fmt, factor=1.0, out=out)
    used = shared_scales(amax, target) if shared else scales
    assert bool((used >= MIN_SCALE).all())
    fmt_info = FORMATS[fmt]
    bound = x.abs().double() * 2.0 ** -(fmt_info.mbits + 1) + (used.repeat_interleave(block, dim=1).double()
                                                                * fmt_info.min_subnormal / 2) + MIN_SCALE
    assert bool(torch.isfinite(out).all())
    assert bool(((out.double() - x.double()).abs() <= bound).all())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_single_quantization_error_within_derived_bound(generator, fmt):
    x = torch.randn(8, 4096, generator=generator, dtype=torch.float64)
    layout, buf = _packed(x.float(), 256, fmt)
    out = torch.empty(8, 4096)
    dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=256, fmt=fmt, factor=1.0, out=out)
    rel = ((out.double() - x).norm() / x.norm()).item()
    assert rel <= rms_error_bound(fmt)
    assert rel >= rms_error_bound(fmt) / 4  # the codec really quantizes


def test_residual_update_is_the_quantization_error(generator):
    x = torch.randn(2, 500, generator=generator)
    r0 = torch.randn(2, 500, generator=generator) * 0.01
    r = r0.clone()
    layout, buf = _packed(x, 128, "e4m3", residual=r)
    deq = torch.empty(2, 500)
    dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=128, fmt="e4m3", factor=1.0, out=deq)
    v = x + r0
    assert torch.equal(r, v - deq)
    assert torch.equal(deq, quantize(v, "e4m3", block=128).dequantize(torch.float32))


def test_non_finite_block_decodes_to_nan_and_keeps_residual(generator):
    x = torch.randn(1, 512, generator=generator)
    x[0, 5] = float("inf")
    x[0, 300] = float("nan")
    r = torch.full((1, 512), 0.5)
    layout, buf = _packed(x, 256, "e4m3", residual=r)
    out = torch.empty(1, 512)
    dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=256, fmt="e4m3", factor=1.0, out=out)
    assert torch.isnan(out).all()
    assert torch.equal(r, torch.full((1, 512), 0.5))
    amax = torch.empty(1, 2)
    x[0, 300] = 1.0
    block_amax_into(x, None, col0=0, cols=512, block=256, out=amax)
    assert amax[0, 0] == float("inf") and amax[0, 1] == x[0, 256:].abs().max()


def test_stochastic_rounding_uses_the_hashed_noise_and_is_unbiased(generator):
    x = torch.randn(1, 2048, generator=generator)
    layout, buf = _packed(x, 256, "e4m3", rounding="stochastic", seed=1234)
    scales = layout.scales(buf)
    v = (x.view(8, 256) * torch.reciprocal(scales).view(8, 1)).view(1, 2048)
    noise = hashed_uniform(torch.arange(2048).view(1, -1), 1234)
    expected = round_to_format(v, "e4m3", "stochastic", noise=noise).to(torch.float8_e4m3fn)
    assert torch.equal(layout.payload(buf), expected.view(torch.uint8))
    means = torch.zeros(1, 2048)
    trials = 64
    for seed in range(trials):
        layout, buf = _packed(x, 256, "e4m3", rounding="stochastic", seed=seed)
        out = torch.empty(1, 2048)
        dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=256, fmt="e4m3",
                     factor=1.0, out=out)
        means += out / trials
    # SR error per element has RMS <= 2^-4 |x| (rms_error_bound); the mean of independent
    # trials shrinks it by sqrt(trials); x3 margin for the 2048-element estimate.
    rel = ((means - x).norm() / x.norm()).item()
    assert rel <= 3 * rms_error_bound("e4m3", "stochastic") / trials ** 0.5


def test_hashed_uniform_is_uniform_and_seed_dependent():
    idx = torch.arange(1 << 16) + (5 << 32)
    u = hashed_uniform(idx, 7)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(u, hashed_uniform(idx, 8))


def test_fast_quantize_kernel_takes_only_aligned_nearest_calls_without_residual():
    x = torch.randn(3, 1024).to(torch.bfloat16)  # fresh allocations: 64-byte aligned rows
    payload = torch.empty(3, 1024, dtype=torch.uint8)

    def fast(x=x, residual=None, payload=payload, col0=0, cols=1024, block=128, stochastic=False):
        return fast_path_applies(x, residual, payload, col0=col0, cols=cols, block=block, stochastic=stochastic)

    assert all(fast(block=block) for block in FAST_BLOCKS)
    assert fast(x=x.half()) and fast(x=x.float())  # fp32: two 16-byte loads per lane
    assert fast(cols=1000) and fast(col0=256, cols=768)  # partial last block; slice not at column 0
    assert fast(payload=None)  # block amax only
    assert not fast(residual=torch.zeros(3, 1024))  # error feedback
    assert not fast(stochastic=True)
    assert not any(fast(block=block) for block in (4, 8, 24, 96, 512, 1024))  # not 8 x (2..32, a power of 2)
    assert not fast(cols=1004)  # slice length not a multiple of 8
    assert not fast(x=x[:, 4:], cols=1016)  # rows start 8 bytes off 16-byte alignment
    assert not fast(x=torch.randn(3, 1028).to(torch.bfloat16)[:, :1024])  # row stride not a multiple of 8
    assert not fast(payload=payload[:, 4:], cols=1016)  # codes 4 bytes off 8-byte alignment


def test_wire_layout_alignment_and_pieces():
    layout = WireLayout(1000, 256)
    assert layout.nblocks == 4 and layout.scale_bytes == 16 and layout.row_bytes == 16 + 1008
    assert pieces(1000, 256, 3) == [(0, 256), (256, 256), (512, 488)]
    assert pieces(100, 256, 4) == [(0, 100)]
    for start, _ in pieces(10_000, 128, 7):
        assert start % 128 == 0


def test_reduction_factor_accepts_strings_and_reduce_ops():
    assert reduction_factor("sum", 4) == 1.0 and reduction_factor("avg", 4) == 0.25
    assert reduction_factor(dist.ReduceOp.AVG, 3) == pytest.approx(1 / 3)
    assert reduction_factor(dist.ReduceOp.SUM, 3) == 1.0
    assert reduction_factor(dist.ReduceOp.PREMUL_SUM(0.125), 3) == 0.125
    with pytest.raises(ValueError, match="op"):
        reduction_factor("max", 2)
    with pytest.raises(ValueError, match="op"):
        reduction_factor(dist.ReduceOp.MAX, 2)



def test_residual_laid_out_unlike_x_is_refused(generator):
    """The kernels address the residual with x's strides, so a residual of another layout (here
    contiguous beside a strided view of x) is refused on every path instead of misread."""
    x = torch.randn(2, 128, generator=generator)[:, :64]
    layout = WireLayout(64, 32)
    buf = layout.empty(2, x.device)
    for residual in (torch.zeros(2, 64), torch.zeros(2, 32)):
        with pytest.raises(ValueError, match="residual"):
            quantize_into(x, residual, col0=0, cols=64, block=32, fmt="e4m3", payload=layout.payload(buf),
                          scales=layout.scales(buf))
        with pytest.raises(ValueError, match="residual"):
            block_amax_into(x, residual, col0=0, cols=64, block=32, out=torch.empty(2, 2))


def _all_to_all_reduce_scatter(inputs: list[torch.Tensor], block: int, fmt: str) -> torch.Tensor:
    """One process playing the W ranks of ``reduce_scatter_all_to_all`` (§0, §8 one hop) with the
    codec: rank s quantizes its [W, chunk] input with its own block scales into wire order (its
    own row last), row d of it travels to rank d, and rank d decodes the W copies of its chunk
    (the received rows in rank order, its own row from its send buffer) and sums them in fp32.
    Returns the W output chunks, [W, chunk]."""
    world, chunk = inputs[0].shape
    layout = WireLayout(chunk, block)
    sends = []
    for rank, x in enumerate(inputs):
        send = layout.empty(world, x.device)
        quantize_into(x, None, col0=0, cols=chunk, block=block, fmt=fmt, payload=layout.payload(send),
                      scales=layout.scales(send), own_row=rank)
        sends.append(send)
    out = torch.empty(world, chunk)
    for dest in range(world):
        recv = torch.stack([sends[src][wire_order(world, src).index(dest)] for src in range(world) if src != dest])
        own = sends[dest][world - 1:]
        dequant_into(layout.payload(recv), layout.scales(recv), sum_rows=world, block=block, fmt=fmt,
                     factor=1.0, out=out[dest:dest + 1], own=(layout.payload(own), layout.scales(own)),
                     own_row=dest)
    return out


def _dequantized_fp64(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """``code·scale`` of each element of ``x`` block-quantized by the oracle, exact in float64."""
    q = quantize(x, fmt, block=block)
    return q.data.double() * q.scale.double().repeat_interleave(block, dim=-1)


def _ring_reduce_scatter(inputs: list[torch.Tensor], block: int, fmt: str) -> torch.Tensor:
    """The ring alternative with quantized hops (§8 "Why all-to-all"): the running partial sum is
    quantized, sent, decoded and added to the next rank's fp32 values, W - 1 times."""
    partial = inputs[0]
    for x in inputs[1:]:
        layout, buf = _packed(partial, block, fmt)
        decoded = torch.empty(partial.shape)
        dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=block, fmt=fmt,
                     factor=1.0, out=decoded)
        partial = decoded + x
    return partial


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_all_to_all_sum_error_does_not_grow_with_world_size(generator, fmt):
    """Simulated W = 2, 8, 32 ranks, each with its own Gaussian input (spread 0.5..2 per rank).
    Against the float64 sum of the fp32 inputs:

    * every element is within one quantization of each summand plus the fp32 sum:
      ``Σ_s (2^-(m+1) + 2^-21)|x_s| + Σ_s scale_s·min_subnormal/2 + W·2^-23·Σ_s |x_s|`` (RNE half
      ulp in the normal range, half the smallest subnormal below it; 2^-21 covers the fp32
      reciprocal of the scale, the product with it and the decode product, ≤ 2^-24 each; the fp32
      accumulation of W terms adds at most 2^-24·|partial sum| ≤ 2^-24·1.07·Σ|x_s| per add);
    * the relative L2 error stays within ``rms_error_bound(fmt)`` = 2^-(m+1)/√3 for every W: the
      summands' independent errors add in quadrature like the summands themselves;
    * the error is only that of the W single quantizations: the output equals the float64 sum of
      the W dequantized summands (``lpdist.quant.quantize``, the codec's bit-exact oracle) up to
      the fp32 decode products and sum, ``W·2^-23·Σ_s |x̂_s|`` (2W roundings of 2^-24).

    Control: a ring with quantized hops (W - 1 chained quantizations of the partial sums) exceeds
    ``rms_error_bound`` at W = 32 (its error grows like √(W/2)), so the check tells them apart."""
    from lpdist.quant import FORMATS

    info = FORMATS[fmt]
    block, chunk = 128, 1024
    for world in (2, 8, 32):
        spreads = 2.0 ** (2 * torch.rand(world, generator=generator) - 1)
        inputs = [torch.randn(world, chunk, generator=generator) * spreads[s] for s in range(world)]
        out = _all_to_all_reduce_scatter(inputs, block, fmt).double()
        stacked = torch.stack(inputs).double()  # [rank, dest, chunk]
        exact = stacked.sum(dim=0)
        abs_sum = stacked.abs().sum(dim=0)
        scales = stacked.abs().view(world, world, chunk // block, block).amax(dim=-1) / info.max
        subnormal_term = (scales * info.min_subnormal / 2).sum(dim=0).repeat_interleave(block, dim=-1)
        bound = (2.0 ** -(info.mbits + 1) + 2.0 ** -21 + world * 2.0 ** -23) * abs_sum + subnormal_term
        worst = ((out - exact).abs() / bound).max().item()
        assert worst <= 1.0, (world, worst)
        dequantized = torch.stack([_dequantized_fp64(x, fmt, block) for x in inputs])
        fp32_bound = world * 2.0 ** -23 * dequantized.abs().sum(dim=0)
        worst = ((out - dequantized.sum(dim=0)).abs() / fp32_bound).max().item()
        assert worst <= 1.0, (world, worst)
        rel = rel_error(out, exact)
        assert rel <= rms_error_bound(fmt), (world, rel)
        assert rel >= rms_error_bound(fmt) / 4, (world, rel)  # the values really were quantized
    ring = rel_error(_ring_reduce_scatter(inputs, block, fmt).double(), exact)
    assert ring > rms_error_bound(fmt), ring
