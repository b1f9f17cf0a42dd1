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
from helpers import rel_error

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


# Error feedback when the parameters behind a reduce-scatter input change between steps.
# Tolerances: one step's output differs from the fp32 reduction by this step's rounding error
# minus the residual fed back from the previous step of the same parameters, itself one
# rounding error; independent errors add in quadrature, so a step stays within
# rms_error_bound(roundings=2 * r) for a collective of r roundings. Over T steps of the same
# gradient g the outputs sum to T*g minus the last residual (EF-SGD telescoping), so their mean
# is off by one rounding error of g + residual (norm at most (1 + bound) * ||g||) divided by T;
# without working feedback RNE repeats the same error every step and the mean is as far off
# as one step.
REPEATS = 4


def _mean_error_bound(roundings: int) -> float:
    bound = rms_error_bound("e4m3", roundings=roundings)
    return bound * (1 + bound) / REPEATS


class _TwoBranches(nn.Module):
    """Two equal linears in one FSDP2 parameter group; each step runs one of them. Branch ``a``'s
    output is scaled by 100, so its gradient and rounding error are about 100x branch ``b``'s."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 64, bias=False)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.a(x) * 100.0 if branch == "a" else self.b(x)


def _branch_grads(rank: int, schedule: list[str], unused_params: bool,
                  error_feedback: bool | None) -> list[torch.Tensor]:
    """Full gradient of the branch run at each step (same batch every step, no update);
    ``error_feedback=None``: torch's fp32 reduce-scatter."""
    model = _TwoBranches()
    fully_shard(model)
    model.set_reduce_scatter_unused_params(unused_params)
    if error_feedback is not None:
        comm.enable_fp8_reduce_scatter(model, error_feedback=error_feedback)
    grads = []
    for branch in schedule:
        model.zero_grad()
        model(_batch(rank, 0), branch).square().mean().backward()
        grads.append(getattr(model, branch).weight.grad.full_tensor().double())
    return grads


@pytest.mark.parametrize("unused_params", [False, True])
def test_fsdp2_error_feedback_stays_with_the_parameters_it_came_from(dist_info, unused_params):
    """Steps run a, a, a, a, b, a. Only the used branch has a gradient, so (unless unused
    parameters are reduced as zeros) the packed input holds a's gradient, then b's, of the same
    size: a's residual must not be added to b's gradient, and must keep working while a is
    packed step after step."""
    schedule = ["a"] * REPEATS + ["b", "a"]
    ref = _branch_grads(dist_info.rank, schedule, unused_params, None)
    fp8 = _branch_grads(dist_info.rank, schedule, unused_params, True)
    errors = [rel_error(g, r) for g, r in zip(fp8, ref)]
    assert max(errors) <= rms_error_bound("e4m3", roundings=2), errors
    mean_error = rel_error(sum(fp8[:REPEATS]) / REPEATS, ref[0])
    assert mean_error <= _mean_error_bound(roundings=1)


class _ReorderedChain(nn.Module):
    """Three equal linears registered l1, l2, l3 but applied l3, l1, l2. DDP's first bucket
    follows registration order; the bucket it rebuilds after step 0 follows the order in which
    gradients became ready, so it packs the same parameters in another order. l2's weight is
    scaled by 100, which makes l1's and l3's gradients about 100x l2's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = (nn.Linear(64, 64, bias=False) for _ in range(3))
        with torch.no_grad():
            self.l2.weight.mul_(100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.l1(self.l3(x)))


def _ddp_grads(rank: int, steps: int, state: comm.DDPHookState | None) -> tuple[list[dict], list[list[int]]]:
    """Per-step gradients by parameter name (same batch every step, no update) and, with a
    hook state, the parameter order of every bucket the hook was given."""
    module = _ReorderedChain()
    model = DistributedDataParallel(module)
    bucket_orders: list[list[int]] = []
    if state is not None:
        def hook(state, bucket):  # unannotated: DDP rejects the string annotations of this module
            bucket_orders.append([id(p) for p in bucket.parameters()])
            return comm.fp8_ddp_hook(state, bucket)

        model.register_comm_hook(state, hook)
    grads = []
    for _ in range(steps):
        model.zero_grad()
        model(_batch(rank, 0)).square().mean().backward()
        grads.append({name: p.grad.double().clone() for name, p in module.named_parameters()})
    return grads, bucket_orders


def test_ddp_hook_error_feedback_follows_rebuilt_buckets(dist_info):
    """A residual belongs to the parameters that produced it: after DDP rebuilds its bucket
    in another parameter order, feedback must start afresh instead of adding l1's error to l2,
    and then keep working over the following steps."""
    steps = 1 + REPEATS
    ref, _ = _ddp_grads(dist_info.rank, steps, None)
    fp8, bucket_orders = _ddp_grads(dist_info.rank, steps, comm.DDPHookState(error_feedback=True))
    assert len(bucket_orders) == steps and bucket_orders[0] != bucket_orders[1]  # the rebuild happened
    assert bucket_orders[1:] == [bucket_orders[1]] * REPEATS
    for name in ref[0]:
        errors = [rel_error(g[name], r[name]) for g, r in zip(fp8, ref)]
        assert max(errors) <= rms_error_bound("e4m3", roundings=4), (name, errors)
        mean_error = rel_error(sum(g[name] for g in fp8[1:]) / REPEATS, ref[0][name])
        assert mean_error <= _mean_error_bound(roundings=2), name


def test_fsdp2_residual_dtype_must_be_fp32_or_the_reduce_dtype(dist_info):
    """residual_dtype=bf16 under an fp32 reduce dtype cannot be honored (the collective keeps
    residuals in fp32 or the input's dtype): refused by name, not replaced by an fp32 residual
    of twice the requested memory. Allowed values are kept as asked."""
    model = _fsdp2(torch.float32, None)
    comm.enable_fp8_reduce_scatter(model, error_feedback=True, residual_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual_dtype"):
        model(_batch(dist_info.rank, 0)).square().mean().backward()
    for reduce_dtype, residual_dtype in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]:
        model = _fsdp2(reduce_dtype, None)
        comm.enable_fp8_reduce_scatter(model, error_feedback=True, residual_dtype=residual_dtype)
        model(_batch(dist_info.rank, 0)).square().mean().backward()
        comms = [m._get_fsdp_state()._fsdp_param_groups[0]._reduce_scatter_comm
                 for m in model if isinstance(m, nn.Linear)]
        dtypes = {kept.tensor.dtype for c in comms for kept in c.residuals.values()}
        assert dtypes == {residual_dtype}


def test_fsdp2_error_feedback_refuses_to_guess_the_packed_parameters(dist_info):
    """Installed without enable_fp8_reduce_scatter, the comm is never told which parameters an
    input packs, so it cannot keep residuals with their parameters: refused before sending."""
    world = dist_info.world_size
    grad = torch.randn(world * 64, generator=torch.Generator().manual_seed(dist_info.rank))
    with pytest.raises(ValueError, match="enable_fp8_reduce_scatter"):
        comm.FP8ReduceScatter(error_feedback=True)(torch.empty(64), grad, None, torch.distributed.ReduceOp.AVG)
