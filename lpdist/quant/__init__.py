"""Number formats and block-scaled quantization: the pure-torch oracle of every kernel.

See ``formats`` (element grids and rounding), ``scaling`` (block layout and scale rules) and
``qtensor`` (``quantize`` / ``dequantize`` / ``QTensor``). ALGORITHMS.md §1 gives the math.
"""

from .formats import (E2M1_VALUES, FORMATS, Format, decode_e2m1, encode_e2m1, get_format,
                      pack_fp4, round_to_format, unpack_fp4)
from .qtensor import QTensor, dequantize, fake_quantize, quantize
from .scaling import PRESETS, Scheme, block_amax, resolve

__all__ = [
    "E2M1_VALUES", "FORMATS", "Format", "PRESETS", "QTensor", "Scheme", "block_amax",
    "decode_e2m1", "dequantize", "encode_e2m1", "fake_quantize", "get_format", "pack_fp4",
    "quantize", "resolve", "round_to_format", "unpack_fp4",
]
