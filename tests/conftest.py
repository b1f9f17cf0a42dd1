"""Shared pytest set-up: the ``gpu`` marker and seeded random generators.

Tests marked ``@pytest.mark.gpu`` are skipped when no CUDA device is present; on a GPU machine
``scripts/gpu_check.sh`` runs them with ``pytest -m gpu tests``.
"""

from __future__ import annotations

import hashlib

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by scripts/gpu_check.sh)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's name: fresh data per test, reproducible per test."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "little") % (2**63)
    return torch.Generator().manual_seed(seed)
