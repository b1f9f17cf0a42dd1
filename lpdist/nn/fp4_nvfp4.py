"""NVIDIA NVFP4 training recipe (arXiv 2509.25149; ALGORITHMS.md §1.4, §5).

* Elements E2M1 in 16-blocks along each GEMM's reduction dim, UE4M3 block scales times one fp32
  tensor scale: ``s_g = amax/(6·448)``, ``ŝ_b = q_E4M3(amax_b/6/s_g)``, ``x ≈ q·ŝ_b·s_g``.
* Weights use 16x16 2-D tiles (one ``ŝ`` per 256 elements), so the quantized W serves Fprop and
  Dgrad alike (``Q2D(W)ᵀ == Q2D(Wᵀ)``). Activations and gradients use 1x16 blocks.
* Round-to-nearest-even for weights and activations, stochastic rounding for gradients.
* Wgrad only: a random Hadamard transform ``H16·diag(r)`` along the token dim on both operands
  (the activation's and the gradient's column-wise copies); r is drawn in the forward pass and
  reused by its backward, so the transform cancels in ``Eᵀ·X``.
"""

from __future__ import annotations

import torch

from ..quant import fake_quantize, quantize
from ..quant.scaling import NVFP4_TENSOR_DIVISOR, block_amax, float_scale, nvfp4_block_scale
from .fp4_emulation import clipped_count, emulated_mm, emulation_dtype, underflow_count
from .hadamard import random_signs, rotate
from .telemetry import record_backward, record_forward

__all__ = ["BLOCK", "weight_2d_scales", "quantize_weight_2d", "NVFP4Matmul"]

BLOCK = 16
_FP4_MAX = 6.0


def weight_2d_scales(w: torch.Tensor) -> torch.Tensor:
    """Effective scale ``ŝ_t·s_g`` per 16x16 tile of ``w [N, K]``, expanded to one per 1x16 row
    block (shape ``[N, K/16]``) so it can be passed to ``lpdist.quant.quantize(scale=...)``."""
    n, k = w.shape
    if n % BLOCK or k % BLOCK:
        raise ValueError(f"2-D NVFP4 weight scaling needs dims divisible by {BLOCK}, got {(n, k)}")
    tensor_scale = float_scale(block_amax(w, None), NVFP4_TENSOR_DIVISOR)
    tiles = w.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK).permute(0, 2, 1, 3)
    tile_amax = block_amax(tiles.reshape(n // BLOCK, k // BLOCK, BLOCK * BLOCK), BLOCK * BLOCK)
    tile_amax = tile_amax.squeeze(-1)
    s_hat = nvfp4_block_scale(tile_amax, tensor_scale, stochastic=False)
    return (s_hat * tensor_scale).repeat_interleave(BLOCK, dim=0)


def quantize_weight_2d(w: torch.Tensor) -> torch.Tensor:
    """``Q2D(w)``: NVFP4 with 16x16 tile scales, RNE (dequantized, in ``w``'s dtype)."""
    return fake_quantize(w, "e2m1", block=BLOCK, scale=weight_2d_scales(w))


class NVFP4Matmul(torch.autograd.Function):
    """``Y = Q(X)·Q2D(W)ᵀ`` with the NVFP4 backward (emulated)."""

    @staticmethod
    def forward(ctx, x, weight, stats, track: bool, out_dtype: torch.dtype):
        cd = emulation_dtype(x)
        xq = quantize(x, "nvfp4")
        x_hat = xq.dequantize(cd)
        w_hat = quantize_weight_2d(weight).to(cd)
        y = emulated_mm(x_hat, w_hat, cd).to(out_dtype)
        signs = random_signs(BLOCK, device=x.device)
        x_wgrad = fake_quantize(rotate(x.t().to(cd), BLOCK, signs), "nvfp4")
        if track:
            record_forward(stats, x.detach().abs().amax(), weight.detach().abs().amax(),
                           clipped_count(x, xq),
                           underflow_count(x, x_hat) + underflow_count(weight, w_hat),
                           x.numel() + weight.numel())
        ctx.save_for_backward(w_hat, x_wgrad, signs)
        ctx.stats, ctx.track, ctx.dtypes = stats, track, (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        w_hat, x_wgrad, signs = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        cd = w_hat.dtype
        e = grad_out.to(cd)
        eq = quantize(e, "nvfp4", rounding="stochastic")
        e_hat = eq.dequantize(cd)
        grad_x = emulated_mm(e_hat, w_hat.t(), cd).to(x_dtype)
        e_wgrad = fake_quantize(rotate(e.t(), BLOCK, signs), "nvfp4", rounding="stochastic")
        grad_w = emulated_mm(e_wgrad, x_wgrad, cd).to(w_dtype)
        if ctx.track:
            record_backward(ctx.stats, e.abs().amax(), clipped_count(e, eq),
                            underflow_count(e, e_hat), e.numel())
        return grad_x, grad_w, None, None, None
