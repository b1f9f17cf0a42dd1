"""lpdist.dist.init under mpiexec: ranks, local ranks and a collective agree with MPI."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lpdist import dist as lpdist_dist

pytestmark = pytest.mark.mpi(min_size=2)


def test_rank_and_size_match_mpi(dist_info: lpdist_dist.DistInfo) -> None:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    assert (dist_info.rank, dist_info.world_size) == (world.Get_rank(), world.Get_size())
    assert (dist.get_rank(), dist.get_world_size()) == (world.Get_rank(), world.Get_size())
    assert dist_info.device == torch.device("cpu")
    assert os.environ["RANK"] == str(dist_info.rank) and os.environ["WORLD_SIZE"] == str(dist_info.world_size)


def test_local_rank_counts_lower_ranks_on_the_same_host(dist_info: lpdist_dist.DistInfo) -> None:
    from mpi4py import MPI

    hosts = MPI.COMM_WORLD.allgather(MPI.Get_processor_name())
    expected = sum(host == hosts[dist_info.rank] for host in hosts[: dist_info.rank])
    assert dist_info.local_rank == expected
    assert os.environ["LOCAL_RANK"] == str(expected)


def test_all_reduce_sums_every_rank(dist_info: lpdist_dist.DistInfo) -> None:
    rank, world_size, _, device = dist_info
    data = [
        torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + r))
        for r in range(world_size)
    ]
    total = data[rank].to(device, copy=True)  # all_reduce works in place; keep the inputs
    dist.all_reduce(total)
    reference = torch.stack(data).sum(0)
    # gloo may add in another order than the reference: allow a few float64 ulps of sum |x|.
    bound = 2.0**-52 * world_size * torch.stack(data).abs().sum(0)
    assert torch.all((total.cpu() - reference).abs() <= bound)


def test_second_init_returns_the_same_info(dist_info: lpdist_dist.DistInfo) -> None:
    assert lpdist_dist.init() == dist_info
    assert lpdist_dist.info() == dist_info
    assert lpdist_dist.is_main() == (dist_info.rank == 0)
