"""Helpers shared by test modules in tests/ and tests/distributed/ (``from helpers import ...``).

Not a test file (pytest collects only ``test_*.py``). Importable because pytest's default
``prepend`` import mode puts tests/ on ``sys.path`` when it loads tests/conftest.py.
"""

from __future__ import annotations

import torch

# Open MPI settings for an ``mpiexec`` launched by a test: as root, on one host, TCP over loopback.
OPEN_MPI_ENV: dict[str, str] = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_btl_tcp_if_include": "lo",
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ``||a - b|| / ||b||``, computed in the promoted dtype of ``a`` and ``b``."""
    return ((a - b).norm() / b.norm()).item()


def operand_with_outliers(rows: int, cols: int, generator: torch.Generator, dtype=torch.float32,
                          device="cpu") -> torch.Tensor:
    """Gaussian ``[rows, cols]`` whose rows and columns span six decades, with an all-zero
    128x128 tile, a NaN, +-inf and a value far below its group's amax that every FP8 format
    flushes to zero (every scale differs; one group has amax 0)."""
    x = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 0, rows)[:, None]
    x = x * torch.logspace(0, 3, cols)[torch.randperm(cols, generator=generator)]
    x[:128, 128:256] = 0.0
    x[3, 5], x[200, 7], x[9, 300] = float("nan"), float("inf"), -float("inf")
    x[-1, 0] = 1e-7
    return x.to(device=device, dtype=dtype)
