"""Every CUDA kernel compiles under NVRTC, the compiler CuPy uses at run time, with the options
the kernel loader passes (``lpdist.kernels.compile_options``), and defines every kernel its
launcher can ask for.

NVRTC is a host library, so this runs without a GPU: compile errors and names that differ between
a launcher and ``csrc/`` show up before any GPU run. It needs NVRTC and the CUDA headers, from the
``nvidia-cuda-nvrtc`` and ``nvidia-cuda-runtime`` wheels of the ``test`` extra. The architecture
is ``compute_90`` (Hopper), the GPUs the kernels are tuned for.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
from pathlib import Path

import pytest

from lpdist import kernels
from lpdist.comm import codec
from lpdist.kernels import fp8_tiles
from lpdist.kernels import quant as quant_launcher
from lpdist.optim import adamw, fused
from lpdist.optim.moments import MOMENT_FORMATS

ARCH = "compute_90"


def _cuda_wheel_dir() -> Path | None:
    """``nvidia/cu13`` of the installed CUDA wheels (lib/libnvrtc.so.13, include/cuda_fp8.h)."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "cu13"
        if (candidate / "lib" / "libnvrtc.so.13").exists() and (candidate / "include" / "cuda_fp8.h").exists():
            return candidate
    return None


CUDA_DIR = _cuda_wheel_dir()
pytestmark = pytest.mark.skipif(CUDA_DIR is None, reason="needs the nvidia-cuda-nvrtc and nvidia-cuda-runtime "
                                "wheels (pip install -e .[test])")


def _check(status: int, call: str) -> None:
    assert status == 0, f"{call} returned NVRTC status {status}"


def nvrtc_compile(name: str, options: tuple[str, ...] = (), expressions: tuple[str, ...] = ()) -> tuple[str, set[str]]:
    """Compile ``csrc/<name>.cu`` as the loader does; returns the PTX and the name expressions
    NVRTC instantiated. A failed compile fails the test with NVRTC's log."""
    lib = ctypes.CDLL(str(CUDA_DIR / "lib" / "libnvrtc.so.13"))
    program = ctypes.c_void_p()
    source = (kernels.CSRC / f"{name}.cu").read_bytes()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source, f"{name}.cu".encode(), 0, None, None), "create")
    try:
        for expression in expressions:
            _check(lib.nvrtcAddNameExpression(program, expression.encode()), f"add {expression}")
        opts = kernels.compile_options(options) + (f"-arch={ARCH}", f"-I{CUDA_DIR / 'include'}")
        status = lib.nvrtcCompileProgram(program, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "log size")
        log = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetProgramLog(program, log), "log")
        assert status == 0, f"NVRTC could not compile csrc/{name}.cu:\n{log.value.decode(errors='replace')}"
        _check(lib.nvrtcGetPTXSize(program, ctypes.byref(size)), "PTX size")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetPTX(program, ptx), "PTX")
        instantiated = set()
        for expression in expressions:
            lowered = ctypes.c_char_p()
            if lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(lowered)) == 0:
                instantiated.add(expression)
        return ptx.value.decode(), instantiated
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _assert_entries(ptx: str, names: set[str]) -> None:
    missing = sorted(n for n in names if f".entry {n}(" not in ptx)
    assert not missing, f"kernels a launcher can ask for are not defined: {missing}"


def test_adamw_kernels():
    """Every kernel name ``fused._kernel_name`` can return (all blocks, parameter and moment
    formats, master copies, small and huge buckets) and the gradient scan, under the AdamW options."""
    names = {"grads_nonfinite"}
    formats = list(MOMENT_FORMATS.values())
    for block, param, m, v, master, total in itertools.product(
            range(128, adamw.MAX_BLOCK + 1, 128), fused.PARAM_FORMAT_CODES.values(), formats, formats,
            (False, True), (1, 2**30)):
        names.add(fused._kernel_name(fused._kernel_block(block, m, v), total, param, m, v, master))
    ptx, _ = nvrtc_compile(fused.KERNEL_MODULE, fused.nvrtc_options())
    _assert_entries(ptx, names)


def test_quantize_kernels():
    """Every template instance ``lpdist.kernels.quant`` can launch: element types x formats x
    vector widths (``_vec``: 2 or 8) x threads per block (``_threads_per_block`` of any block)."""
    types, formats = kernels.C_TYPES.values(), kernels.FORMAT_TYPES
    fp8 = [f for name, f in formats.items() if name != "e2m1"]
    per_block = sorted({quant_launcher._threads_per_block(k, vec) for k in range(1, 4097) for vec in (2, 8)})
    expressions = (
        [f"lp_quantize<{t}, {f}, {vec}, {tpb}>" for t, f, vec, tpb in itertools.product(types, formats.values(),
                                                                                      (2, 8), per_block)]
        + [f"lp_quantize_fp8_fast<{t}, {f}, {tpb}>" for t, f, tpb in itertools.product(types, fp8, per_block)]
        + [f"lp_dequantize<{t}, {f}, {vec}>" for t, f, vec in itertools.product(types, formats.values(), (1, 8))]
        + [f"lp_dequantize_fp8_fast<{t}, {f}>" for t, f in itertools.product(types, fp8)]
        + [f"lp_amax<{t}, {vec8}>" for t, vec8 in itertools.product(types, ("true", "false"))])
    _, instantiated = nvrtc_compile("quant", expressions=tuple(expressions))
    assert not set(expressions) - instantiated, sorted(set(expressions) - instantiated)


def test_comm_kernels():
    """The quantize and dequantize kernels of every input, residual and output dtype and vector
    width ``lpdist.comm.codec`` can pick, the fast quantizer and its peer-store form
    (``lpdist.comm.p2p``) of every ``FAST_BLOCKS`` block, and the peer barrier."""
    names = set()
    for dtype, short in codec._DTYPE_NAME.items():
        for residual, vec, per_lane in itertools.product({short, "f32"}, (codec._WIDE_VEC[dtype], 1), (8, 32)):
            names.add(f"quantize_rows_{short}_{residual}_v{vec}_k{per_lane}")
        names.update(f"dequant_rows_{short}_v{vec}" for vec in (*codec._DEQUANT_VECS, 1))
    ptx, _ = nvrtc_compile("reduce")
    _assert_entries(ptx, names)

    expressions = tuple(f"{kernel}<{kernels.C_TYPES[dtype]}, {kernels.FORMAT_TYPES[fmt]}, "
                        f"{block // codec._FAST_VEC}>"
                        for kernel, dtype, fmt, block in itertools.product(
                            ("quantize_rows_fast", "quantize_rows_to_peers"), codec._DTYPE_NAME,
                            codec.FP8_DTYPES, codec.FAST_BLOCKS))
    _, instantiated = nvrtc_compile("reduce_fast", expressions=expressions)
    assert not set(expressions) - instantiated, sorted(set(expressions) - instantiated)
    ptx, _ = nvrtc_compile("peer")
    _assert_entries(ptx, {"peer_barrier"})


def test_fp8_tile_kernels():
    """The both-ways 1x128 cast of every input dtype and FP8 format, with the launcher's options."""
    expressions = tuple(f"lp_cast_tiles_both<{t}, {f}>" for t, f in itertools.product(
        kernels.C_TYPES.values(), (kernels.FORMAT_TYPES["e4m3"], kernels.FORMAT_TYPES["e5m2"])))
    _, instantiated = nvrtc_compile("fp8_tiles", (f"-DLP_TILES_MIN_CTAS={fp8_tiles.CTAS_PER_SM}",), expressions)
    assert not set(expressions) - instantiated, sorted(set(expressions) - instantiated)


def test_a_compile_error_is_reported(tmp_path, monkeypatch):
    """The check can fail: a kernel with a type error does not pass as compiled."""
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    monkeypatch.setattr(kernels, "CSRC", tmp_path)
    with pytest.raises(AssertionError, match="undefined_name"):
        nvrtc_compile("broken")
