"""Reduction ops of quantized collectives: ``sum``, ``avg`` and ``PREMUL_SUM(f)``.

Every op is a sum times a factor applied once, in fp32, when the received chunks are
decoded: ``sum`` -> 1, ``avg`` -> 1/W, ``PREMUL_SUM(f)`` -> f (NCCL multiplies every input by f
before summing, which is the same number up to one rounding). Accepts the strings, torch's
``ReduceOp.SUM``/``ReduceOp.AVG`` and ``ReduceOp.PREMUL_SUM(f)`` objects (as FSDP2 passes them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["reduction_factor"]


def _red_op_type(op: Any) -> Any:
    """The ``RedOpType`` of a ``ReduceOp`` object or of a bare ``RedOpType``."""
    return getattr(op, "op", op)


def reduction_factor(op: Any, world_size: int) -> float:
    """The factor multiplying the fp32 sum for ``op`` in a group of ``world_size`` ranks."""
    if isinstance(op, str):
        name = op.lower()
        if name == "sum":
            return 1.0
        if name == "avg":
            return 1.0 / world_size
        raise ValueError(f"op must be 'sum', 'avg' or a torch ReduceOp SUM/AVG/PREMUL_SUM, got {op!r}")
    kind = _red_op_type(op)
    if kind == dist.ReduceOp.SUM:
        return 1.0
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world_size
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = getattr(op, "factor", None)
        if factor is None:
            raise ValueError("op=ReduceOp.PREMUL_SUM needs its factor; this torch build does not "
                             "expose ReduceOp.factor, pass op='sum' and scale the gradients instead")
        return float(factor.item() if isinstance(factor, torch.Tensor) else factor)
    raise ValueError(f"op must be 'sum', 'avg' or a torch ReduceOp SUM/AVG/PREMUL_SUM, got {op!r}")
