"""Low-precision layers and training recipes.

* :class:`Float8Linear` (FP8 GEMMs: tensor / row / DeepSeek-V3 block scaling),
* :class:`FP4Linear` (Quartet, Microsoft DGE and NVIDIA NVFP4 recipes, emulated),
* :func:`swiglu` / :class:`SmoothSwiGLU` / :func:`register_swiglu` (Fishman et al.),
* :class:`Recipe`, :data:`recipes`, :func:`convert` (swap layers in a model).
"""

from .convert import ConvertSummary, convert
from .float8_linear import Float8Linear
from .fp4_linear import FP4_RECIPES, FP4Linear
from .recipes import Recipe, get_recipe, recipes
from .smooth_swiglu import SmoothSwiGLU, register_swiglu, swiglu
from .telemetry import STAT_KEYS, set_tracking

__all__ = ["ConvertSummary", "FP4Linear", "FP4_RECIPES", "Float8Linear", "Recipe", "STAT_KEYS", "set_tracking",
           "SmoothSwiGLU", "convert", "get_recipe", "recipes", "register_swiglu", "swiglu"]
