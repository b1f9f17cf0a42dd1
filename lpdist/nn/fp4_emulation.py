"""Shared pieces of the emulated FP4 GEMMs (no FP4 tensor cores on Hopper).

Operands are quantized with :mod:`lpdist.quant` (the oracle's rounding), dequantized, and
multiplied in fp32 (fp64 for fp64 inputs) with autocast off, so the product of a dequantized
FP4 value and its scale is exact and the result equals an FP4 GEMM with fp32 accumulation up to
summation order. A Blackwell build would replace :func:`emulated_mm` by a native FP4 GEMM on
the packed codes and scales that the recipes already compute.
"""

from __future__ import annotations

import torch

from ..quant import QTensor
from ..quant.scaling import to_blocks
from .telemetry import clip_threshold

__all__ = ["emulation_dtype", "emulated_mm", "underflow_count", "clipped_count"]


def emulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 inputs (test references), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def emulated_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a·bᵀ`` of dequantized operands in ``dtype`` with autocast disabled."""
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype).t()


def underflow_count(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Number of non-zero values of ``x`` whose quantized image ``x_hat`` is zero (fp32, 0-dim)."""
    return ((x_hat == 0) & (x != 0)).sum(dtype=torch.float32)


def clipped_count(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Number of values of ``x`` saturated by the block-scaled quantization ``q`` of it."""
    scaled = to_blocks(x.float(), q.block) / q.scales().unsqueeze(-1)
    return (scaled.abs() > clip_threshold(q.scheme.elem)).sum(dtype=torch.float32)
