"""SwiGLU and Smooth-SwiGLU (Fishman et al., arXiv 2409.12517; ALGORITHMS.md §2.3, §0).

``SwiGLU(x) = W3 (Swish(W2 x) ⊙ W1 x)`` with ``gate_proj = W2``, ``up_proj = W1``,
``down_proj = W3``. Once W1 and W2 align, the product is quadratic in x and rare large inputs
make outliers in the input of W3 that a per-tensor FP8 scale cannot absorb. Smooth-SwiGLU divides
the linear branch ``u = W1 x`` by a scale ``s`` before the quantized down projection and
compensates exactly, so the function is unchanged in exact arithmetic. ``s`` is computed from the
current micro-batch and treated as a constant in autograd (``DETACH_SCALED_SWIGLU``, a flag of the
paper's published training script):

* ``smooth="token"`` (the reference run): ``s_t = max_j |u_tj|`` per token; the down projection
  sees ``a = Swish(g) ⊙ u/s`` (each row's linear branch has max 1, so ``|a| ≤ |Swish(g)|``)
  and its output rows are multiplied back by ``s_t``: ``diag(s)·(diag(1/s)·A·W3ᵀ) = A·W3ᵀ``.
* ``smooth="channel"`` (the paper's wording): ``s_j = max_t |u_tj|`` per FFN channel; the down
  projection runs with weight ``W3·diag(s)`` (its input columns rescaled), which is the
  inference folding ``w̃3,j = s_j·w3,j``.

Zero scales (an all-zero row or column) are replaced by 1. Works with any linear module that
reads ``self.weight`` in its forward (``nn.Linear``, ``Float8Linear``, ``FP4Linear``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["SMOOTH_MODES", "swiglu", "SmoothSwiGLU", "register_swiglu", "swiglu_attributes",
           "enable_smoothing"]

SMOOTH_MODES = (None, "token", "channel")
_REGISTRY: dict[type, tuple[str, str, str]] = {}
_SMOOTHED: dict[type, type] = {}  # registered class -> its subclass with the smoothed forward


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def _down_scaled_rows(down_proj: nn.Module, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``down_proj(a)`` with its matmul output (not its bias) multiplied by ``s`` per row.

    The bias is left out of the projection and added after the scaling: subtracting it from the
    biased output instead would multiply that output's rounding error (relative to ``|b|``) by
    ``s``, which in bf16 can exceed the matmul part itself.
    """
    bias = getattr(down_proj, "bias", None)
    if bias is None:
        y = down_proj(a)
        return y * s.to(y.dtype)
    y = functional_call(down_proj, {"bias": None}, (a,))
    return y * s.to(y.dtype) + bias.to(y.dtype)


def swiglu(x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, *,
           smooth: str | None = "token") -> torch.Tensor:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, smoothed per token, per channel or not."""
    if smooth not in SMOOTH_MODES:
        raise ValueError(f"smooth must be one of {SMOOTH_MODES}, got {smooth!r}")
    g = gate_proj(x)
    u = up_proj(x)
    if smooth is None:
        return down_proj(F.silu(g) * u)
    if smooth == "token":
        s = _safe(u.detach().abs().amax(dim=-1, keepdim=True))
        return _down_scaled_rows(down_proj, F.silu(g) * (u / s), s)
    s = _safe(u.detach().abs().reshape(-1, u.shape[-1]).amax(dim=0))
    weight = down_proj.weight
    return functional_call(down_proj, {"weight": weight * s.to(weight.dtype)}, (F.silu(g) * (u / s),))


class SmoothSwiGLU(nn.Module):
    """A SwiGLU MLP ``dim -> hidden -> dim`` whose forward is :func:`swiglu` with ``smooth``.

    ``linear`` builds the three projections (``linear(in_features, out_features)``; default
    ``nn.Linear`` without bias), e.g. ``functools.partial(Float8Linear, scaling="row")``.
    """

    is_swiglu_mlp = True

    def __init__(self, dim: int, hidden: int, *, linear: Callable[..., nn.Module] | None = None,
                 smooth: str | None = "token") -> None:
        super().__init__()
        if smooth not in SMOOTH_MODES:
            raise ValueError(f"smooth must be one of {SMOOTH_MODES}, got {smooth!r}")
        if linear is not None and not callable(linear):
            raise TypeError(f"linear must be None or a callable (in_features, out_features) -> module, "
                            f"got {type(linear).__name__}")
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        make = linear or (lambda i, o: nn.Linear(i, o, bias=False))
        self.gate_proj, self.up_proj, self.down_proj = make(dim, hidden), make(dim, hidden), make(hidden, dim)
        self.smooth = smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj, smooth=self.smooth)


def register_swiglu(cls: type, *, gate: str = "gate_proj", up: str = "up_proj",
                    down: str = "down_proj") -> type:
    """Declare ``cls`` a SwiGLU MLP (``forward(x) = down(silu(gate(x)) * up(x))``) with these
    submodule names, so that ``convert`` can apply Smooth-SwiGLU to it. Usable as a decorator."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    for arg, name in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{arg} must be a non-empty attribute name, got {name!r}")
    _REGISTRY[cls] = (gate, up, down)
    return cls


def swiglu_attributes(module: nn.Module) -> tuple[str, str, str] | None:
    """``(gate, up, down)`` attribute names if ``module`` is a known SwiGLU MLP, else None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    if getattr(type(module), "is_swiglu_mlp", False):
        return ("gate_proj", "up_proj", "down_proj")
    return None


def _smooth_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a smoothed registered MLP: :func:`swiglu` on its three projections."""
    gate, up, down = swiglu_attributes(self)
    return swiglu(x, getattr(self, gate), getattr(self, up), getattr(self, down), smooth=self.smooth)


def _reduce_smoothed(self: nn.Module, protocol: int) -> tuple:
    """Pickle (and deep-copy) a smoothed MLP as "an instance of the registered class, smoothed":
    the generated subclass has no importable name, the registered class does."""
    return _new_smoothed, (self._unsmoothed_class,), self.__dict__


def _new_smoothed(cls: type) -> nn.Module:
    """An uninitialized instance of the smoothed subclass of ``cls`` (unpickling fills it)."""
    return object.__new__(_smoothed_class(cls))


def _smoothed_class(cls: type) -> type:
    """The subclass of ``cls`` whose forward is :func:`swiglu` (one per class, cached). Its
    instances are still ``cls`` instances, and they pickle by reference to ``cls``."""
    if cls not in _SMOOTHED:
        _SMOOTHED[cls] = type(f"Smooth{cls.__name__}", (cls,), {
            "__module__": cls.__module__, "__doc__": f"{cls.__name__} with Smooth-SwiGLU.",
            "is_swiglu_mlp": True, "_unsmoothed_class": cls,
            "forward": _smooth_forward, "__reduce_ex__": _reduce_smoothed})
    return _SMOOTHED[cls]


def enable_smoothing(module: nn.Module, smooth: str) -> None:
    """Set ``module.smooth``; a registered class without its own ``smooth`` handling
    (no ``is_swiglu_mlp``) becomes its cached subclass whose forward calls :func:`swiglu`."""
    if smooth not in SMOOTH_MODES:
        raise ValueError(f"smooth must be one of {SMOOTH_MODES}, got {smooth!r}")
    if swiglu_attributes(module) is None:
        raise ValueError(f"module must be a SwiGLU MLP (is_swiglu_mlp or register_swiglu), "
                         f"got {type(module).__name__}")
    module.smooth = smooth
    if not getattr(type(module), "is_swiglu_mlp", False):
        module.__class__ = _smoothed_class(type(module))
