"""The ``all_to_all`` transport of the FP8 reduce-scatter (ALGORITHMS.md §0, §8 qgZ one hop).

Rank ``r`` views its input as ``[W, chunk]`` (row ``d`` is destined for rank ``d``), quantizes
every row with its own block scales, and exchanges the packed rows (scales + codes, one
``all_to_all_single`` on uint8). Each rank then holds the W quantized copies of its chunk and
decodes and sums them in fp32 with one rounding to the output dtype::

    out = factor * Σ_s decode(q_s) * scale_s

Each element is quantized once, so the error does not grow with W (unlike a ring with fp8
arithmetic at every hop). Large buffers are cut into column pieces that are pipelined: the
quantization of piece k+1 and the decode of piece k-1 overlap the exchange of piece k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import stats
from .codec import dequant_into, quantize_into
from .pending import PendingCollective
from .wire import WireLayout, pieces

__all__ = ["reduce_scatter_all_to_all", "PIECE_BYTES", "MAX_PIECES"]

#: Target payload bytes per pipeline piece on CUDA, and the most pieces one call is cut into.
PIECE_BYTES = 64 << 20
MAX_PIECES = 8


def auto_pieces(input: torch.Tensor) -> int:
    """Pipeline depth: one piece on CPU; on CUDA about ``PIECE_BYTES`` of fp8 payload each."""
    if not input.is_cuda:
        return 1
    return max(1, min(MAX_PIECES, input.numel() // PIECE_BYTES))


def reduce_scatter_all_to_all(output: torch.Tensor, input: torch.Tensor, group, *, factor: float,
                              fmt: str, block: int, rounding: str, residual: torch.Tensor | None,
                              seed: int, num_pieces: int | None,
                              async_op: bool) -> PendingCollective | None:
    """Quantized reduce-scatter by one all-to-all (see the module docstring)."""
    world = dist.get_world_size(group)
    chunk = output.numel()
    x = input.view(world, chunk)
    res = residual.view(world, chunk) if residual is not None else None
    out = output.view(1, chunk)
    count = auto_pieces(input) if num_pieces is None else num_pieces
    in_flight: list[tuple] = []
    sent = 0

    def finish(work, recv, layout, col0, cols) -> None:
        work.wait()
        dequant_into(layout.payload(recv), layout.scales(recv), sum_rows=world, block=block,
                     fmt=fmt, factor=factor, out=out[:, col0:col0 + cols])

    for col0, cols in pieces(chunk, block, count):
        layout = WireLayout(cols, block)
        send = layout.empty(world, input.device)
        quantize_into(x, res, col0=col0, cols=cols, block=block, fmt=fmt,
                      payload=layout.payload(send), scales=layout.scales(send),
                      rounding=rounding, seed=seed)
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=group, async_op=True)
        sent += (world - 1) * layout.row_bytes
        in_flight.append((work, recv, layout, col0, cols))
        if len(in_flight) > 1:
            finish(*in_flight.pop(0))
    stats.record("all_to_all", elements=input.numel(), bytes_sent=sent)
    if not in_flight:  # zero-size chunk
        return PendingCollective(lambda: None) if async_op else None
    last = in_flight.pop()
    if async_op:
        return PendingCollective(lambda: finish(*last))
    finish(*last)
    return None
