"""wrap(..., shard="zero"): ZeRO-1 partitioned low-precision state gives the unsharded result
with 1/world of the state per rank (gloo, CPU; any world size)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from lpdist.optim import wrap

pytestmark = pytest.mark.mpi(min_size=2)


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # many equal tensors so that ZeRO's partition is balanced
    return nn.Sequential(*[nn.Linear(32, 32) for _ in range(2 * 3 * 4)])


def _train(model, opt, steps=4):
    gen = torch.Generator().manual_seed(2)  # the same data on every rank: replicated grads
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 32, generator=gen)).pow(2).mean().backward()
        opt.step()


def _local_bytes(opt) -> int:
    return opt.optim.memory_bytes() if isinstance(opt, ZeroRedundancyOptimizer) else opt.memory_bytes()


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
], ids=["adamw", "sgd-momentum"])
def test_zero_sharding_matches_unsharded_and_splits_the_state(dist_info, make):
    world = dist.get_world_size()
    model = _model()
    twin = copy.deepcopy(model)
    sharded = wrap(make(model.parameters()), moments="fp8", shard="zero")
    unsharded = wrap(make(twin.parameters()), moments="fp8")
    assert isinstance(sharded, ZeroRedundancyOptimizer)
    _train(model, sharded)
    _train(twin, unsharded)
    # Each parameter is updated by exactly one rank with the same quantized state as unsharded
    # and then broadcast: equal within fp32 rounding (here bit for bit).
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    local = _local_bytes(sharded)
    total = torch.tensor(local)
    dist.all_reduce(total)
    assert total.item() == unsharded.memory_bytes()
    # 24 equal tensors split evenly for world sizes 2, 3, 4: 1/world of the state per rank.
    assert local == pytest.approx(unsharded.memory_bytes() / world, rel=0.01)


def test_zero_sharded_state_loaded_from_a_checkpoint_is_the_state_used(dist_info):
    """ZeroRedundancyOptimizer loads state straight into the local optimizer's state: the next
    step must use it, not the quantized copy packed before the load."""
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), moments="fp8", shard="zero")
    _train(model, opt, steps=2)
    opt.consolidate_state_dict(to=0)
    saved = [opt.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    for st in saved[0]["state"].values():
        st["momentum_buffer"] = torch.zeros_like(st["momentum_buffer"])  # a checkpoint without momentum
    opt.load_state_dict(saved[0])
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero momentum and zero gradients: nothing moves
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
