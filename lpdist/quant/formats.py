"""Element formats (FP8 E4M3/E5M2, FP4 E2M1) and rounding onto their grids.

A format ``ExMy`` with exponent bias ``b`` represents, for normal numbers,
``(-1)^s (1 + m/2^y) 2^(e-b)`` and, for subnormals (e = 0), ``(-1)^s (m/2^y) 2^(1-b)``
(ALGORITHMS.md §1.1). Inside one binade ``[2^e, 2^(e+1))`` the grid spacing is
``2^(e-y)``; below the smallest normal ``2^emin`` (emin = 1-b) it stays ``2^(emin-y)``. So for
any value ``v`` the two neighbouring grid points are multiples of

    spacing(v) = 2^(max(floor(log2|v|), emin) - y)

and rounding reduces to rounding ``v / spacing(v)`` to an integer: ``rint`` (ties to even) for
round-to-nearest-even, ``floor(. + u)`` with ``u ~ U[0, 1)`` for unbiased stochastic rounding
(§1.5). Values are clamped to ``±max`` first, so a quantizer saturates instead of producing
NaN/inf the way a raw dtype cast does (§1.2). NaN stays NaN.

The same arithmetic, in the same order, runs in ``csrc/quant.cu``; that is what makes the CUDA
kernels bit-identical to this reference for round-to-nearest, except on fp32 subnormals (below
2^-126), which the kernels flush to zero and this reference does not (``lpdist.kernels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Format",
    "FORMATS",
    "get_format",
    "round_to_format",
    "encode_e2m1",
    "decode_e2m1",
    "pack_fp4",
    "unpack_fp4",
    "E2M1_VALUES",
]


@dataclass(frozen=True)
class Format:
    """An element format: ``ebits`` exponent bits, ``mbits`` mantissa bits, saturating ``max``."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    torch_dtype: torch.dtype | None  # storage dtype for FP8; None for packed FP4

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (``floor(log2(max))``): 8 for E4M3, 15 for E5M2, 2 for E2M1."""
        return math.floor(math.log2(self.max))

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


FORMATS: dict[str, Format] = {
    "e4m3": Format("e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn),
    "e5m2": Format("e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2),
    "e2m1": Format("e2m1", 2, 1, 1, 6.0, None),
}

#: The 8 non-negative E2M1 magnitudes, indexed by the 3 low bits of the code (§1.1).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def get_format(fmt: str | Format) -> Format:
    """Look up an element format by name, with a clear error for unknown names."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt.lower()]


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2**exponent`` in float32 for integer exponents in [-126, 127]."""
    return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)


def floor_log2(v: torch.Tensor) -> torch.Tensor:
    """``floor(log2|v|)`` of float32 values read from the exponent bits (-127 for 0/subnormals)."""
    return ((v.view(torch.int32) >> 23) & 0xFF) - 127


def round_to_format(
    v: torch.Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round float32 values ``v`` (already scaled) onto ``fmt``'s grid, saturating at ``±max``.

    ``rounding="nearest"`` is round-to-nearest, ties to even. ``rounding="stochastic"`` rounds
    up with probability equal to the distance from the lower neighbour over the spacing, so
    ``E[q] = v`` inside the representable range. ``noise`` (uniform in [0, 1), same shape) may
    be given instead of ``generator`` to make stochastic rounding reproducible. NaN stays NaN.
    """
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        got = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
        raise TypeError(f"v must be a floating-point tensor, got {got}")
    f = get_format(fmt)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    v = v.float().clamp(-f.max, f.max)  # saturate; clamp keeps NaN
    e = floor_log2(v).clamp(min=f.emin)
    inv_spacing = _pow2(f.mbits - e)
    spacing = _pow2(e - f.mbits)
    t = v * inv_spacing  # exact: multiplication by a power of two
    if rounding == "nearest":
        r = torch.round(t)  # half to even
    else:
        if noise is None:  # rand_like without a generator: traceable with symbolic shapes
            noise = torch.rand_like(v) if generator is None else torch.rand(
                v.shape, generator=generator, device=v.device, dtype=torch.float32)
        r = torch.floor(t + noise)
    return r * spacing


def encode_e2m1(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, 0..15) of values already on the E2M1 grid: sign bit 3, magnitude index.

    Magnitude index ``i`` stands for ``E2M1_VALUES[i]``, which is exactly the OCP bit layout
    (``0b0001`` = 0.5, ..., ``0b0111`` = 6). NaN (no E2M1 code) becomes code 0; callers mark
    such blocks with a NaN scale.
    """
    m = q.abs()
    idx = torch.where(m < 2, m * 2, torch.where(m < 4, m + 2, m * 0.5 + 4))
    idx = torch.nan_to_num(idx, nan=0.0).to(torch.uint8)
    sign = (torch.signbit(q) & ~torch.isnan(q)).to(torch.uint8) << 3
    return sign | idx


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of 4-bit E2M1 codes (uint8, 0..15)."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32,
                         device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last dim, two per byte, low nibble first (odd length: pad 0)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: the first ``n`` codes along the last dim."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :n]
