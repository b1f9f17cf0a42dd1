"""Low-precision optimizers: ``AdamW`` with FP8/FP16/BF16 block-scaled moments and a fused
CUDA step (``csrc/adam.cu``), working on FSDP2 shards and inside ZeroRedundancyOptimizer."""

from .adamw import AdamW

__all__ = ["AdamW"]
