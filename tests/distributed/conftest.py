"""Fixtures for tests run under ``mpiexec -n N python -m pytest --with-mpi tests/distributed``.

``dist_info`` creates the default process group once per pytest process (every rank runs the
same tests in the same order, so they all join it together) with the gloo backend, and destroys
it at the end. Tests that need torch.distributed request this fixture instead of calling
``torch.distributed.init_process_group`` themselves.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from lpdist import dist as lpdist_dist


@pytest.fixture(scope="session")
def dist_info() -> Iterator[lpdist_dist.DistInfo]:
    """``DistInfo(rank, world_size, local_rank, device)`` of this rank (gloo, CPU)."""
    info = lpdist_dist.init(backend="gloo")
    yield info
    lpdist_dist.destroy()
