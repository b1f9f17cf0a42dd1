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

Error feedback (``error_feedback=True``; install with ``enable_fp8_reduce_scatter``) keeps one
residual per FSDP parameter group, laid out like the group's reduce-scatter input. FSDP2 packs
only the parameters that received a gradient, so that input's layout changes when a different
set of parameters gets gradients (conditional branches, experts); the residual is reused only
while the same parameters are packed and starts again from zeros when the set changes, so no
parameter ever receives another one's quantization error (with
``FSDPModule.set_reduce_scatter_unused_params(True)`` the set, and so the feedback, never
changes). It costs one unsharded gradient of memory per group on every rank (in
``residual_dtype``: the reduce dtype, or float32), which is why it is off by default.

``FP8AllGather`` implements ``AllGather`` for ``set_custom_all_gather``: parameters are gathered
as fp8 codes plus block scales (about half the bytes of bf16), so **the gathered weights are
lossy** (every rank computes with the same ``decode(Q(w))``); the sharded fp32/bf16 parameters
and the optimizer are untouched. FSDP2 gathers raw bytes (uint8) when a group mixes dtypes;
such a group is gathered exactly, without compression.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from .collectives import _check_options, all_gather, reduce_scatter
from .compat import all_gather_single
from .hooks import KeptResidual, _layout_residual

__all__ = ["FP8ReduceScatter", "FP8AllGather", "enable_fp8_reduce_scatter", "enable_fp8_all_gather"]


class _EmptyAllocMixin:
    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Plain caching-allocator buffers (the comm adds its own wire buffers)."""
        return torch.empty(size, dtype=dtype, device=device)


class FP8ReduceScatter(_EmptyAllocMixin, ReduceScatter):
    """FSDP2 reduce-scatter that sends gradients in FP8 (see ``lpdist.comm.reduce_scatter``).

    ``error_feedback=True`` needs to know which parameters FSDP packed into each input, which
    ``enable_fp8_reduce_scatter`` arranges; a comm installed otherwise refuses to guess
    (``ValueError`` at its first call). ``residuals`` holds the state: by FSDP parameter group,
    reused only for the same packed parameters (module docstring).
    ``residual_dtype``: ``None`` (the reduce dtype) or ``torch.float32`` (a float32 residual
    under a bf16/fp16 reduce dtype); a dtype that is neither float32 nor the group's reduce
    dtype raises ``ValueError`` at the first reduce-scatter, when the reduce dtype is known.
    """

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
        self.residuals: dict[int, KeptResidual] = {}
        self._next_packing: tuple[int, tuple[Any, ...]] | None = None

    def _expect_packing(self, group: Any, fsdp_params: tuple[Any, ...]) -> None:
        """Announce that the next call reduces FSDP param group ``group``'s input packed from
        ``fsdp_params`` (``FSDPParam`` objects, in packing order)."""
        self._next_packing = (id(group), fsdp_params)

    def _residual(self, input_tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor | None:
        if not self.error_feedback:
            return None
        dtype = self.residual_dtype or input_tensor.dtype
        if dtype not in (torch.float32, input_tensor.dtype):
            raise ValueError(f"residual_dtype must be None, torch.float32 or the reduce dtype "
                             f"({input_tensor.dtype}), got {dtype}")
        if self._next_packing is None:
            raise ValueError("error_feedback=True needs to know which parameters each input packs: "
                             "install the comm with enable_fp8_reduce_scatter(model, error_feedback=True)")
        group_id, fsdp_params = self._next_packing
        self._next_packing = None
        # FSDP2 pads each unsharded gradient to W equal shards and packs shard r of each
        # parameter into row r of the (W, -1) input.
        shard_numel = sum(p.padded_sharded_param_size.numel() for p in fsdp_params)
        packed_numel = dist.get_world_size(group) * shard_numel
        if packed_numel != input_tensor.numel():
            raise RuntimeError(f"FSDP packed {input_tensor.numel()} gradient elements, but the "
                               f"{len(fsdp_params)} parameters with gradients account for {packed_numel}; "
                               "error feedback cannot tell which residual belongs to which parameter")
        params = tuple(id(p) for p in fsdp_params)
        return _layout_residual(self.residuals, group_id, params, input_tensor, dtype)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op, async_op: bool = False) -> None:
        # FSDP2 only waits on real ``dist.Work`` objects, so the call completes before returning
        # (stream-ordered on CUDA, like any NCCL collective issued on FSDP's reduce-scatter stream).
        reduce_scatter(output_tensor, input_tensor, group, op=op, fmt=self.fmt, block=self.block,
                       transport=self.transport, rounding=self.rounding,
                       residual=self._residual(input_tensor, group), check_finite=self.check_finite)
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


def _param_groups(module: FSDPModule) -> list[Any]:
    """The ``FSDPParamGroup``s of ``module`` (none when it holds no parameters)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch releases with one param group per module
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return groups


def _fsdp_modules_with_params(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule) and _param_groups(m)]


def _packed_params(group: Any) -> tuple[Any, ...]:
    """The FSDP params whose gradients ``group.post_backward`` is about to pack, in order.

    FSDP2 packs, in ``group.fsdp_params`` order, each parameter with an accumulated or a new
    unsharded gradient and, with ``reduce_scatter_unused_params``, each other one that
    requires grad; it clears those gradients before the reduce-scatter, so they are read here.
    """
    reduce_unused = getattr(group, "reduce_scatter_unused_params", False)
    return tuple(
        p for p in group.fsdp_params
        if hasattr(p, "_unsharded_param") and (
            p.unsharded_accumulated_grad is not None or p.unsharded_param.grad is not None
            or (reduce_unused and p.unsharded_param.requires_grad)))


def _announce_packing(group: Any) -> None:
    """Make ``group``'s post-backward tell its ``FP8ReduceScatter`` which parameters it packs
    (installed once per group; the comm is looked up at each call, so it may be replaced)."""
    post_backward: Callable[..., Any] = group.post_backward
    if getattr(post_backward, "announces_packing", False):
        return

    def announcing_post_backward(*args: Any) -> Any:
        comm = group._reduce_scatter_comm
        if isinstance(comm, FP8ReduceScatter) and comm.error_feedback:
            comm._expect_packing(group, _packed_params(group))
        return post_backward(*args)

    announcing_post_backward.announces_packing = True
    group.post_backward = announcing_post_backward


def _require_fsdp2(model: nn.Module, method: str) -> list[FSDPModule]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = _fsdp_modules_with_params(model)
    if not modules:
        raise ValueError("model has no FSDP2 module with parameters; call fully_shard(...) first")
    if not hasattr(modules[0], method):
        raise RuntimeError(f"this torch release has no FSDPModule.{method} (torch >= 2.11 needed)")
    return modules


def enable_fp8_reduce_scatter(model: nn.Module, **cfg: Any) -> int:
    """Install an ``FP8ReduceScatter(**cfg)`` on every FSDP2 module of ``model`` with parameters.

    Each module gets its own instance, and each parameter group announces to it which
    parameters it packs into every reduce-scatter, so error-feedback residuals stay with the
    parameters they came from (module docstring). Returns the number of modules patched.
    """
    modules = _require_fsdp2(model, "set_custom_reduce_scatter")
    comms = [FP8ReduceScatter(**cfg) for _ in modules]  # validate before changing anything
    for module, comm in zip(modules, comms):
        module.set_custom_reduce_scatter(comm)
        for group in _param_groups(module):
            _announce_packing(group)
    return len(modules)


def enable_fp8_all_gather(model: nn.Module, **cfg: Any) -> int:
    """Install an ``FP8AllGather(**cfg)`` on every FSDP2 module of ``model`` with parameters.

    Halves parameter all-gather bytes; lossy for the gathered weights (see the module docstring).
    Returns the number of modules patched.
    """
    modules = _require_fsdp2(model, "set_custom_all_gather")
    comm = FP8AllGather(**cfg)
    for module in modules:
        module.set_custom_all_gather(comm)
    return len(modules)
