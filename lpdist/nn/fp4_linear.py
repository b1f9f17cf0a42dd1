"""``FP4Linear``: a drop-in ``nn.Linear`` trained with one of three FP4 recipes.

``recipe`` picks the quantization of the three GEMMs (ALGORITHMS.md §0):

* ``"quartet"`` (§4, :mod:`lpdist.nn.fp4_quartet`): MXFP4, Hadamard-32 + QuEST forward,
  randomized Hadamard + stochastic rounding backward;
* ``"dge"`` (§3, :mod:`lpdist.nn.fp4_dge`): E2M1 absmax per channel / per token, outlier
  clamping with high-precision compensation, differentiable gradient estimator;
* ``"nvfp4"`` (§5, :mod:`lpdist.nn.fp4_nvfp4`): NVFP4 with 16x16 weight tiles, random Hadamard
  on the Wgrad operands, stochastic rounding of gradients.

Hopper has no FP4 tensor cores, so every recipe is emulated exactly (:mod:`lpdist.nn.fp4_emulation`):
the numbers are those of the FP4 GEMMs, the speed is not.
"""

from __future__ import annotations

import torch

from .base_linear import LowPrecisionLinear, check_features
from .fp4_dge import DGEMatmul
from .fp4_nvfp4 import BLOCK as NVFP4_BLOCK
from .fp4_nvfp4 import NVFP4Matmul
from .fp4_quartet import QuartetMatmul

__all__ = ["FP4Linear", "FP4_RECIPES"]

FP4_RECIPES = {"quartet": QuartetMatmul, "dge": DGEMatmul, "nvfp4": NVFP4Matmul}


class FP4Linear(LowPrecisionLinear):
    """``nn.Linear`` whose Fprop, Dgrad and Wgrad follow an FP4 ``recipe`` (emulated).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        recipe: ``"quartet"`` | ``"dge"`` | ``"nvfp4"`` (``"nvfp4"`` needs both dims divisible
            by 16 for its 16x16 weight tiles).
        track_stats: keep :meth:`last_stats` telemetry (device tensors, no host sync).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 recipe: str = "quartet", track_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(recipe, str) or recipe not in FP4_RECIPES:
            raise ValueError(f"recipe must be one of {sorted(FP4_RECIPES)}, got {recipe!r}")
        check_features(in_features, out_features)
        if recipe == "nvfp4" and (in_features % NVFP4_BLOCK or out_features % NVFP4_BLOCK):
            raise ValueError(f"recipe='nvfp4' needs in_features ({in_features}) and out_features "
                             f"({out_features}) divisible by {NVFP4_BLOCK}")
        super().__init__(in_features, out_features, bias, track_stats=track_stats, device=device,
                         dtype=dtype)
        self.recipe = recipe

    def _matmul(self, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return FP4_RECIPES[self.recipe].apply(x2d, self.weight, self._lp_stats, self.track_stats,
                                              out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe!r}"
