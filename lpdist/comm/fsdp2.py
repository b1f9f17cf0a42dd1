"""FSDP2 integration: FP8 gradient reduce-scatter and FP8 parameter all-gather.

``FP8ReduceScatter`` implements FSDP2's ``ReduceScatter`` comm interface
(``torch.distributed.fsdp._fully_shard._fsdp_api``; installed with
``FSDPModule.set_custom_reduce_scatter``). FSDP2's ``foreach_reduce`` calls it as
``comm(output_tensor=..., input_tensor=..., group=..., op=...)`` with a flat buffer in the
``MixedPrecisionPolicy.reduce_dtype`` (or the gradient dtype) and passes the averaging in the
op: ``ReduceOp.AVG``, ``ReduceOp.PREMUL_SUM(1/factor)`` for ``set_gradient_divide_factor``,
or ``ReduceOp.SUM`` with FSDP's own pre/post division (fp16 reduce dtypes, forced-sum setups,
older torch releases). All three are honored; FSDP's own divisions run outside the comm, so
they compose unchanged. ``check_finite=True``: a non-finite gradient on any rank raises
``FloatingPointError`` on every rank before anything is sent (default: it arrives as NaN).

Error feedback (``error_feedback=True``) keeps one residual per FSDP parameter group (one
``FP8ReduceScatter`` instance per FSDP module) and per reduce-scatter size. It costs one
unsharded gradient of memory per group on every rank (in ``residual_dtype``, default the reduce
dtype), which is why it is off by default.

``FP8AllGather`` implements ``AllGather`` for ``set_custom_all_gather``: parameters are gathered
as fp8 codes plus block scales (about half the bytes of bf16), so **the gathered weights are
lossy** (every rank computes with the same ``decode(Q(w))``); the sharded fp32/bf16 parameters
and the optimizer are untouched. FSDP2 gathers raw bytes (uint8) when a group mixes dtypes;
such a group is gathered exactly, without compression.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from .collectives import _check_options, all_gather, reduce_scatter
from .compat import all_gather_single

__all__ = ["FP8ReduceScatter", "FP8AllGather", "enable_fp8_reduce_scatter", "enable_fp8_all_gather"]


class _EmptyAllocMixin:
    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Plain caching-allocator buffers (the comm adds its own wire buffers)."""
        return torch.empty(size, dtype=dtype, device=device)


class FP8ReduceScatter(_EmptyAllocMixin, ReduceScatter):
    """FSDP2 reduce-scatter that sends gradients in FP8 (see ``lpdist.comm.reduce_scatter``)."""

    def __init__(self, *, fmt: str = "e4m3", block: int = 256, transport: str = "all_to_all",
                 rounding: str = "nearest", error_feedback: bool = False,
                 residual_dtype: torch.dtype | None = None, check_finite: bool = False) -> None:
        _check_options(fmt, block, rounding, transport)
        if residual_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"residual_dtype must be None or a float dtype, got {residual_dtype!r}")
        self.fmt, self.block, self.transport, self.rounding = fmt, block, transport, rounding
        self.error_feedback = bool(error_feedback)
        self.check_finite = bool(check_finite)
        self.residual_dtype = residual_dtype
        self.residuals: dict[tuple, torch.Tensor] = {}

    def _residual(self, input_tensor: torch.Tensor) -> torch.Tensor | None:
        if not self.error_feedback:
            return None
        dtype = self.residual_dtype or input_tensor.dtype
        if dtype not in (torch.float32, input_tensor.dtype):
            dtype = torch.float32
        key = (input_tensor.numel(), input_tensor.dtype, input_tensor.device)
        if key not in self.residuals:
            self.residuals[key] = torch.zeros(input_tensor.shape, dtype=dtype, device=input_tensor.device)
        return self.residuals[key]

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op, async_op: bool = False) -> None:
        # FSDP2 only waits on real ``dist.Work`` objects, so the call completes before returning
        # (stream-ordered on CUDA, like any NCCL collective issued on FSDP's reduce-scatter stream).
        reduce_scatter(output_tensor, input_tensor, group, op=op, fmt=self.fmt, block=self.block,
                       transport=self.transport, rounding=self.rounding,
                       residual=self._residual(input_tensor), check_finite=self.check_finite)
        return None


class FP8AllGather(_EmptyAllocMixin, AllGather):
    """FSDP2 all-gather of parameters in FP8 (lossy for the gathered weights)."""

    def __init__(self, *, fmt: str = "e4m3", block: int = 256) -> None:
        _check_options(fmt, block, "nearest")
        self.fmt, self.block = fmt, block

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> None:
        if input_tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            all_gather_single(output_tensor, input_tensor, group=group)
            return None
        all_gather(output_tensor, input_tensor.contiguous(), group, fmt=self.fmt, block=self.block)
        return None


def _fsdp_modules_with_params(model: nn.Module) -> list[FSDPModule]:
    found = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch releases with one param group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        if groups:
            found.append(module)
    return found


def _require_fsdp2(model: nn.Module, method: str) -> list[FSDPModule]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = _fsdp_modules_with_params(model)
    if not modules:
        raise ValueError("model has no FSDP2 module with parameters; call fully_shard(...) first")
    if not hasattr(modules[0], method):
        raise RuntimeError(f"this torch release has no FSDPModule.{method} (torch >= 2.11 needed)")
    return modules


def enable_fp8_reduce_scatter(model: nn.Module, **cfg) -> int:
    """Install an ``FP8ReduceScatter(**cfg)`` on every FSDP2 module of ``model`` with parameters.

    Each module gets its own instance, so error-feedback residuals stay per parameter group.
    Returns the number of modules patched.
    """
    modules = _require_fsdp2(model, "set_custom_reduce_scatter")
    comms = [FP8ReduceScatter(**cfg) for _ in modules]  # validate before changing anything
    for module, comm in zip(modules, comms):
        module.set_custom_reduce_scatter(comm)
    return len(modules)


def enable_fp8_all_gather(model: nn.Module, **cfg) -> int:
    """Install an ``FP8AllGather(**cfg)`` on every FSDP2 module of ``model`` with parameters.

    Halves parameter all-gather bytes; lossy for the gathered weights (see the module docstring).
    Returns the number of modules patched.
    """
    modules = _require_fsdp2(model, "set_custom_all_gather")
    comm = FP8AllGather(**cfg)
    for module in modules:
        module.set_custom_all_gather(comm)
    return len(modules)
