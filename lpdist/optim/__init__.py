"""Low-precision optimizers: ``AdamW`` with FP8/FP16/BF16 block-scaled moments and a fused
CUDA step (``csrc/adam.cu``), working on FSDP2 shards and inside ZeroRedundancyOptimizer;
``wrap()`` gives any torch optimizer low-precision (and optionally ZeRO-sharded) state."""

from .adamw import AdamW, clip_coefficient
from .wrap import QuantizedState, wrap

__all__ = ["AdamW", "QuantizedState", "clip_coefficient", "wrap"]
