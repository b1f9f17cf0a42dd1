"""examples/pretrain_llama.py on every rank of ``mpiexec -n N`` (gloo over lpdist.init's
MPI rendezvous): a short FSDP2 run, then a resume that extends it, with N = 2 and 3 (uneven
FSDP2 shards)."""

from __future__ import annotations

import importlib.util
import json
import math
import sysconfig
import tempfile
from pathlib import Path

import pytest

from lpdist import dist as lpdist_dist

pytestmark = pytest.mark.mpi(min_size=2)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pretrain_llama.py"
DATA = str(Path(sysconfig.get_paths()["stdlib"]) / "logging")
ARGS = ["--model", "tiny", "--seq-len", "64", "--batch-size", "2", "--data", DATA, "--warmup", "1", "--monitor-every", "2"]


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def shared_dir(dist_info: lpdist_dist.DistInfo, monkeypatch: pytest.MonkeyPatch):
    """One temporary folder, created by rank 0 and used by every rank (same host)."""
    from mpi4py import MPI

    handle = tempfile.TemporaryDirectory() if dist_info.rank == 0 else None
    path = Path(MPI.COMM_WORLD.bcast(handle.name if handle else None, root=0))
    monkeypatch.setenv("LPDIST_CACHE", str(path / "cache"))
    yield path
    MPI.COMM_WORLD.Barrier()
    if handle:
        handle.cleanup()


def test_example_trains_and_resumes_on_every_rank(dist_info: lpdist_dist.DistInfo, shared_dir: Path) -> None:
    from mpi4py import MPI

    rank, world_size, _, device = dist_info
    example = load_example()
    out = str(shared_dir / "run")
    first = example.train(example.parse_args([*ARGS, "--steps", "6", "--stop-at", "4", "--out", out]), rank, world_size,
                          device)
    resumed = example.train(example.parse_args([*ARGS, "--steps", "6", "--resume", "--out", out]), rank, world_size, device)
    # Every rank logs the same all-reduced loss.
    for record in (first, resumed):
        losses = MPI.COMM_WORLD.allgather(record["loss"])
        assert all(math.isfinite(x) and x == losses[0] for x in losses)
    assert (first["step"], resumed["step"]) == (4, 6)
    assert resumed["tokens"] == 6 * world_size * 2 * 64
    if rank == 0:
        records = [json.loads(line) for line in (shared_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
        assert (shared_dir / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
        assert (shared_dir / "run" / "loss.png").is_file()


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_fp8_recipe_trains_with_the_automatic_gradient_transport(dist_info: lpdist_dist.DistInfo,
                                                                   shared_dir: Path, parallel: str) -> None:
    """The fp8 recipe's FP8 gradient communication with ``--grad-comm-transport auto`` (on CPU:
    all_to_all) under FSDP2 and DDP; ``p2p`` on CPU is refused naming the transport to use."""
    from mpi4py import MPI

    from lpdist import comm

    rank, world_size, _, device = dist_info
    example = load_example()
    comm.reset_stats()
    args = [*ARGS, "--recipe", "fp8", "--steps", "2", "--parallel", parallel, "--out", str(shared_dir / parallel)]
    record = example.train(example.parse_args(args), rank, world_size, device)
    losses = MPI.COMM_WORLD.allgather(record["loss"])
    assert all(math.isfinite(x) and x == losses[0] for x in losses)
    assert comm.stats()["all_to_all"]["calls"] > 0 and "p2p" not in comm.stats()
    with pytest.raises(ValueError, match="p2p.*all_to_all"):
        example.train(example.parse_args([*args, "--grad-comm-transport", "p2p", "--out", str(shared_dir / "p2p")]),
                      rank, world_size, device)
