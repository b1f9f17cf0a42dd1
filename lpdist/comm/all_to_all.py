"""The ``all_to_all`` transport of the FP8 reduce-scatter (ALGORITHMS.md §0, §8 qgZ one hop; ZeRO++,
arXiv 2306.10209).

Rank ``r`` views its input as ``[W, chunk]`` (row ``d`` is destined for rank ``d``), quantizes
every row with its own block scales into one packed buffer (scales + codes per row,
``wire.WireLayout``) and exchanges the rows with one ``all_to_all_single`` on uint8. Its own row
never travels: the quantize kernel writes it last (``codec.wire_order``), the all-to-all sends
only the W-1 rows before it (split size 0 for itself), and the decode reads it from the send
buffer. Each rank then holds the W quantized copies of its chunk and decodes and sums them in
fp32, in rank order, with one rounding to the output dtype::

    out = factor * Σ_s decode(q_s) * scale_s

With two ranks the exchange is an all-gather of the one row each rank sends (the same bytes; see
``TWO_RANK_ALL_GATHER``). Each element is quantized once, so the error does not grow with W (unlike a ring with fp8
arithmetic at every hop). Large buffers are cut into column pieces that are pipelined: the
quantization of piece k+1 and the decode of piece k-1 overlap the exchange of piece k. Every
piece costs one quantize launch, one NCCL call and one decode launch of host time, so pieces
are large (``PIECE_ELEMENTS``): below that size one piece is fastest.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from . import stats
from .codec import dequant_into, quantize_into
from .compat import all_gather_single
from .pending import PendingCollective, finished
from .wire import WireLayout, pieces

__all__ = ["reduce_scatter_all_to_all", "quantize_send_rows", "exchange", "PIECE_ELEMENTS", "MAX_PIECES",
           "auto_pieces", "TWO_RANK_ALL_GATHER"]

#: Input elements per pipeline piece on CUDA (about 64 MiB of fp8 payload), and the most pieces.
#: On two H200s a 256M-element reduce-scatter took 1.145 / 1.140 / 1.000 ms in 1 / 2 / 4 pieces.
PIECE_ELEMENTS = 64 << 20
MAX_PIECES = 4
#: Two ranks exchange their rows by ``all_gather_single`` instead of ``all_to_all_single``: each
#: sends the same one row either way, but NCCL runs the all-gather as a collective over its ring
#: channels and the all-to-all as point-to-point sends, which get fewer channels over a network.
TWO_RANK_ALL_GATHER = True


def auto_pieces(input: torch.Tensor) -> int:
    """Pipeline depth: one piece on CPU; on CUDA one per ``PIECE_ELEMENTS`` input elements."""
    if not input.is_cuda:
        return 1
    return max(1, min(MAX_PIECES, input.numel() // PIECE_ELEMENTS))


def quantize_send_rows(x: torch.Tensor, residual: torch.Tensor | None, col0: int, layout: WireLayout, *,
                       fmt: str, rounding: str, seed: int, rank: int) -> torch.Tensor:
    """A new send buffer: the W rows of ``x[:, col0:col0 + layout.cols]`` (``residual`` updated)
    quantized into packed rows in wire order (this rank's own row last, ``codec.wire_order``)."""
    send = layout.empty(x.shape[0], x.device)
    quantize_into(x, residual, col0=col0, cols=layout.cols, block=layout.block, fmt=fmt,
                  payload=layout.payload(send), scales=layout.scales(send), rounding=rounding, seed=seed,
                  own_row=rank)
    return send


def exchange(send: torch.Tensor, layout: WireLayout, world: int, rank: int,
             group: dist.ProcessGroup | None) -> tuple[torch.Tensor, dist.Work | None]:
    """Start the all-to-all of the first W-1 packed rows of ``send``; (receive buffer, work)."""
    if world == 2 and TWO_RANK_ALL_GATHER:
        both = layout.empty(2, send.device)  # row r: rank r's row for the other rank
        work = all_gather_single(both, send[:1], group=group, async_op=True)
        return both[1 - rank:2 - rank], work
    recv = layout.empty(world - 1, send.device)
    if world == 1:
        return recv, None
    splits = [0 if d == rank else 1 for d in range(world)]
    work = dist.all_to_all_single(recv, send[:world - 1], output_split_sizes=splits,
                                  input_split_sizes=splits, group=group, async_op=True)
    return recv, work


def reduce_scatter_all_to_all(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, *,
                              factor: float, fmt: str, block: int, rounding: str, residual: torch.Tensor | None,
                              seed: int, num_pieces: int | None,
                              async_op: bool) -> PendingCollective | None:
    """Quantized reduce-scatter by one all-to-all (see the module docstring)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = output.numel()
    x = input.view(world, chunk)
    res = residual.view(world, chunk) if residual is not None else None
    out = output.view(1, chunk)
    count = auto_pieces(input) if num_pieces is None else num_pieces
    in_flight: list[PendingCollective] = []
    sent = 0

    def decode(send: torch.Tensor, recv: torch.Tensor, layout: WireLayout, col0: int, cols: int) -> None:
        own = send[world - 1:]
        dequant_into(layout.payload(recv), layout.scales(recv), sum_rows=world, block=block,
                     fmt=fmt, factor=factor, out=out[:, col0:col0 + cols],
                     own=(layout.payload(own), layout.scales(own)), own_row=rank)

    for col0, cols in pieces(chunk, block, count):
        layout = WireLayout(cols, block)
        send = quantize_send_rows(x, res, col0, layout, fmt=fmt, rounding=rounding, seed=seed, rank=rank)
        recv, work = exchange(send, layout, world, rank, group)
        sent += (world - 1) * layout.row_bytes
        in_flight.append(PendingCollective(functools.partial(decode, send, recv, layout, col0, cols),
                                           work=work))
        if len(in_flight) > 1:
            in_flight.pop(0).wait()
    stats.record("all_to_all", elements=input.numel(), bytes_sent=sent)
    if not in_flight:  # zero-size chunk
        return finished(async_op)
    last = in_flight.pop()
    if async_op:
        return last
    last.wait()
    return None
