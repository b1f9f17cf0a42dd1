"""CUDA launcher for ``csrc/fp8_tiles.cu``: both 1x128 FP8 casts of a 2-D GEMM operand from one
read of each 128x128 tile.

The torch twin (the oracle) is :func:`lpdist.nn.fp8_cast.cast_fp8` applied to ``x`` with groups
of 128 along its columns and to ``x.t()`` with groups of 128 along its rows; the kernel's output
is bit-identical to it (``tests/test_nn_gpu.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant.formats import get_format
from . import C_TYPES, FORMAT_TYPES, launch

#: Tile edge: the 1x128 groups of DeepSeek-V3 block scaling.
TILE = 128
_THREADS = 256
#: CTAs per SM the kernel's register budget allows (``__launch_bounds__``): three leave a few
#: bytes of spill for bf16 inputs and hide more memory latency than two.
CTAS_PER_SM = 3


def tiles_fit(x: torch.Tensor) -> bool:
    """Whether the kernel takes ``x``: a contiguous CUDA matrix of a supported dtype whose
    dims are multiples of 128 (the layout the tensor-core GEMM needs anyway)."""
    return (x.is_cuda and x.dim() == 2 and x.dtype in C_TYPES and x.is_contiguous()
            and x.shape[0] % TILE == 0 and x.shape[1] % TILE == 0 and x.data_ptr() % 8 == 0)


def cast_tiles_both(x: torch.Tensor, fmt: str, track: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q_row, s_row, q_col, s_col, tile_stats)`` for ``x [rows, cols]`` (``tiles_fit``):

    * ``q_row [rows, cols]`` with ``s_row [rows, cols/128]``: groups of 128 along cols;
    * ``q_col [cols, rows]`` (``x`` transposed) with ``s_col [cols, rows/128]``: groups along rows;
    * ``tile_stats [tiles, 3]`` when ``track`` (per tile: amax, saturated and flushed counts of
      ``q_row``), else None.

    Scales are fp32 and column-major (strides ``(1, rows)`` and ``(1, cols)``), as cuBLASLt's
    1x128 block scaling reads them.
    """
    rows, cols = x.shape
    dtype = get_format(fmt).torch_dtype
    q_row = torch.empty((rows, cols), dtype=dtype, device=x.device)
    q_col = torch.empty((cols, rows), dtype=dtype, device=x.device)
    s_row = torch.empty((cols // TILE, rows), dtype=torch.float32, device=x.device).t()
    s_col = torch.empty((rows // TILE, cols), dtype=torch.float32, device=x.device).t()
    tiles = (rows // TILE) * (cols // TILE)
    stats = torch.empty((tiles, 3), dtype=torch.float32, device=x.device) if track else None
    launch("fp8_tiles", f"lp_cast_tiles_both<{C_TYPES[x.dtype]}, {FORMAT_TYPES[fmt]}>", tiles, _THREADS,
           (x, rows, cols, q_row, s_row, q_col, s_col, np.uint64(0) if stats is None else stats),
           device=x.device, options=(f"-DLP_TILES_MIN_CTAS={CTAS_PER_SM}",))
    return q_row, s_row, q_col, s_col, stats
