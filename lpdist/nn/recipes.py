"""Training recipes: which layers run in which precision, plus what the trainer does with
gradients and optimizer state.

``convert`` consumes ``linear``, the layer options, ``smooth_swiglu`` and the selection fields
(``keep_high_precision``, ``keep_last_fraction``). ``grad_comm`` (format of the data-parallel
gradient reduce-scatter, ``None`` = bf16/fp32), ``all_gather`` (format of the FSDP2 parameter
all-gather, ``None`` = the compute dtype) and ``moments`` (``lpdist.optim.AdamW``'s ``moments=``)
are read by the training example.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any

from ..optim.moments import parse_moments
from .fp4_linear import FP4_RECIPES
from .fp8_cast import FP8_FORMATS
from .fp8_gemm import SCALING_KINDS
from .smooth_swiglu import SMOOTH_MODES

__all__ = ["Recipe", "recipes", "get_recipe", "LINEAR_KINDS", "DEFAULT_HIGH_PRECISION"]

LINEAR_KINDS = ("bf16", "fp8", "fp4")
#: Module names kept in high precision by every recipe: the output head (ALGORITHMS.md §2.1, §5, §7).
DEFAULT_HIGH_PRECISION = ("lm_head", "output", "*.lm_head", "*.output")


@dataclass(frozen=True)
class Recipe:
    """A low-precision training recipe.

    Attributes:
        name: the key in :data:`recipes` (or a user label).
        linear: ``"bf16"`` (no swap) | ``"fp8"`` (``Float8Linear``) | ``"fp4"`` (``FP4Linear``).
        smooth_swiglu: ``None`` | ``"token"`` | ``"channel"`` (Smooth-SwiGLU granularity).
        grad_comm: gradient communication format for the trainer (``"e4m3"``, ``"e5m2"`` or None).
        all_gather: FSDP2 parameter all-gather format (``"e4m3"``, ``"e5m2"`` or None); lossy for
            the gathered weights (``lpdist.comm.enable_fp8_all_gather``).
        moments: AdamW moment storage for the trainer (``"fp32"``, ``"fp8"``, or an (m, v) tuple).
        keep_high_precision: fnmatch patterns of module names (full or last component) that stay
            ``nn.Linear``; the output head is always kept (:data:`DEFAULT_HIGH_PRECISION` by
            name, and ``convert`` keeps any linear whose weight is tied to an embedding).
        keep_last_fraction: fraction of the convertible linear layers, counted from the end of
            the network, kept in high precision (NVFP4 keeps about 15%, ALGORITHMS.md §5).
        scaling, block, grad_fmt, amax_history: ``Float8Linear`` options (``amax_history > 0``:
            delayed per-tensor scaling over that many steps).
        fp4_recipe: ``FP4Linear`` recipe (``"quartet"`` | ``"dge"`` | ``"nvfp4"``).
    """

    name: str
    linear: str = "bf16"
    smooth_swiglu: str | None = None
    grad_comm: str | None = None
    all_gather: str | None = None
    moments: str | tuple[str, str] = "fp32"
    keep_high_precision: tuple[str, ...] = field(default=())
    keep_last_fraction: float = 0.0
    scaling: str = "tensor"
    block: int = 128
    grad_fmt: str = "e5m2"
    fp4_recipe: str | None = None
    amax_history: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if self.linear not in LINEAR_KINDS:
            raise ValueError(f"linear must be one of {LINEAR_KINDS}, got {self.linear!r}")
        if self.smooth_swiglu not in SMOOTH_MODES:
            raise ValueError(f"smooth_swiglu must be one of {SMOOTH_MODES}, got {self.smooth_swiglu!r}")
        if self.scaling not in SCALING_KINDS:
            raise ValueError(f"scaling must be one of {SCALING_KINDS}, got {self.scaling!r}")
        if self.grad_fmt not in FP8_FORMATS:
            raise ValueError(f"grad_fmt must be one of {FP8_FORMATS}, got {self.grad_fmt!r}")
        if self.grad_comm is not None and self.grad_comm not in FP8_FORMATS:
            raise ValueError(f"grad_comm must be None or one of {FP8_FORMATS}, got {self.grad_comm!r}")
        if self.all_gather is not None and self.all_gather not in FP8_FORMATS:
            raise ValueError(f"all_gather must be None or one of {FP8_FORMATS}, got {self.all_gather!r}")
        parse_moments(self.moments)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block <= 0:
            raise ValueError(f"block must be a positive int, got {self.block!r}")
        history = self.amax_history
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"amax_history must be an int >= 0, got {history!r}")
        if history and (self.linear != "fp8" or self.scaling != "tensor"):
            raise ValueError(f"amax_history (delayed scaling) needs linear='fp8' and scaling='tensor', got "
                             f"linear={self.linear!r}, scaling={self.scaling!r}")
        fp4_ok = isinstance(self.fp4_recipe, str) and self.fp4_recipe in FP4_RECIPES
        if self.linear == "fp4" and not fp4_ok:
            raise ValueError(f"fp4_recipe must be one of {sorted(FP4_RECIPES)} when linear='fp4', "
                             f"got {self.fp4_recipe!r}")
        if self.fp4_recipe is not None and not fp4_ok:
            raise ValueError(f"fp4_recipe must be None or one of {sorted(FP4_RECIPES)}, got {self.fp4_recipe!r}")
        fraction = self.keep_last_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise TypeError(f"keep_last_fraction must be a float in [0, 1), got {type(fraction).__name__}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"keep_last_fraction must be in [0, 1), got {fraction!r}")
        patterns = self.keep_high_precision
        if (isinstance(patterns, str) or not isinstance(patterns, (tuple, list, set, frozenset))
                or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"keep_high_precision must be a tuple, list or set of name patterns (str), "
                            f"got {patterns!r}")
        ordered = sorted(patterns) if isinstance(patterns, (set, frozenset)) else patterns  # sets: a stable order
        object.__setattr__(self, "keep_high_precision", tuple(ordered))

    def with_options(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


recipes: dict[str, Recipe] = {
    r.name: r for r in (
        Recipe("bf16"),
        # FP8 linears with per-tensor scaling (E4M3 forward, E5M2 gradients), FP8 gradient comm,
        # FP8 Adam moments (E4M3 m, E5M2 v).
        Recipe("fp8", linear="fp8", grad_comm="e4m3", moments="fp8"),
        # The same, plus the FSDP2 parameter all-gather in FP8 (halves its bytes; lossy weights).
        Recipe("fp8-gather", linear="fp8", grad_comm="e4m3", all_gather="e4m3", moments="fp8"),
        # The fp8 recipe with delayed scaling of activations and gradients (amax of the last 16
        # steps): their casts need no amax pass of their own before them.
        Recipe("fp8-delayed", linear="fp8", grad_comm="e4m3", moments="fp8", amax_history=16),
        # Fishman et al. (ALGORITHMS.md §2): FP8 linears + Smooth-SwiGLU + FP8 Adam moments (E4M3 m, E5M2 v).
        Recipe("fp8-smooth", linear="fp8", smooth_swiglu="token", grad_comm="e4m3", moments="fp8"),
        # Per-row scaling of every GEMM operand.
        Recipe("fp8-row", linear="fp8", scaling="row", grad_comm="e4m3"),
        # DeepSeek-V3 (arXiv 2412.19437; ALGORITHMS.md §7): 1x128 / 128x128 tiles, E4M3 everywhere, bf16 moments.
        Recipe("fp8-block", linear="fp8", scaling="block", grad_fmt="e4m3", grad_comm="e4m3",
               moments="bf16"),
        # Wang et al. (ALGORITHMS.md §3.5): FP8 gradients, Adam m in FP8 and v in bf16.
        Recipe("fp4-dge", linear="fp4", fp4_recipe="dge", grad_comm="e4m3", moments=("e4m3", "bf16")),
        # Castro et al. (ALGORITHMS.md §4): standard fp32 AdamW state.
        Recipe("fp4-quartet", linear="fp4", fp4_recipe="quartet", grad_comm="e4m3"),
        # NVIDIA (ALGORITHMS.md §5): ~15% of the linears, the last ones, stay in bf16; fp32 optimizer state.
        Recipe("nvfp4", linear="fp4", fp4_recipe="nvfp4", grad_comm="e4m3", keep_last_fraction=0.15),
    )
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A :class:`Recipe` from a name in :data:`recipes` or a ``Recipe`` instance."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in recipes:
        return recipes[recipe]
    raise ValueError(f"recipe must be a Recipe or one of {sorted(recipes)}, got {recipe!r}")
