"""Shared pieces of the emulated FP4 GEMMs (no FP4 tensor cores on Hopper).

Operands are quantized with :mod:`lpdist.quant` (the oracle's rounding) in fp32 (fp64 for fp64
inputs). The GEMM then runs on tensor cores without losing exactness: an FP4 element times a
power-of-two (E8M0) or E4M3 block scale has at most 2 + 4 significant bits, so ``code·scale`` is
exactly a bf16 number (8 significant bits, the fp32 exponent range), and a bf16 GEMM with fp32
accumulation of such operands equals the FP4 GEMM with fp32 accumulation up to summation order.
Scale factors that are not bf16 numbers but are constant along the reduction dim (an NVFP4 fp32
tensor scale, DGE's per-output-channel weight scale, Quartet's 1/3 backward factor) are applied to the fp32
GEMM output by :func:`scaled_mm`, as a native FP4 GEMM's alpha / epilogue does. An operand that
is not bf16-exact (DGE's per-channel scales along the reduction dim, its OCC residual) is split
into ``hi + lo`` bf16 terms by :func:`split_operand` (error ≤ 2^-16 relative per element).

GEMM precision by input dtype (:func:`gemm_dtype`): bf16 inputs (training) -> bf16 GEMM with
fp32 output; fp32/fp16 -> fp32 GEMM; fp64 (test references) -> fp64 GEMM. A Blackwell build would
replace :func:`scaled_mm` by a native FP4 GEMM on the packed codes and scales.
"""

from __future__ import annotations

import torch

from ..quant import QTensor
from ..quant.formats import get_format
from ..quant.scaling import from_blocks, to_blocks
from .telemetry import clip_threshold

__all__ = ["E2M1_MAX", "emulation_dtype", "gemm_dtype", "inf_as_nan", "fp4_operand", "nan_blocks", "split_operand",
           "scaled_mm", "underflow_count", "clipped_count"]

#: Largest E2M1 magnitude (6): the saturation bound of every FP4 recipe.
E2M1_MAX = get_format("e2m1").max

Operand = torch.Tensor | tuple[torch.Tensor, ...]


def emulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Precision of the quantizer arithmetic (rotations, scales): fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """Operand dtype of the emulated GEMMs: bf16 for bf16 inputs, fp64 for fp64, else fp32."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float64) else torch.float32


def inf_as_nan(t: torch.Tensor) -> torch.Tensor:
    """``t`` with ±inf replaced by NaN. The FP4 recipes quantize operands that no rotation mixes
    first (NVFP4, DGE's weight) through this, so that ±inf reaches the results as non-finite
    (E2M1 has no inf code and ``lpdist.quant.quantize`` saturates ±inf)."""
    return torch.where(torch.isinf(t), float("nan"), t)


def fp4_operand(q: QTensor, block_scale: torch.Tensor) -> torch.Tensor:
    """FP4 values of ``q`` times the per-block ``block_scale`` (fp32, shaped like ``q``).

    ``block_scale`` is the part of ``q``'s scale that varies along the GEMM's reduction dim (an
    E8M0 power of two or an E4M3 value), so the result is exactly representable in bf16; the rest
    of the scale goes to :func:`scaled_mm`'s output factors. E2M1 has no NaN code: a block that
    held a NaN has a NaN scale in ``q`` (:meth:`QTensor.scales`), and ``block_scale`` must be NaN
    there too, so that its operand values are NaN: ``q``'s own stored scale is; a scale computed
    apart from ``q`` goes through :func:`nan_blocks` first.
    """
    values = to_blocks(q.values(), q.block) * block_scale.unsqueeze(-1)
    return from_blocks(values, q.shape[-1]).reshape(q.shape)


def nan_blocks(q: QTensor, block_scale: torch.Tensor) -> torch.Tensor:
    """``block_scale`` made NaN in the blocks whose scale in ``q`` is NaN (blocks that held a NaN)."""
    return block_scale.masked_fill(torch.isnan(q.scales()), float("nan"))


def split_operand(t: torch.Tensor, gemm: torch.dtype) -> Operand:
    """``t`` as a sum of GEMM operands in ``gemm``: itself, or for a bf16 GEMM of a wider tensor
    ``hi = bf16(t)``, ``lo = bf16(t - hi)``, so ``|t - hi - lo| ≤ 2^-16·|t|`` per element."""
    if gemm != torch.bfloat16 or t.dtype == torch.bfloat16:
        return t
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.to(t.dtype)).to(torch.bfloat16)


def _terms(t: Operand) -> tuple[torch.Tensor, ...]:
    return t if isinstance(t, tuple) else (t,)


def _mm(a: torch.Tensor, b: torch.Tensor, gemm: torch.dtype) -> torch.Tensor:
    """``a·bᵀ`` in ``gemm`` (bf16: fp32 accumulation and fp32 output)."""
    if gemm != torch.bfloat16:
        return a.to(gemm) @ b.to(gemm).t()
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a16.is_cuda:
        return torch.mm(a16, b16.t(), out_dtype=torch.float32)
    # No bf16->fp32 GEMM on CPU: the products of bf16 numbers are exact in fp32, so an fp32 GEMM
    # of the (already rounded) bf16 operands is the same computation.
    return a16.float() @ b16.float().t()


def scaled_mm(a: Operand, b: Operand, *, gemm: torch.dtype, alpha: torch.Tensor | float | None = None,
              col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha · (Σ a_i)·(Σ b_j)ᵀ · diag(col_scale)`` with autocast disabled.

    ``a [M, K]`` and ``b [N, K]`` are tensors or tuples of terms (:func:`split_operand`) whose
    values are exact in ``gemm``; ``col_scale [N]`` and the scalar ``alpha`` are applied to the
    fp32 (fp64 for an fp64 ``gemm``) result. Error: fp32 accumulation over K terms,
    ``≤ (K + 2)·2^-24 · |alpha|·(|a|·|b|ᵀ)·|col_scale|`` per element.
    """
    with torch.autocast(_terms(a)[0].device.type, enabled=False):
        out = None
        for ai in _terms(a):
            for bj in _terms(b):
                part = _mm(ai, bj, gemm)
                out = part if out is None else out + part
        if alpha is not None:
            out = out * alpha
        if col_scale is not None:
            out = out * col_scale.to(out.dtype)
        return out


def underflow_count(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Number of non-zero values of ``x`` whose quantized image ``x_hat`` is zero (fp32, 0-dim)."""
    return ((x_hat == 0) & (x != 0)).sum(dtype=torch.float32)


def clipped_count(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Number of values of ``x`` saturated by the block-scaled quantization ``q`` of it."""
    scaled = to_blocks(x.float(), q.block) / q.scales().unsqueeze(-1)
    return (scaled.abs() > clip_threshold(q.scheme.elem)).sum(dtype=torch.float32)
