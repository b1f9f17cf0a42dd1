"""A SwiGLU MLP of three ``Float8Linear`` projections as one FP8 autograd function.

``y = down(h)`` with ``h = silu(g) ⊙ u``, ``g = gate(x)``, ``u = up(x)`` (ALGORITHMS.md §2.3
without smoothing). Run layer by layer, SwiGLU writes ``h`` in bf16 and the down projection
reads it back twice (amax, then both FP8 casts); in backward SwiGLU writes ``dg`` and ``du``
and the gate and up projections read each back the same way. Here those casts take SwiGLU's
inputs instead (``csrc/fp8_tiles.cu``, sources ``swiglu`` and ``swiglu_grad``): the values are
computed in the kernel that casts them, so ``h``, ``dg`` and ``du`` never exist in bf16, and
``x`` is cast once for both projections. Every GEMM and scaling rule is that of
:class:`~lpdist.nn.Float8Linear` (module ``lpdist.nn.float8_linear``) with ``scaling="tensor"``
or ``"block"``; the values are rounded to the activation dtype before their casts, as the layers
would see them, so the result equals the three layers up to the rounding of SwiGLU's own
arithmetic (fp32 here, with the twin's order of operations below).

SwiGLU's values (the twin of the kernels, fp32, then rounded to the input dtype):
``sig = 1 / (1 + exp(-g))`` (0 where subnormal), ``h = (g · sig) · u``, ``du = dh · (g · sig)``,
``dg = (dh · u) · (sig · (1 + g · (1 - sig)))``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .base_linear import INPUT_DTYPES, output_dtype
from .float8_linear import FWD_FMT, Float8Linear, cast_weight_dgrad, cast_weight_fprop
from .fp8_cast import FP8Cast, both_ways_outputs, cast_fp8_both_ways, fake_both_ways, unpack_both_ways
from .fp8_gemm import fp8_gemm
from .telemetry import record_backward, record_forward

__all__ = ["FUSED_SCALINGS", "float8_swiglu", "fusable", "swiglu_values", "swiglu_grad_values"]

#: Scalings of the fused function (row scaling runs layer by layer).
FUSED_SCALINGS = ("tensor", "block")
_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def _sigmoid(g: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-g))`` in fp32, flushed to 0 where subnormal (g below about -87.3), as the
    CUDA twin does explicitly (GPU reciprocals may flush subnormal results)."""
    sig = torch.reciprocal(1.0 + torch.exp(-g))
    return torch.where(sig < _SMALLEST_NORMAL, torch.zeros((), dtype=sig.dtype, device=sig.device), sig)


def swiglu_values(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor]:
    """``(h,)`` with ``h = silu(g) · u`` computed in fp32 and rounded to ``g``'s dtype."""
    gf = g.float()
    return ((gf * _sigmoid(gf)) * u.float()).to(g.dtype),


def swiglu_grad_values(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)``, the gradients of ``h = silu(g) · u`` for ``∂L/∂h = dh`` (fp32, rounded)."""
    gf, uf, dhf = g.float(), u.float(), dh.float()
    sig = _sigmoid(gf)
    dg = (dhf * uf) * (sig * (1.0 + gf * (1.0 - sig)))
    du = dhf * (gf * sig)
    return dg.to(g.dtype), du.to(g.dtype)


# Custom ops (opaque to torch.compile, like lpdist::fp8_cast_both_ways): the casts of SwiGLU's
# output and of its two gradients, each as (q_row, s_row, q_col, s_col, stats).
_LIBRARY = torch.library.Library("lpdist", "FRAGMENT")
_LIBRARY.define("fp8_swiglu_cast_both_ways(Tensor g, Tensor u, str fmt, int block, bool track) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIBRARY.define("fp8_swiglu_grad_cast_both_ways(Tensor g, Tensor u, Tensor dh, str fmt, int block, bool track) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _swiglu_kernel(g, u, fmt, block, track):
    return tuple(both_ways_outputs("swiglu", (g, u), swiglu_values, fmt, block, track))


def _swiglu_grad_kernel(g, u, dh, fmt, block, track):
    return tuple(both_ways_outputs("swiglu_grad", (g, u, dh), swiglu_grad_values, fmt, block, track))


_LIBRARY.impl("fp8_swiglu_cast_both_ways", _swiglu_kernel, "CompositeExplicitAutograd")
_LIBRARY.impl("fp8_swiglu_grad_cast_both_ways", _swiglu_grad_kernel, "CompositeExplicitAutograd")
torch.library.register_fake("lpdist::fp8_swiglu_cast_both_ways",
                            lambda g, u, fmt, block, track: fake_both_ways(g, fmt, block, track), lib=_LIBRARY)
torch.library.register_fake("lpdist::fp8_swiglu_grad_cast_both_ways",
                            lambda g, u, dh, fmt, block, track: (*fake_both_ways(g, fmt, block, track),
                                                                 *fake_both_ways(g, fmt, block, track)),
                            lib=_LIBRARY)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fusable(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> bool:
    """Whether :func:`float8_swiglu` may replace ``down(silu(gate(x)) * up(x))``: three
    ``Float8Linear`` without bias, of one scaling in :data:`FUSED_SCALINGS` (same ``block``,
    ``grad_fmt`` and ``track_stats``), plain-tensor weights (not sharded DTensors), no forward
    hooks on them (they would not run), and a non-empty input of a layer input dtype."""
    layers = (gate, up, down)
    if not all(type(m) is Float8Linear and m.bias is None and not _has_hooks(m) for m in layers):
        return False
    settings = {(m.scaling, m.block, m.grad_fmt, m.track_stats) for m in layers}
    if len(settings) != 1 or gate.scaling not in FUSED_SCALINGS:
        return False
    if any(isinstance(m.weight, DTensor) for m in layers):  # sharded: only the layers' own forwards gather
        return False
    return (x.dtype in INPUT_DTYPES and x.numel() > 0 and x.shape[-1] == gate.in_features == up.in_features
            and gate.out_features == up.out_features == down.in_features)


def _both_uses(t: torch.Tensor, fmt: str, scaling: str, block: int, track: bool) -> tuple[FP8Cast, FP8Cast]:
    return cast_fp8_both_ways(t, fmt, block if scaling == "block" else None, track=track)


class _Float8SwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) · up(x))`` with FP8 Fprop, Dgrad and Wgrad (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                stats_gate: torch.Tensor, stats_up: torch.Tensor, stats_down: torch.Tensor, scaling: str,
                block: int, grad_fmt: str, track: bool) -> torch.Tensor:
        tile = block if scaling == "block" else 0
        xq, x_wgrad = _both_uses(x, FWD_FMT, scaling, block, track)
        wq = [cast_weight_fprop(w, scaling, block, track) for w in (w_gate, w_up, w_down)]
        g, u = (fp8_gemm(xq, w, scaling, x.dtype, b_blocks=scaling == "block", block=block, fast_accum=True)
                for w in wq[:2])
        hq, h_wgrad = unpack_both_ways(torch.ops.lpdist.fp8_swiglu_cast_both_ways.default(
            g, u, FWD_FMT, tile, track), track)
        y = fp8_gemm(hq, wq[2], scaling, x.dtype, b_blocks=scaling == "block", block=block, fast_accum=True)
        stats = (stats_gate, stats_up, stats_down)
        if track:
            for stat, a, w, n in zip(stats, (xq, xq, hq), wq, (x.numel(), x.numel(), g.numel())):
                record_forward(stat, a.amax, w.amax, a.saturated + w.saturated, a.underflow + w.underflow,
                               n + w.data.numel())
        ctx.save_for_backward(w_gate, w_up, w_down, *(w.scale for w in wq), x_wgrad.data, x_wgrad.scale,
                              g, u, h_wgrad.data, h_wgrad.scale)
        ctx.stats = stats  # written in place by backward; not saved, so no version check
        ctx.config = (scaling, block, grad_fmt, track)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (w_gate, w_up, w_down, s_gate, s_up, s_down, xw_data, xw_scale, g, u, hw_data,
         hw_scale) = ctx.saved_tensors
        scaling, block, grad_fmt, track = ctx.config
        tile = block if scaling == "block" else 0
        b_blocks = scaling == "block"
        e = grad_out.contiguous()
        eq, e_wgrad = _both_uses(e, grad_fmt, scaling, block, track)
        dh = fp8_gemm(eq, cast_weight_dgrad(w_down, scaling, block, s_down), scaling, g.dtype,
                      b_blocks=b_blocks, block=block)
        grad_down = fp8_gemm(e_wgrad, FP8Cast(hw_data, hw_scale), scaling, w_down.dtype, block=block)
        outputs = torch.ops.lpdist.fp8_swiglu_grad_cast_both_ways.default(g, u, dh, grad_fmt, tile, track)
        (gq, g_wgrad), (uq, u_wgrad) = unpack_both_ways(outputs[:5], track), unpack_both_ways(outputs[5:], track)
        x_wgrad = FP8Cast(xw_data, xw_scale)
        grad_x = (fp8_gemm(gq, cast_weight_dgrad(w_gate, scaling, block, s_gate), scaling, g.dtype,
                           b_blocks=b_blocks, block=block)
                  + fp8_gemm(uq, cast_weight_dgrad(w_up, scaling, block, s_up), scaling, g.dtype,
                             b_blocks=b_blocks, block=block))
        grad_gate = fp8_gemm(g_wgrad, x_wgrad, scaling, w_gate.dtype, block=block)
        grad_up = fp8_gemm(u_wgrad, x_wgrad, scaling, w_up.dtype, block=block)
        if track:
            for stat, c in zip(ctx.stats, (gq, uq, eq)):
                record_backward(stat, c.amax, c.saturated, c.underflow, c.data.numel())
        return grad_x, grad_gate, grad_up, grad_down, None, None, None, None, None, None, None


def float8_swiglu(x: torch.Tensor, gate: Float8Linear, up: Float8Linear, down: Float8Linear) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` as one FP8 function (module docstring); the three layers
    must be :func:`fusable` with ``x``. Their telemetry is recorded as if each had run."""
    if not fusable(x, gate, up, down):
        raise ValueError("float8_swiglu needs three Float8Linear projections without bias or hooks, of one "
                         f"scaling in {FUSED_SCALINGS} and shared settings, matching x; use swiglu() otherwise")
    out_dtype = output_dtype(x)
    x2d = x.reshape(-1, gate.in_features)
    if x2d.dtype != out_dtype:
        x2d = x2d.to(out_dtype)
    y = _Float8SwiGLU.apply(x2d, gate.weight, up.weight, down.weight,
                            gate._lp_stats, up._lp_stats, down._lp_stats, gate.scaling, gate.block,
                            gate.grad_fmt, gate.track_stats)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], down.out_features)
