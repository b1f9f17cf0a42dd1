"""Start torch.distributed the same way under ``torchrun``, ``mpirun`` or as one process.

``init()`` looks at how the program was launched and creates the default process group:

* **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
  ``MASTER_PORT``): ``env://`` rendezvous; the local rank comes from ``LOCAL_RANK``.
* **mpirun / mpiexec** (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ``PMIX_RANK`` ... set, no
  ``RANK``): rank and size come from ``MPI.COMM_WORLD`` (mpi4py), the local rank from a
  ``COMM_TYPE_SHARED`` split. Rank 0 opens a ``TCPStore`` on a free port and broadcasts its
  address over MPI; everyone then joins it. The usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``MASTER_ADDR``/``MASTER_PORT`` variables are exported so that later code sees a
  torchrun-like environment.
* **one process**: world size 1 over a private ``FileStore``, so collectives still work.

Backend: ``nccl`` when CUDA is available (the device is ``cuda:<local_rank>`` and becomes the
current device), ``gloo`` otherwise; ``backend=`` overrides. Every collective and the
rendezvous give up after ``timeout`` seconds (argument, else ``LPDIST_TIMEOUT``, else 600), so
a dead peer makes the others fail instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import tempfile
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init", "destroy", "process_group", "is_main", "info"]

DEFAULT_TIMEOUT_S = 600.0
BACKENDS = ("nccl", "gloo")
# Variables that MPI launchers export to every rank (Open MPI, PMIx, MPICH/Hydra, Intel MPI, MVAPICH).
MPI_ENV_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
# Of those, the ones holding the number of processes the launcher started.
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


class DistInfo(NamedTuple):
    """Where this process sits: unpacks as ``rank, world_size, local_rank, device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


_info: DistInfo | None = None
_file_store_path: str | None = None


def _resolve_timeout(timeout: float | None) -> datetime.timedelta:
    """Timeout from the argument, else ``LPDIST_TIMEOUT`` (seconds), else 600 s."""
    if timeout is None:
        raw = os.environ.get("LPDIST_TIMEOUT")
        if raw is None:
            return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"LPDIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
        source = "LPDIST_TIMEOUT"
    else:
        source = "timeout"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{source} must be a number of seconds, got {type(timeout).__name__}")
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"{source} must be a positive finite number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _resolve_backend(backend: str | None) -> str:
    """``nccl`` with CUDA, ``gloo`` without; an explicit choice must be one of ``BACKENDS``."""
    if backend is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs a CUDA device; use backend='gloo' on CPU")
    return backend


def _device_for(backend: str, local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` for NCCL (made the current device), the CPU for gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s); "
            "start at most one process per GPU"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _launched_by_mpi() -> bool:
    return any(name in os.environ for name in MPI_ENV_VARS)


def _rendezvous_address(single_node: bool) -> str:
    """Address rank 0 listens on: ``MASTER_ADDR`` if set, else loopback on one node, else the
    address this host's name resolves to (set ``MASTER_ADDR`` where that is not reachable)."""
    if "MASTER_ADDR" in os.environ:
        return os.environ["MASTER_ADDR"]
    if single_node:
        return "127.0.0.1"
    return socket.gethostbyname(socket.getfqdn())


def _check_launcher_world_size(world_size: int, mpi_library: str) -> None:
    """Refuse a world that the launcher did not start.

    An mpi4py built on another MPI than the launcher's ignores the launcher: every process is a
    world of one, and N independent single-process runs would start. The launcher's size
    variables (``MPI_SIZE_VARS``; several may be set when launchers nest) must include the size
    mpi4py sees.
    """
    launched = {name: os.environ[name].strip() for name in MPI_SIZE_VARS if name in os.environ}
    if launched and str(world_size) not in launched.values():
        described = ", ".join(f"{name}={value}" for name, value in launched.items())
        raise RuntimeError(
            f"the MPI launcher's world size ({described}) is not the world of {world_size} that "
            f"mpi4py's MPI ({mpi_library}) sees: mpi4py is built on another MPI than the launcher's. "
            "Launch with the mpiexec of mpi4py's MPI, or reinstall mpi4py against the launcher's MPI"
        )


def _open_master_store(
    single_node: bool, world_size: int, timeout: datetime.timedelta
) -> tuple[dist.TCPStore | None, tuple[str, int | str, str | None], Exception | None]:
    """Rank 0's rendezvous ``TCPStore`` on ``MASTER_ADDR``/``MASTER_PORT`` (a free port if unset).

    Returns ``(store, (host, port, error_text), failure)``: on failure the store is None and the
    exception is returned, not raised, so that rank 0 can tell the other ranks before raising.
    """
    host, port = os.environ.get("MASTER_ADDR", "<this host>"), os.environ.get("MASTER_PORT", "0")
    try:
        host = _rendezvous_address(single_node)
        port = int(port)
        # wait_for_workers=False: the others learn the port only after this returns.
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    except Exception as exc:  # whatever the failure, every rank must learn of it
        return None, (host, port, f"{type(exc).__name__}: {exc}"), exc
    return store, (host, store.port, None), None


def _init_from_mpi(backend: str, timeout: datetime.timedelta) -> DistInfo:
    """Rank/size/local rank from mpi4py; rendezvous on a TCPStore that rank 0 opens.

    Rank 0 always broadcasts ``(host, port, error_text)``: when it cannot open the store, every
    rank raises the same ``RuntimeError`` instead of the others waiting for an address forever.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        found = [name for name in MPI_ENV_VARS if name in os.environ]
        raise RuntimeError(
            f"launched under MPI ({', '.join(found)} set) but mpi4py is not installed: "
            "`pip install mpi4py` (or `pip install lpdist[mpi]`), or launch with torchrun"
        ) from None
    world = MPI.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    library = MPI.Get_library_version().splitlines()[0].split(",")[0].strip()  # e.g. "Open MPI v5.0.11"
    _check_launcher_world_size(world_size, library)
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    single_node = local_size == world_size

    store = failure = message = None
    if rank == 0:
        store, message, failure = _open_master_store(single_node, world_size, timeout)
    host, port, error = world.bcast(message, root=0)
    if error is not None:
        raise RuntimeError(
            f"rank 0 could not open the rendezvous store at {host}:{port} ({error}); "
            "set MASTER_ADDR to an address of rank 0's host and MASTER_PORT to a free port (or unset it)"
        ) from failure
    if rank != 0:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
    )
    device = _device_for(backend, local_rank)
    _init_process_group(backend, device, timeout, store=store, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def _init_from_env(backend: str, timeout: datetime.timedelta) -> DistInfo:
    """torchrun-style ``env://`` rendezvous."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device_for(backend, local_rank)
    _init_process_group(backend, device, timeout, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def _init_single(backend: str, timeout: datetime.timedelta) -> DistInfo:
    """World of one over a private FileStore (no port to pick, nothing to collide with)."""
    global _file_store_path
    handle, _file_store_path = tempfile.mkstemp(prefix="lpdist-store-")
    os.close(handle)
    store = dist.FileStore(_file_store_path, 1)
    device = _device_for(backend, 0)
    _init_process_group(backend, device, timeout, store=store, rank=0, world_size=1)
    return DistInfo(0, 1, 0, device)


def _init_process_group(backend: str, device: torch.device, timeout: datetime.timedelta, **kwargs) -> None:
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL communicator: errors surface here, not at the first collective
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def _adopt_existing(current: str) -> DistInfo:
    """Describe a default process group (backend ``current``) that was created outside lpdist."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in current else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init(backend: str | None = None, timeout: float | None = None) -> DistInfo:
    """Create the default process group from the launch environment and return where we are.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None`` picks ``nccl`` when CUDA is available.
        timeout: seconds before a rendezvous or collective gives up (default
            ``LPDIST_TIMEOUT`` or 600).

    Returns:
        ``DistInfo(rank, world_size, local_rank, device)``. Calling ``init`` again returns the
        same value; a group created elsewhere (``dist.init_process_group``) is adopted.

    Raises:
        ValueError: unknown backend, NCCL without CUDA, a non-positive timeout.
        RuntimeError: launched under MPI without mpi4py or with an mpi4py of another MPI than
            the launcher's, rank 0 could not open the MPI rendezvous store (raised on every
            rank), or more local ranks than GPUs.
    """
    global _info
    if dist.is_initialized():
        current = dist.get_backend()
        if backend is not None and backend not in current:
            raise ValueError(f"a process group with backend {current!r} already exists; cannot switch to {backend!r}")
        if _info is None:
            _info = _adopt_existing(current)
        return _info
    resolved_timeout = _resolve_timeout(timeout)
    resolved_backend = _resolve_backend(backend)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _info = _init_from_env(resolved_backend, resolved_timeout)
    elif _launched_by_mpi():
        _info = _init_from_mpi(resolved_backend, resolved_timeout)
    else:
        _info = _init_single(resolved_backend, resolved_timeout)
    return _info


def info() -> DistInfo | None:
    """The value ``init()`` returned, or None before ``init()`` / after ``destroy()``."""
    return _info if dist.is_initialized() else None


def destroy() -> None:
    """Destroy the default process group (no-op when there is none) so ``init`` can run again;
    first release the peer workspaces of the ``p2p`` transport (``lpdist.comm.peer``)."""
    global _info, _file_store_path
    if dist.is_initialized():
        from .comm.peer import release_workspaces

        release_workspaces()  # the p2p transport's peer memory, while its groups still exist
        dist.destroy_process_group()
    _info = None
    if _file_store_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(_file_store_path)
        _file_store_path = None


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout: float | None = None) -> Iterator[DistInfo]:
    """``with process_group() as (rank, world_size, local_rank, device): ...``; destroys on exit."""
    try:
        yield init(backend, timeout)
    finally:
        destroy()


def is_main() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0
