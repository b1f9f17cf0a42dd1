"""``Float8Linear``: a drop-in ``nn.Linear`` whose three GEMMs run in FP8.

With ``X [T, K]``, ``W [N, K]`` and ``E = ∂L/∂Y [T, N]`` (ALGORITHMS.md notation):

* Fprop ``Y = Q(X)·Q(W)ᵀ``, both E4M3, scaled along K;
* Dgrad ``∂L/∂X = Q_g(E)·Q(W)``, scaled along N;
* Wgrad ``∂L/∂W = Q_g(E)ᵀ·Q(X)``, scaled along T;

``Q_g`` uses ``grad_fmt`` (E5M2 by default, the hybrid FP8 recipe of Micikevicius et al., "FP8
Formats for Deep Learning", arXiv 2209.05433; E4M3 as in DeepSeek-V3, arXiv 2412.19437).
Scales are dynamic (current amax, ``s = amax/F_max``, §1.2) with one of three granularities,
always taken along each GEMM's own reduction dim:

* ``"tensor"``: one scale per tensor (the same cast serves X and Xᵀ, W and Wᵀ);
* ``"row"``: one scale per row of each operand, i.e. per token / output channel along K in
  Fprop, per token / input channel along N in Dgrad, per output / input channel along T in
  Wgrad (so X and E are cast twice, once per direction);
* ``"block"``: DeepSeek-V3 (ALGORITHMS.md §7): 1x``block`` tiles for activations and gradients
  (128x1 tiles along T for the Wgrad operands), ``block``x``block`` tiles for the weight.

With ``scaling="tensor"`` and ``amax_history=n > 0``, X and E are scaled instead with the
largest amax of their last ``n`` steps (delayed scaling, ``fp8_cast.cast_fp8_with_history``;
the weight keeps its current amax): the first forward and backward of the layer scale with the
current amax and fill the histories, every later one reads them (a forward without autograd,
e.g. an evaluation, fills the input history only). The histories are non-persistent buffers
(the ``state_dict`` stays ``nn.Linear``'s), so a layer rebuilt from a checkpoint starts again
with one current-amax step. Every forward and backward records an amax:
under activation checkpointing the recomputed forward would record (and scale) once more, so
keep delayed scaling out of checkpointed regions; DDP's default ``broadcast_buffers`` gives
every rank rank 0's histories at each forward.

The GEMMs run on FP8 tensor cores through ``torch._scaled_mm`` / ``F.scaled_mm`` on GPUs that
have them and are emulated exactly elsewhere (``lpdist.nn.fp8_gemm``). For backward only FP8
tensors are saved (the Wgrad copy of X, already transposed), plus the weight parameter itself,
which ``nn.Linear`` saves too (under FSDP2 it is the re-gathered unsharded weight), and its
forward scales: Dgrad re-casts W transposed with them (per-tensor and 128x128-block scales of W
and Wᵀ are the same), so no amax pass over W is repeated. Forward uses fast accumulation; the
backward GEMMs do not. The GEMMs are ``lpdist.nn.fp8_gemm.fp8_gemm``: on tensor cores compiled
and eager runs take the same cuBLASLt GEMM.
"""

from __future__ import annotations

import torch

from .base_linear import LowPrecisionLinear, check_features
from .fp8_cast import FP8_FORMATS, FP8Cast, cast_fp8, cast_fp8_blocks, cast_fp8_both_ways, cast_fp8_with_history
from .fp8_gemm import SCALING_KINDS, fp8_gemm
from .telemetry import record_backward, record_forward

__all__ = ["Float8Linear"]

_FWD_FMT = "e4m3"


def _group(scaling: str, block: int, n: int) -> int | None:
    """Scale group length along an operand's last (reduction) dim for this scaling."""
    return {"tensor": None, "row": n, "block": block}[scaling]


def _transposed(c: FP8Cast) -> FP8Cast:
    """A per-tensor cast of ``x`` reused as the cast of ``xᵀ`` (row-major copy of the data)."""
    return c._replace(data=c.data.t().contiguous())


def _cast_weight_fprop(w: torch.Tensor, scaling: str, block: int, track: bool) -> FP8Cast:
    if scaling == "block":
        return cast_fp8_blocks(w, _FWD_FMT, block, track=track)
    return cast_fp8(w, _FWD_FMT, _group(scaling, block, w.shape[1]), track=track)


def _cast_weight_dgrad(w: torch.Tensor, scaling: str, block: int,
                       fprop_scale: torch.Tensor) -> FP8Cast:
    """W as the ``[K, N]`` row-major B operand of Dgrad, scaled along N. Per-tensor and
    128x128-block scales are those of the forward cast (W and Wᵀ share them), so only row
    scaling takes a new amax; the cast writes the transposed layout directly."""
    if scaling == "row":
        c = cast_fp8(w.t(), _FWD_FMT, w.shape[0])
        return c._replace(data=c.data.contiguous())
    if scaling == "block":
        c = cast_fp8_blocks(w.t(), _FWD_FMT, block, scale=fprop_scale.t())
    else:
        c = cast_fp8(w.t(), _FWD_FMT, scale=fprop_scale)
    return c._replace(data=c.data.contiguous())


def _cast_both_uses(t2d: torch.Tensor, fmt: str, scaling: str, block: int, track: bool,
                    history: torch.Tensor | None = None, delayed: bool = False) -> tuple[FP8Cast, FP8Cast]:
    """``t2d [T, C]`` as the operand scaled along C (Fprop or Dgrad) and as the ``[C, T]``
    row-major Wgrad operand scaled along T. Block scaling casts both from one read of each
    tile; per-tensor scaling reuses the first cast transposed (with an amax ``history``: its
    scale, delayed or current, from ``cast_fp8_with_history``)."""
    if history is not None:
        cast = cast_fp8_with_history(t2d, fmt, history, delayed=delayed, track=track)
        return cast, _transposed(cast)
    if scaling == "block":
        return cast_fp8_both_ways(t2d, fmt, block, track=track)
    along_c = cast_fp8(t2d, fmt, _group(scaling, block, t2d.shape[1]), track=track)
    if scaling == "tensor":
        return along_c, _transposed(along_c)
    c = cast_fp8(t2d.t(), fmt, t2d.shape[0])
    return along_c, c._replace(data=c.data.contiguous())


class _Float8Matmul(torch.autograd.Function):
    """``Y = X·Wᵀ`` with FP8 Fprop, Dgrad and Wgrad (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stats: torch.Tensor, scaling: str,
                block: int, grad_fmt: str, track: bool, out_dtype: torch.dtype,
                x_history: torch.Tensor | None, grad_history: torch.Tensor | None,
                x_delayed: bool, grad_delayed: bool) -> torch.Tensor:
        xq, x_wgrad = _cast_both_uses(x, _FWD_FMT, scaling, block, track, x_history, x_delayed)
        wq = _cast_weight_fprop(weight, scaling, block, track)
        y = fp8_gemm(xq, wq, scaling, out_dtype, b_blocks=scaling == "block", block=block,
                     fast_accum=True)
        if track:
            record_forward(stats, xq.amax, wq.amax, xq.saturated + wq.saturated,
                           xq.underflow + wq.underflow, x.numel() + weight.numel())
        ctx.save_for_backward(weight, wq.scale, x_wgrad.data, x_wgrad.scale)
        ctx.stats = stats  # written in place by backward; not saved, so no version check
        ctx.grad_history = grad_history  # likewise
        ctx.config = (scaling, block, grad_fmt, track, x.dtype, grad_delayed)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, w_scale, xw_data, xw_scale = ctx.saved_tensors
        stats = ctx.stats
        scaling, block, grad_fmt, track, x_dtype, grad_delayed = ctx.config
        e = grad_out.contiguous()
        eq, e_wgrad = _cast_both_uses(e, grad_fmt, scaling, block, track, ctx.grad_history, grad_delayed)
        w_dgrad = _cast_weight_dgrad(weight, scaling, block, w_scale)
        grad_x = fp8_gemm(eq, w_dgrad, scaling, x_dtype, b_blocks=scaling == "block", block=block)
        grad_w = fp8_gemm(e_wgrad, FP8Cast(xw_data, xw_scale), scaling, weight.dtype, block=block)
        if track:
            record_backward(stats, eq.amax, eq.saturated, eq.underflow, e.numel())
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None


class Float8Linear(LowPrecisionLinear):
    """``nn.Linear`` with FP8 forward and backward GEMMs and dynamic scaling.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (same parameters and
            ``state_dict`` keys).
        scaling: ``"tensor"`` | ``"row"`` | ``"block"`` (see the module docstring).
        block: tile size for ``scaling="block"`` (128 in DeepSeek-V3; the tensor-core path needs
            128 and all GEMM dims divisible by it, other sizes run emulated).
        grad_fmt: ``"e5m2"`` | ``"e4m3"``, the format of the output gradient in backward. The
            block-scaled tensor-core GEMM takes E4M3 only; use ``grad_fmt="e4m3"`` with it.
        track_stats: keep :meth:`last_stats` telemetry (device tensors, no host sync).
        amax_history: ``0`` (default): current scaling; ``n > 0`` (``scaling="tensor"`` only):
            delayed scaling of X and E from the largest amax of their last ``n`` steps (see the
            module docstring; Transformer Engine's DelayedScaling keeps 1024, 16 is common).
    """

    #: Buffers kept in fp32 whatever the module's dtype.
    _fp32_buffers = ("_lp_stats", "_x_amax_history", "_grad_amax_history")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 scaling: str = "tensor", block: int = 128, grad_fmt: str = "e5m2",
                 track_stats: bool = True, amax_history: int = 0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        check_features(in_features, out_features)
        if scaling not in SCALING_KINDS:
            raise ValueError(f"scaling must be one of {SCALING_KINDS}, got {scaling!r}")
        if grad_fmt not in FP8_FORMATS:
            raise ValueError(f"grad_fmt must be one of {FP8_FORMATS}, got {grad_fmt!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        if scaling == "block" and (in_features % block or out_features % block):
            raise ValueError(f"scaling='block' needs in_features ({in_features}) and "
                             f"out_features ({out_features}) divisible by block={block}")
        if isinstance(amax_history, bool) or not isinstance(amax_history, int) or amax_history < 0:
            raise ValueError(f"amax_history must be an int >= 0, got {amax_history!r}")
        if amax_history and scaling != "tensor":
            raise ValueError(f"amax_history (delayed scaling) needs scaling='tensor', got scaling={scaling!r}")
        super().__init__(in_features, out_features, bias, track_stats=track_stats, device=device,
                         dtype=dtype)
        self.scaling, self.block, self.grad_fmt, self.amax_history = scaling, block, grad_fmt, amax_history
        for name in ("_x_amax_history", "_grad_amax_history"):
            self.register_buffer(name, torch.zeros(amax_history, device=self.weight.device) if amax_history else None,
                                 persistent=False)
        #: Whether the input / gradient history holds a step (then the cast of X / E is delayed).
        #: Separate, as a forward without autograd (evaluation) records X but has no backward.
        self.x_history_filled = self.grad_history_filled = False

    def _matmul(self, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if x2d.dtype != out_dtype and torch.is_autocast_enabled(x2d.device.type):
            x2d = x2d.to(out_dtype)
        delayed = (self.x_history_filled, self.grad_history_filled)
        if self.amax_history:
            self.x_history_filled = True
            if torch.is_grad_enabled() and (x2d.requires_grad or self.weight.requires_grad):
                self.grad_history_filled = True  # by this forward's backward, before the next forward
        return _Float8Matmul.apply(x2d, self.weight, self._lp_stats, self.scaling, self.block,
                                   self.grad_fmt, self.track_stats, out_dtype, self._x_amax_history,
                                   self._grad_amax_history, *delayed)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scaling={self.scaling!r}, grad_fmt={self.grad_fmt!r}"
                + (f", block={self.block}" if self.scaling == "block" else "")
                + (f", amax_history={self.amax_history}" if self.amax_history else ""))
