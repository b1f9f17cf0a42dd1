"""FP8 communication hooks for DDP and FSDP1 (``register_comm_hook``).

* ``fp8_ddp_hook(state, bucket)`` for ``DistributedDataParallel.register_comm_hook``: averages
  each gradient bucket with the quantized ``all_reduce`` (reduce-scatter + all-gather, both FP8),
  like DDP's default average. With ``DDPHookState(error_feedback=True)`` a residual is kept per
  bucket for as long as the bucket packs the same parameters in the same order. DDP rebuilds
  its buckets after the first iteration, in the order gradients became ready, which can move
  parameters inside a bucket of unchanged size; the residual of a changed bucket starts again
  from zero, so no parameter ever receives another one's quantization error.
* ``fp8_fsdp_hook(state, grad, output=None)`` for FSDP1's ``register_comm_hook``: sharded
  strategies pass the padded unsharded gradient and the shard to fill (quantized
  ``reduce_scatter``, averaged); ``NO_SHARD`` passes only the gradient (quantized
  ``all_reduce`` in place). FSDP1 hooks get no stable identity for a gradient, so this hook
  has no error feedback; FSDP2's ``FP8ReduceScatter`` has.

``check_finite=True`` (either state): a gradient holding NaN/inf on any rank raises
``FloatingPointError`` on every rank before anything is sent (see ``collectives``); by default
such a gradient is sent and arrives as NaN, so the trainer's own check sees it.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook inspects the hook's
# annotations and requires the real ``dist.GradBucket`` / ``torch.futures.Future`` objects.
from typing import Hashable, NamedTuple

import torch
import torch.distributed as dist

from .collectives import _check_options, all_reduce, reduce_scatter

__all__ = ["DDPHookState", "FSDPHookState", "fp8_ddp_hook", "fp8_fsdp_hook"]


class KeptResidual(NamedTuple):
    """An error-feedback residual and the layout of the input it was made for."""

    layout: tuple
    tensor: torch.Tensor


def _layout_residual(residuals: dict[Hashable, KeptResidual], slot: Hashable, params: tuple,
                    like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The residual kept in ``residuals[slot]`` for an input ``like`` that packs ``params``.

    A residual holds, element by element, the quantization error of the parameter stored at
    that offset, so it may only be added to an input with the same parameters at the same
    offsets. It is reused while ``params`` (identities, in packing order) and ``like``'s shape,
    dtype and device are unchanged; otherwise the slot gets a new zero residual of ``dtype``
    (the old one is dropped, so a slot never holds more than one input's worth of memory).
    """
    layout = (params, like.shape, like.dtype, like.device, dtype)
    kept = residuals.get(slot)
    if kept is None or kept.layout != layout:
        kept = KeptResidual(layout, torch.zeros(like.shape, dtype=dtype, device=like.device))
        residuals[slot] = kept
    return kept.tensor


class FSDPHookState:
    """Options of the FP8 hooks: wire format, block, transport, rounding, process group,
    ``check_finite``."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, fmt: str = "e4m3",
                 block: int = 256, transport: str = "all_to_all", rounding: str = "nearest",
                 check_finite: bool = False) -> None:
        _check_options(fmt, block, rounding, transport)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, got "
                            f"{type(process_group).__name__}")
        self.process_group = process_group
        self.fmt, self.block, self.transport, self.rounding = fmt, block, transport, rounding
        self.check_finite = bool(check_finite)

    def options(self) -> dict:
        return dict(fmt=self.fmt, block=self.block, transport=self.transport, rounding=self.rounding,
                    check_finite=self.check_finite)


class DDPHookState(FSDPHookState):
    """``FSDPHookState`` plus optional error feedback per DDP bucket (``residuals``: by bucket
    index, see ``_layout_residual``)."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, fmt: str = "e4m3",
                 block: int = 256, transport: str = "all_to_all", rounding: str = "nearest",
                 error_feedback: bool = False, check_finite: bool = False) -> None:
        super().__init__(process_group, fmt=fmt, block=block, transport=transport, rounding=rounding,
                         check_finite=check_finite)
        self.error_feedback = bool(error_feedback)
        self.residuals: dict[int, KeptResidual] = {}

    def residual(self, bucket: dist.GradBucket) -> torch.Tensor | None:
        """The residual of ``bucket``: the one kept for its index while the bucket packs the same
        parameters in the same order, zeros when the bucket is new or changed; ``None`` without
        error feedback."""
        if not self.error_feedback:
            return None
        params = tuple(id(p) for p in bucket.parameters())
        buffer = bucket.buffer()
        return _layout_residual(self.residuals, bucket.index(), params, buffer, buffer.dtype)


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut = torch.futures.Future(devices=[tensor.device] if tensor.is_cuda else None)
    fut.set_result(tensor)
    return fut


def fp8_ddp_hook(state: DDPHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged over the group through FP8."""
    if not isinstance(state, DDPHookState):
        raise TypeError(f"state must be a DDPHookState, got {type(state).__name__}")
    buffer = bucket.buffer()
    all_reduce(buffer, state.process_group, op="avg", residual=state.residual(bucket), **state.options())
    return _completed(buffer)


def fp8_fsdp_hook(state: FSDPHookState, grad: torch.Tensor, output: torch.Tensor | None = None) -> None:
    """FSDP1 comm hook: averaged FP8 reduce-scatter into ``output`` (or all-reduce of ``grad``)."""
    if not isinstance(state, FSDPHookState):
        raise TypeError(f"state must be an FSDPHookState, got {type(state).__name__}")
    if output is None:
        all_reduce(grad, state.process_group, op="avg", **state.options())
    else:
        reduce_scatter(output, grad, state.process_group, op="avg", **state.options())
