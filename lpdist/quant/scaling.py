"""Block layout and scale rules (ALGORITHMS.md §1.2-§1.4, decisions in §0).

Blocks run along the last dimension: ``block=k`` gives every ``k`` consecutive elements of a
row one scale (a last partial block is allowed and padded with zeros, which do not change its
amax); ``block=None`` gives the whole tensor one scale. Scales follow ``x ≈ decode(q) * scale``:

* plain FP8/E2M1: ``scale = amax / fmt_max`` (exact float32 division, not a power of two);
* MX (E8M0 scale, OCP MX spec): ``2^(floor(log2 amax) - emax_elem)`` ("floor", the OCP rule,
  may clip the block maximum) or ``2^ceil(log2(amax / fmt_max))`` ("ceil", RCEIL, never clips,
  used wherever stochastic rounding follows);
* NVFP4: ``s_g = amax(tensor) / (6·448)``, per block ``ŝ_b = q_E4M3((amax_b / 6) / s_g)``, the
  effective scale is ``ŝ_b · s_g`` (§1.4). With stochastic rounding the block target is enlarged
  by 17/16 so that the E4M3 rounding of ``ŝ_b`` cannot push elements past 6 (Quartet-II); a
  subnormal E4M3 ``ŝ_b`` for which the headroom is not enough is rounded up.

The amax ignores NaN and ±inf (they are handled element-wise: inf saturates, NaN stays NaN).
A block whose amax is 0 gets scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FORMATS, Format, floor_log2, get_format, round_to_format

__all__ = ["Scheme", "PRESETS", "resolve", "to_blocks", "from_blocks", "block_amax",
           "float_scale", "true_div", "MIN_SCALE", "e8m0_exponent", "nvfp4_block_scale", "NVFP4_TENSOR_DIVISOR"]

NVFP4_TENSOR_DIVISOR = 6.0 * 448.0
NVFP4_SR_HEADROOM = 17.0 / 16.0


@dataclass(frozen=True)
class Scheme:
    """What ``quantize`` does for one ``fmt``: element format, block size and scale kind."""

    name: str
    elem: Format
    block: int | None
    scale_kind: str  # "float" | "e8m0" | "nvfp4"

    @property
    def scale_bytes(self) -> float:
        """Storage bytes of one block scale."""
        return 4.0 if self.scale_kind == "float" else 1.0


#: Presets of the OCP MX spec and NVIDIA's NVFP4: (element format, block, scale kind).
PRESETS = {
    "mxfp8": ("e4m3", 32, "e8m0"),
    "mxfp4": ("e2m1", 32, "e8m0"),
    "nvfp4": ("e2m1", 16, "nvfp4"),
}


def resolve(fmt: str, block: int | None) -> Scheme:
    """Turn ``(fmt, block)`` into a :class:`Scheme`, validating both."""
    if isinstance(fmt, str) and fmt.lower() in PRESETS:
        elem, preset_block, kind = PRESETS[fmt.lower()]
        if block is not None and block != preset_block:
            raise ValueError(f"block must be None or {preset_block} for fmt={fmt!r}, got {block!r}")
        return Scheme(fmt.lower(), FORMATS[elem], preset_block, kind)
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS) + sorted(PRESETS)}, got {fmt!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be None or a positive int, got {block!r}")
    return Scheme(fmt.lower(), get_format(fmt), block, "float")


def num_blocks(n: int, block: int | None) -> int:
    return 1 if block is None else -(-n // block)


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View ``x[..., n]`` as ``[..., nblocks, block]``, zero-padding the last partial block."""
    n = x.shape[-1]
    pad = num_blocks(n, block) * block - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], num_blocks(n, block), block)


def from_blocks(xb: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``[..., nblocks, block]`` back to ``[..., n]``."""
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])[..., :n]


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in fp32 with NaN/inf replaced by 0, so they never set a scale."""
    a = x.float().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device))


def block_amax(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """Max of |finite values| per block: shape ``x.shape[:-1] + (nblocks,)``, or 0-dim."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0):
        raise ValueError(f"block must be None or a positive int, got {block!r}")
    a = _finite_abs(x)
    if block is None:
        return a.amax() if a.numel() else torch.zeros((), device=a.device)
    return to_blocks(a, block).amax(dim=-1)


def true_div(a: torch.Tensor, divisor: float) -> torch.Tensor:
    """``a / divisor`` correctly rounded on every device.

    PyTorch's CUDA kernels turn division by a Python scalar into multiplication by its
    reciprocal, which can differ in the last bit; dividing by a 0-dim tensor does not.
    """
    return a / torch.full((), divisor, dtype=torch.float32, device=a.device)


#: Smallest positive normal float32: the floor of every scale, so that a block whose amax is a
#: float32 subnormal cannot get a zero scale (its reciprocal would be infinite).
MIN_SCALE = 2.0 ** -126


def float_scale(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """``max(amax / fmt_max, MIN_SCALE)`` in float32; blocks with amax 0 get scale 1."""
    s = true_div(amax.float(), fmt_max).clamp_min(MIN_SCALE)
    return torch.where(amax > 0, s, torch.ones_like(s))


def e8m0_exponent(amax: torch.Tensor, elem: Format, rule: str) -> torch.Tensor:
    """Integer exponent ``E`` of the power-of-two MX scale ``2^E``, clamped to [-127, 127].

    ``rule="floor"``: ``floor(log2 amax) - emax_elem`` (OCP). ``rule="ceil"``:
    ``ceil(log2(amax / fmt_max))`` (RCEIL). amax 0 gives ``E = 0`` (scale 1).
    """
    amax = amax.float()
    if rule == "floor":
        e = floor_log2(amax) - elem.emax
    elif rule == "ceil":
        r = true_div(amax, elem.max)
        mantissa_bits = r.view(torch.int32) & 0x7FFFFF
        e = floor_log2(r) + (mantissa_bits != 0).to(torch.int32)
    else:
        raise ValueError(f"scale_rule must be 'floor' or 'ceil', got {rule!r}")
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(-127, 127)


def _e4m3_ceil(v: torch.Tensor) -> torch.Tensor:
    """The smallest E4M3 value ``>= v`` for ``v >= 0`` (float32; capped at 448)."""
    e4m3 = FORMATS["e4m3"]
    nearest = round_to_format(v, e4m3)
    step = torch.ldexp(torch.ones_like(nearest), floor_log2(nearest).clamp(min=e4m3.emin) - e4m3.mbits)
    return torch.where(nearest < v, nearest + step, nearest).clamp(max=e4m3.max)


def nvfp4_block_scale(amax_blocks: torch.Tensor, tensor_scale: torch.Tensor,
                      stochastic: bool) -> torch.Tensor:
    """E4M3 block scale values ``ŝ_b = q_E4M3(amax_b / 6 / s_g)`` (as float32; 0 becomes 1).

    ``stochastic``: the scale must not clip the block max (saturation biases stochastic
    rounding, §1.5). The target is enlarged by 17/16 (Quartet-II), which covers the RNE of a
    normal E4M3 value (it lowers a value by at most a factor 16/17); a subnormal E4M3 value has a
    fixed step of 2^-9 and may still fall below ``amax_b / 6 / s_g``: such a scale is rounded up
    to the next E4M3 value instead, so that ``|x| / (ŝ_b·s_g) <= 6`` holds for every block.
    """
    amax = amax_blocks.float()
    target = amax * NVFP4_SR_HEADROOM if stochastic else amax
    s_hat = round_to_format(true_div(target, 6.0) / tensor_scale, "e4m3")
    s_hat = torch.where(s_hat > 0, s_hat, torch.ones_like(s_hat))
    if stochastic:
        needed = true_div(amax, 6.0) / tensor_scale
        s_hat = torch.where(s_hat < needed, _e4m3_ceil(needed), s_hat)
    return s_hat
