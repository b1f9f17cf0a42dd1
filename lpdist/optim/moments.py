"""Storage formats of the Adam moments and their torch reference encode/decode.

A moment is kept flat (the parameter's local elements in order) in one of

* ``"fp32"``: the value itself, no scale (the second moment is kept as ``v``);
* ``"bf16"``: round-to-nearest-even bf16, no scale (bf16 has fp32's exponent range);
* ``"fp16"``, ``"e4m3"``, ``"e5m2"``: block-scaled codes. Every ``block`` consecutive elements
  share one fp32 scale ``s = amax / fmt_max`` (exact division, ``s = 1`` for an all-zero block,
  at least the smallest normal fp32 so its inverse is finite) and each element is stored as
  ``RNE(x * (1 / s))``, saturating, with ``1 / s`` rounded to fp32 once per block (the
  multiply-by-inverse form of ALGORITHMS.md §1.2: the fused kernel divides once per block, not
  once per element); ``x ≈ decode(code) * s`` (ALGORITHMS.md §0).

In every low-precision format the second moment is stored as ``sqrt(v)``, which halves its
dynamic range in log scale: gradients spanning 6 decades in one block give ``v`` spanning 12
decades (beyond E5M2's 32 binades) but ``sqrt(v)`` only 6. A positive ``sqrt(v)`` below the
format's smallest subnormal is stored as that subnormal instead of 0, so a stored second moment
is never 0 while its gradient history is non-zero; since ``|m| <= C(beta) sqrt(v)`` for Adam's
exponential averages, ``m / (sqrt(v) + eps)`` then stays within a constant factor of the fp32
update (the failure mode of ALGORITHMS.md §0: E5M2 ``v`` flushed to 0 under a non-zero E4M3 ``m``).

``"fp8"`` means E4M3 for ``m`` and E5M2 for ``sqrt(v)`` (Fishman et al., ALGORITHMS.md §2.4). The same fp32
operations, in the same order, run in ``csrc/adam.cu``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import FORMATS, round_to_format
from ..quant.scaling import block_amax, float_scale, from_blocks, num_blocks, to_blocks

__all__ = ["MomentFormat", "MOMENT_FORMATS", "parse_moments", "MomentStore", "encode", "decode",
           "sqrt_rn"]


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root (IEEE 754 ``sqrt``, as CUDA's ``sqrtf``).

    PyTorch's CPU fp32 ``sqrt`` is not correctly rounded: about one result in five is one ulp
    off. The float64 square root is correctly rounded and rounding it to fp32 is exact for
    square roots (53 >= 2 * 24 + 2 bits, so the double rounding cannot change the result).
    """
    return torch.sqrt(x.double()).float()


@dataclass(frozen=True)
class MomentFormat:
    """How one moment is stored: element dtype, block scaling, smallest positive value."""

    name: str
    code: int  # format id shared with csrc/adam.cu
    dtype: torch.dtype
    scaled: bool
    max: float
    min_subnormal: float


MOMENT_FORMATS: dict[str, MomentFormat] = {
    "fp32": MomentFormat("fp32", 0, torch.float32, False, torch.finfo(torch.float32).max, 2.0**-149),
    "bf16": MomentFormat("bf16", 1, torch.bfloat16, False, torch.finfo(torch.bfloat16).max, 2.0**-133),
    "fp16": MomentFormat("fp16", 2, torch.float16, True, 65504.0, 2.0**-24),
    "e4m3": MomentFormat("e4m3", 3, torch.float8_e4m3fn, True, FORMATS["e4m3"].max,
                         FORMATS["e4m3"].min_subnormal),
    "e5m2": MomentFormat("e5m2", 4, torch.float8_e5m2, True, FORMATS["e5m2"].max,
                         FORMATS["e5m2"].min_subnormal),
}

_PRESETS = {"fp8": ("e4m3", "e5m2")}


def parse_moments(moments: str | tuple[str, str]) -> tuple[MomentFormat, MomentFormat]:
    """``"fp32" | "bf16" | "fp16" | "fp8"`` or an ``(m, v)`` tuple of format names, in which
    ``"fp8"`` stands for the preset's format at that position (E4M3 for m, E5M2 for v)."""
    names = _PRESETS.get(moments, (moments, moments)) if isinstance(moments, str) else moments
    if isinstance(names, (tuple, list)) and len(names) == 2:
        names = [_PRESETS[n][i] if isinstance(n, str) and n in _PRESETS else n for i, n in enumerate(names)]
    if (not isinstance(names, (tuple, list)) or len(names) != 2
            or not all(isinstance(n, str) and n in MOMENT_FORMATS for n in names)):
        raise ValueError(
            f"moments must be one of {sorted(MOMENT_FORMATS.keys() - {'e4m3', 'e5m2'}) + ['fp8']} "
            f"or an (m, v) tuple of {sorted(MOMENT_FORMATS) + ['fp8']}, got {moments!r}")
    return MOMENT_FORMATS[names[0]], MOMENT_FORMATS[names[1]]


@dataclass
class MomentStore:
    """One stored moment: flat ``codes`` and per-block fp32 ``scales`` (empty when unscaled)."""

    fmt: MomentFormat
    block: int
    codes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def zeros(cls, fmt: MomentFormat, block: int, numel: int, device: torch.device) -> "MomentStore":
        codes = torch.zeros(numel, dtype=fmt.dtype, device=device)
        nscales = num_blocks(numel, block) if fmt.scaled else 0
        return cls(fmt, block, codes, torch.ones(nscales, dtype=torch.float32, device=device))

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4


def _round(y: torch.Tensor, fmt: MomentFormat, keep_nonfinite: bool) -> torch.Tensor:
    """RNE onto the storage grid (saturating for fp8), in the storage dtype. ``keep_nonfinite``:
    NaN stays NaN and ±inf stays ±inf, or becomes NaN in E4M3, which has no infinity (torch's
    cast would saturate it to ±448)."""
    if fmt.name in FORMATS:
        rounded = round_to_format(y, fmt.name)
        if keep_nonfinite:
            rounded = torch.where(torch.isfinite(y), rounded, y if fmt.dtype != torch.float8_e4m3fn else float("nan"))
        return rounded.to(fmt.dtype)
    return y.to(fmt.dtype)


def encode(x: torch.Tensor, fmt: MomentFormat, block: int, *, positive_floor: bool,
           keep_nonfinite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode flat fp32 ``x`` into ``(codes, scales)``.

    ``positive_floor``: values in ``(0, min_subnormal)`` after scaling become ``min_subnormal``
    (used for ``sqrt(v)``, which is never negative). ``keep_nonfinite`` (state of other
    optimizers, ``lpdist.optim.wrap``): a block's scale comes from its finite values and NaN/±inf
    elements stay non-finite, so one of them neither turns its block into NaN (an inf amax) nor
    leaves it unscaled (a NaN amax). Without it the operations are those of ``csrc/adam.cu``,
    whose steps never see non-finite gradients.
    """
    if fmt.scaled:
        xb = to_blocks(x, block)
        amax = block_amax(x, block) if keep_nonfinite else xb.abs().amax(dim=-1)
        scales = float_scale(amax, fmt.max)  # >= MIN_SCALE = 2^-126
        y = from_blocks(xb * torch.div(1.0, scales)[:, None], x.numel())
    else:
        scales = x.new_ones(0)
        y = x
    if positive_floor:
        floor = torch.tensor(fmt.min_subnormal, dtype=torch.float32, device=x.device)
        y = torch.where((y > 0) & (y < floor), floor, y)
    return _round(y, fmt, keep_nonfinite), scales


def decode(codes: torch.Tensor, scales: torch.Tensor, fmt: MomentFormat, block: int) -> torch.Tensor:
    """Flat fp32 values ``decode(code) * scale`` of a stored moment."""
    x = codes.float()
    if not fmt.scaled:
        return x
    return from_blocks(to_blocks(x, block) * scales[:, None], x.numel())
