"""NVIDIA NVFP4 training recipe (arXiv 2509.25149; ALGORITHMS.md §1.4, §5).

* Elements E2M1 in 16-blocks along each GEMM's reduction dim, UE4M3 block scales times one fp32
  tensor scale: ``s_g = amax/(6·448)``, ``ŝ_b = q_E4M3(amax_b/6/s_g)``, ``x ≈ q·ŝ_b·s_g``.
* Weights use 16x16 2-D tiles (one ``ŝ`` per 256 elements), so the quantized W serves Fprop and
  Dgrad alike (``Q2D(W)ᵀ == Q2D(Wᵀ)``). Activations and gradients use 1x16 blocks.
* Round-to-nearest-even for weights and activations, stochastic rounding for gradients.
* Wgrad only: a random Hadamard transform ``H16·diag(r)`` along the token dim on both operands
  (the activation's and the gradient's column-wise copies), with fresh signs r drawn in each
  backward pass, so the transform cancels in ``Eᵀ·X``.

Exact bf16 emulation (:mod:`lpdist.nn.fp4_emulation`): every GEMM operand is ``code·ŝ`` (E2M1
times an E4M3 block or tile scale: ≤ 6 significant bits, exact in bf16); the two fp32 tensor
scales multiply the fp32 GEMM output (``alpha = s_g(A)·s_g(B)``).
"""

from __future__ import annotations

import torch

from ..quant import QTensor, fake_quantize, quantize
from ..quant.scaling import NVFP4_TENSOR_DIVISOR, block_amax, float_scale, nvfp4_block_scale
from .fp4_emulation import (clipped_count, emulation_dtype, fp4_operand, gemm_dtype, inf_as_nan,
                            nan_blocks, scaled_mm, underflow_count)
from .hadamard import rotate, signs_like
from .telemetry import record_backward, record_forward

__all__ = ["BLOCK", "weight_2d_scales", "quantize_weight_2d", "weight_2d_operand",
           "nvfp4_operand", "NVFP4Matmul"]

BLOCK = 16


def _tile_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 tile scales ``ŝ_t`` expanded to one per 1x16 row block (``[N, K/16]``, fp32) and the
    fp32 tensor scale ``s_g`` of ``w [N, K]``."""
    n, k = w.shape
    if n % BLOCK or k % BLOCK:
        raise ValueError(f"2-D NVFP4 weight scaling needs dims divisible by {BLOCK}, got {(n, k)}")
    tensor_scale = float_scale(block_amax(w, None), NVFP4_TENSOR_DIVISOR)
    tiles = w.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK).permute(0, 2, 1, 3)
    tile_amax = block_amax(tiles.reshape(n // BLOCK, k // BLOCK, BLOCK * BLOCK), BLOCK * BLOCK)
    s_hat = nvfp4_block_scale(tile_amax.squeeze(-1), tensor_scale, stochastic=False)
    return s_hat.repeat_interleave(BLOCK, dim=0), tensor_scale


def weight_2d_scales(w: torch.Tensor) -> torch.Tensor:
    """Effective scale ``ŝ_t·s_g`` per 16x16 tile of ``w [N, K]``, expanded to one per 1x16 row
    block (shape ``[N, K/16]``) so it can be passed to ``lpdist.quant.quantize(scale=...)``."""
    s_hat, tensor_scale = _tile_scales(w)
    return s_hat * tensor_scale


def quantize_weight_2d(w: torch.Tensor) -> torch.Tensor:
    """``Q2D(w)``: NVFP4 with 16x16 tile scales, RNE (dequantized, in ``w``'s dtype)."""
    return fake_quantize(w, "e2m1", block=BLOCK, scale=weight_2d_scales(w))


def weight_2d_operand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q2D(w)`` as ``(code·ŝ_t, s_g)``: a bf16-exact fp32 operand and the fp32 tensor scale."""
    s_hat, tensor_scale = _tile_scales(w)
    q = quantize(inf_as_nan(w), "e2m1", block=BLOCK, scale=s_hat * tensor_scale)
    return fp4_operand(q, nan_blocks(q, s_hat)), tensor_scale


def nvfp4_operand(t: torch.Tensor, rounding: str = "nearest") -> tuple[QTensor, torch.Tensor]:
    """NVFP4 (1x16 blocks) of ``t``: the :class:`QTensor` and its ``code·ŝ_b`` operand (fp32,
    exact in bf16); the dequantized value is the operand times ``q.tensor_scale``."""
    q = quantize(inf_as_nan(t), "nvfp4", rounding=rounding)
    return q, fp4_operand(q, q.scale.float())


class NVFP4Matmul(torch.autograd.Function):
    """``Y = Q(X)·Q2D(W)ᵀ`` with the NVFP4 backward (emulated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor, track: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
        gd = gemm_dtype(x)
        xq, x_op = nvfp4_operand(x)
        w_op, w_sg = weight_2d_operand(weight)
        y = scaled_mm(x_op, w_op, gemm=gd, alpha=xq.tensor_scale * w_sg).to(out_dtype)
        if track:
            record_forward(stats, x.detach().abs().amax(), weight.detach().abs().amax(),
                           clipped_count(x, xq),
                           underflow_count(x, x_op) + underflow_count(weight, w_op),
                           x.numel() + weight.numel())
        ctx.save_for_backward(x, w_op, w_sg)
        ctx.stats, ctx.track, ctx.dtypes = stats, track, (x.dtype, weight.dtype, gd)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        x, w_op, w_sg = ctx.saved_tensors
        x_dtype, w_dtype, gd = ctx.dtypes
        cd = emulation_dtype(x)
        e = grad_out.to(cd)
        eq, e_op = nvfp4_operand(e, "stochastic")
        grad_x = scaled_mm(e_op, w_op.t(), gemm=gd, alpha=eq.tensor_scale * w_sg).to(x_dtype)
        signs = signs_like(e, BLOCK)
        ewq, ew_op = nvfp4_operand(rotate(e.t(), BLOCK, signs), "stochastic")
        xwq, xw_op = nvfp4_operand(rotate(x.t().to(cd), BLOCK, signs))
        grad_w = scaled_mm(ew_op, xw_op, gemm=gd, alpha=ewq.tensor_scale * xwq.tensor_scale)
        if ctx.track:
            record_backward(ctx.stats, e.abs().amax(), clipped_count(e, eq),
                            underflow_count(e, e_op), e.numel())
        return grad_x, grad_w.to(w_dtype), None, None, None
