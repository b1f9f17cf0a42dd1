"""Block-scaled FP8 encode/decode of gradient slices: the kernels of ``csrc/reduce.cu`` and
``csrc/reduce_fast.cu``, and their torch twin.

Both functions work on 2-D slices: ``rows`` destination ranks by ``cols`` elements, each row a
contiguous run inside a row-major tensor. They write into caller-provided views, so the same
code fills the packed all-to-all wire buffer and plain fp8 tensors for NCCL.

``quantize_into`` (ALGORITHMS.md §1.2 block scaling, §0 "FP8 gradient communication")::

    v = x + r                       (fp32; r is the error-feedback residual, if any)
    s = amax_b(v) / fmt_max         own scales (amax over finite values, 0 -> 1)
      = amax_shared_b / target      shared scales (``target = fmt_max / world_size``)
    q = round(clamp(v * (1/s), ±fmt_max))   RNE, or stochastic: floor(v/s * 2^(m-e) + u) * 2^(e-m)
    r <- v - decode(q) * s

A block that holds NaN or ±inf is never turned into numbers: its own scale is NaN (shared:
the agreed amax is +inf), so every receiver decodes NaN for the whole block, and its residual
is left as it was. Stochastic rounding draws ``u`` from a counter hash of (seed, element index),
so the CUDA kernel and the torch twin round identically.

``dequant_into``: ``out[o] = factor * Σ_{s<sum_rows} decode(q[o+s]) * scale[o+s]``, summed
in fp32 in rank order, one final rounding to ``out``'s dtype.

On CUDA with CuPy the kernels run; elsewhere the twin does. Tests check they agree bit for bit.
CuPy compiles every kernel in flush-to-zero mode (NVRTC ``-ftz=true``, always appended), so a
float32 subnormal (below 2^-126) is a zero of its sign in every fp32 operation of the kernels;
the twin flushes its inputs and products alike (``_flush_subnormals``), so both give the same
bytes for gradients that small, on every device.
Calls without a residual, with round-to-nearest, 8-aligned slices and a block in ``FAST_BLOCKS``
go to ``quantize_rows_fast`` (same bytes, several loads in flight per thread; see
``fast_path_applies``); everything else goes to ``quantize_rows``.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..quant import FORMATS, block_amax, round_to_format
from ..quant.noise import hashed_uniform
from ..quant.scaling import float_scale, from_blocks, to_blocks

__all__ = ["FP8_DTYPES", "MAX_BLOCK", "quantize_into", "block_amax_into", "dequant_into", "fast_path_applies",
           "launch_fast_quantize", "wire_order"]

#: Wire formats and their torch dtypes.
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
#: Largest block the kernel keeps in registers (32 lanes x 32 elements).
MAX_BLOCK = 1024
#: Largest block of the kernel variant holding 8 elements per lane (fewer registers, full occupancy).
SMALL_BLOCK = 256

_FMT_CODE = {"e4m3": 0, "e5m2": 1}
_DTYPE_NAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_WIDE_VEC = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}
_DEQUANT_VECS = (16, 8)  # fp8 codes per lane: 16- or 8-byte loads
_MODE_OWN, _MODE_SHARED, _MODE_AMAX = 0, 1, 2
_THREADS = 256
#: Blocks of the fast quantize kernel: 8 elements per lane, block / 8 lanes (a power of two <= 32;
#: block 8, one lane per block, stays on the general kernel: that instantiation spills registers).
FAST_BLOCKS = (16, 32, 64, 128, 256)
_FAST_VEC = 8
_FAST_GROUPS_IN_FLIGHT = 4  # U of quantize_rows_fast: blocks each thread loads before reducing

#: Grid cap of the grid-stride comm kernels (``quantize_rows_fast``, ``quantize_rows_to_peers``,
#: ``dequant_rows``) in CTAs per
#: SM; None: ``kernels.GRID_CTAS_PER_SM`` (several waves, every SM slot busy). Both kernels fit 4
#: CTAs of 256 threads per SM, so 4 is one persistent wave and 1-3 leave registers and threads on
#: every SM to a NCCL kernel that runs beside them (the pipelined all-to-all overlaps the exchange
#: of one piece with the quantize and decode of others). Bytes are the same for every cap.
grid_ctas_per_sm: int | None = None


def _vec_width(widths: tuple[int, ...], block: int, col0: int, cols: int, *tensors: torch.Tensor) -> int:
    """Widest of ``widths`` the kernel may use: every row, slice and block start aligned to it."""
    for vec in widths:
        if (block % vec == 0 and col0 % vec == 0 and cols % vec == 0
                and all(t.dim() < 2 or t.stride(0) % vec == 0 for t in tensors)
                and all(t.data_ptr() % min(16, vec * t.element_size()) == 0 for t in tensors)):
            return vec
    return 1


def _grid(work_items: int, per_cta: int, device: torch.device) -> int:
    """CTAs of a grid-stride comm kernel under ``grid_ctas_per_sm``."""
    cap = kernels.GRID_CTAS_PER_SM if grid_ctas_per_sm is None else grid_ctas_per_sm
    return kernels.capped_grid(work_items, per_cta, cap, device=device)


def _check_slice(x: torch.Tensor, col0: int, cols: int, block: int, residual: torch.Tensor | None = None) -> None:
    """``x`` is 2-D with contiguous rows and the slice starts on a block inside it; a ``residual``
    is laid out like ``x`` (the kernels address both with ``x``'s strides)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be a 2-D tensor with contiguous rows")
    if residual is not None and (residual.shape != x.shape or residual.stride() != x.stride()):
        raise ValueError(f"residual must have x's shape {tuple(x.shape)} and strides {x.stride()}, got "
                         f"{tuple(residual.shape)} with strides {residual.stride()}")
    if x.dtype not in _DTYPE_NAME:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not 0 <= col0 or col0 + cols > x.shape[1] or col0 % block:
        raise ValueError(f"slice [{col0}, {col0 + cols}) must lie in the rows and start on a block")


def fast_path_applies(x: torch.Tensor, residual: torch.Tensor | None, payload: torch.Tensor | None, *,
                       col0: int, cols: int, block: int, stochastic: bool) -> bool:
    """Whether ``quantize_rows_fast`` (csrc/reduce_fast.cu) handles this call instead of ``quantize_rows``.

    It covers the common case only: no error-feedback residual, round-to-nearest, a block in
    ``FAST_BLOCKS`` (block / 8 lanes per block, 8 elements each), and 8-element alignment of every
    row, the slice and the payload (16-byte loads of 16-bit inputs, two of fp32; 8-byte code stores).
    Both kernels give identical bytes; the fast one keeps several loads in flight per thread.
    """
    views = [t for t in (x, payload) if t is not None]
    return (residual is None and not stochastic and block in FAST_BLOCKS
            and _vec_width((_FAST_VEC,), block, col0, cols, *views) == _FAST_VEC)


def launch_fast_quantize(kernel: str, x: torch.Tensor, nblocks: int, block: int, fmt: str,
                         args: list) -> None:
    """Launch ``kernel`` of ``csrc/reduce_fast.cu`` (``quantize_rows_fast`` or
    ``quantize_rows_to_peers``, both built on ``quantize_groups``) over the rows of ``x``,
    ``nblocks`` blocks each: block / 8 lanes per block, ``_FAST_GROUPS_IN_FLIGHT`` blocks in flight
    per thread, the comm kernels' grid cap (``grid_ctas_per_sm``)."""
    lanes = block // _FAST_VEC
    name = f"{kernel}<{kernels.C_TYPES[x.dtype]}, {kernels.FORMAT_TYPES[fmt]}, {lanes}>"
    grid = _grid(x.shape[0] * nblocks, _THREADS // lanes * _FAST_GROUPS_IN_FLIGHT, x.device)
    kernels.launch("reduce_fast", name, grid, _THREADS, args, device=x.device)


def _quantize_cuda(x, residual, col0, cols, block, fmt, mode, seed, payload=None, scales=None,
                   amax_in=None, amax_out=None, target=1.0, stochastic=False, own_row=None) -> None:
    rows = x.shape[0]
    nblocks = -(-cols // block)
    res_dtype = residual.dtype if residual is not None else x.dtype
    if res_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"residual must be float32 or {x.dtype}, got {res_dtype}")
    amax = amax_in if amax_in is not None else amax_out
    null = np.uint64(0)
    wire_and_amax = [
        payload if payload is not None else null, payload.stride(0) if payload is not None else 0,
        scales if scales is not None else null, scales.stride(0) if scales is not None else 0,
        amax_in if amax_in is not None else null, amax_out if amax_out is not None else null,
        amax.stride(0) if amax is not None else 0, np.float32(target), np.int32(mode)]
    own = np.int32(rows - 1 if own_row is None else own_row)
    if fast_path_applies(x, residual, payload, col0=col0, cols=cols, block=block, stochastic=stochastic):
        launch_fast_quantize("quantize_rows_fast", x, nblocks, block, fmt, [
            x, x.stride(0), np.int32(rows), col0, cols, nblocks, *wire_and_amax, own])
        return
    views = [t for t in (residual, payload) if t is not None]
    vec = _vec_width((_WIDE_VEC[x.dtype],), block, col0, cols, x, *views)
    per_lane = 8 if block <= SMALL_BLOCK else 32
    name = f"quantize_rows_{_DTYPE_NAME[x.dtype]}_{_DTYPE_NAME[res_dtype]}_v{vec}_k{per_lane}"
    warps = rows * nblocks
    kernels.launch("reduce", name, -(-warps * 32 // _THREADS), _THREADS, [
        x, residual if residual is not None else null, x.stride(0), np.int32(rows), col0, cols,
        np.int32(block), nblocks, *wire_and_amax,
        np.int32(_FMT_CODE[fmt]), np.float32(FORMATS[fmt].max), np.int32(stochastic),
        np.uint32(seed & 0xFFFFFFFF), own], device=x.device)


_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32, 2^-126


def _flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every float32 subnormal (``|t| < 2^-126``) replaced by a zero of its sign, as a
    kernel compiled with flush-to-zero treats the inputs and results of its fp32 operations
    (one multiply: a subnormal times 0 is a signed zero, NaN and ±inf times 1 stay as they are)."""
    return t * (t.abs() >= _FLOAT32_TINY)


def _values(x, residual, col0, cols) -> torch.Tensor:
    v = _flush_subnormals(x[:, col0:col0 + cols].float())
    if residual is not None:
        v = _flush_subnormals(v + _flush_subnormals(residual[:, col0:col0 + cols].float()))
    return v


def _finite_blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    return torch.isfinite(to_blocks(v, block)).all(dim=-1)


def block_amax_into(x: torch.Tensor, residual: torch.Tensor | None, *, col0: int, cols: int,
                    block: int, out: torch.Tensor) -> None:
    """``out[row, b] = max |x + r|`` over block ``b`` of the slice (+inf if it holds NaN/inf)."""
    _check_slice(x, col0, cols, block, residual)
    if kernels.use_cupy(x):
        _quantize_cuda(x, residual, col0, cols, block, "e4m3", _MODE_AMAX, 0, amax_out=out)
        return
    v = _values(x, residual, col0, cols)
    amax = block_amax(v, block)
    out.copy_(torch.where(_finite_blocks(v, block), amax, torch.full_like(amax, float("inf"))))


def shared_scales(amax: torch.Tensor, target: float) -> torch.Tensor:
    """Effective scales from agreed block amaxes: ``max(amax / target, MIN_SCALE)`` (fp32), 1 where
    amax is 0, +inf where a rank saw NaN/inf (``float_scale``, as for own scales)."""
    return float_scale(amax, target)


def wire_order(rows: int, own_row: int | None) -> list[int]:
    """Input row held by each payload row: the rows other than ``own_row`` in order, then ``own_row``."""
    if own_row is None:
        return list(range(rows))
    return [r for r in range(rows) if r != own_row] + [own_row]


def quantize_into(x: torch.Tensor, residual: torch.Tensor | None, *, col0: int, cols: int,
                  block: int, fmt: str, payload: torch.Tensor, scales: torch.Tensor | None = None,
                  amax: torch.Tensor | None = None, target: float = 1.0,
                  rounding: str = "nearest", seed: int = 0, own_row: int | None = None) -> None:
    """Quantize ``x[:, col0:col0+cols] (+ residual)`` into ``payload`` (uint8 [rows, cols]).

    Own scales are written to ``scales`` (fp32 [rows, nblocks]); with ``amax`` given (agreed
    block amaxes, in input-row order) the scales are ``amax / target`` and nothing is written to
    ``scales``. ``residual`` (same shape as ``x``) is updated in place to ``v - decode(q) * s``.
    ``own_row``: payload and scale rows follow ``wire_order`` (input row ``own_row`` last), so the
    first ``rows - 1`` rows are exactly what an all-to-all sends to the other ranks.
    """
    _check_slice(x, col0, cols, block, residual)
    stochastic = rounding == "stochastic"
    if kernels.use_cupy(x):
        mode = _MODE_OWN if amax is None else _MODE_SHARED
        _quantize_cuda(x, residual, col0, cols, block, fmt, mode, seed, payload=payload,
                       scales=scales, amax_in=amax, target=target, stochastic=stochastic,
                       own_row=own_row)
        return
    order = wire_order(x.shape[0], own_row)
    v = _values(x, residual, col0, cols)
    finite = _finite_blocks(v, block)
    if amax is None:
        s = float_scale(block_amax(v, block), FORMATS[fmt].max)
        s = torch.where(finite, s, torch.full_like(s, float("nan")))
        scales.copy_(s[order])
    else:
        s = shared_scales(amax, target)
        finite = finite & torch.isfinite(amax)
    vb = to_blocks(v, block)
    limit = FORMATS[fmt].max if amax is None else target  # shared scales: no rank beyond +-target
    scaled = (vb * torch.reciprocal(s).unsqueeze(-1)).clamp(-limit, limit)
    noise = None
    if stochastic:
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1) * x.stride(0)
        index = rows + col0 + torch.arange(cols, device=x.device)
        noise = to_blocks(hashed_uniform(index, seed), block)
    q = round_to_format(scaled, fmt, rounding, noise=noise)
    codes = q.to(FP8_DTYPES[fmt])
    payload.copy_(from_blocks(codes, cols).view(torch.uint8)[order])
    if residual is not None:
        err = _flush_subnormals(vb - _flush_subnormals(codes.float() * s.unsqueeze(-1)))
        old = to_blocks(residual[:, col0:col0 + cols].float(), block)
        new = torch.where(finite.unsqueeze(-1), err, old)
        residual[:, col0:col0 + cols] = from_blocks(new, cols).to(residual.dtype)


def _rank_ordered(payload: torch.Tensor, scales: torch.Tensor, own: tuple[torch.Tensor, torch.Tensor] | None,
                  own_row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Payload and scale rows in rank order, with the own row put back at ``own_row``."""
    if own is None:
        return payload, scales
    return (torch.cat([payload[:own_row], own[0], payload[own_row:]]),
            torch.cat([scales[:own_row], own[1], scales[own_row:]]))


def dequant_into(payload: torch.Tensor, scales: torch.Tensor, *, sum_rows: int, block: int,
                 fmt: str, factor: float, out: torch.Tensor,
                 own: tuple[torch.Tensor, torch.Tensor] | None = None, own_row: int | None = None,
                 amax_target: float | None = None) -> None:
    """``out[o, c] = factor * Σ_{s<sum_rows} decode(q[o+s, c]) * scale[o+s, c//block]``.

    ``q``/``scale`` rows come from ``payload`` (uint8 [rows, cols]) and ``scales`` (fp32, one
    column per block), ``rows = out_rows + sum_rows - 1``; with ``own = (payload_row,
    scale_row)`` ([1, cols] and [1, nblocks]) that row is row ``own_row`` and ``payload`` holds
    the others in order (the all-to-all receive buffer, where this rank's row never travels).
    ``amax_target``: ``scales`` holds agreed block amaxes; the scale is ``shared_scales(amax,
    amax_target)``. ``out`` is [out_rows, cols] with contiguous rows (float32, bfloat16, float16).
    """
    if out.dtype not in _DTYPE_NAME:
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    if (own is None) != (own_row is None):
        raise ValueError("own and own_row must be given together")
    out_rows, cols = out.shape
    if kernels.use_cupy(payload, out):
        views = (payload, out) if own is None else (payload, out, own[0])
        vec = _vec_width(_DEQUANT_VECS, block, 0, cols, *views)
        name = f"dequant_rows_{_DTYPE_NAME[out.dtype]}_v{vec}"
        grid = (max(1, _grid(-(-cols // (_THREADS * vec)) * out_rows, 1, out.device) // out_rows), out_rows)
        null = np.uint64(0)
        kernels.launch("reduce", name, grid, _THREADS, [
            payload, payload.stride(0), scales, scales.stride(0), np.int32(sum_rows), cols,
            np.int32(block), np.float32(factor), out, out.stride(0), np.int32(_FMT_CODE[fmt]),
            null if own is None else own[0], null if own is None else own[1],
            np.int32(-1 if own_row is None else own_row),
            np.float32(0.0 if amax_target is None else amax_target)], device=out.device)
        return
    payload, scales = _rank_ordered(payload, scales, own, own_row)
    if amax_target is not None:
        scales = shared_scales(scales, amax_target)
    vals = payload.view(FP8_DTYPES[fmt]).float()
    expanded = scales.float().repeat_interleave(block, dim=1)[:, :cols]
    terms = _flush_subnormals(vals * expanded)
    acc = torch.zeros((out_rows, cols), dtype=torch.float32, device=out.device)
    for s in range(sum_rows):
        acc = _flush_subnormals(acc + terms[s:s + out_rows])
    out.copy_(_flush_subnormals(acc * torch.tensor(factor, dtype=torch.float32)))
