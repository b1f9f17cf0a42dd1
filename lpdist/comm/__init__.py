"""FP8 gradient communication for torch.distributed (ALGORITHMS.md §0, §6, §8).

* ``reduce_scatter`` / ``all_reduce`` / ``all_gather``: quantized collectives (``collectives``),
  transports ``"all_to_all"`` (``all_to_all``), ``"p2p"`` (``p2p``: stores into the other GPUs'
  memory through ``peer`` workspaces) and ``"nccl"`` (``shared_scale``), error feedback through
  ``residual=``; ``fastest_transport`` picks p2p where it can run.
* ``FP8ReduceScatter`` / ``enable_fp8_reduce_scatter`` and ``FP8AllGather`` /
  ``enable_fp8_all_gather`` for FSDP2 (``fsdp2``).
* ``fp8_ddp_hook`` + ``DDPHookState`` for DDP, ``fp8_fsdp_hook`` + ``FSDPHookState`` for FSDP1
  (``hooks``).
* ``stats()`` / ``reset_stats()``: calls, elements and bytes sent per transport (``stats``).
Kernels: ``csrc/reduce.cu``, ``reduce_fast.cu``, ``peer.cu``; their torch twins: ``codec``.
"""

from .collectives import (ROUNDINGS, TRANSPORTS, all_gather, all_reduce, fastest_transport, reduce_scatter,
                          rms_error_bound)
from .fsdp2 import FP8AllGather, FP8ReduceScatter, enable_fp8_all_gather, enable_fp8_reduce_scatter
from .hooks import DDPHookState, FSDPHookState, fp8_ddp_hook, fp8_fsdp_hook
from .pending import PendingCollective
from .stats import reset_stats, stats

__all__ = [
    "DDPHookState", "FP8AllGather", "FP8ReduceScatter", "FSDPHookState", "PendingCollective",
    "ROUNDINGS", "TRANSPORTS", "all_gather", "all_reduce", "enable_fp8_all_gather",
    "enable_fp8_reduce_scatter", "fastest_transport", "fp8_ddp_hook", "fp8_fsdp_hook", "reduce_scatter",
    "reset_stats", "rms_error_bound", "stats",
]
