"""lpdist.dist.init: one process, torchrun with two processes, MPI launch failures, argument checking.

Launch paths run in subprocesses so that no process group leaks into the other tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import OPEN_MPI_ENV

from lpdist import dist as lpdist_dist

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MV2_")

# Every rank sums float64 vectors drawn from generators seeded by rank; the reference regenerates
# all of them. Summation order may differ between gloo and the reference, so allow a few float64
# ulps of the summed magnitudes (2**-52 * world * sum|x|).
ALL_REDUCE_CHECK = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from lpdist import dist as ld

    def check_all_reduce(rank, world_size):
        data = [torch.randn(257, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + r))
                for r in range(world_size)]
        total = data[rank].clone()
        dist.all_reduce(total)
        reference = torch.stack(data).sum(0)
        bound = 2.0**-52 * world_size * torch.stack(data).abs().sum(0)
        assert torch.all((total - reference).abs() <= bound), (total - reference).abs().max()
    """
)


def _run(args: list[str], timeout_s: float = 120.0, *, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a python command with no launcher variables inherited, lpdist importable and ``env``
    added. It runs in a session of its own: past ``timeout_s`` the whole session (an MPI
    launcher's ranks included) is killed and the test fails. ``check``: exit status 0."""
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(MPI_PREFIXES)}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env["LPDIST_TIMEOUT"] = "60"
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    with subprocess.Popen(args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{args} still ran after {timeout_s} s\n{stdout}\n{stderr}")
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_single_process_init_destroy_and_reinit(tmp_path: Path) -> None:
    script = tmp_path / "single.py"
    script.write_text(
        ALL_REDUCE_CHECK
        + textwrap.dedent(
            """
            info = ld.init()
            rank, world_size, local_rank, device = info
            assert (rank, world_size, local_rank, device.type) == (0, 1, 0, "cpu"), info
            assert dist.is_initialized() and dist.get_backend() == "gloo"
            assert ld.init() == info and ld.info() == info and ld.is_main()
            check_all_reduce(rank, world_size)
            ld.destroy()
            assert not dist.is_initialized() and ld.info() is None and ld.is_main()
            with ld.process_group(backend="gloo", timeout=30) as again:
                assert again == info
                check_all_reduce(again.rank, again.world_size)
            assert not dist.is_initialized()
            print("single-process OK")
            """
        )
    )
    assert "single-process OK" in _run([sys.executable, str(script)]).stdout


def test_torchrun_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "two.py"
    script.write_text(
        ALL_REDUCE_CHECK
        + textwrap.dedent(
            """
            import os
            rank, world_size, local_rank, device = ld.init()
            assert (rank, world_size) == (int(os.environ["RANK"]), 2)
            assert local_rank == int(os.environ["LOCAL_RANK"]) == rank  # one node
            assert ld.is_main() == (rank == 0)
            check_all_reduce(rank, world_size)
            ld.destroy()
            print(f"rank {rank} OK", flush=True)
            """
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = _run(cmd).stdout
    assert "rank 0 OK" in out and "rank 1 OK" in out, out


def _mpiexec() -> str | None:
    """The MPI launcher beside this Python (a venv's MPI wheel), else the one on PATH."""
    found = Path(sys.executable).parent / "mpiexec"
    return str(found) if found.exists() else shutil.which("mpiexec")


needs_mpi4py = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="no MPI (mpi4py)")


@needs_mpi4py
@pytest.mark.skipif(_mpiexec() is None, reason="no MPI (mpiexec)")
def test_mpi_rank0_store_failure_raises_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 cannot listen on MASTER_PORT (another socket holds it): every rank raises at once
    instead of the others waiting forever for rank 0's address."""
    script = tmp_path / "taken_port.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, socket
            from mpi4py import MPI
            from lpdist import dist as ld

            world = MPI.COMM_WORLD
            holder = socket.socket()
            if world.Get_rank() == 0:
                holder.bind(("127.0.0.1", 0))
                holder.listen()
            port = world.bcast(holder.getsockname()[1] if world.Get_rank() == 0 else None, root=0)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            try:
                ld.init(backend="gloo", timeout=20)
            except RuntimeError as exc:
                print(f"rank {world.Get_rank()} refused: {exc}", flush=True)
            else:
                raise SystemExit("init succeeded on a port that is taken")
            """
        )
    )
    command = [_mpiexec(), "-n", "2", "--oversubscribe", sys.executable, str(script)]
    out = _run(command, timeout_s=90, env=OPEN_MPI_ENV).stdout
    refusals = sorted(line for line in out.splitlines() if "refused:" in line)
    assert [line.split(" refused:")[0] for line in refusals] == ["rank 0", "rank 1"], out
    assert all("rank 0 could not open the rendezvous store at 127.0.0.1:" in line for line in refusals), out


@needs_mpi4py
def test_mpi4py_of_another_mpi_than_the_launcher_is_refused() -> None:
    """An MPICH-style launcher (PMI_SIZE) starting a process whose mpi4py uses another MPI: that
    MPI sees a world of one, which must not pass for a run of PMI_SIZE processes."""
    code = "from lpdist import dist; dist.init(backend='gloo', timeout=20)"
    result = _run([sys.executable, "-c", code], env={"PMI_RANK": "1", "PMI_SIZE": "2"}, check=False)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "PMI_SIZE=2" in result.stderr and "world of 1" in result.stderr, \
        result.stderr


@pytest.fixture
def no_launch_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A process that looks like a plain `python` run, with no process group."""
    assert not dist.is_initialized(), "a test before this one left a process group behind"
    for name in os.environ:
        if name in LAUNCH_VARS or name.startswith(MPI_PREFIXES) or name == "LPDIST_TIMEOUT":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("backend", ["ucc", "NCCL", ""])
def test_unknown_backend_is_rejected(no_launch_env: pytest.MonkeyPatch, backend: str) -> None:
    with pytest.raises(ValueError, match="backend"):
        lpdist_dist.init(backend=backend)
    assert not dist.is_initialized()


@pytest.mark.parametrize("timeout", [0, -5.0, float("nan"), float("inf")])
def test_bad_timeout_is_rejected(no_launch_env: pytest.MonkeyPatch, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        lpdist_dist.init(timeout=timeout)
    assert not dist.is_initialized()


def test_timeout_of_wrong_type_is_rejected(no_launch_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match="timeout"):
        lpdist_dist.init(timeout="30")  # type: ignore[arg-type]


def test_bad_timeout_env_is_rejected(no_launch_env: pytest.MonkeyPatch) -> None:
    no_launch_env.setenv("LPDIST_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="LPDIST_TIMEOUT"):
        lpdist_dist.init()
    assert not dist.is_initialized()


def test_mpi_launch_without_mpi4py_explains(no_launch_env: pytest.MonkeyPatch) -> None:
    no_launch_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    no_launch_env.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` raise ImportError
    with pytest.raises(RuntimeError, match="mpi4py"):
        lpdist_dist.init()
    assert not dist.is_initialized()
