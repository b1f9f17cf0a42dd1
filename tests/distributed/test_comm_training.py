"""FP8 gradient communication inside FSDP2, DDP and FSDP1 training (gloo, CPU).

Each test trains the same model twice from the same initial weights on the same per-rank data:
once with torch's own fp32 communication, once with FP8 communication. The gradients of every
step and the final weight update must agree within ``rms_error_bound`` (one fp8 rounding for a
reduce-scatter, two for the all-reduce of the DDP hook; its docstring derives the bound), plus
2^-8 where gradients are reduced in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, ShardingStrategy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from lpdist import comm
from lpdist.comm import rms_error_bound

pytestmark = pytest.mark.mpi(min_size=2)

STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 192), nn.GELU(), nn.Linear(192, 64), nn.GELU(), nn.Linear(64, 8))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(1000 * step + rank))


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().double().reshape(-1)


def _train(model: nn.Module, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """SGD for STEPS steps; returns each step's flat local gradient and the final local weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        model(_batch(rank, step)).square().mean().backward()
        grads.append(torch.cat([_local(p.grad) for p in model.parameters() if p.grad is not None]))
        opt.step()
    return grads, torch.cat([_local(p) for p in model.parameters()])


def _assert_close_training(fp8, ref, initial: torch.Tensor, tol: float) -> None:
    (g8, w8), (g32, w32) = fp8, ref
    for a, b in zip(g8, g32):
        assert ((a - b).norm() / b.norm()).item() <= tol
        assert ((a - b).norm() / b.norm()).item() > 0  # the FP8 path really quantized
    update8, update32 = w8 - initial, w32 - initial
    assert ((update8 - update32).norm() / update32.norm()).item() <= tol


def _fsdp2(reduce_dtype: torch.dtype, divide_factor: float | None) -> nn.Module:
    model = _model()
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if divide_factor is not None:
        model.set_gradient_divide_factor(divide_factor)
    return model


@pytest.mark.parametrize("reduce_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divide", ["avg", "premul"])
@pytest.mark.parametrize("error_feedback", [False, True])
def test_fsdp2_fp8_reduce_scatter_tracks_fp32_comm(dist_info, reduce_dtype, divide, error_feedback):
    rank, world = dist_info.rank, dist_info.world_size
    factor = None if divide == "avg" else 2.0 * world  # PREMUL_SUM(1 / (2W))
    ref_model = _fsdp2(reduce_dtype, factor)
    initial = torch.cat([_local(p) for p in ref_model.parameters()])
    ref = _train(ref_model, rank)
    model = _fsdp2(reduce_dtype, factor)
    comm.reset_stats()
    assert comm.enable_fp8_reduce_scatter(model, error_feedback=error_feedback) == 3
    fp8 = _train(model, rank)
    assert comm.stats()["all_to_all"]["calls"] == 3 * STEPS
    if error_feedback:
        residual_sets = [m._get_fsdp_state()._fsdp_param_groups[0]._reduce_scatter_comm.residuals
                         for m in model if isinstance(m, nn.Linear)]
        assert all(len(r) == 1 for r in residual_sets)
    tol = rms_error_bound("e4m3") + (2.0 ** -8 if reduce_dtype == torch.bfloat16 else 0.0)
    _assert_close_training(fp8, ref, initial, tol)


def test_fsdp2_fp8_all_gather_is_lossy_but_close(dist_info):
    rank = dist_info.rank
    ref_model = _fsdp2(torch.float32, None)
    initial = torch.cat([_local(p) for p in ref_model.parameters()])
    ref = _train(ref_model, rank)
    model = _fsdp2(torch.float32, None)
    comm.reset_stats()
    assert comm.enable_fp8_all_gather(model) == 3
    fp8 = _train(model, rank)
    assert comm.stats()["all_gather"]["calls"] >= 3 * STEPS
    # the weights are rounded once per gather; gradients inherit about that relative error,
    # through two layers of the network in series (x2)
    _assert_close_training(fp8, ref, initial, 2 * rms_error_bound("e4m3"))


def test_enable_fp8_reduce_scatter_rejects_plain_modules_and_bad_options(dist_info):
    with pytest.raises(ValueError, match="fully_shard"):
        comm.enable_fp8_reduce_scatter(_model())
    with pytest.raises(ValueError, match="fmt"):
        comm.enable_fp8_reduce_scatter(_fsdp2(torch.float32, None), fmt="int8")


@pytest.mark.parametrize("error_feedback", [False, True])
def test_ddp_hook_tracks_fp32_all_reduce(dist_info, error_feedback):
    rank = dist_info.rank
    ref_model = DistributedDataParallel(_model())
    initial = torch.cat([_local(p) for p in ref_model.parameters()])
    ref = _train(ref_model, rank)
    model = DistributedDataParallel(_model())
    state = comm.DDPHookState(error_feedback=error_feedback)
    model.register_comm_hook(state, comm.fp8_ddp_hook)
    fp8 = _train(model, rank)
    assert bool(state.residuals) == error_feedback
    _assert_close_training(fp8, ref, initial, rms_error_bound("e4m3", roundings=2))


@pytest.mark.parametrize("strategy", [ShardingStrategy.FULL_SHARD, ShardingStrategy.NO_SHARD])
def test_fsdp1_hook_tracks_fp32_comm(dist_info, strategy):
    rank = dist_info.rank

    def wrap() -> nn.Module:
        return FullyShardedDataParallel(_model(), device_id=torch.device("cpu"), sharding_strategy=strategy,
                                        use_orig_params=True)

    ref_model = wrap()
    initial = torch.cat([_local(p) for p in ref_model.parameters()])
    ref = _train(ref_model, rank)
    model = wrap()
    model.register_comm_hook(comm.FSDPHookState(), comm.fp8_fsdp_hook)
    comm.reset_stats()
    fp8 = _train(model, rank)
    assert comm.stats()["all_to_all"]["calls"] == STEPS
    roundings = 1 if strategy == ShardingStrategy.FULL_SHARD else 2
    _assert_close_training(fp8, ref, initial, rms_error_bound("e4m3", roundings=roundings))
