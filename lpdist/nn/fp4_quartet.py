"""Quartet (Castro et al., arXiv 2505.14669; ALGORITHMS.md §4): all three GEMMs in MXFP4.

Forward (QuEST, §4.1), for X and W along K: rotate every 32-group by ``H32/√32``; scale per
group ``X_g = 2^⌊log2(c·σ_g + 1e-8)⌋`` with ``c = 2.92247856/6`` (the RMSE-optimal Gaussian clip,
σ_g the population standard deviation of the rotated group); round to E2M1 (RNE, saturating at
±6). The trust mask ``M = |x_rot/X_g| < 6`` gates the straight-through gradient, which is rotated
back with ``Hᵀ``.

Backward (§4.2): both operands of each backward GEMM are re-quantized along that GEMM's
reduction dim (N for Dgrad, tokens for Wgrad) after a randomized Hadamard rotation
``H32·diag(r)`` with fresh signs r every call (applied to both operands, so it cancels), with the
non-clipping 3/4 scale ``2^(⌊log2 amax_g⌋ - 2)·4/3`` and unbiased stochastic rounding:
``∂L/∂X_rot = Q(E)·Q(W_qᵀ)ᵀ``, ``∂L/∂W_rot = Q(Eᵀ)·Q(X_qᵀ)ᵀ``. Each result is masked with its
operand's forward trust mask and rotated back.

Exact bf16 emulation (:mod:`lpdist.nn.fp4_emulation`): forward operands are ``code·X_g`` with a
power-of-two ``X_g``; backward operands are ``code·2^⌊log2 amax_g⌋`` (the E8M0 part of the 3/4
scale ``2^⌊log2 amax_g⌋/3``), and the two factors 1/3 become the GEMM alpha 1/9 (§4.2).
"""

from __future__ import annotations

import torch

from ..quant import fake_quantize, quantize
from ..quant.formats import floor_log2
from ..quant.scaling import to_blocks
from .fp4_emulation import E2M1_MAX, emulation_dtype, fp4_operand, gemm_dtype, nan_blocks, scaled_mm, underflow_count
from .hadamard import rotate, rotate_transposed, signs_like, unrotate
from .telemetry import record_backward, record_forward

__all__ = ["QUEST_C", "GROUP", "BACKWARD_FACTOR", "quest_scale", "quest_quantize",
           "backward_scale", "backward_quantize", "QuartetMatmul"]

QUEST_C = 2.92247856 / 6.0
GROUP = 32
BACKWARD_FACTOR = 1.0 / 3.0  # 3/4 scale 2^(⌊log2 amax⌋ - 2)·4/3 = E8M0 part 2^⌊log2 amax⌋ times 1/3


def _pow2_floor(v: torch.Tensor) -> torch.Tensor:
    """``2^⌊log2 v⌋`` for positive fp32 ``v`` (exact, read from the exponent bits)."""
    return torch.exp2(floor_log2(v.float()).float())


def quest_scale(x_rot: torch.Tensor) -> torch.Tensor:
    """QuEST group scales ``2^⌊log2(c·σ_g + 1e-8)⌋``, shape ``[..., n/32]``."""
    sigma = to_blocks(x_rot.float(), GROUP).std(dim=-1, correction=0)
    return _pow2_floor(QUEST_C * sigma + 1e-8)


def quest_quantize(x_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QuEST quantization of a rotated operand: ``(dequantized values, trust mask)``."""
    scale = quest_scale(x_rot)
    x_hat = fake_quantize(x_rot, "e2m1", block=GROUP, scale=scale)
    n = x_rot.shape[-1]
    scaled = (to_blocks(x_rot.float(), GROUP) / scale.unsqueeze(-1)).reshape(*x_rot.shape[:-1], -1)
    return x_hat, scaled[..., :n].abs() < E2M1_MAX


def _e8m0_part(t: torch.Tensor) -> torch.Tensor:
    """``2^⌊log2 amax_g⌋`` per 32-group of ``t`` (1 for all-zero groups)."""
    amax = to_blocks(t.float().abs(), GROUP).amax(dim=-1)
    return torch.where(amax > 0, _pow2_floor(amax), torch.ones_like(amax))


def backward_scale(t: torch.Tensor) -> torch.Tensor:
    """Tseng 3/4 group scales ``2^(⌊log2 amax_g⌋ - 2)·4/3 = 2^⌊log2 amax_g⌋/3`` (scaled amax in
    [3, 6)); 1/3 for all-zero groups."""
    return _e8m0_part(t) * BACKWARD_FACTOR


def backward_quantize(t: torch.Tensor, signs: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """Rotate ``t`` (``t.t()`` when ``transpose``) along its last dim by ``H32·diag(signs)``, then
    MXFP4 with 3/4 scales and stochastic rounding. Returns ``code·2^⌊log2 amax_g⌋`` (fp32, exact
    in bf16; the last dim is padded to a multiple of 32): the dequantized value is that times
    :data:`BACKWARD_FACTOR`."""
    t_rot = rotate_transposed(t, GROUP, signs) if transpose else rotate(t, GROUP, signs)
    e8m0 = _e8m0_part(t_rot)
    q = quantize(t_rot, "e2m1", block=GROUP, scale=e8m0 * BACKWARD_FACTOR, rounding="stochastic")
    return fp4_operand(q, nan_blocks(q, e8m0)).to(emulation_dtype(t))


class QuartetMatmul(torch.autograd.Function):
    """``Y = Q(X H)·Q(W H)ᵀ`` with the Quartet backward (emulated MXFP4)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor, track: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
        cd, gd = emulation_dtype(x), gemm_dtype(x)
        x_rot, w_rot = rotate(x.to(cd), GROUP), rotate(weight.to(cd), GROUP)
        x_hat, x_mask = quest_quantize(x_rot)  # code·X_g: exact in bf16
        w_hat, w_mask = quest_quantize(w_rot)
        y = scaled_mm(x_hat, w_hat, gemm=gd).to(out_dtype)
        if track:
            record_forward(stats, x.detach().abs().amax(), weight.detach().abs().amax(),
                           (~x_mask).sum(dtype=torch.float32) + (~w_mask).sum(dtype=torch.float32),
                           underflow_count(x_rot, x_hat) + underflow_count(w_rot, w_hat),
                           x_rot.numel() + w_rot.numel())
        ctx.save_for_backward(x_hat, w_hat, x_mask, w_mask)
        ctx.stats, ctx.track = stats, track
        ctx.shapes = (x.shape[-1], x.dtype, weight.dtype, gd)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        x_hat, w_hat, x_mask, w_mask = ctx.saved_tensors
        k, x_dtype, w_dtype, gd = ctx.shapes
        cd = x_hat.dtype
        e = grad_out.to(cd)
        alpha = BACKWARD_FACTOR * BACKWARD_FACTOR
        signs_n = signs_like(e, GROUP)
        grad_x_rot = scaled_mm(backward_quantize(e, signs_n),
                               backward_quantize(w_hat, signs_n, transpose=True), gemm=gd, alpha=alpha)
        signs_t = signs_like(e, GROUP)
        grad_w_rot = scaled_mm(backward_quantize(e, signs_t, transpose=True),
                               backward_quantize(x_hat, signs_t, transpose=True), gemm=gd, alpha=alpha)
        grad_x = unrotate(grad_x_rot * x_mask, GROUP, size=k).to(x_dtype)
        grad_w = unrotate(grad_w_rot * w_mask, GROUP, size=k).to(w_dtype)
        if ctx.track:
            zero = torch.zeros((), device=e.device)
            record_backward(ctx.stats, e.abs().amax(), zero, zero, e.numel())
        return grad_x, grad_w, None, None, None
