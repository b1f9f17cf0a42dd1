"""CUDA launchers for ``csrc/quant.cu``: block-scaled quantize and dequantize.

Called by ``lpdist.quant`` for CUDA tensors; produces exactly the storage of the torch
reference (``lpdist.quant.qtensor``), bit for bit with round-to-nearest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..quant.scaling import NVFP4_TENSOR_DIVISOR, float_scale
from . import C_TYPES, FORMAT_TYPES, capped_grid, launch

if TYPE_CHECKING:  # annotations only: lpdist.quant imports this module
    from ..quant.qtensor import QTensor
    from ..quant.scaling import Scheme

_THREADS = 256
_MODE = {"float": 0, "e8m0_floor": 1, "e8m0_ceil": 2, "nvfp4": 3, "given": 4, "tensor": 5}
_SCALE_KIND = {"float": 0, "e8m0": 1, "nvfp4": 2}
# Work chunk (elements of a row one thread group handles) when the tensor has a single scale:
# one scale for all, so the chunk only sets how much work a thread group takes on.
_TENSOR_CHUNK = 2048
_FAST_MAX_BLOCK = 256


def _vec(x: torch.Tensor, n: int, k: int) -> int:
    """8 elements per thread (16-byte loads) when rows and blocks are 8-aligned, else pairs."""
    aligned = x.data_ptr() % 16 == 0 and n % 8 == 0 and k % 8 == 0
    return 8 if aligned else 2


def _threads_per_block(k: int, vec: int) -> int:
    need = -(-k // vec)
    for tpb in (4, 8, 16):
        if need <= tpb:
            return tpb
    return 32


def _seed(generator: torch.Generator | None) -> int:
    gen_device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 32, (1,), generator=generator, device=gen_device).item())


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """Device buffer ``[amax of finite |x|, 1.0 if any NaN else 0.0]`` (no host sync)."""
    out = torch.zeros(2, dtype=torch.float32, device=x.device)
    vec8 = x.data_ptr() % 16 == 0 and x.numel() % 8 == 0
    launch("quant", f"lp_amax<{C_TYPES[x.dtype]}, {'true' if vec8 else 'false'}>",
           capped_grid(x.numel(), _THREADS * (32 if vec8 else 8)), _THREADS, (x, x.numel(), out))
    return out


def quantize(x: torch.Tensor, scheme: Scheme, rounding: str, generator: torch.Generator | None,
             scale: torch.Tensor | None, rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a CUDA tensor; returns (data, stored scale, tensor scale or None)."""
    if x.dtype == torch.float64:
        x = x.float()
    x = x.contiguous()
    elem, block = scheme.elem, scheme.block
    fp4 = elem.torch_dtype is None
    n = x.shape[-1]
    rows = x.numel() // n
    lead = x.shape[:-1]
    k = block if block is not None else min(n + (n % 2), _TENSOR_CHUNK)
    if fp4 and k % 2:
        from ..quant.qtensor import _quantize_reference  # odd FP4 blocks would split a byte
        return _quantize_reference(x, scheme, rounding, generator, scale, rule)
    nb = -(-n // k)
    dev = x.device
    data = torch.empty(*lead, (n + 1) // 2 if fp4 else n, dtype=torch.uint8, device=dev)
    amax_buf = torch.zeros(2, dtype=torch.float32, device=dev)
    given = amax_buf
    given_stride = 0
    tensor_scale = None
    if scale is not None:
        mode = "given"
        given = scale.float().contiguous()
        given_stride = 0 if block is None else 1
        if fp4 and block is None:
            amax_buf = tensor_amax(x)  # its NaN flag marks the whole tensor
    elif block is None:
        mode = "tensor"
        amax_buf = tensor_amax(x)
    elif scheme.scale_kind == "e8m0":
        mode = f"e8m0_{rule}"
    elif scheme.scale_kind == "nvfp4":
        mode = "nvfp4"
        amax_buf = tensor_amax(x)
        tensor_scale = float_scale(amax_buf[0], NVFP4_TENSOR_DIVISOR)
    else:
        mode = "float"
    if block is None:
        stored = torch.empty((), dtype=torch.float32, device=dev)
    elif scheme.scale_kind == "float":
        stored = torch.empty(*lead, nb, dtype=torch.float32, device=dev)
    else:
        stored = torch.empty(*lead, nb, dtype=torch.uint8, device=dev)
    vec = _vec(x, n, k)
    tpb = _threads_per_block(k, vec)
    stochastic = rounding == "stochastic"
    common = (x, data, stored, amax_buf, given, given_stride, rows, n, k, np.int32(_MODE[mode]))
    if not fp4 and not stochastic and vec == 8 and k <= _FAST_MAX_BLOCK:
        kernel = f"lp_quantize_fp8_fast<{C_TYPES[x.dtype]}, {FORMAT_TYPES[elem.name]}, {tpb}>"
        launch("quant", kernel, capped_grid(rows * nb, _THREADS // tpb * 4), _THREADS, common)
    else:
        kernel = f"lp_quantize<{C_TYPES[x.dtype]}, {FORMAT_TYPES[elem.name]}, {vec}, {tpb}>"
        launch("quant", kernel, capped_grid(rows * nb, _THREADS // tpb), _THREADS,
               common + (np.int32(stochastic), np.uint32(_seed(generator) if stochastic else 0)))
    if scale is not None:
        stored = scale.float() if not fp4 else stored
    if not fp4:
        data = data.view(elem.torch_dtype)
    if scheme.scale_kind == "nvfp4":
        stored = stored.view(torch.float8_e4m3fn)
    return data, stored, tensor_scale


def dequantize(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """Expand a CUDA ``QTensor`` into ``dtype`` (float32, bfloat16 or float16)."""
    out_dtype = dtype if dtype in C_TYPES else torch.float32
    scheme = q.scheme
    elem = scheme.elem
    fp4 = elem.torch_dtype is None
    shape = q.shape if len(q.shape) else torch.Size([1])
    n = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    k = q.block if q.block is not None else n
    out = torch.empty(shape, dtype=out_dtype, device=q.data.device)
    data = q.data.view(torch.uint8).contiguous()
    scale = q.scale.view(torch.uint8) if scheme.scale_kind == "nvfp4" else q.scale
    scale = scale.contiguous()
    tensor_scale = q.tensor_scale if q.tensor_scale is not None else scale
    aligned = data.data_ptr() % 8 == 0 and out.data_ptr() % 32 == 0
    vec = 8 if aligned and n % 8 == 0 and k % 8 == 0 else 1
    args = (data, scale, tensor_scale, np.int32(_SCALE_KIND[scheme.scale_kind]),
            0 if q.block is None else 1, out, rows, n, k)
    if vec == 8 and not fp4:
        kernel = f"lp_dequantize_fp8_fast<{C_TYPES[out_dtype]}, {FORMAT_TYPES[elem.name]}>"
        launch("quant", kernel, capped_grid(rows * n // 8, _THREADS * 4), _THREADS, args)
    else:
        kernel = f"lp_dequantize<{C_TYPES[out_dtype]}, {FORMAT_TYPES[elem.name]}, {vec}>"
        launch("quant", kernel, capped_grid(rows * n // vec, _THREADS), _THREADS, args)
    out = out.reshape(q.shape)
    return out if out_dtype == dtype else out.to(dtype)
