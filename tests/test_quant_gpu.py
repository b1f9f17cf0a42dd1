"""CUDA kernels of csrc/quant.cu against the torch oracle (run on a GPU machine)."""

import math

import pytest
import torch

from lpdist import kernels
from lpdist import quant as Q
from lpdist.quant.qtensor import _dequantize_reference, _quantize_reference

pytestmark = pytest.mark.gpu

CASES = [("e4m3", b) for b in (None, 16, 32, 128, 100, 7, "row")] + \
        [("e5m2", b) for b in (None, 32, 128, "row")] + \
        [("e2m1", b) for b in (None, 16, 32, 128)] + [("mxfp8", None), ("mxfp4", None), ("nvfp4", None)]
SHAPES = [(4, 1024), (3, 1000), (5, 333), (2, 3, 256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _need_cupy():
    if not kernels.use_cupy(torch.empty(1, device="cuda")):
        pytest.fail("CuPy backend not active on a CUDA machine")


def reference(x, fmt, block, **kw):
    scheme = Q.resolve(fmt, block)
    rule = kw.get("scale_rule") or ("ceil" if kw.get("rounding") == "stochastic" else "floor")
    return _quantize_reference(x.cpu(), scheme, kw.get("rounding", "nearest"), None, kw.get("scale"), rule)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, treating any two NaN encodings as equal."""
    a, b = a.cpu(), b.cpu()
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float32):
        fa, fb = a.float(), b.float()
        both_nan = torch.isnan(fa) & torch.isnan(fb)
        return bool((both_nan | (a.view(torch.uint8 if a.element_size() == 1 else torch.int32)
                                 == b.view(torch.uint8 if b.element_size() == 1 else torch.int32))).all())
    return torch.equal(a, b)


@pytest.mark.parametrize("fmt,block", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_bit_identical_to_oracle(fmt, block, dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(hash((fmt, str(block), str(dtype), shape)) % 2 ** 31)
    mag = 10.0 ** (torch.rand(*shape[:-1], 1, device="cuda", generator=gen) * 8 - 4)
    x = (torch.randn(shape, device="cuda", generator=gen) * mag)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    blk = shape[-1] if block == "row" else block
    q = Q.quantize(x, fmt, block=blk)
    data, stored, tscale = reference(x, fmt, blk)
    assert q.data.is_cuda
    assert same_bits(q.data, data), "payload differs"
    assert same_bits(q.scale, stored), "scales differ"
    if tscale is not None:
        assert same_bits(q.tensor_scale, tscale)
    d = q.dequantize()
    ref = _dequantize_reference(Q.QTensor(data, stored, q.fmt, q.block, q.shape, q.dtype, tscale), dtype)
    assert torch.equal(d.cpu(), ref)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e2m1", "mxfp4", "nvfp4"])
def test_nan_inf_match_oracle(fmt):
    x = torch.randn(4, 128, device="cuda")
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    block = 32 if fmt in ("e4m3", "e5m2", "e2m1") else None
    d = Q.quantize(x, fmt, block=block).dequantize().cpu()
    data, stored, ts = reference(x, fmt, block)
    ref = _dequantize_reference(Q.QTensor(data, stored, fmt, Q.resolve(fmt, block).block, x.shape,
                                          x.dtype, ts), torch.float32)
    assert torch.equal(torch.isnan(d), torch.isnan(ref)) and torch.isnan(d[0, 3])
    finite = ~torch.isnan(ref)
    assert torch.equal(d[finite], ref[finite])


@pytest.mark.parametrize("fmt,block", [("e4m3", 128), ("e2m1", 32)])
def test_given_scale(fmt, block):
    x = torch.randn(8, 256, device="cuda")
    s = Q.block_amax(x, block) / 100.0
    q = Q.quantize(x, fmt, block=block, scale=s)
    data, stored, _ = reference(x, fmt, block, scale=s.cpu())
    assert same_bits(q.data, data)


@pytest.mark.parametrize("fmt,block", [("e4m3", 128), ("e5m2", None), ("e2m1", 32), ("mxfp4", None),
                                       ("nvfp4", None)])
def test_stochastic_kernel_unbiased(fmt, block):
    torch.manual_seed(0)
    base = torch.randn(1, 256, device="cuda")
    n = 20000
    d = Q.quantize(base.expand(n, 256).contiguous(), fmt, block=block, rounding="stochastic").dequantize()
    mean, se = d.mean(0), d.std(0) / math.sqrt(n)
    moving = se > 0
    z = ((mean - base[0]).abs() / se.clamp_min(1e-30))[moving]
    assert (z < 5).all() and (z > 3).float().mean() < 0.02
    assert torch.allclose(mean[~moving], base[0][~moving], rtol=1e-3, atol=0)
    d2 = Q.quantize(base.expand(n, 256).contiguous(), fmt, block=block, rounding="stochastic").dequantize()
    assert not torch.equal(d, d2)


def test_nvfp4_stochastic_kernel_scales_equal_the_oracle():
    """Block scales do not depend on the random draws, so the kernel's stochastic NVFP4 scales
    equal the oracle's bit for bit, including the subnormal E4M3 scales that are rounded up so
    that no block max passes 6 (blocks 2^0 .. 2^-24 times the tensor amax)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 256, generator=gen) * torch.logspace(0, -24, 16, base=2.0).repeat_interleave(16)
    q = Q.quantize(x.cuda(), "nvfp4", rounding="stochastic")
    _, stored, tensor_scale = reference(x, "nvfp4", None, rounding="stochastic")
    assert same_bits(q.scale, stored) and same_bits(q.tensor_scale, tensor_scale)
    assert (Q.block_amax(x, 16).double() / q.scales().cpu().double() <= 6.0 * (1 + 4 * 2.0 ** -24)).all()


def test_backend_switch(monkeypatch):
    assert kernels.backend() == "cupy"
