"""Packed wire layout of quantized rows: fp32 block scales and fp8 codes in one uint8 buffer.

One collective carries both, so payload and scales never need two exchanges. Each row (one per
destination rank, or the one row a rank contributes to an all-gather) is::

    [ nblocks fp32 scales | pad to 16 B | cols fp8 codes | pad to 16 B ]

The 16-byte padding keeps every row, scale section and code section aligned for vector loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WireLayout", "pieces"]

_ALIGN = 16


def _pad(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class WireLayout:
    """Byte layout of one packed row holding ``cols`` elements in blocks of ``block``."""

    cols: int
    block: int

    @property
    def nblocks(self) -> int:
        return -(-self.cols // self.block)

    @property
    def scale_bytes(self) -> int:
        return _pad(4 * self.nblocks)

    @property
    def row_bytes(self) -> int:
        return self.scale_bytes + _pad(self.cols)

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        """An uninitialised uint8 buffer of ``rows`` packed rows."""
        return torch.empty((rows, self.row_bytes), dtype=torch.uint8, device=device)

    def scales(self, buf: torch.Tensor) -> torch.Tensor:
        """fp32 [rows, nblocks] view of the scale sections of ``buf``."""
        return buf[:, :self.scale_bytes].view(torch.float32)[:, :self.nblocks]

    def payload(self, buf: torch.Tensor) -> torch.Tensor:
        """uint8 [rows, cols] view of the fp8 code sections of ``buf``."""
        return buf[:, self.scale_bytes:self.scale_bytes + self.cols]


def pieces(cols: int, block: int, count: int) -> list[tuple[int, int]]:
    """Split ``cols`` into at most ``count`` (start, length) pieces starting on block bounds."""
    nblocks = -(-cols // block)
    count = max(1, min(count, nblocks))
    bounds = [min(cols, (nblocks * i // count) * block) for i in range(count + 1)]
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
