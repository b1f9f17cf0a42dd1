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
quantize pass, then an exchange, then a decode.

The common case (no residual, round to nearest, 8-aligned rows, block 16-256) runs the kernels of
``csrc/reduce_fast.cu``, and a large call is cut into column pieces (``all_to_all.auto_pieces``)
whose decode hides under the next piece's stores::

    barrier; store piece 0; barrier; store piece 1 + decode piece 0; barrier; ...; decode piece K-1

(``quantize_rows_to_peers``, then ``quantize_to_peers_and_decode``: one grid in which every
fourth CTA decodes the piece that has arrived while the others store the next one; a decode on a
second stream instead was slower, as it waited for SMs the stores held). Every other case (error
feedback, stochastic rounding, odd sizes) quantizes the whole call into a local send buffer
exactly as ``all_to_all`` does, copies each row to its destination, and decodes after one barrier.

Needs the group on one machine with direct peer access between its GPUs (``peer``); anything
else is refused with a clear error naming ``transport='all_to_all'``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.distributed as dist

from .. import kernels
from . import stats
from .all_to_all import auto_pieces
from .codec import dequant_into, fast_path_applies, quantize_into, wire_order
from .pending import PendingCollective
from .peer import workspace
from .wire import WireLayout, pieces

__all__ = ["reduce_scatter_p2p", "DECODE_EVERY"]

_THREADS = 256
_GROUPS_IN_FLIGHT = 4  # U of quantize_groups: blocks each thread loads before reducing
#: In a store-and-decode launch every DECODE_EVERY-th CTA decodes, the others store.
DECODE_EVERY = 4


def _store_args(x: torch.Tensor, ws, col0: int, layout: WireLayout, offset: int, fmt: str) -> tuple[str, int, list]:
    """Template arguments, store-CTA count and arguments of one piece's stores to the peers."""
    lanes = layout.block // 8
    types = f"{kernels.C_TYPES[x.dtype]}, {kernels.FORMAT_TYPES[fmt]}, {lanes}"
    ctas = kernels.capped_grid(x.shape[0] * layout.nblocks, _THREADS // lanes * _GROUPS_IN_FLIGHT, device=x.device)
    args = [x, x.stride(0), np.int32(x.shape[0]), col0, layout.cols, layout.nblocks, ws.base,
            ws.data_offset + offset + ws.rank * layout.row_bytes, layout.scale_bytes]
    return types, ctas, args


def _quantize_to_peers(x: torch.Tensor, ws, col0: int, layout: WireLayout, offset: int, fmt: str) -> None:
    """``quantize_rows_to_peers``: row d of ``x[:, col0:col0 + layout.cols]`` into slot ``rank`` of
    the piece at data offset ``offset`` of rank d's workspace."""
    types, ctas, args = _store_args(x, ws, col0, layout, offset, fmt)
    kernels.launch("reduce_fast", f"quantize_rows_to_peers<{types}>", ctas, _THREADS, args, device=x.device)


def _quantize_to_peers_and_decode(x: torch.Tensor, ws, col0: int, layout: WireLayout, offset: int,
                                  fmt: str, arrived: tuple[int, WireLayout, int], factor: float,
                                  out: torch.Tensor) -> None:
    """One launch: the stores of this piece (as ``_quantize_to_peers``) and the decode of the
    piece ``arrived`` = (col0, layout, offset) that is already in this rank's workspace."""
    types, ctas, args = _store_args(x, ws, col0, layout, offset, fmt)
    dec_col0, dec_layout, dec_offset = arrived
    grid = -(-ctas // (DECODE_EVERY - 1)) * DECODE_EVERY
    rows = ws.data[dec_offset:]
    kernels.launch("reduce_fast", f"quantize_to_peers_and_decode<{types}>", grid,
                   _THREADS, [*args, rows, dec_layout.row_bytes, dec_layout.scale_bytes, dec_layout.cols,
                              np.int32(layout.block), np.float32(factor), out[dec_col0:],
                              np.int32(DECODE_EVERY)], device=x.device)


def reduce_scatter_p2p(output: torch.Tensor, input: torch.Tensor, group, *, factor: float, fmt: str,
                       block: int, rounding: str, residual: torch.Tensor | None, seed: int,
                       num_pieces: int | None, async_op: bool) -> PendingCollective | None:
    """Quantized reduce-scatter through peer workspaces (see the module docstring)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = output.numel()
    if chunk == 0:
        stats.record("p2p", elements=0, bytes_sent=0)
        return PendingCollective(lambda: None) if async_op else None
    x = input.view(world, chunk)
    out = output.view(-1)
    fast = (fast_path_applies(x, residual, None, col0=0, cols=chunk, block=block,
                              stochastic=rounding == "stochastic")
            and out.data_ptr() % 16 == 0)
    count = (auto_pieces(input) if num_pieces is None else num_pieces) if fast else 1
    parts = [(col0, WireLayout(cols, block)) for col0, cols in pieces(chunk, block, count)]
    offsets = list(itertools.accumulate((world * layout.row_bytes for _, layout in parts), initial=0))
    ws = workspace(group, offsets[-1], input.device)
    ws.barrier()
    arrived = None
    for (col0, layout), offset in zip(parts, offsets):
        if not fast:
            send = layout.empty(world, input.device)
            quantize_into(x, residual.view(world, chunk) if residual is not None else None, col0=0,
                          cols=chunk, block=block, fmt=fmt, payload=layout.payload(send),
                          scales=layout.scales(send), rounding=rounding, seed=seed, own_row=rank)
            for wire_row, d in enumerate(wire_order(world, rank)):
                ws.copy_to(d, rank * layout.row_bytes, send[wire_row])
        elif arrived is None:
            _quantize_to_peers(x, ws, col0, layout, offset, fmt)
        else:
            _quantize_to_peers_and_decode(x, ws, col0, layout, offset, fmt, arrived, factor, out)
        ws.barrier()
        arrived = (col0, layout, offset)
    col0, layout, offset = arrived
    rows = ws.data[offset:offset + world * layout.row_bytes].view(world, layout.row_bytes)
    dequant_into(layout.payload(rows), layout.scales(rows), sum_rows=world, block=block, fmt=fmt,
                 factor=factor, out=out[col0:col0 + layout.cols].view(1, -1))
    stats.record("p2p", elements=input.numel(), bytes_sent=(world - 1) * sum(l.row_bytes for _, l in parts))
    return PendingCollective(lambda: None) if async_op else None
