"""Backend dispatch: CUDA kernels from ``csrc/*.cu`` through CuPy, torch everywhere else.

Every kernel in ``csrc/`` has a pure-torch twin (the oracle) in ``lpdist.quant`` or in the
module that uses it. This module only decides which one runs and launches CUDA code:

* ``backend()`` is ``"cupy"`` when CuPy imports and a CUDA device is present, else ``"torch"``.
  ``LPDIST_BACKEND=torch`` forces the reference everywhere (useful to bisect a numeric issue);
  ``LPDIST_BACKEND=cupy``, like leaving it unset, picks the kernels when they can run.
* ``module(name)`` compiles ``csrc/<name>.cu`` once per process with NVRTC (``cupy.RawModule``);
  CuPy caches the binary on disk in a private directory (``~/.cache/lpdist/cupy``, mode 0700).
  CuPy appends ``-ftz=true`` after the caller's options (NVRTC takes the last), so every kernel
  runs in flush-to-zero mode: a float32 subnormal (below 2^-126) is a zero of its sign in every
  fp32 operation. The communication twin (``lpdist.comm.codec``) flushes alike; the quantization
  and AdamW twins do not, so they can differ from their kernels on values below 2^-126 only.
* ``launch(...)`` runs a kernel on PyTorch's current stream, on torch tensors without copies
  (their ``data_ptr()`` is passed as a raw device pointer).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CACHE = Path(os.environ.get("LPDIST_CACHE_DIR", Path.home() / ".cache" / "lpdist")) / "cupy"
#: Values of ``LPDIST_BACKEND`` (case-insensitive; unset or empty is ``"cupy"``).
BACKENDS = ("torch", "cupy")

__all__ = ["BACKENDS", "backend", "use_cupy", "module", "compile_options", "launch", "capped_grid",
           "current_stream_ptr", "GRID_CTAS_PER_SM", "CSRC", "C_TYPES", "FORMAT_TYPES"]


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it readable and writable by its owner
    only (mode 0700): compiled kernels loaded from it must not be replaceable by other users."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


@functools.cache
def _cupy():
    """Import CuPy with its kernel cache in a private directory; None when unavailable."""
    choice = os.environ.get("LPDIST_BACKEND", "").lower() or "cupy"
    if choice not in BACKENDS:
        raise ValueError(f"LPDIST_BACKEND must be unset or one of {BACKENDS}, got "
                         f"{os.environ['LPDIST_BACKEND']!r}")
    if choice == "torch":
        return None
    if not torch.cuda.is_available():
        return None
    os.environ.setdefault("CUPY_CACHE_DIR", str(private_dir(_CACHE)))
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def cupy_module() -> Any:
    """The CuPy module (for its CUDA runtime bindings); RuntimeError when it cannot be used."""
    cupy = _cupy()
    if cupy is None:
        raise RuntimeError("CUDA kernels need CuPy and a CUDA device (install lpdist[cuda])")
    return cupy


def backend() -> str:
    """``"cupy"`` if CUDA kernels can run in this process, else ``"torch"``."""
    return "cupy" if _cupy() is not None else "torch"


def use_cupy(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives on a CUDA device and the CuPy backend is active.

    Always False while ``torch.compile`` traces: the torch reference twin is traced instead and
    inductor fuses it (a CuPy launch is opaque to the compiler and cannot be traced).
    """
    if torch.compiler.is_compiling():
        return False
    return all(t.is_cuda for t in tensors) and _cupy() is not None


@functools.cache
def module(name: str, options: tuple[str, ...] = (), name_expressions: tuple[str, ...] = ()) -> Any:
    """Compile ``csrc/<name>.cu`` with NVRTC once per process and return the ``RawModule``.

    ``name_expressions`` lists template instantiations to compile (e.g.
    ``"lp_quantize<float, lp::E4M3, 8, 16>"``); each distinct tuple is compiled once.
    """
    cupy = cupy_module()
    source = (CSRC / f"{name}.cu").read_text()
    return cupy.RawModule(code=source, options=compile_options(options), name_expressions=name_expressions or None)


def compile_options(options: tuple[str, ...] = ()) -> tuple[str, ...]:
    """NVRTC options of every ``csrc/*.cu`` compile: C++17, ``csrc/`` on the include path, then
    the caller's ``options`` (CuPy adds the CUDA include path and the device's architecture)."""
    return ("--std=c++17", f"-I{CSRC}") + tuple(options)


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_ptr(device: int) -> int:
    """Raw handle of torch's current CUDA stream on ``device`` (torch's own raw getter where this
    torch has it, which costs a fraction of building ``torch.cuda.current_stream``'s object)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device)
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int, device: int) -> Any:
    """CuPy handle of a torch stream (cached; CuPy 14 flags ExternalStream as deprecated but it is
    the one constructor that takes a raw pointer across CuPy 13-14)."""
    cupy = _cupy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device)


def _arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        if not a.is_cuda:
            raise ValueError("kernel arguments must be CUDA tensors")
        return np.uint64(a.data_ptr())
    if isinstance(a, bool):
        return np.int32(a)
    if isinstance(a, int):
        return np.int64(a)
    if isinstance(a, float):
        return np.float32(a)
    return a


#: Template arguments of the kernels: C element type of a torch dtype, format traits of a format
#: name (``csrc/lp_formats.cuh``).
C_TYPES = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}
FORMAT_TYPES = {"e4m3": "lp::E4M3", "e5m2": "lp::E5M2", "e2m1": "lp::E2M1"}


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Default grid cap of the grid-stride kernels (quantize, comm), CTAs per SM.
GRID_CTAS_PER_SM = 64


def capped_grid(work_items: int, per_cta: int, ctas_per_sm: int = GRID_CTAS_PER_SM,
                device: torch.device | int | None = None) -> int:
    """CTAs of a grid-stride kernel: enough for one pass over ``work_items`` at ``per_cta``
    each, at most ``ctas_per_sm`` per SM of ``device`` (default: the current one), at least 1."""
    if isinstance(device, torch.device):
        device = device.index
    index = torch.cuda.current_device() if device is None else device
    return max(1, min(-(-work_items // per_cta), _sm_count(index) * ctas_per_sm))


def launch(
    name: str,
    kernel: str,
    grid: int | Sequence[int],
    block: int | Sequence[int],
    args: Sequence[Any],
    *,
    device: torch.device | int | None = None,
    shared_mem: int = 0,
    options: tuple[str, ...] = (),
) -> None:
    """Launch ``kernel`` from ``csrc/<name>.cu`` on torch's current stream.

    Tensors become raw device pointers, Python ``int`` becomes ``int64``, ``float`` becomes
    ``float32`` and ``bool`` becomes ``int32``; pass ``np.int32`` etc. for other C types.
    A ``kernel`` with template arguments (``"f<float, 8>"``) is compiled on first use.
    """
    current = torch.cuda.current_device()
    if device is None:
        dev = current
    else:
        dev = device if isinstance(device, int) else device.index
    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    block = (block,) if isinstance(block, int) else tuple(block)
    function = _kernel(name, kernel, tuple(options), dev)
    stream = _external_stream(current_stream_ptr(dev), dev)
    launch_args = tuple(_arg(a) for a in args)
    if dev == current:  # the common case: no device switch (a context manager costs host time)
        function(grid, block, launch_args, shared_mem=shared_mem, stream=stream)
        return
    with _cupy().cuda.Device(dev):
        function(grid, block, launch_args, shared_mem=shared_mem, stream=stream)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, kernel: str, options: tuple[str, ...], device: int) -> Any:
    """The launchable kernel for one device (CuPy's ``Function``, loaded in that device's
    context), looked up once: lookups cost more than launches."""
    cupy = _cupy()
    exprs = (kernel,) if "<" in kernel else ()
    with cupy.cuda.Device(device):
        return module(name, options, exprs).get_function(kernel).kernel
