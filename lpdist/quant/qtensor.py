"""``quantize`` / ``dequantize`` and the ``QTensor`` container (the numeric oracle).

``quantize(x, fmt, block=...)`` computes one scale per block (``lpdist.quant.scaling``),
multiplies by its float32 reciprocal, rounds onto the element grid (``lpdist.quant.formats``)
and stores:

* FP8 (``e4m3``, ``e5m2``, ``mxfp8``): ``data`` is a ``torch.float8_*`` tensor shaped like ``x``;
* FP4 (``e2m1``, ``mxfp4``, ``nvfp4``): ``data`` is uint8, two codes per byte, low nibble first;
* ``scale``: float32 per block for plain formats, uint8 E8M0 codes (``2^(code-127)``, 255 = NaN)
  for MX, float8_e4m3fn block scales plus a float32 ``tensor_scale`` for NVFP4.

For CUDA tensors the work runs in ``csrc/quant.cu`` when CuPy is present (``lpdist.kernels``);
the kernels are bit-identical to this code for round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from .formats import (decode_e2m1, encode_e2m1, pack_fp4, round_to_format, unpack_fp4)
from .scaling import (NVFP4_TENSOR_DIVISOR, Scheme, block_amax, e8m0_exponent, float_scale,
                      from_blocks, num_blocks, nvfp4_block_scale, resolve, to_blocks)

__all__ = ["QTensor", "quantize", "dequantize", "fake_quantize"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class QTensor:
    """A block-scaled low-precision tensor: ``x ≈ decode(data) * scale`` per block."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str
    block: int | None
    shape: torch.Size
    dtype: torch.dtype
    tensor_scale: torch.Tensor | None = None  # NVFP4 only

    @property
    def scheme(self) -> Scheme:
        return resolve(self.fmt, self.block)

    @property
    def nbytes(self) -> int:
        """Bytes of payload plus scales (what is stored or sent)."""
        n = self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()
        if self.tensor_scale is not None:
            n += self.tensor_scale.numel() * self.tensor_scale.element_size()
        return n

    def scales(self) -> torch.Tensor:
        """Effective float32 scale per block (``[..., nblocks]``, or 0-dim for one scale)."""
        kind = self.scheme.scale_kind
        if kind == "float":
            return self.scale
        if kind == "e8m0":
            ones = torch.ones(self.scale.shape, device=self.scale.device)
            s = torch.ldexp(ones, self.scale.to(torch.int32) - 127)
            return s.masked_fill(self.scale == 255, float("nan"))
        return self.scale.float() * self.tensor_scale

    def values(self) -> torch.Tensor:
        """Element values on the format grid (float32, shaped like the original tensor)."""
        n = self.shape[-1] if len(self.shape) else 1
        if self.scheme.elem.torch_dtype is not None:
            return self.data.float()
        return decode_e2m1(unpack_fp4(self.data, n))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)


def _check_input(x: torch.Tensor, rounding: str, generator: torch.Generator | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float32/bfloat16/float16/float64), got {x.dtype}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def _expected_scale_shape(shape: torch.Size, block: int | None) -> tuple[int, ...]:
    return () if block is None else (*shape[:-1], num_blocks(shape[-1], block))


def quantize(
    x: torch.Tensor,
    fmt: str = "e4m3",
    *,
    block: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    scale: torch.Tensor | None = None,
    scale_rule: str | None = None,
) -> QTensor:
    """Quantize ``x`` to ``fmt`` with one scale per ``block`` elements of the last dim.

    Args:
        x: float32/bfloat16/float16 tensor on any device (float64 is rounded to float32 first).
        fmt: ``"e4m3"``, ``"e5m2"``, ``"e2m1"`` or a preset ``"mxfp8"``, ``"mxfp4"``, ``"nvfp4"``.
        block: ``None`` (one scale per tensor) or a block length along the last dim.
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased).
        generator: random source for stochastic rounding (reference path).
        scale: a precomputed effective float32 scale (plain formats only), e.g. shared across
            ranks or per 2-D tile; shape ``x.shape[:-1] + (nblocks,)`` or 0-dim. A block whose
            scale is not a positive finite number decodes as NaN (never as a wrong number).
        scale_rule: MX only, ``"floor"`` (OCP; default with nearest) or ``"ceil"`` (RCEIL;
            default with stochastic, which must not clip).
    """
    _check_input(x, rounding, generator)
    scheme = resolve(fmt, block)
    if scale is not None and scheme.scale_kind != "float":
        raise ValueError(f"scale= is only supported for plain formats (e4m3/e5m2/e2m1), not {fmt!r}")
    if scale_rule is not None and scheme.scale_kind != "e8m0":
        raise ValueError(f"scale_rule only applies to MX presets (mxfp8/mxfp4), not {fmt!r}")
    rule = scale_rule or ("ceil" if rounding == "stochastic" else "floor")
    shape, dtype = x.shape, x.dtype
    flat = x.reshape(1) if x.dim() == 0 else x
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
            raise TypeError(f"scale must be a floating torch.Tensor, got "
                            f"{scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__}")
        scale = scale.float()
        scale = torch.where((scale > 0) & (scale < float("inf")), scale, torch.full_like(scale, float("nan")))
        expected = _expected_scale_shape(flat.shape, scheme.block)
        if tuple(scale.shape) != expected:
            raise ValueError(f"scale must have shape {expected} for x of shape {tuple(shape)}, "
                             f"got {tuple(scale.shape)}")
    if kernels.use_cupy(flat) and flat.numel() > 0:
        from ..kernels import quant as cuda_quant
        data, stored, tensor_scale = cuda_quant.quantize(flat, scheme, rounding, generator, scale, rule)
    else:
        data, stored, tensor_scale = _quantize_reference(flat, scheme, rounding, generator, scale, rule)
    return QTensor(data, stored, scheme.name, scheme.block, shape, dtype, tensor_scale)


def _nan_blocks(xf: torch.Tensor, block: int | None) -> torch.Tensor:
    """Which blocks (or, for ``block=None``, whether the tensor) hold a NaN."""
    return torch.isnan(xf).any() if block is None else torch.isnan(to_blocks(xf, block)).any(dim=-1)


def _block_scales(xf, scheme: Scheme, rounding, scale, rule):
    """Effective float32 scales, their stored form, and the NVFP4 tensor scale (else None).

    E2M1 has no NaN code, so for FP4 a block holding a NaN gets a NaN scale (the OCP MX
    convention); FP8 keeps NaN per element.
    """
    elem, block = scheme.elem, scheme.block
    nan = _nan_blocks(xf, block) if elem.torch_dtype is None else None
    if scale is not None:
        eff = scale.float() if nan is None else scale.float().masked_fill(nan, float("nan"))
        return eff, eff, None
    amax = block_amax(xf, block)
    if scheme.scale_kind == "float":
        eff = float_scale(amax, elem.max)
        eff = eff if nan is None else eff.masked_fill(nan, float("nan"))
        return eff, eff, None
    if scheme.scale_kind == "e8m0":
        e = e8m0_exponent(amax, elem, rule)
        eff = torch.ldexp(torch.ones_like(amax), e)
        code = (e + 127).to(torch.uint8)
        if nan is not None:
            eff, code = eff.masked_fill(nan, float("nan")), code.masked_fill(nan, 255)
        return eff, code, None
    tensor_scale = float_scale(block_amax(xf, None), NVFP4_TENSOR_DIVISOR)
    s_hat = nvfp4_block_scale(amax, tensor_scale, rounding == "stochastic").masked_fill(nan, float("nan"))
    return s_hat * tensor_scale, s_hat.to(torch.float8_e4m3fn), tensor_scale


def _quantize_reference(x: torch.Tensor, scheme: Scheme, rounding: str, generator: torch.Generator | None,
                        scale: torch.Tensor | None, rule: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pure-torch quantization; returns (data, stored scale, tensor scale or None)."""
    elem, block = scheme.elem, scheme.block
    xf = x.float()
    n = xf.shape[-1]
    eff, stored, tensor_scale = _block_scales(xf, scheme, rounding, scale, rule)
    inv = torch.reciprocal(eff)  # one division per block; elements are multiplied, as in the kernel
    if block is None:
        q = round_to_format(xf * inv, elem, rounding, generator)
    else:
        q = from_blocks(round_to_format(to_blocks(xf, block) * inv.unsqueeze(-1), elem, rounding,
                                        generator), n)
    data = q.to(elem.torch_dtype) if elem.torch_dtype is not None else pack_fp4(encode_e2m1(q))
    return data, stored, tensor_scale


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``decode(data) * scale`` per block, in ``dtype`` (default: the original dtype)."""
    if not isinstance(q, QTensor):
        raise TypeError(f"q must be a QTensor, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    if q.data.is_cuda and kernels.use_cupy(q.data) and q.data.numel() > 0:
        from ..kernels import quant as cuda_quant
        return cuda_quant.dequantize(q, dtype)
    return _dequantize_reference(q, dtype)


def _dequantize_reference(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    vals = q.values()
    n = vals.shape[-1]
    s = q.scales()
    if q.block is None:
        out = vals * s
    else:
        out = from_blocks(to_blocks(vals, q.block) * s.unsqueeze(-1), n)
    return out.reshape(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str = "e4m3",
    *,
    block: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    scale: torch.Tensor | None = None,
    scale_rule: str | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x, ...))`` in ``x``'s dtype: the exact emulation layers use."""
    q = quantize(x, fmt, block=block, rounding=rounding, generator=generator, scale=scale,
                 scale_rule=scale_rule)
    return dequantize(q)
