"""The ``p2p`` transport of the FP8 reduce-scatter: the ``all_to_all`` math, exchanged by stores.

Same quantization, wire rows and fp32 sum as the ``all_to_all`` transport (module
``all_to_all``; the outputs are bit-identical), without a NCCL call. Every rank owns a peer
workspace (module ``peer``) holding W packed rows (``wire.WireLayout``), slot s for rank s's
contribution to this rank's chunk. A call::

    barrier                      every rank has finished decoding the previous call's rows
    quantize, row d -> rank d    the quantize kernel stores row d straight into rank d's slot
                                 ``rank`` (NVLink stores; this rank's own row stays local)
    barrier                      every row of this rank's chunk has arrived
    out = factor * Σ_s decode(slot s)   in fp32, in rank order, one rounding

So the bytes cross NVLink while the quantize kernel runs: its stores to the W-1 peers and to the
local slot are interleaved, so the link and the local memory work at the same time instead of a
quantize pass, then an exchange, then a decode. Large calls are cut into column pieces (as in
``all_to_all``, ``PIECE_ELEMENTS``), each with its own rows in the workspace and a barrier after
its stores; piece k is decoded on a side stream while piece k+1 is stored, and the caller's
stream waits for the last decode. The common case (no residual, round to nearest,
8-aligned rows, block 16-256) runs ``quantize_rows_to_peers`` (``csrc/reduce_fast.cu``), one
launch for all rows; every other case (error feedback, stochastic rounding, odd sizes) quantizes
into a local send buffer exactly as ``all_to_all`` does and copies each row to its destination.

Needs the group on one machine with direct peer access between its GPUs (``peer``); anything
else is refused with a clear error naming ``transport='all_to_all'``.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
import torch.distributed as dist

from .. import kernels
from . import codec, stats
from .all_to_all import auto_pieces
from .codec import dequant_into, fast_path_applies, quantize_into, wire_order
from .pending import PendingCollective
from .peer import workspace
from .wire import WireLayout, pieces

__all__ = ["reduce_scatter_p2p"]

_THREADS = 256
_GROUPS_IN_FLIGHT = 4  # U of quantize_groups: blocks each thread loads before reducing


@functools.lru_cache(maxsize=None)
def _decode_stream(main: int, device: int) -> torch.cuda.Stream:
    """The side stream that decodes pieces while ``main`` (a stream handle) stores the next one."""
    return torch.cuda.Stream(device=device)


def _quantize_to_peers(x: torch.Tensor, ws, layout: WireLayout, col0: int, offset: int, block: int,
                       fmt: str) -> None:
    """``quantize_rows_to_peers``: row d of ``x[:, col0:col0 + layout.cols]`` into slot ``rank``
    of the piece at data offset ``offset`` of rank d's workspace."""
    lanes = block // 8
    name = f"quantize_rows_to_peers<{kernels.C_TYPES[x.dtype]}, {kernels.FORMAT_TYPES[fmt]}, {lanes}>"
    grid = codec.comm_grid(x.shape[0] * layout.nblocks, _THREADS // lanes * _GROUPS_IN_FLIGHT, x.device)
    kernels.launch("reduce_fast", name, grid, _THREADS, [
        x, x.stride(0), np.int32(x.shape[0]), col0, layout.cols, layout.nblocks, ws.base,
        ws.data_offset + offset + ws.rank * layout.row_bytes, layout.scale_bytes], device=x.device)


def reduce_scatter_p2p(output: torch.Tensor, input: torch.Tensor, group, *, factor: float, fmt: str,
                       block: int, rounding: str, residual: torch.Tensor | None, seed: int,
                       num_pieces: int | None, async_op: bool) -> PendingCollective | None:
    """Quantized reduce-scatter through peer workspaces (see the module docstring)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = output.numel()
    if chunk == 0:
        stats.record("p2p", elements=0, bytes_sent=0)
        return PendingCollective(lambda: None) if async_op else None
    count = auto_pieces(input) if num_pieces is None else num_pieces
    parts = [(col0, WireLayout(cols, block)) for col0, cols in pieces(chunk, block, count)]
    offsets = list(itertools.accumulate((world * layout.row_bytes for _, layout in parts), initial=0))
    ws = workspace(group, offsets[-1], input.device)
    x = input.view(world, chunk)
    res = residual.view(world, chunk) if residual is not None else None
    out = output.view(1, chunk)
    main = torch.cuda.current_stream(input.device)
    side = _decode_stream(main.cuda_stream, input.device.index) if len(parts) > 1 else main
    stochastic = rounding == "stochastic"
    ws.barrier()
    for (col0, layout), offset in zip(parts, offsets):
        if fast_path_applies(x, res, None, col0=col0, cols=layout.cols, block=block, stochastic=stochastic):
            _quantize_to_peers(x, ws, layout, col0, offset, block, fmt)
        else:
            send = layout.empty(world, input.device)
            quantize_into(x, res, col0=col0, cols=layout.cols, block=block, fmt=fmt,
                          payload=layout.payload(send), scales=layout.scales(send), rounding=rounding,
                          seed=seed, own_row=rank)
            for wire_row, d in enumerate(wire_order(world, rank)):
                ws.copy_to(d, offset + rank * layout.row_bytes, send[wire_row])
        ws.barrier()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            rows = ws.data[offset:offset + world * layout.row_bytes].view(world, layout.row_bytes)
            dequant_into(layout.payload(rows), layout.scales(rows), sum_rows=world, block=block, fmt=fmt,
                         factor=factor, out=out[:, col0:col0 + layout.cols])
    main.wait_stream(side)
    stats.record("p2p", elements=input.numel(), bytes_sent=(world - 1) * sum(l.row_bytes for _, l in parts))
    return PendingCollective(lambda: None) if async_op else None
