"""Helpers of scripts/swiglu_outliers.py: E4M3 cast statistics and channel alignment."""

import torch
import torch.nn.functional as F
from script_loader import load_script

swiglu_outliers = load_script("scripts/swiglu_outliers.py")


def test_e4m3_stats_counts_flushed_subnormal_and_saturated_values():
    # amax 448 -> current scale 1. E4M3 subnormals are multiples of 2^-9 and normals start at
    # 2^-6: 2^-11 rounds to 0 (below half of 2^-9), 2^-8 is a subnormal, 1 and 448 are normal.
    x = torch.tensor([2.0 ** -11, -(2.0 ** -8), 1.0, 448.0])
    stats = swiglu_outliers.e4m3_stats(x)
    assert stats["amax"] == 448.0
    assert stats["underflow_frac"] == 0.25
    assert stats["subnormal_frac"] == 0.5
    assert stats["saturated_frac"] == 0.0
    assert stats["max_over_median"] == 448.0 / torch.tensor([2.0 ** -11, 2.0 ** -8, 1.0, 448.0]).median().item()
    # A stale scale of 0.5 maps 448 to 896 > 448: one value saturates.
    assert swiglu_outliers.e4m3_stats(x, torch.tensor(0.5))["saturated_frac"] == 0.25


def test_align_channels_aligns_only_the_chosen_rows():
    gen = torch.Generator().manual_seed(1)
    gate, up = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    gate0, up0 = gate.clone(), up.clone()
    chosen = torch.tensor([2, 5])
    swiglu_outliers.align_channels(gate, up, chosen, c=3.0, boost=2.0)
    torch.testing.assert_close(gate[chosen], 2.0 * gate0[chosen])
    torch.testing.assert_close(up[chosen], 6.0 * gate0[chosen])
    cos = F.cosine_similarity(gate[chosen], up[chosen], dim=1)
    torch.testing.assert_close(cos, torch.ones(2))
    rest = torch.ones(16, dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(gate[rest], gate0[rest]) and torch.equal(up[rest], up0[rest])
