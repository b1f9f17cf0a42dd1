"""CUDA launcher for ``csrc/fp8_tiles.cu``: both FP8 casts of a 2-D GEMM operand (row-major and
transposed) from one read of each 128x128 tile, with 1x128 tile scales or one per-tensor scale,
of a tensor or of SwiGLU's values.

Sources (what is cast):

* ``"plain"``: ``x`` itself (inputs ``(x,)``);
* ``"swiglu"``: ``h = silu(g) * u`` (inputs ``(g, u)``), the down projection's input;
* ``"swiglu_grad"``: ``dg = dh * u * silu'(g)`` and ``du = dh * silu(g)`` (inputs ``(g, u, dh)``),
  two outputs.

SwiGLU's values are written by one elementwise pass that also takes their amax (for a per-tensor
scale, which must be known before the cast); the cast then reads each tile once. The torch twins
(the oracles) are :func:`lpdist.nn.fp8_cast.cast_fp8` of the value and of its transpose, with the
SwiGLU values of :mod:`lpdist.nn.float8_swiglu`; the kernels' output is bit-identical to them
(``tests/test_nn_gpu.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..quant.formats import get_format
from . import C_TYPES, FORMAT_TYPES, capped_grid, launch

#: Tile edge: the 1x128 groups of DeepSeek-V3 block scaling.
TILE = 128
_THREADS = 256
#: CTAs per SM the kernel's register budget allows (``__launch_bounds__``): three leave a few
#: bytes of spill for bf16 inputs and hide more memory latency than two.
CTAS_PER_SM = 3
#: CTAs per SM of the grid-stride values-and-amax kernel.
VALUES_CTAS_PER_SM = 8
#: Source name -> (``Source`` value in csrc/fp8_tiles.cu, inputs, outputs).
SOURCES = {"plain": (0, 1, 1), "swiglu": (1, 2, 1), "swiglu_grad": (2, 3, 2)}
_NULL = np.uint64(0)


class TileCast(NamedTuple):
    """One cast written by the kernel: ``q_row [rows, cols]`` with ``s_row``, ``q_col [cols, rows]``
    (transposed) with ``s_col``; tile scales are ``[rows, cols/128]`` and ``[cols, rows/128]``,
    column-major, per-tensor scales 0-dim. ``tile_stats [tiles, 3]`` (amax, saturated and
    flushed counts of ``q_row`` per tile) when tracked; ``amax`` (0-dim) of the whole value in
    per-tensor mode."""

    q_row: torch.Tensor
    s_row: torch.Tensor
    q_col: torch.Tensor
    s_col: torch.Tensor
    tile_stats: torch.Tensor | None
    amax: torch.Tensor | None


def tiles_fit(*inputs: torch.Tensor) -> bool:
    """Whether the kernels take these inputs: contiguous CUDA matrices of one supported dtype and
    one shape whose dims are multiples of 128 (the layout the tensor-core GEMM needs anyway)."""
    x = inputs[0]
    return all(t.is_cuda and t.dim() == 2 and t.dtype == x.dtype and t.shape == x.shape and t.is_contiguous()
               and t.data_ptr() % 16 == 0 for t in inputs) and (
        x.dtype in C_TYPES and x.shape[0] % TILE == 0 and x.shape[1] % TILE == 0)


def tile_kernel(dtype: torch.dtype, fmt: str, per_tensor: bool) -> str:
    """Name expression of the cast kernel for these template arguments."""
    return f"lp_cast_tiles<{C_TYPES[dtype]}, {FORMAT_TYPES[fmt]}, {'true' if per_tensor else 'false'}>"


def values_kernel(dtype: torch.dtype, source: str, amax: bool) -> str:
    """Name expression of the elementwise values-and-amax kernel of ``source``."""
    return f"lp_source_values<{C_TYPES[dtype]}, {SOURCES[source][0]}, {'true' if amax else 'false'}>"


def source_values(source: str, inputs: tuple[torch.Tensor, ...], *, amax: bool
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``(values, amax)``: the outputs of ``source`` (``[x]`` itself for ``"plain"``) and, when
    ``amax``, ``[outputs]`` fp32 with the max of the finite ``|value|`` of each."""
    code, n_inputs, n_outputs = SOURCES[source]
    if len(inputs) != n_inputs:
        raise ValueError(f"source {source!r} takes {n_inputs} input(s), got {len(inputs)}")
    if not tiles_fit(*inputs):
        raise ValueError("the tile kernels take contiguous CUDA float32/bfloat16/float16 matrices of one "
                         "shape, both dims multiples of 128, 16-byte aligned")
    x = inputs[0]
    values = [x] if source == "plain" else [torch.empty_like(x) for _ in range(n_outputs)]
    if source == "plain" and not amax:
        return values, None
    maxima = torch.zeros(n_outputs, dtype=torch.float32, device=x.device) if amax else None
    n8 = x.numel() // 8
    pointers = list(inputs) + [_NULL] * (3 - n_inputs)
    outputs = ([_NULL, _NULL] if source == "plain" else values + [_NULL] * (2 - n_outputs))
    launch("fp8_tiles", values_kernel(x.dtype, source, amax), capped_grid(n8, _THREADS, VALUES_CTAS_PER_SM, x.device),
           _THREADS, (*pointers, n8, *outputs, _NULL if maxima is None else maxima), device=x.device)
    return values, maxima


def cast_tiles(source: str, inputs: tuple[torch.Tensor, ...], fmt: str, *, per_tensor: bool,
               track: bool) -> list[TileCast]:
    """Both casts of each output of ``source`` (one, or two for ``"swiglu_grad"``: dg, du), with
    1x128 tile scales or, when ``per_tensor``, one scale per output from the amax of the pass
    that writes the values."""
    values, maxima = source_values(source, inputs, amax=per_tensor)
    rows, cols = inputs[0].shape
    dtype = get_format(fmt).torch_dtype
    tiles = (rows // TILE) * (cols // TILE)
    casts = []
    for k, x in enumerate(values):
        if per_tensor:
            s_row = torch.empty((), dtype=torch.float32, device=x.device)
            s_col = torch.empty((), dtype=torch.float32, device=x.device)
        else:
            s_row = torch.empty((cols // TILE, rows), dtype=torch.float32, device=x.device).t()
            s_col = torch.empty((rows // TILE, cols), dtype=torch.float32, device=x.device).t()
        cast = TileCast(torch.empty((rows, cols), dtype=dtype, device=x.device), s_row,
                        torch.empty((cols, rows), dtype=dtype, device=x.device), s_col,
                        torch.empty((tiles, 3), dtype=torch.float32, device=x.device) if track else None,
                        maxima[k] if per_tensor else None)
        launch("fp8_tiles", tile_kernel(x.dtype, fmt, per_tensor), tiles, _THREADS,
               (x, rows, cols, cast.q_row, cast.s_row, cast.q_col, cast.s_col,
                _NULL if cast.amax is None else cast.amax, _NULL if cast.tile_stats is None else cast.tile_stats),
               device=x.device, options=(f"-DLP_TILES_MIN_CTAS={CTAS_PER_SM}",))
        casts.append(cast)
    return casts
