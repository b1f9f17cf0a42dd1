"""``convert(model, recipe)``: swap ``nn.Linear`` layers for their low-precision versions in place.

Selection: every ``nn.Linear`` (exact type) is a candidate, except the
output head and anything ``recipe.keep_high_precision`` names (fnmatch on the full module name
or its last component), any linear whose weight is the same Parameter as an ``nn.Embedding``'s
weight (a tied output head, whatever its name: converting it would quantize the embedding
table), anything ``filter_fn(name, module)`` rejects, the last
``recipe.keep_last_fraction`` of the candidates in module order, and layers whose shapes the
format cannot tile (reported, never silently changed). A layer registered under several names
counts once and gets one precision under all of them. Embeddings and norms are not linears and
stay as they are. The new layers share the old parameters, so ``state_dict`` keys, values and
optimizer references are unchanged. SwiGLU MLPs (``is_swiglu_mlp`` or :func:`register_swiglu`)
get ``smooth`` set when the recipe asks for Smooth-SwiGLU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Callable

from torch import nn

from .float8_linear import Float8Linear
from .fp4_linear import FP4Linear
from .fp4_nvfp4 import BLOCK as NVFP4_BLOCK
from .recipes import DEFAULT_HIGH_PRECISION, Recipe, get_recipe
from .smooth_swiglu import enable_smoothing, swiglu_attributes

__all__ = ["convert", "ConvertSummary"]


@dataclass
class ConvertSummary:
    """What :func:`convert` changed: converted layer names, layers kept in high precision (name
    -> reason), and the SwiGLU MLPs given Smooth-SwiGLU."""

    recipe: str
    layer_type: str
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    smoothed: list[str] = field(default_factory=list)
    smooth_mode: str | None = None

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        lines = [f"convert(recipe={self.recipe!r}): {self.num_converted} linear layer(s) -> {self.layer_type}"]
        if self.kept:
            lines.append(f"  kept in high precision ({len(self.kept)}):")
            lines += [f"    {name}: {why}" for name, why in self.kept.items()]
        if self.smoothed:
            lines.append(f"  Smooth-SwiGLU ({self.smooth_mode}) on {len(self.smoothed)} MLP(s): "
                         + ", ".join(self.smoothed))
        return "\n".join(lines)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch(name, p) or fnmatch(leaf, p) for p in patterns)


def _layer_factory(recipe: Recipe) -> tuple[str, Callable[[nn.Linear], nn.Module] | None]:
    if recipe.linear == "fp8":
        opts = dict(scaling=recipe.scaling, block=recipe.block, grad_fmt=recipe.grad_fmt,
                    **({"amax_history": recipe.amax_history} if recipe.amax_history else {}))
        return f"Float8Linear({', '.join(f'{k}={v}' for k, v in opts.items())})", (
            lambda lin: Float8Linear.from_linear(lin, **opts))
    if recipe.linear == "fp4":
        return f"FP4Linear(recipe={recipe.fp4_recipe})", (
            lambda lin: FP4Linear.from_linear(lin, recipe=recipe.fp4_recipe))
    return "nn.Linear (unchanged)", None


def _untileable(recipe: Recipe, lin: nn.Linear) -> str | None:
    dims = (lin.in_features, lin.out_features)
    if recipe.linear == "fp8" and recipe.scaling == "block" and any(d % recipe.block for d in dims):
        return f"shape {dims} not divisible by block {recipe.block}"
    if recipe.linear == "fp4" and recipe.fp4_recipe == "nvfp4" and any(d % NVFP4_BLOCK for d in dims):
        return f"shape {dims} not divisible by the 16x16 NVFP4 weight tiles"
    return None


def _linears_by_identity(model: nn.Module) -> list[tuple[list[str], nn.Linear]]:
    """Every ``nn.Linear`` (exact type) of ``model`` once, in module order, with all the names it
    is registered under (a layer shared by two parents or two attributes has several)."""
    names: dict[int, list[str]] = {}
    layers: dict[int, nn.Linear] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            names.setdefault(id(module), []).append(name)
            layers[id(module)] = module
    return [(names[key], layers[key]) for key in names]


def _embedding_weights(model: nn.Module) -> dict[int, str]:
    """``id(weight) -> module name`` of every ``nn.Embedding`` (or subclass) of ``model``: a linear
    layer holding one of these Parameters is a tied output head."""
    tied: dict[int, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None) if isinstance(module, nn.Embedding) else None
        if isinstance(weight, nn.Parameter):
            tied.setdefault(id(weight), name)
    return tied


def convert(model: nn.Module, recipe: str | Recipe, *,
            filter_fn: Callable[[str, nn.Module], bool] | None = None) -> ConvertSummary:
    """Apply ``recipe`` to ``model`` in place and return a :class:`ConvertSummary`.

    A linear layer registered under several names is one layer: it is converted under all of
    them (every name then refers to the same new layer) or, if any of its names is kept in high
    precision, kept under all of them. ``model`` itself must not be an ``nn.Linear``: it cannot
    be replaced in place (use ``Float8Linear.from_linear`` / ``FP4Linear.from_linear``, or wrap it
    in a container module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable(name, module) -> bool")
    recipe = get_recipe(recipe)
    layer_type, make = _layer_factory(recipe)
    if make is not None and type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear, which convert() cannot replace in place; "
                         "use Float8Linear.from_linear(model) / FP4Linear.from_linear(model), or pass "
                         "a module that contains it (e.g. nn.Sequential(model))")
    summary = ConvertSummary(recipe.name, layer_type, smooth_mode=recipe.smooth_swiglu)
    patterns = DEFAULT_HIGH_PRECISION + recipe.keep_high_precision
    tied = _embedding_weights(model)

    def keep_reason(name: str, module: nn.Linear) -> str | None:
        if _matches(name, patterns):
            return "output head / keep_high_precision"
        if id(module.weight) in tied:
            return f"output head (weight tied to embedding {tied[id(module.weight)]!r})"
        if filter_fn is not None and not filter_fn(name, module):
            return "filter_fn"
        return _untileable(recipe, module)

    linears = _linears_by_identity(model) if make is not None else []
    candidates: list[tuple[list[str], nn.Linear]] = []
    for names, module in linears:
        why = next((r for r in (keep_reason(name, module) for name in names) if r is not None), None)
        if why is None:
            candidates.append((names, module))
        else:
            summary.kept.update(dict.fromkeys(names, why))
    n_tail = math.ceil(recipe.keep_last_fraction * len(candidates)) if candidates else 0
    tail_reason = f"last {recipe.keep_last_fraction:.0%} of the linear layers"
    for names, _ in candidates[len(candidates) - n_tail:]:
        summary.kept.update(dict.fromkeys(names, tail_reason))
    for names, module in candidates[:len(candidates) - n_tail]:
        new = make(module)
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, new)
        summary.converted.extend(names)

    if recipe.smooth_swiglu is not None:
        for name, module in model.named_modules():
            if swiglu_attributes(module) is not None:
                enable_smoothing(module, recipe.smooth_swiglu)
                summary.smoothed.append(name)
    return summary
