"""Microsoft FP4 recipe (Wang et al., arXiv 2501.17116; ALGORITHMS.md §3).

Forward ``Y = X̃·Q4(W)ᵀ``:

* weights: E2M1 absmax per output channel, ``Q4(w) = q(w·γ)/γ`` with ``γ = 6/amax`` over K (§3.1-3.2);
* activations: outlier clamping and compensation (OCC, §3.4) per token: with index quantiles
  ``lo = sorted(x)[⌊(1-α)K⌋]``, ``hi = sorted(x)[⌊αK⌋]``, ``X_c = clamp(X, lo, hi)`` is quantized
  per token and the sparse residual ``ΔX = X - X_c`` is added back in high precision,
  ``X̃ = Q4(X_c) + ΔX`` (the reference simulator's residual compensation; α = 0.99). ALGORITHMS.md
  §0 computes the residual's product in bf16; here ``ΔX`` rides in X̃, whose bf16 GEMM operands
  carry it to 2^-16 relative (see below): a little more precise than one bf16 term.

Backward: Dgrad ``E·Q4(W)`` (straight-through for X); Wgrad uses the Differentiable Gradient
Estimator (§3.3): ``∂L/∂W = (Eᵀ·X̃) ⊙ f'(W·γ)`` with, inside each E2M1 quantization interval of
width δ and offset x from its lower grid point,
``f'(x) = (1/k)·|2x/δ - 1|^(1/k - 1)``, clipped at 3 (k = 5). Intervals in the scaled domain:
δ = 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]; mirrored for negatives; 0 outside [-6, 6].
The output gradient E stays in the compute precision (the paper quantizes the GEMM inputs W and
X to FP4; gradients are FP8 only in communication, which ``Recipe.grad_comm`` covers).

bf16 emulation (:mod:`lpdist.nn.fp4_emulation`): the absmax scales are exact fp32 divisions
(not powers of two), so only the Fprop weight factors exactly (E2M1 codes as the operand, the
per-output-channel scale on the output). Dgrad reduces over output channels (W's scale varies
along it), Wgrad over tokens (X̃'s per-token scale and the OCC residual vary along it): there Ŵ
and X̃ are split into two bf16 terms each (:func:`~lpdist.nn.fp4_emulation.split_operand`,
≤ 2^-16 relative error per element, below the fp32 accumulation error K·2^-24 for K ≥ 256), and
E is already bf16 in bf16 training. Six bf16 GEMMs instead of three fp32 ones.
"""

from __future__ import annotations

import math

import torch

from ..quant import quantize
from .fp4_emulation import (E2M1_MAX, emulation_dtype, gemm_dtype, inf_as_nan, scaled_mm, split_operand,
                            underflow_count)
from .telemetry import record_backward, record_forward

__all__ = ["dge_derivative", "occ_clamp", "DGEMatmul", "OCC_ALPHA", "DGE_K", "DGE_CLAMP"]

OCC_ALPHA = 0.99
DGE_K = 5.0
DGE_CLAMP = 3.0


def dge_derivative(v: torch.Tensor, k: float = DGE_K, clamp: float = DGE_CLAMP) -> torch.Tensor:
    """``f'(v)`` of the DGE surrogate at scaled values ``v`` (see the module docstring)."""
    a = v.abs()
    delta = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(a.dtype)
    base = torch.where(a < 2, 0.0, torch.where(a < 4, 2.0, 4.0)).to(a.dtype)
    lower = base + torch.floor((a - base) / delta) * delta
    lower = torch.where(a >= E2M1_MAX, a.new_tensor(4.0), lower)  # 6 is the end of [4, 6]
    t = (2 * (a - lower) / delta - 1).abs()
    d = (t.pow(1.0 / k - 1.0) / k).clamp(max=clamp)
    return torch.where(a <= E2M1_MAX, d, torch.zeros_like(d))


def _quantile_index(q: float, n: int) -> int:
    """``⌊q·n⌋`` robust to binary fractions like 0.29·100 = 28.999…, capped at ``n - 1``."""
    return min(n - 1, int(math.floor(q * n + 1e-9)))


# Rows up to this length are sorted whole; wider ones take two top-k selections. On one H200
# (fp32 [T, K], both statistics): K=768 sort 1.30 ms, top-k 2.08, two kthvalue 2.55; K=2048
# 2.63 / 3.31 / 4.96 ms (T=32768); K=5632 (T=8192) 3.81 / 1.93 / 2.71 ms. All give the same values.
_SORT_MAX_ROW = 2048


def _row_order_statistics(x: torch.Tensor, i_lo: int, i_hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorted(row)[i_lo]`` and ``sorted(row)[i_hi]`` of every row of ``x`` (ascending order,
    0-based, ``i_lo <= i_hi``), shaped ``[..., 1]``."""
    n = x.shape[-1]
    if n <= _SORT_MAX_ROW:
        ordered = torch.sort(x, dim=-1).values
        return ordered[..., i_lo:i_lo + 1], ordered[..., i_hi:i_hi + 1]
    lo = torch.topk(x, i_lo + 1, dim=-1, largest=False).values[..., -1:]
    hi = torch.topk(x, n - i_hi, dim=-1, largest=True).values[..., -1:]
    return lo, hi


def occ_clamp(x: torch.Tensor, alpha: float = OCC_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp each row of ``x`` to its index quantiles (§3.4); returns ``(x_c, x - x_c)``."""
    if not 0.5 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0.5, 1], got {alpha!r}")
    n = x.shape[-1]
    lo, hi = _row_order_statistics(x, _quantile_index(1.0 - alpha, n), _quantile_index(alpha, n))
    x_c = torch.minimum(torch.maximum(x, lo), hi)
    return x_c, x - x_c


class DGEMatmul(torch.autograd.Function):
    """``Y = X̃·Q4(W)ᵀ`` with the DGE weight gradient (emulated FP4)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor, track: bool,
                out_dtype: torch.dtype) -> torch.Tensor:
        cd, gd = emulation_dtype(x), gemm_dtype(x)
        xf = x.to(cd)
        x_c, residual = occ_clamp(xf, OCC_ALPHA)
        x_hat = quantize(x_c, "e2m1", block=x.shape[-1]).dequantize(cd) + residual
        wq = quantize(inf_as_nan(weight), "e2m1", block=weight.shape[-1])
        w_hat = wq.dequantize(cd)
        wf = weight.detach().to(cd)
        w_amax = wf.abs().amax(dim=1, keepdim=True)
        # W·γ with γ = 6/amax per output channel; clamp the 1-ulp overshoot of the amax element.
        w_scaled = wf * (E2M1_MAX / w_amax.clamp_min(torch.finfo(cd).tiny))
        w_scaled = w_scaled.clamp(-E2M1_MAX, E2M1_MAX)
        y = scaled_mm(split_operand(x_hat, gd), wq.values(), gemm=gd,
                      col_scale=wq.scales().squeeze(-1)).to(out_dtype)
        if track:
            record_forward(stats, xf.abs().amax(), w_amax.amax(),
                           (residual != 0).sum(dtype=torch.float32),
                           underflow_count(x_c, x_hat - residual) + underflow_count(weight, w_hat),
                           x.numel() + weight.numel())
        ctx.save_for_backward(x_hat, w_hat, dge_derivative(w_scaled))
        ctx.stats, ctx.track, ctx.dtypes = stats, track, (x.dtype, weight.dtype, gd)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        x_hat, w_hat, fprime = ctx.saved_tensors
        x_dtype, w_dtype, gd = ctx.dtypes
        e = grad_out if gd == torch.bfloat16 else grad_out.to(x_hat.dtype)
        grad_x = scaled_mm(split_operand(e, gd), split_operand(w_hat.t(), gd), gemm=gd)
        grad_w = scaled_mm(split_operand(e.t(), gd), split_operand(x_hat.t(), gd), gemm=gd)
        grad_w = grad_w * fprime
        if ctx.track:
            zero = torch.zeros((), device=grad_out.device)
            record_backward(ctx.stats, grad_out.abs().amax().float(), zero, zero, grad_out.numel())
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None, None
