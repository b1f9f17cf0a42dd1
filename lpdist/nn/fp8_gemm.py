"""One FP8 GEMM ``A·Bᵀ`` of two scaled operands: FP8 tensor cores where they exist, exact
emulation elsewhere.

Both operands come as row-major ``[rows, K]`` casts (:class:`~lpdist.nn.fp8_cast.FP8Cast`)
whose scales run along the reduction dim K, so ``out[m, n] = Σ_k a[m, k]·b[n, k]`` with the
scales applied per group. Scaling kinds:

* ``"tensor"``: one scale per operand; ``"row"``: scales ``[M, 1]`` and ``[N, 1]``;
* ``"block"``: A in 1x128 tiles ``[M, K/128]``; B either in 1x128 tiles ``[N, K/128]`` or in
  128x128 blocks ``[N/128, K/128]`` (DeepSeek-V3, arXiv 2412.19437; ALGORITHMS.md §7).

Hardware path (CUDA, FP8 tensor cores): ``torch._scaled_mm`` for tensor and row scales (mat2
column-major, i.e. ``b.data.t()``), ``torch.nn.functional.scaled_mm`` with ``BlockWise1x128`` /
``BlockWise128x128`` recipes for blocks (cuBLASLt >= 12.9 on sm90 accumulates each 128-run of
K in FP32 with its scales, as DeepSeek-V3 prescribes). Each combination is probed once per
device against the emulation (non-square operands, both accumulation modes); when the probe
fails the emulation runs instead, with a warning.

Per-tensor scaled GEMMs that the tensor cores take call ``torch._scaled_mm`` directly, so that
under ``torch.compile`` it is part of the traced graph (the choice is made while tracing, from
the probe below, which ``torch.compile`` treats as a constant); on one H200 the compiled 8B
MLP block took a median 16.3 ms per step this way against 16.6 ms through an opaque op around
the same call (BENCHMARKS.md). Its result must reach the graph output untouched: with a
``.to(out_dtype)`` after it, even a no-op one, inductor (torch 2.11) returned an all-zero input
gradient, which the GPU tests (compiled and eager layers against the emulation, every scaling)
detect. Everything else (row scales, block scaling through ``F.scaled_mm``, which torch 2.11
cannot trace, and the emulation) is the custom op ``lpdist::fp8_gemm``: ``torch.compile`` treats
it as one opaque kernel (shape and dtype from its fake implementation) and the choice between
tensor cores and emulation is made when it runs.

Emulation (CPU, or a combination the GPU refuses): dequantize both operands (fp64 for fp64
inputs, else fp32, where the product of a 4-bit FP8 significand and an fp32 scale is exact up to
one fp32 rounding) and multiply in that precision. Equal to the FP8 GEMM up to accumulation
order.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .fp8_cast import FP8Cast, column_major, dequantize_fp8

__all__ = ["fp8_gemm", "hardware_fp8_available", "SCALING_KINDS"]

SCALING_KINDS = ("tensor", "row", "block")
_TILE = 128
_PROBED: dict[tuple, bool] = {}
_PROBE_SHAPE = (128, 256, 384)  # M, N, K: distinct, so a transposed layout cannot pass


def _recipe(*names: str):
    """A ``ScalingType`` member by its name in this torch version (names changed across releases)."""
    for name in names:
        if hasattr(F.ScalingType, name):
            return getattr(F.ScalingType, name)
    raise AttributeError(f"torch.nn.functional.ScalingType has none of {names}")


def _block_weight_scale(s: torch.Tensor) -> torch.Tensor:
    """128x128 block scales ``[N/128, K/128]`` of B as ``[round_up(K/128, 4), N/128]`` with
    strides ``(1, round_up(K/128, 4))``, the layout of ``scale_b`` for BlockWise128x128."""
    kb = s.shape[1]
    pad = -kb % 4
    if pad:
        s = F.pad(s, (0, pad), value=1.0)
    return s.contiguous().t()


def _hardware_gemm(a: FP8Cast, b: FP8Cast, kind: str, b_blocks: bool, out_dtype: torch.dtype,
                   fast_accum: bool) -> torch.Tensor:
    if kind == "tensor":
        return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale, scale_b=b.scale,
                                out_dtype=out_dtype, use_fast_accum=fast_accum)
    if kind == "row":
        return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale.reshape(-1, 1),
                                scale_b=b.scale.reshape(1, -1), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    tile = _recipe("BlockWise1x128", "Blockwise_1x128")
    if b_blocks:
        recipe_b, scale_b = _recipe("BlockWise128x128", "Blockwise_128x128"), _block_weight_scale(b.scale)
    else:
        recipe_b, scale_b = tile, column_major(b.scale)
    return F.scaled_mm(a.data, b.data.t(), column_major(a.scale), tile, scale_b, recipe_b,
                       output_dtype=out_dtype)


def _emulated_gemm(a: FP8Cast, b: FP8Cast, kind: str, b_blocks: bool, out_dtype: torch.dtype,
                   block: int = _TILE) -> torch.Tensor:
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    group_a = None if kind == "tensor" else (a.data.shape[-1] if kind == "row" else block)
    group_b = None if kind == "tensor" else (b.data.shape[-1] if kind == "row" else block)
    with torch.autocast(a.data.device.type, enabled=False):
        a_hp = dequantize_fp8(a, group_a, dtype)
        b_hp = dequantize_fp8(b, group_b, dtype, blocks=block if b_blocks else None)
        return (a_hp @ b_hp.t()).to(out_dtype)


def _shapes_fit(kind: str, m: int, n: int, k: int) -> bool:
    align = _TILE if kind == "block" else 16
    return m % align == 0 and n % align == 0 and k % align == 0


def _probe(key: tuple) -> bool:
    """Run the hardware path once on random non-square operands, with and without fast
    accumulation, and compare both to the emulation."""
    kind, a_dtype, b_dtype, b_blocks, index = key
    device = torch.device("cuda", index)
    from .fp8_cast import cast_fp8, cast_fp8_blocks
    fmt = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
    m, n, k = _PROBE_SHAPE
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen)
    y = torch.randn(n, k, device=device, generator=gen)
    group = {"tensor": None, "row": k, "block": _TILE}[kind]
    a = cast_fp8(x, fmt[a_dtype], group)
    b = cast_fp8_blocks(y, fmt[b_dtype], _TILE) if b_blocks else cast_fp8(y, fmt[b_dtype], group)
    want = _emulated_gemm(a, b, kind, b_blocks, torch.float32)
    # bf16 output: one rounding (2^-8 relative) on top of accumulation-order differences.
    tol = 2.0 ** -7 * want.abs() + 1e-3 * want.abs().max()
    for fast_accum in (False, True):
        try:
            got = _hardware_gemm(a, b, kind, b_blocks, torch.bfloat16, fast_accum).float()
        except (RuntimeError, NotImplementedError, ValueError, AttributeError, TypeError) as err:
            warnings.warn(f"FP8 {kind} GEMM ({a_dtype} x {b_dtype}) is not available on {device} "
                          f"({type(err).__name__}: {str(err).splitlines()[0]}); using the exact "
                          "emulation (dequantized operands, fp32 GEMM) instead", RuntimeWarning)
            return False
        if got.shape != want.shape or not bool(((got - want).abs() <= tol).all()):
            warnings.warn(f"FP8 {kind} GEMM ({a_dtype} x {b_dtype}, use_fast_accum={fast_accum}) "
                          f"on {device} disagrees with the emulation; using the emulation instead",
                          RuntimeWarning)
            return False
    return True


@torch.compiler.assume_constant_result
def hardware_fp8_available(kind: str, a_dtype: torch.dtype, b_dtype: torch.dtype, b_blocks: bool,
                           device: torch.device) -> bool:
    """Whether this device runs this FP8 GEMM combination on tensor cores (probed once per
    combination and device, on first use; later calls are one dictionary lookup). Under
    ``torch.compile`` it is called once while tracing and its answer is part of the graph."""
    if device.type != "cuda":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    key = (kind, a_dtype, b_dtype, b_blocks, index)
    known = _PROBED.get(key)
    if known is None:
        known = (torch.cuda.get_device_capability(index) >= (8, 9)
                 and (kind != "block" or hasattr(F, "scaled_mm")) and _probe(key))
        _PROBED[key] = known
    return known


def _uses_tensor_cores(a: FP8Cast, b: FP8Cast, kind: str, b_blocks: bool, block: int,
                       out_dtype: torch.dtype) -> bool:
    m, k = a.data.shape
    return (a.data.is_cuda and out_dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (kind != "block" or block == _TILE) and _shapes_fit(kind, m, b.data.shape[0], k)
            and hardware_fp8_available(kind, a.data.dtype, b.data.dtype, b_blocks, a.data.device))


# The op is declared with torch.library.Library rather than torch.library.custom_op: the
# dispatcher then calls the Python kernel directly, without custom_op's per-call wrapper layers
# (autograd redispatch, aliasing checks), which cost about 0.1 ms of host time per GEMM on an
# H200's host. It is only called where autograd is off (inside _Float8Matmul's forward and
# backward), so it needs no autograd kernel.
_LIBRARY = torch.library.Library("lpdist", "FRAGMENT")
_LIBRARY.define("fp8_gemm(Tensor a_data, Tensor a_scale, Tensor b_data, Tensor b_scale, str kind, "
                "bool b_blocks, int block, ScalarType out_dtype, bool fast_accum) -> Tensor")


def _fp8_gemm_kernel(a_data: torch.Tensor, a_scale: torch.Tensor, b_data: torch.Tensor,
                     b_scale: torch.Tensor, kind: str, b_blocks: bool, block: int,
                     out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    a = FP8Cast(a_data.contiguous(), a_scale)
    b = FP8Cast(b_data.contiguous(), b_scale)
    if _uses_tensor_cores(a, b, kind, b_blocks, block, out_dtype):
        hw_dtype = torch.bfloat16 if kind != "tensor" and out_dtype == torch.float32 else out_dtype
        return _hardware_gemm(a, b, kind, b_blocks, hw_dtype, fast_accum).to(out_dtype)
    return _emulated_gemm(a, b, kind, b_blocks, out_dtype, block)


_LIBRARY.impl("fp8_gemm", _fp8_gemm_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("lpdist::fp8_gemm", lib=_LIBRARY)
def _(a_data, a_scale, b_data, b_scale, kind, b_blocks, block, out_dtype, fast_accum):
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


_fp8_gemm_op = torch.ops.lpdist.fp8_gemm.default


def fp8_gemm(a: FP8Cast, b: FP8Cast, kind: str, out_dtype: torch.dtype, *, b_blocks: bool = False,
             block: int = _TILE, fast_accum: bool = False) -> torch.Tensor:
    """``A·Bᵀ`` of row-major FP8 operands scaled along K, in ``out_dtype``.

    ``kind="block"``: A (and B unless ``b_blocks``) in 1x``block`` tiles; ``b_blocks=True``
    marks B as a ``block``x``block``-tile weight. Tensor cores take ``block=128`` only.
    ``fast_accum`` enables Hopper's fast (reduced-precision) accumulation, used for the forward.
    Row- and block-scaled tensor-core GEMMs produce bf16, converted to an fp32 ``out_dtype``.

    1x``block`` tile scales enter the op column-major, the layout cuBLASLt reads: under
    ``torch.compile`` that relayout is part of the traced graph, where inductor writes it with
    the cast that computes the scales, instead of a copy per call inside the opaque op.
    """
    if kind == "tensor" and _uses_tensor_cores(a, b, kind, b_blocks, block, out_dtype):
        # In the traced graph, the result returned as it is (no .to(): module docstring).
        a, b = FP8Cast(a.data.contiguous(), a.scale), FP8Cast(b.data.contiguous(), b.scale)
        return _hardware_gemm(a, b, kind, b_blocks, out_dtype, fast_accum)
    a_scale = column_major(a.scale) if kind == "block" else a.scale
    b_scale = column_major(b.scale) if kind == "block" and not b_blocks else b.scale
    return _fp8_gemm_op(a.data, a_scale, b.data, b_scale, kind, b_blocks, block, out_dtype,
                        fast_accum)
