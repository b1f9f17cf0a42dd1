"""Bad input to the quantized collectives across ranks (gloo; run with mpiexec -n 2 and -n 3).

Sizes, dtypes or options that differ between ranks, and one rank refusing its own arguments,
raise on every rank before anything is sent (no hang, no silently misaligned bytes);
``check_finite=True`` raises ``FloatingPointError`` on every rank; without it a NaN/inf block
arrives as NaN, never as a finite number. After every refused call the group still works.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lpdist import comm

NAN, INF = float("nan"), float("inf")
BLOCK = 16


def _collective(name: str, n: int, world: int, **kwargs):
    """A call of collective ``name`` with ``n`` elements per rank: ``(call, input, output)``,
    the output filled with a sentinel (for ``all_reduce`` it is the input)."""
    x = torch.randn(n * world if name == "reduce_scatter" else n)
    if name == "reduce_scatter":
        out = torch.full((n,), 7.0)
        return (lambda: comm.reduce_scatter(out, x, **kwargs)), x, out
    if name == "all_gather":
        out = torch.full((n * world,), 7.0)
        return (lambda: comm.all_gather(out, x, **kwargs)), x, out
    return (lambda: comm.all_reduce(x, **kwargs)), x, x


def _group_still_works(world: int) -> None:
    t = torch.ones(3)
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((3,), float(world)))


COLLECTIVES = ["reduce_scatter", "all_gather", "all_reduce"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", COLLECTIVES)
def test_sizes_differing_across_ranks_raise_everywhere(dist_info, name):
    rank, world = dist_info.rank, dist_info.world_size
    call, _, out = _collective(name, 32 + 16 * rank, world)
    before = out.clone()
    with pytest.raises(ValueError, match=r"ranks disagree on input\.numel\(\)"):
        call()
    assert torch.equal(out, before)
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field,kwargs", [
    ("block", lambda r: dict(block=128 * (r + 1))),
    ("fmt", lambda r: dict(fmt=("e4m3", "e5m2")[r % 2])),
])
def test_options_differing_across_ranks_raise_everywhere(dist_info, field, kwargs):
    rank, world = dist_info.rank, dist_info.world_size
    call, _, _ = _collective("reduce_scatter", 256, world, **kwargs(rank))
    with pytest.raises(ValueError, match=f"ranks disagree on {field}"):
        call()
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
def test_dtype_differing_across_ranks_raises_everywhere(dist_info):
    rank, world = dist_info.rank, dist_info.world_size
    dtype = torch.bfloat16 if rank == 0 else torch.float32
    with pytest.raises(ValueError, match="ranks disagree on dtype"):
        comm.all_reduce(torch.randn(64, dtype=dtype))
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", [
    dict(input=lambda w: torch.randn(8 * w + 1)),                 # size does not fit output
    dict(input=lambda w: torch.randn(8 * w).double()),            # dtype not allowed
    dict(kwargs=dict(block=0)), dict(kwargs=dict(fmt="e2m1")), dict(kwargs=dict(op="max")),
])
def test_one_rank_refusing_its_arguments_raises_on_every_rank(dist_info, bad):
    rank, world = dist_info.rank, dist_info.world_size
    bad_rank = world - 1
    x = bad["input"](world) if "input" in bad and rank == bad_rank else torch.randn(8 * world)
    kwargs = bad.get("kwargs", {}) if rank == bad_rank else {}
    expected = "another rank refused" if rank != bad_rank else "input|fmt|block|op"
    with pytest.raises((ValueError, TypeError), match=expected):
        comm.reduce_scatter(torch.empty(8), x, **kwargs)
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", COLLECTIVES)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_check_finite_raises_on_every_rank_before_sending(dist_info, name, bad):
    rank, world = dist_info.rank, dist_info.world_size
    call, x, out = _collective(name, 64, world, check_finite=True, block=BLOCK)
    if rank == 0:
        x[5] = bad
    before = out.clone()
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        call()
    assert torch.allclose(out, before, rtol=0, atol=0, equal_nan=True)  # nothing was written
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
def test_check_finite_sees_a_non_finite_residual(dist_info):
    world = dist_info.world_size
    residual = torch.zeros(64 * world)
    if dist_info.rank == 1:
        residual[3] = NAN
    with pytest.raises(FloatingPointError):
        comm.reduce_scatter(torch.empty(64), torch.randn(64 * world), residual=residual, check_finite=True)
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_block_arrives_as_nan_never_as_a_number(dist_info, bad):
    """Without check_finite the block holding the bad value decodes as NaN on the receiver;
    every other block stays finite and within the e4m3 bound of the fp64 sum."""
    rank, world = dist_info.rank, dist_info.world_size
    chunk = 4 * BLOCK
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(world * chunk, generator=g) for _ in range(world)]
    xs[0][chunk * (world - 1) + BLOCK + 2] = bad   # rank 0 poisons block 1 of the last rank's chunk
    out = torch.empty(chunk)
    comm.reduce_scatter(out, xs[rank].clone(), block=BLOCK)
    blocks = out.view(-1, BLOCK)
    if rank == world - 1:
        assert torch.isnan(blocks[1]).all()
        finite = torch.ones(chunk // BLOCK, dtype=torch.bool)
        finite[1] = False
        assert torch.isfinite(blocks[finite]).all()
    else:
        assert torch.isfinite(out).all()
    gathered = torch.empty(world * chunk)
    x = torch.randn(chunk, generator=g)
    if rank == 0:
        x[3] = bad
    comm.all_gather(gathered, x, block=BLOCK)
    assert torch.isnan(gathered[:BLOCK]).all() and torch.isfinite(gathered[BLOCK:]).all()
    t = torch.randn(world * chunk, generator=g)
    if rank == 0:
        t[BLOCK + 1] = bad
    comm.all_reduce(t, block=BLOCK)
    assert torch.isnan(t[BLOCK:2 * BLOCK]).all()
    assert torch.isfinite(t[:BLOCK]).all() and torch.isfinite(t[2 * BLOCK:]).all()


@pytest.mark.mpi(min_size=2)
def test_hooks_and_fsdp2_comm_forward_check_finite(dist_info):
    rank, world = dist_info.rank, dist_info.world_size
    grad = torch.randn(32 * world)
    if rank == 0:
        grad[0] = NAN
    with pytest.raises(FloatingPointError):
        comm.fp8_fsdp_hook(comm.FSDPHookState(check_finite=True), grad.clone(), torch.empty(32))
    with pytest.raises(FloatingPointError):
        comm.fp8_fsdp_hook(comm.FSDPHookState(check_finite=True), grad.clone())
    with pytest.raises(FloatingPointError):
        comm.FP8ReduceScatter(check_finite=True)(torch.empty(32), grad.clone(), None, dist.ReduceOp.AVG)
    assert comm.DDPHookState(check_finite=True).options()["check_finite"] is True
    out = torch.empty(32)
    comm.FP8ReduceScatter()(out, grad.clone(), None, dist.ReduceOp.AVG)  # default: NaN arrives as NaN
    assert bool(torch.isnan(out).all()) == (rank == 0) and bool(torch.isnan(out).any()) == (rank == 0)
    _group_still_works(world)


@pytest.mark.mpi(min_size=2)
def test_empty_tensors_are_a_no_op(dist_info):
    world = dist_info.world_size
    comm.reduce_scatter(torch.empty(0), torch.empty(0), check_finite=True)
    comm.all_gather(torch.empty(0), torch.empty(0))
    t = torch.empty(0)
    comm.all_reduce(t)
    assert t.shape == (0,)
    _group_still_works(world)
