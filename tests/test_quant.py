"""Oracles of ALGORITHMS.md §1 and §11.1-11.2 for lpdist.quant (the torch reference)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpdist import quant as Q

PLAIN = ["e4m3", "e5m2", "e2m1"]


def bound(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Largest RNE error of each element: half a spacing of the grid at the element's magnitude.

    In the normal range the spacing is at most 2^-M |v| (v = x/scale), so the error is at most
    2^-(M+1)|x|; below the smallest normal the spacing is 2^(emin-M), i.e. an absolute error of
    scale * 2^(emin-M-1). Scaling multiplies by the float32 reciprocal of the scale, which adds
    at most 2 float32 roundings (2^-23 |x|) before the element rounding.
    """
    f = Q.get_format(fmt)
    return torch.maximum(x.abs() * 2.0 ** -(f.mbits + 1), scale * 2.0 ** (f.emin - f.mbits - 1)) \
        + x.abs() * 2.0 ** -22


def expand(scale: torch.Tensor, block: int | None, n: int) -> torch.Tensor:
    if block is None:
        return scale
    return scale.repeat_interleave(block, dim=-1)[..., :n]


def wide_range(rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian data whose rows span 8 orders of magnitude (1e-4 .. 1e4)."""
    mag = 10.0 ** (torch.rand(rows, 1, generator=gen) * 8 - 4)
    return torch.randn(rows, n, generator=gen) * mag


# --- element grids (§11.1) ---------------------------------------------------------------

def test_e2m1_grid_exactly_representable_and_codes_roundtrip():
    grid = torch.tensor(Q.E2M1_VALUES + tuple(-v for v in Q.E2M1_VALUES))
    assert torch.equal(Q.round_to_format(grid, "e2m1"), grid)
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(Q.encode_e2m1(Q.decode_e2m1(codes))[codes != 8], codes[codes != 8])
    assert len(set(grid.tolist())) == 15


@pytest.mark.parametrize("fmt,inputs,expected", [
    ("e2m1", [2.4, 2.6, 0.3, 0.2, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, 5.5, 7, 100],
     [2, 3, 0.5, 0, 0, 1, 1, 2, 2, 4, 4, -2, 6, 6, 6]),
    ("e4m3", [17, 17.5, 19, 0.3, 0.9, 17.3, 300, 0.0013, 2 ** -10, 449, 465, 1e6],
     [16, 18, 20, 0.3125, 0.875, 18, 288, 0.001953125, 0, 448, 448, 448]),
    ("e5m2", [61440, 3e-6, 1.5e-5, 1e9], [57344, 0, 1.52587890625e-5, 57344]),
])
def test_rne_oracles(fmt, inputs, expected):
    got = Q.round_to_format(torch.tensor(inputs, dtype=torch.float32), fmt)
    assert got.tolist() == pytest.approx(expected, rel=0, abs=0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_rne_matches_torch_cast_on_all_representable_midpoints(fmt):
    """Every FP8 value and every midpoint between neighbours: our RNE equals torch's cast."""
    dt = Q.get_format(fmt).torch_dtype
    vals = torch.arange(256, dtype=torch.uint8).view(dt).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    probe = torch.cat([vals, mids])
    assert torch.equal(Q.round_to_format(probe, fmt), probe.to(dt).float())


def test_inf_and_nan():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
    r = Q.round_to_format(x, "e4m3")
    assert r[0] == 448 and r[1] == -448 and math.isnan(r[2]) and r[3] == 1
    q = Q.quantize(torch.tensor([[1.0, float("nan"), float("inf"), -2.0]]), "e4m3", block=4)
    d = q.dequantize()
    assert torch.isnan(d[0, 1]) and d[0, 2] == 2.0 and d[0, 3] == -2.0  # inf saturates to amax
    q4 = Q.quantize(torch.tensor([[1.0, float("nan")] + [0.5] * 30 + [1.0] * 32]), "mxfp4")
    d4 = q4.dequantize()
    assert torch.isnan(d4[0, :32]).all() and not torch.isnan(d4[0, 32:]).any()
    assert q4.scale[0, 0] == 255


# --- scales (§11.2) -----------------------------------------------------------------------

def test_e8m0_codes():
    q = Q.quantize(torch.ones(1, 32), "mxfp8")
    q.scale = torch.tensor([[127, 254, 0, 255]], dtype=torch.uint8)
    s = q.scales()
    assert s[0, 0] == 1.0 and s[0, 1] == 2.0 ** 127 and s[0, 2] == 2.0 ** -127 and torch.isnan(s[0, 3])


def test_mxfp4_ocp_and_rceil_oracles():
    x = torch.tensor([[1.9] + [0.1] * 31])
    q = Q.quantize(x, "mxfp4")
    assert q.scales().item() == 0.25
    d = q.dequantize()
    assert d[0, 0] == 1.5 and d[0, 1] == 0.125
    x2 = torch.tensor([[1.0] + [0.3] * 31])
    d2 = Q.quantize(x2, "mxfp4").dequantize()
    assert d2[0, 0] == 1.0 and d2[0, 1] == 0.25
    qc = Q.quantize(x, "mxfp4", scale_rule="ceil")
    assert qc.scales().item() == 0.5 and qc.dequantize()[0, 0] == 2.0


def test_mx_scaled_amax_invariants():
    gen = torch.Generator().manual_seed(0)
    x = wide_range(64, 256, gen)
    for fmt, lo, hi in [("mxfp4", 4, 8), ("mxfp8", 256, 512)]:
        q = Q.quantize(x, fmt)
        ratio = Q.block_amax(x, 32) / q.scales()
        assert ((ratio >= lo) & (ratio < hi)).all()
        qc = Q.quantize(x, fmt, scale_rule="ceil")
        assert (Q.block_amax(x, 32) / qc.scales() <= Q.get_format(q.scheme.elem.name).max).all()


def test_mxfp8_floor_rule_example():
    q = Q.quantize(torch.tensor([[1.0] + [0.5] * 31]), "mxfp8")
    assert q.scales().item() == 2.0 ** -8


def test_nvfp4_example():
    x = 10 * torch.tensor([[6.0] + [0.7] * 15 + [3.0] + [0.2] * 15])
    q = Q.quantize(x, "nvfp4")
    assert q.tensor_scale.item() == pytest.approx(60 / 2688, rel=1e-7)
    assert q.scale.float().tolist() == [[448.0, 224.0]]
    d = q.dequantize()
    assert d[0, 0] == pytest.approx(60) and d[0, 1] == pytest.approx(5.0)
    assert d[0, 16] == pytest.approx(30) and d[0, 17] == pytest.approx(2.5)
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(32, 256, generator=gen)
    qy = Q.quantize(y, "nvfp4")
    assert qy.values().abs().amax() <= 6


def test_zero_block_gets_scale_one_and_zeros():
    x = torch.zeros(2, 64)
    x[1, 40] = 3.0
    q = Q.quantize(x, "e4m3", block=32)
    assert q.scale[0].tolist() == [1.0, 1.0] and q.scale[1, 0] == 1.0
    assert torch.equal(q.dequantize()[0], torch.zeros(64))
    assert q.dequantize()[1, 40] == 3.0


def test_per_tensor_scale_example():
    x = torch.tensor([3.0, -1.0, 0.5])
    q = Q.quantize(x, "e4m3")
    assert q.scale.item() == pytest.approx(3.0 / 448) and q.dequantize()[0] == 3.0


# --- round trips over 8 orders of magnitude ------------------------------------------------

@pytest.mark.parametrize("fmt", PLAIN)
@pytest.mark.parametrize("block", [None, 16, 32, 128, 300, "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_within_format_bound(fmt, block, dtype):
    gen = torch.Generator().manual_seed(hash((fmt, str(block), str(dtype))) % 2 ** 31)
    n = 1000  # not a multiple of any block: partial last blocks
    x = wide_range(8, n, gen)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    blk = n if block == "row" else block
    q = Q.quantize(x, fmt, block=blk)
    d = q.dequantize()
    assert d.dtype == dtype and d.shape == x.shape
    xf = x.float()
    err = (d.float() - xf).abs()
    # dequantizing into a 16-bit dtype adds one more rounding of that dtype: half an ulp
    # (2^-8 relative for bf16, 2^-11 for fp16, plus fp16's subnormal spacing 2^-24 / 2)
    out_round = {torch.float32: 0.0,
                 torch.bfloat16: d.float().abs() * 2.0 ** -8,
                 torch.float16: d.float().abs() * 2.0 ** -11 + 2.0 ** -25}[dtype]
    tol = bound(xf, expand(q.scales(), blk, n), fmt) + out_round
    assert (err <= tol + 1e-30).all()


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_presets_round_trip(fmt):
    gen = torch.Generator().manual_seed(3)
    x = wide_range(16, 200, gen)
    q = Q.quantize(x, fmt, scale_rule="ceil") if fmt.startswith("mx") else Q.quantize(x, fmt)
    err = (q.dequantize() - x).abs()
    blk = q.block
    tol = bound(x, expand(q.scales(), blk, 200), q.scheme.elem.name)
    if fmt == "nvfp4":  # E4M3 rounding of the block scale may push the block max past 6
        tol = torch.maximum(tol, x.abs() * 2.0 ** -4 + expand(q.scales(), blk, 200) * 0.25)
    assert (err <= tol + 1e-30).all()


@pytest.mark.parametrize("fmt,block", [("e4m3", 32), ("e5m2", None), ("e2m1", 16), ("mxfp4", None),
                                       ("nvfp4", None), ("mxfp8", None)])
def test_stochastic_rounding_unbiased(fmt, block):
    gen = torch.Generator().manual_seed(7)
    n_samples = 4000
    base = torch.randn(1, 64, generator=gen)
    x = base.expand(n_samples, 64).contiguous()
    d = Q.quantize(x, fmt, block=block, rounding="stochastic", generator=gen).dequantize()
    mean = d.mean(0)
    se = d.std(0) / math.sqrt(n_samples)
    # An element on the grid (a block maximum) or one whose round-up probability is far below
    # 1/n_samples shows no variance in n samples; its mean must still sit on the input.
    still = se == 0
    z = ((mean - base[0]).abs() / se.clamp_min(1e-30))[~still]
    assert torch.allclose(mean[still], base[0][still], rtol=1e-3, atol=0)
    assert (z < 5).all() and (z > 3).float().mean() < 0.02  # 3 standard errors for ~99.7%
    assert not torch.equal(d[0], d[1])  # really random


def test_stochastic_needs_no_clipping_for_mx():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(256, 32, generator=gen)
    q = Q.quantize(x, "mxfp4", rounding="stochastic", generator=gen)
    assert (Q.block_amax(x, 32) / q.scales() <= 6).all()


def test_nvfp4_stochastic_scales_never_clip(generator):
    """§1.4/§11.2: with stochastic rounding no block max may pass 6 (clipping biases SR). The
    17/16 headroom covers the RNE of normal E4M3 scales (relative step <= 2^-3); blocks far below
    the tensor amax get subnormal E4M3 scales (absolute step 2^-9), which must round up. Bound:
    |x|/(ŝ·s_g) <= 6 up to the float32 roundings of amax/6/s_g, ŝ·s_g and its reciprocal times x
    (4·2^-24 relative)."""
    x = torch.randn(64, 256, generator=generator)
    x = x * torch.logspace(0, -24, 16, base=2.0).repeat_interleave(16)  # 16 blocks, 2^0 .. 2^-24
    q = Q.quantize(x, "nvfp4", rounding="stochastic", generator=generator)
    scaled_max = Q.block_amax(x, 16).double() / q.scales().double()
    assert (q.scale.float() < 2.0 ** -6).any()  # subnormal E4M3 block scales are exercised
    assert (scaled_max <= 6.0 * (1 + 4 * 2.0 ** -24)).all(), scaled_max.max()


def test_nvfp4_stochastic_rounding_unbiased_in_a_small_block(generator):
    """A block 1.4·2^-9/448 times smaller than the tensor amax (E4M3 block scale ratio in the
    subnormal range): the mean of n SR draws must sit on x within 5 standard errors."""
    x = torch.zeros(32)
    x[0] = 6.0 * 448.0  # tensor scale 1
    x[16:] = 6.0 * 1.4 * 2.0 ** -9 * torch.linspace(1.0, 0.1, 16)
    n = 4000
    d = Q.quantize(x.expand(n, 32).contiguous(), "nvfp4", rounding="stochastic",
                   generator=generator).dequantize()
    mean, se = d[:, 16:].double().mean(0), d[:, 16:].double().std(0) / math.sqrt(n)
    err = (mean - x[16:].double()).abs()
    assert (err <= 5 * se + 1e-12 * x[16:].double()).all(), (err / se).max()


# --- storage ----------------------------------------------------------------------------

def test_fp4_packing_low_nibble_first():
    x = torch.tensor([[0.5, 6.0, -1.0]])  # codes 1, 7, 8|2 = 10
    q = Q.quantize(x, "e2m1", block=3, scale=torch.ones(1, 1))
    assert q.data.dtype == torch.uint8 and q.data.tolist() == [[0x71, 0x0A]]


def test_nbytes():
    x = torch.randn(4, 1000)
    assert Q.quantize(x, "e4m3", block=128).nbytes == 4000 + 4 * 4 * 8
    assert Q.quantize(x, "mxfp4").nbytes == 2000 + 4 * 32
    assert Q.quantize(x, "nvfp4").nbytes == 2000 + 4 * 63 + 4
    assert Q.quantize(x, "e5m2").nbytes == 4000 + 4


def test_shapes_and_scalars():
    for shape in [(), (7,), (3, 5, 40)]:
        x = torch.randn(shape)
        d = Q.fake_quantize(x, "e4m3", block=16)
        assert d.shape == x.shape


def test_given_scale_is_used():
    x = torch.randn(4, 64)
    s = torch.full((4, 2), 0.01)
    q = Q.quantize(x, "e4m3", block=32, scale=s)
    assert torch.equal(q.scales(), s)
    assert q.dequantize().abs().max() <= 448 * 0.01


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(fmt="e3m4"), ValueError, "fmt"),
    (dict(block=0), ValueError, "block"),
    (dict(block=2.5), ValueError, "block"),
    (dict(rounding="up"), ValueError, "rounding"),
    (dict(fmt="mxfp4", block=64), ValueError, "block"),
    (dict(fmt="mxfp4", scale=torch.ones(())), ValueError, "scale"),
    (dict(scale_rule="ceil"), ValueError, "scale_rule"),
    (dict(block=32, scale=torch.ones(3)), ValueError, "scale"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        Q.quantize(torch.randn(4, 64), **kwargs)


def test_bad_input_types():
    with pytest.raises(TypeError, match="x"):
        Q.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="floating"):
        Q.quantize(torch.arange(4))


# --- property tests -----------------------------------------------------------------------

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=70), fmt=st.sampled_from(PLAIN),
       block=st.sampled_from([None, 1, 7, 16, 32]))
def test_property_bound_and_idempotence(values, fmt, block):
    x = torch.tensor(values, dtype=torch.float32)
    q = Q.quantize(x, fmt, block=block)
    d = q.dequantize()
    s = expand(q.scales(), block, len(values))
    assert ((d - x).abs() <= bound(x, s, fmt) + 1e-30).all()
    again = Q.quantize(d, fmt, block=block, scale=q.scales())  # grid values are fixed points
    assert torch.equal(again.dequantize(), d)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1", "mxfp8", "mxfp4", "nvfp4"])
def test_subnormal_amax_stays_finite(fmt):
    """A block whose amax is a float32 subnormal must not get a zero scale (1/0 = inf → NaN)."""
    x = torch.tensor([[3.0e-44, -1.0e-44] + [0.0] * 30])
    d = Q.quantize(x, fmt).dequantize()
    assert torch.isfinite(d).all() and (d - x).abs().max() <= 3.0e-44
