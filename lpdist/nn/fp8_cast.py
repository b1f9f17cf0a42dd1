"""Compile-friendly FP8 casts of GEMM operands with current (just-in-time) or delayed scaling.

Every operand of an FP8 GEMM is cast as ``q = sat_F(x / s)`` with ``s = amax / F_max`` taken
over the scaling group (ALGORITHMS.md §0 and §1.2; groups of §7 for the DeepSeek-V3 recipe,
arXiv 2412.19437):

* ``group=None``: one scale per tensor;
* ``group=g``: one scale per ``g`` consecutive elements of the last dim (``g = n`` is row-wise,
  ``g = 128`` the 1x128 tiles of activations and gradients);
* :func:`cast_fp8_blocks`: one scale per ``b x b`` tile of a 2-D weight (128x128 blocks);
* :func:`cast_fp8_both_ways`: the 1x``b`` casts of ``x`` and of ``xᵀ`` together (an activation
  or gradient feeds one GEMM scaled along its columns and one along its rows);
* :func:`cast_fp8_with_history`: one scale per tensor taken from the amax of earlier steps
  (delayed scaling), the one cast here that does not need ``x``'s own amax first.

The arithmetic is that of :func:`lpdist.quant.quantize` (the oracle: ``float_scale`` of the
finite amax, multiplication by its fp32 reciprocal, saturation to ``±F_max``) and the rounding
is the hardware round-to-nearest-even cast to ``torch.float8_*``; the tests check both are
bit-identical on finite data. Non-finite values are never turned into numbers: NaN stays NaN
element-wise and never sets a scale (as in ``quantize``), while ±inf, which ``quantize``
saturates, enters the amax here (:func:`abs_for_amax`): its group's scale becomes infinite, the
group's codes 0 (NaN at the ±inf itself) and every GEMM result using the group non-finite
(``0·inf = NaN``), as ``nn.Linear``'s results would be. This costs no work per element. Delayed
scaling, whose scale comes from earlier steps, makes the step's scale NaN instead when ``x``
holds ±inf or NaN (its amax is taken without a select per element).
Written as plain tensor expressions (no ``.item()``, no data-dependent branches) so that
``torch.compile`` fuses amax, divide, clamp and cast into one or two kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import kernels
from ..kernels import fp8_tiles
from ..quant.formats import get_format
from ..quant.scaling import float_scale, from_blocks, to_blocks
from .telemetry import clip_threshold

__all__ = ["FP8Cast", "FP8_FORMATS", "abs_for_amax", "cast_fp8", "cast_fp8_blocks", "cast_fp8_both_ways",
           "cast_fp8_with_history", "column_major", "dequantize_fp8"]

#: Element formats an FP8 GEMM operand may use.
FP8_FORMATS = ("e4m3", "e5m2")


class FP8Cast(NamedTuple):
    """An FP8 operand: ``data`` (float8, shape of x), ``scale`` (fp32 dequantization factor:
    0-dim, ``[..., n_groups]`` or ``[rows/b, cols/b]``), ``amax`` of the input (0-dim, fp32),
    and counts of clipped (|x/s| beyond max by over half a step) and flushed (x != 0 but q == 0) elements (0-dim)."""

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor | None = None
    saturated: torch.Tensor | None = None
    underflow: torch.Tensor | None = None


def abs_for_amax(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in fp32 with NaN replaced by 0: what a scale is taken from. NaN never sets a scale
    (it stays NaN in the cast); ±inf makes its group's amax and scale infinite, so the group's
    results are non-finite instead of saturated (see the module docstring)."""
    # fmax returns the number when one argument is NaN: one max instruction per element, where a
    # where(isnan) select made inductor's amax reductions slower (measured in BENCHMARKS.md).
    return torch.fmax(x.float().abs(), torch.zeros((), device=x.device))


#: Consecutive rows (of ``x``'s last dim) that one partial maximum of :func:`_tensor_amax` covers.
_AMAX_ROWS_PER_PARTIAL = 4


def _tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """The amax of :func:`abs_for_amax` over all of ``x``, taken as the maximum of partial maxima
    over runs of ``_AMAX_ROWS_PER_PARTIAL`` consecutive rows (when the row count allows; a
    contiguous ``x`` only, where the view is free). The value is the same as one reduction over
    the whole tensor; the two-stage shape is the one for which ``torch.compile`` emits the faster
    reduction: at the 8B MLP block on one H200 a step's per-tensor amax kernels took 0.85 ms,
    against 1.01 ms with one row per partial and 1.06 ms in one reduction (BENCHMARKS.md)."""
    a = abs_for_amax(x)
    if x.dim() < 2 or x.numel() == 0 or not x.is_contiguous():
        return a.amax()
    rows = a.reshape(-1, x.shape[-1])
    k = _AMAX_ROWS_PER_PARTIAL if rows.shape[0] % _AMAX_ROWS_PER_PARTIAL == 0 else 1
    return rows.reshape(rows.shape[0] // k, -1).amax(dim=-1).amax()


def _saturate_and_cast(x: torch.Tensor, scale: torch.Tensor, fmt: str, track: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f = get_format(fmt)
    v = x.float() * torch.reciprocal(scale)  # as the oracle: one reciprocal per group
    data = v.clamp(-f.max, f.max).to(f.torch_dtype)
    if not track:
        zero = torch.zeros((), device=x.device)
        return data, zero, zero
    saturated = (v.abs() > clip_threshold(f)).sum(dtype=torch.float32)
    underflow = ((data.float() == 0) & (x != 0)).sum(dtype=torch.float32)
    return data, saturated, underflow


def cast_fp8(x: torch.Tensor, fmt: str, group: int | None = None, *, track: bool = False,
             scale: torch.Tensor | None = None) -> FP8Cast:
    """Cast ``x`` to FP8 ``fmt`` with one scale per tensor (``group=None``) or per ``group``
    consecutive elements of the last dim (a last partial group is allowed).

    ``scale``: a per-tensor scale already known (``group=None`` only; e.g. the forward scale of
    a weight reused for its transpose), which skips the amax pass; ``amax`` is then None.
    """
    f = get_format(fmt)
    if group is None:
        amax = None if scale is not None else _tensor_amax(x)
        scale = float_scale(amax, f.max) if scale is None else scale
        data, sat, uf = _saturate_and_cast(x, scale, fmt, track)
        return FP8Cast(data, scale, amax, sat, uf)
    if scale is not None:
        raise ValueError("cast_fp8 takes a precomputed scale for group=None only")
    n = x.shape[-1]
    xb = to_blocks(x, group)
    amax_g = abs_for_amax(xb).amax(dim=-1)
    scale = float_scale(amax_g, f.max)
    data, sat, uf = _saturate_and_cast(xb, scale.unsqueeze(-1), fmt, track)
    return FP8Cast(from_blocks(data, n), scale, amax_g.amax(), sat, uf)


def cast_fp8_with_history(x: torch.Tensor, fmt: str, history: torch.Tensor, *, delayed: bool,
                          track: bool = False) -> FP8Cast:
    """Per-tensor cast of ``x`` that keeps the amax history of its operand: ``history`` (fp32,
    newest first) receives ``x``'s amax in place, the oldest entry dropping out (0 for a step
    whose ``x`` holds ±inf, or NaN when delayed: it sets no later scale, while its own results
    are non-finite).

    ``delayed=True`` is delayed scaling (the per-tensor recipe of Micikevicius et al., "FP8
    Formats for Deep Learning", arXiv 2209.05433, as in Transformer Engine's DelayedScaling):
    the scale is ``max(history) / F_max`` from earlier steps, known before ``x`` is read, so
    ``torch.compile`` can fuse the cast (and the amax for the history) into the kernel that
    produces ``x`` instead of reading ``x`` once for its amax and again for the cast. Values
    beyond the history's range saturate at ``±F_max`` (counted in ``saturated`` when
    ``track``). ``delayed=False`` scales with ``x``'s own amax, as :func:`cast_fp8`, and only
    records it (the first step, while the history is empty).
    """
    if delayed:
        cast = cast_fp8(x, fmt, track=track, scale=float_scale(history.amax(), get_format(fmt).max))
        # The amax as the maximum of row maxima: a reduction over the rows has the cast's own
        # loop shape, so torch.compile computes both (and whatever produced x) in one kernel.
        # Taken over |x| as it is, NaN and ±inf included (no select per element): a non-finite
        # amax makes the step's scale NaN (one scale per tensor: the tensor is the group).
        amax = x.float().abs().amax(dim=-1).amax()
        cast = cast._replace(scale=torch.where(torch.isfinite(amax), cast.scale, float("nan")), amax=amax)
    else:
        cast = cast_fp8(x, fmt, track=track)
    recorded = torch.where(torch.isfinite(cast.amax), cast.amax, 0.0)
    history.copy_(torch.cat((recorded.reshape(1), history[:-1])))
    return cast


def cast_fp8_blocks(w: torch.Tensor, fmt: str, block: int, *, track: bool = False,
                    scale: torch.Tensor | None = None) -> FP8Cast:
    """Cast a 2-D ``w [rows, cols]`` with one scale per ``block x block`` tile (DeepSeek-V3
    weight blocks, ALGORITHMS.md §7); ``rows`` and ``cols`` must be multiples of ``block``. The
    result is the same for ``w`` and ``w.t()`` (the scale grid transposes with it). ``scale``
    (``[rows/block, cols/block]``): tile scales already known, which skips the amax pass."""
    rows, cols = w.shape
    if rows % block or cols % block:
        raise ValueError(f"block scaling needs both weight dims divisible by block={block}, "
                         f"got {tuple(w.shape)}")
    f = get_format(fmt)
    tiles = w.reshape(rows // block, block, cols // block, block)
    amax = None
    if scale is None:
        amax_t = abs_for_amax(tiles).amax(dim=(1, 3))
        scale, amax = float_scale(amax_t, f.max), amax_t.amax()
    data, sat, uf = _saturate_and_cast(tiles, scale[:, None, :, None], fmt, track)
    return FP8Cast(data.reshape(rows, cols), scale, amax, sat, uf)


def column_major(s: torch.Tensor) -> torch.Tensor:
    """Same values, strides ``(1, rows)``: the scale layout cuBLASLt's block scaling reads (no
    copy when ``s`` already has it)."""
    return s.t().contiguous().t()


# The pair of casts is the custom op ``lpdist::fp8_cast_both_ways`` (declared like
# ``lpdist::fp8_gemm``): ``torch.compile`` keeps it opaque, so compiled code runs the one-read
# CUDA kernel too instead of inductor's two reductions over x.
_LIBRARY = torch.library.Library("lpdist", "FRAGMENT")
_LIBRARY.define("fp8_cast_both_ways(Tensor x, str fmt, int block, bool track) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _cast_both_ways_kernel(x: torch.Tensor, fmt: str, block: int, track: bool):
    if block == fp8_tiles.TILE and kernels.use_cupy(x) and fp8_tiles.tiles_fit(x):
        q_row, s_row, q_col, s_col, tile_stats = fp8_tiles.cast_tiles_both(x, fmt, track)
        if track:
            stats = torch.cat((tile_stats[:, 0].amax().reshape(1), tile_stats[:, 1:].sum(dim=0)))
        else:
            stats = x.new_empty(0, dtype=torch.float32)
        return q_row, s_row, q_col, s_col, stats
    rows = cast_fp8(x, fmt, block, track=track)
    cols = cast_fp8(x.t(), fmt, block)
    stats = (torch.stack((rows.amax, rows.saturated, rows.underflow)) if track
             else x.new_empty(0, dtype=torch.float32))
    return rows.data, column_major(rows.scale), cols.data.contiguous(), column_major(cols.scale), stats


_LIBRARY.impl("fp8_cast_both_ways", _cast_both_ways_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("lpdist::fp8_cast_both_ways", lib=_LIBRARY)
def _(x, fmt, block, track):
    rows, cols = x.shape
    dtype = get_format(fmt).torch_dtype
    groups_row, groups_col = -(-cols // block), -(-rows // block)
    return (x.new_empty((rows, cols), dtype=dtype), x.new_empty((groups_row, rows), dtype=torch.float32).t(),
            x.new_empty((cols, rows), dtype=dtype), x.new_empty((groups_col, cols), dtype=torch.float32).t(),
            x.new_empty(3 if track else 0, dtype=torch.float32))


def cast_fp8_both_ways(x: torch.Tensor, fmt: str, block: int, *, track: bool = False
                       ) -> tuple[FP8Cast, FP8Cast]:
    """``(cast of x, cast of xᵀ)`` for a 2-D ``x [rows, cols]``, each in groups of ``block``
    along its own last dim: equal to ``cast_fp8(x, fmt, block)`` and
    ``cast_fp8(x.t(), fmt, block)`` (data of the second row-major ``[cols, rows]``), with
    column-major scales. On CUDA, for ``block=128`` and dims divisible by 128, one kernel reads
    each 128x128 tile once and writes both (``csrc/fp8_tiles.cu``). ``track``: amax, saturated
    and flushed counts of the first cast, as :func:`cast_fp8` reports them."""
    if x.dim() != 2:
        raise ValueError(f"cast_fp8_both_ways takes a 2-D tensor, got shape {tuple(x.shape)}")
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {FP8_FORMATS}, got {fmt!r}")
    q_row, s_row, q_col, s_col, stats = torch.ops.lpdist.fp8_cast_both_ways.default(x, fmt, block, track)
    amax, saturated, underflow = stats.unbind() if track else (None, None, None)
    return FP8Cast(q_row, s_row, amax, saturated, underflow), FP8Cast(q_col, s_col)


def dequantize_fp8(c: FP8Cast, group: int | None, dtype: torch.dtype, *,
                   blocks: int | None = None) -> torch.Tensor:
    """``data * scale`` in ``dtype`` for a cast made with the same ``group`` (or ``blocks``)."""
    if blocks is not None:
        rows, cols = c.data.shape
        tiles = c.data.to(dtype).reshape(rows // blocks, blocks, cols // blocks, blocks)
        return (tiles * c.scale.to(dtype)[:, None, :, None]).reshape(rows, cols)
    if group is None:
        return c.data.to(dtype) * c.scale.to(dtype)
    n = c.data.shape[-1]
    return from_blocks(to_blocks(c.data.to(dtype), group) * c.scale.to(dtype).unsqueeze(-1), n)
