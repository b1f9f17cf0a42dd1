"""lpdist.optim.AdamW on FSDP2 shards, inside ZeroRedundancyOptimizer and through
torch.distributed.checkpoint with resharding (gloo, CPU; any world size)."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

from lpdist.optim import AdamW

pytestmark = pytest.mark.mpi(min_size=2)


def _model() -> nn.Sequential:
    torch.manual_seed(0)  # odd sizes: uneven FSDP shards and partial quantization blocks
    return nn.Sequential(nn.Linear(15, 67), nn.GELU(), nn.Linear(67, 9))


def _fsdp(model: nn.Sequential) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _batches(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)  # the same batches on every rank
    return [torch.randn(8, 15, generator=gen) for _ in range(steps)]


def _train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_fsdp2_shards_match_torch_adamw(dist_info):
    reference = _model()
    sharded = _fsdp(copy.deepcopy(reference))
    opt = AdamW(sharded.parameters(), lr=1e-2, weight_decay=0.1, moments="fp32")
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    batches = _batches(6)
    _train(sharded, opt, batches)
    _train(reference, ref_opt, batches)
    # Identical batches on every rank: FSDP's averaged gradient is the local one up to fp32
    # summation order, so parameters agree to fp32 rounding over 6 steps.
    for p, q in zip(sharded.parameters(), reference.parameters()):
        torch.testing.assert_close(_full(p), q.detach(), rtol=0, atol=1e-6)
    sd = opt.state_dict()
    assert type(sd["state"][0]["exp_avg"]).__name__ == "DTensor"
    torch.testing.assert_close(_full(sd["state"][0]["exp_avg"]), ref_opt.state_dict()["state"][0]["exp_avg"],
                               rtol=0, atol=1e-6)


def test_fsdp2_fp8_state_is_sharded_and_nonfinite_is_agreed(dist_info):
    world = dist.get_world_size()
    sharded = _fsdp(_model())
    opt = AdamW(sharded.parameters(), lr=1e-2, moments="fp8", nonfinite="skip")
    _train(sharded, opt, _batches(2))
    total = torch.tensor(opt.memory_bytes())
    dist.all_reduce(total)
    n = sum(p.numel() for p in sharded.parameters())
    # Local shards hold ~1/world of the elements: 2 bytes each plus a scale pair per block (at
    # most one partial block per shard and tensor).
    assert total.item() <= 2.07 * n + 8 * 2 * 4 * world
    assert opt.memory_bytes() <= total.item() / world + 2 * 8 * 4 * 4
    before = [_full(p).clone() for p in sharded.parameters()]
    sharded(_batches(1)[0]).pow(2).mean().backward()
    if dist.get_rank() == 0:  # one rank's shard only: every rank must skip
        next(sharded.parameters()).grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for a, p in zip(before, sharded.parameters()):
        assert torch.equal(a, _full(p))


def test_zero_redundancy_optimizer_matches_torch_adamw(dist_info):
    reference = _model()
    model = copy.deepcopy(reference)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdamW, lr=1e-2,
                                  weight_decay=0.1, moments="fp32")
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    batches = _batches(5)
    _train(model, opt, batches)
    _train(reference, ref_opt, batches)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        loaded = torch.optim.AdamW(copy.deepcopy(reference).parameters(), lr=1e-2)
        loaded.load_state_dict(opt.state_dict())
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(loaded.state_dict()["state"][0][key],
                                       ref_opt.state_dict()["state"][0][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("moments", ["fp32", "fp8"])
def test_checkpoint_reshards_fsdp_state_into_a_replicated_model(dist_info, moments):
    sharded = _fsdp(_model())
    opt = AdamW(sharded.parameters(), lr=1e-2, moments=moments)
    _train(sharded, opt, _batches(3))
    saved = {k: {kk: _full(vv) for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    path = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save({"optim": get_optimizer_state_dict(sharded, opt)}, checkpoint_id=path[0])

    plain = _model()
    plain_opt = AdamW(plain.parameters(), lr=1e-2, moments=moments)
    target = {"optim": get_optimizer_state_dict(plain, plain_opt)}
    dcp.load(target, checkpoint_id=path[0])
    set_optimizer_state_dict(plain, plain_opt, target["optim"])
    restored = plain_opt.state_dict()["state"]
    for i, state in saved.items():
        assert float(restored[i]["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = state[key], restored[i][key]
            if moments == "fp32":
                assert torch.equal(x, y)
            else:  # requantized with whole-tensor blocks instead of per-shard ones: one more
                # RNE rounding, relative 2^-4 (E4M3 m) / 2^-2 (E5M2 sqrt(v) squared), plus the
                # absolute step of the smallest codes of a block.
                rel = 2.0**-4 if key == "exp_avg" else 2.0**-2
                torch.testing.assert_close(y, x, rtol=rel, atol=2.0**-9 * x.abs().max().item())
