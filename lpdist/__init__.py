"""lpdist: low-precision (FP8/FP4) LLM training on stock PyTorch.

Sub-packages: ``quant`` (number formats, the oracle), ``kernels`` (CUDA via CuPy),
``comm`` (FP8 gradient communication), ``optim`` (low-precision AdamW), ``nn`` (FP8/FP4
layers, Smooth-SwiGLU, recipes), ``models``, ``data``, ``checkpoint``, ``monitor``.
The names below are imported lazily so that ``import lpdist`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "lpdist.nn",
    "recipes": "lpdist.nn",
    "convert": "lpdist.nn",
    "AdamW": "lpdist.optim",
    "wrap": "lpdist.optim",
    "Float8Linear": "lpdist.nn",
    "FP4Linear": "lpdist.nn",
    "SmoothSwiGLU": "lpdist.nn",
    "swiglu": "lpdist.nn",
    "enable_fp8_reduce_scatter": "lpdist.comm",
    "init": "lpdist.dist",
    "quantize": "lpdist.quant",
    "dequantize": "lpdist.quant",
    "QTensor": "lpdist.quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lpdist' has no attribute {name!r}")
