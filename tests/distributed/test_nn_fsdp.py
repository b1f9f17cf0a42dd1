"""Float8Linear / FP4Linear under FSDP2 ``fully_shard`` (gloo, CPU): the module sees the
all-gathered plain weight in forward, and sharded gradients equal the unsharded model's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from lpdist.nn import Float8Linear, FP4Linear


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Float8Linear(64, 128, scaling="row"), nn.GELU(),
                         FP4Linear(128, 64, recipe="dge"), nn.GELU(),
                         Float8Linear(64, 32, scaling="tensor"))


@pytest.mark.mpi(min_size=2)
def test_fully_shard_matches_unsharded(dist_info):
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = _model()
    sharded = copy.deepcopy(reference)
    for layer in sharded:
        if isinstance(layer, (Float8Linear, FP4Linear)):
            fully_shard(layer)
    fully_shard(sharded)
    seen = []
    sharded[0].register_forward_pre_hook(lambda m, args: seen.append(type(m.weight).__name__))
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world, 16, 64, generator=gen)
    sharded(x_all[rank]).pow(2).mean().backward()
    reference(x_all.reshape(-1, 64)).pow(2).mean().backward()  # same mean over all tokens
    assert seen == ["Parameter"] or seen == ["Tensor"]
    for (name, p_ref), p in zip(reference.named_parameters(), sharded.parameters()):
        grad = p.grad.full_tensor()
        # FP8/FP4 scales are per rank (each rank's tokens), so gradients agree within the
        # formats' error; an unsharded-vs-sharded mismatch (wrong shard, missing reduction)
        # would be O(1).
        rel = ((grad - p_ref.grad).norm() / p_ref.grad.norm()).item()
        assert rel < 0.25, (name, rel)
