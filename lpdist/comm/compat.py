"""Single-tensor collectives across torch releases.

torch 2.13 names them ``all_gather_single`` / ``reduce_scatter_single`` and deprecates the
``*_into_tensor`` / ``reduce_scatter_tensor`` spellings that older releases (2.11) only have.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["all_gather_single", "reduce_scatter_single"]

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
