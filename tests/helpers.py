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
