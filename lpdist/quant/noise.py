"""Counter-based uniform noise for stochastic rounding (ALGORITHMS.md §1.5).

``u = hashed_uniform(index, seed)`` is a pure function of an element's index and a seed, so a
kernel and its torch twin draw the same noise and stochastic rounding can be reproduced bit for
bit. The hash is lowbias32, computed here on int64 tensors holding uint32 values; its CUDA twin
is ``lp::hashed_uniform`` in ``csrc/lp_formats.cuh`` (used by ``csrc/reduce.cu`` and
``csrc/adam.cu``).
"""

from __future__ import annotations

import torch

__all__ = ["hashed_uniform"]


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 ``a`` in [0, 2^32), without int64 overflow."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (``mix32`` in csrc/lp_formats.cuh)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) (24 random bits) per int64 element ``index`` for ``seed``."""
    lo = index & 0xFFFFFFFF
    hi = (index >> 32) & 0xFFFFFFFF
    h = _mix32(lo ^ _mix32(hi ^ _mix32(torch.full_like(index, seed & 0xFFFFFFFF))))
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)
