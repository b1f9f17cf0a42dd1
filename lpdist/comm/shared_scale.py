"""The ``nccl`` transport: shared block scales and NCCL's native fp8 reduction.

FP8-LM's shared scale (arXiv 2310.18313; ALGORITHMS.md §6.3) at block granularity, pre-divided by
the world size so the fp8 sum cannot overflow (§6.1, §0):

1. every rank computes the amax of each block of ``x + r`` (its input plus residual);
2. one MAX all-reduce of the block amaxes gives ``A_b``, and every rank uses the same scale
   ``s_b = A_b / t`` with ``t = scale_target(fmt, W)``, the largest fp8 value ``<= fmt_max / W``;
   scaled values are clamped to ``±t``, so ``|q| <= t`` and ``|Σ_r q_r| <= W·t <= fmt_max``
   (``fmt_max / W`` itself is rarely on the fp8 grid: rounding up to the next code overflowed
   the sum, e.g. e5m2 with W = 3 summed 3 x 20480 > 57344 to inf);
3. NCCL reduce-scatters the fp8 tensors with its own fp8 sum (NCCL >= 2.24, sm90+);
4. the received fp8 chunk is decoded with ``s_b`` and the op factor (the decode kernel computes
   ``s_b`` from ``A_b`` itself: no extra pass, no host synchronization).

Unlike ``all_to_all`` the sum is rounded to fp8 by NCCL (once per ring hop), and the scale of a
block is set by the largest rank, so a rank with small gradients loses relative precision.
Needs an NCCL process group on CUDA; anything else is refused before any work is done.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from . import stats
from .codec import FP8_DTYPES, block_amax_into, dequant_into, quantize_into
from .compat import reduce_scatter_single
from .pending import PendingCollective
from ..quant import FORMATS

__all__ = ["reduce_scatter_shared_scale", "check_native_fp8", "agree_block_amax", "scale_target"]

MIN_NCCL = (2, 24)


def check_native_fp8(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Raise ``RuntimeError`` unless NCCL fp8 reductions can run for ``group`` on ``device``."""
    backend = dist.get_backend(group)
    if backend != "nccl" or device.type != "cuda":
        raise RuntimeError(f"transport='nccl' needs an NCCL process group and CUDA tensors "
                           f"(got backend {backend!r}, device {device}); use transport='all_to_all'")
    _check_nccl_fp8(device)


@functools.cache
def _check_nccl_fp8(device: torch.device) -> None:
    """NCCL version and GPU capability (fixed for a process: checked once per device)."""
    version = torch.cuda.nccl.version()
    if tuple(version[:2]) < MIN_NCCL:
        raise RuntimeError(f"transport='nccl' needs NCCL >= 2.24 for fp8 reductions, found {version}")
    if torch.cuda.get_device_capability(device) < (9, 0):
        raise RuntimeError("transport='nccl' needs a GPU with fp8 support (sm90 or newer)")


@functools.cache
def scale_target(fmt: str, world: int) -> float:
    """The largest magnitude one rank may contribute: the largest ``fmt`` value ``<= fmt_max / W``
    (``fmt_max / W`` in float32, rounded down onto the fp8 grid), so that ``W`` of them sum to at
    most ``fmt_max``."""
    bound = torch.tensor(FORMATS[fmt].max, dtype=torch.float32) / world
    code = bound.to(FP8_DTYPES[fmt])  # nearest: may lie one code above the bound
    if float(code) > float(bound):
        code = (code.view(torch.uint8) - 1).view(FP8_DTYPES[fmt])  # positive codes: one code down
    return float(code)


def agree_block_amax(x: torch.Tensor, residual: torch.Tensor | None, block: int,
                     group: dist.ProcessGroup | None) -> torch.Tensor:
    """Block amaxes of ``x + residual`` ([W, chunk] rows), MAX-reduced over ``group``."""
    rows, chunk = x.shape
    amax = torch.empty((rows, -(-chunk // block)), dtype=torch.float32, device=x.device)
    block_amax_into(x, residual, col0=0, cols=chunk, block=block, out=amax)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def reduce_scatter_shared_scale(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, *,
                                factor: float, fmt: str, block: int, rounding: str,
                                residual: torch.Tensor | None, seed: int,
                                async_op: bool) -> PendingCollective | None:
    """Quantized reduce-scatter with shared block scales and NCCL's fp8 sum."""
    check_native_fp8(group, input.device)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = output.numel()
    x = input.view(world, chunk)
    res = residual.view(world, chunk) if residual is not None else None
    amax = agree_block_amax(x, res, block, group)
    target = scale_target(fmt, world)
    codes = torch.empty((world, chunk), dtype=torch.uint8, device=input.device)
    quantize_into(x, res, col0=0, cols=chunk, block=block, fmt=fmt, payload=codes, amax=amax,
                  target=target, rounding=rounding, seed=seed)
    summed = torch.empty((1, chunk), dtype=torch.uint8, device=input.device)
    work = reduce_scatter_single(summed.view(FP8_DTYPES[fmt]), codes.view(FP8_DTYPES[fmt]),
                                      op=dist.ReduceOp.SUM, group=group, async_op=True)
    stats.record("nccl", elements=input.numel(),
                 bytes_sent=2 * (world - 1) * amax.numel() * 4 // world + (world - 1) * chunk)

    def decode() -> None:
        dequant_into(summed, amax[rank:rank + 1], sum_rows=1, block=block, fmt=fmt, factor=factor,
                     out=output.view(1, chunk), amax_target=target)

    handle = PendingCollective(decode, work=work)
    if async_op:
        return handle
    handle.wait()
    return None
