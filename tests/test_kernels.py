"""lpdist.kernels launch helpers that need no GPU."""

from __future__ import annotations

import pytest
import torch

from lpdist import kernels


@pytest.mark.parametrize("work, per_cta, per_sm, expected", [
    (10, 4, 4, 3),              # one pass: ceil(10 / 4)
    (10**9, 256, 4, 132 * 4),   # capped at 4 CTAs on each of 132 SMs
    (0, 4, 4, 1),               # never an empty grid
])
def test_capped_grid(monkeypatch: pytest.MonkeyPatch, work: int, per_cta: int, per_sm: int, expected: int) -> None:
    asked = []
    monkeypatch.setattr(kernels, "_sm_count", lambda index: asked.append(index) or 132)
    assert kernels.capped_grid(work, per_cta, per_sm, torch.device("cuda", 1)) == expected
    assert asked == [1]
