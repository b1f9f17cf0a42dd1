"""Peer workspaces: device memory that every rank of a group maps into its own address space.

The ranks of a process group on one machine whose GPUs reach each other directly (NVLink, or PCIe
peer access) can read and write each other's memory with ordinary loads and stores. A
``PeerWorkspace`` is one ``cudaMalloc`` buffer per rank, shared through CUDA IPC
(``cudaIpcGetMemHandle`` / ``cudaIpcOpenMemHandle``, CuPy's runtime bindings; the handles travel
by ``all_gather_object``), so that a kernel on rank r can store into rank d's buffer through
``base[d]``. Layout of each buffer::

    [ one uint32 flag per rank, padded to FLAG_BYTES | data: nbytes ]

``barrier()`` queues ``peer_barrier`` (``csrc/peer.cu``) on the current stream: work queued after
it starts only once every rank has finished what it queued before it, including its stores into
this rank's buffer. That is the whole synchronisation: no host round trip, no NCCL call.

Workspaces are cached per (process group, device, stream), so collectives queued on two streams
never share flags or rows, and grow (collectively: every rank asks for the same sizes in the same
order, as with any collective) to the next power of two of the largest request.
``release_workspaces()`` (collective) unmaps and frees them all; ``lpdist.dist.destroy()`` calls
it before destroying the process group. A program that destroys process groups itself and then
creates new ones calls it first, so that no workspace outlives its group.
"""

from __future__ import annotations

import socket
from typing import Callable, Hashable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .. import kernels

__all__ = ["PeerWorkspace", "workspace", "release_workspaces", "peer_access_problem", "FLAG_BYTES",
           "BARRIER_TIMEOUT_S"]

#: Bytes before the data region of a buffer: one uint32 flag per rank (up to 64 ranks).
FLAG_BYTES = 256
#: A device barrier that waits longer than this (a rank died or took another path) traps, which
#: fails the CUDA context loudly instead of hanging it (NCCL's default timeout is as long).
BARRIER_TIMEOUT_S = 600
_BARRIER_TIMEOUT_NS = np.uint64(BARRIER_TIMEOUT_S * 10**9)
_MIN_BYTES = 1 << 20

T = TypeVar("T")
_workspaces: dict[tuple[str, int, int], "PeerWorkspace"] = {}


def _group_key(group) -> str:
    group = group if group is not None else dist.group.WORLD
    return getattr(group, "group_name", None) or str(dist.get_process_group_ranks(group))


def peer_access_problem(group: dist.ProcessGroup | None, device: torch.device) -> str | None:
    """Why the ranks of ``group`` cannot share peer workspaces on ``device``, or None if they can.

    A collective (two ``all_gather_object``): every rank gets the same answer, also where only
    some ranks see a problem (the second exchange shares each rank's verdict). Needs CUDA and
    CuPy, every rank on this machine, one distinct GPU each, and peer access between all of them.
    """
    local = None
    if device.type != "cuda" or kernels.backend() != "cupy":
        local = "needs CUDA tensors and CuPy (pip install lpdist[cuda])"
    index = device.index if device.type == "cuda" else -1
    world = dist.get_world_size(group)
    infos = [None] * world
    dist.all_gather_object(infos, (socket.gethostname(), index, local), group=group)
    verdicts = [None] * world
    dist.all_gather_object(verdicts, _verdict(infos, index), group=group)
    return next((v for v in verdicts if v), None)


def _verdict(infos: list[tuple[str, int, str | None]], index: int) -> str | None:
    """This rank's reason against peer workspaces, given every rank's (host, GPU index, problem)."""
    problems = [p for _, _, p in infos if p]
    if problems:
        return problems[0]
    if len({host for host, _, _ in infos}) > 1:
        return "every rank of the group must run on the same machine"
    indices = [i for _, i, _ in infos]
    if len(set(indices)) < len(indices):
        return "every rank of the group must use its own GPU"
    if len(indices) * 4 > FLAG_BYTES:
        return f"at most {FLAG_BYTES // 4} ranks"
    runtime = kernels.cupy_module().cuda.runtime
    for peer in indices:
        if peer != index and not runtime.deviceCanAccessPeer(index, peer):
            return f"GPU {index} cannot access GPU {peer} directly (no NVLink or PCIe peer access)"
    return None


class PeerWorkspace:
    """One buffer per rank of ``group`` on ``device``, mapped by every rank (see the module doc).

    ``data`` is this rank's data region (uint8 [nbytes]); ``base`` holds every rank's buffer
    address as mapped here (int64 [world], on the device) for kernels; a data offset ``o`` of
    rank ``d`` is at ``base[d] + data_offset + o``. The other ranks' regions are never wrapped
    as torch tensors (torch would place them on their own GPUs); ``copy_to(d, offset, src)``
    copies into one.
    """

    data_offset = FLAG_BYTES

    def __init__(self, group: dist.ProcessGroup | None, nbytes: int, device: torch.device) -> None:
        cupy = kernels.cupy_module()
        self.group, self.device, self.nbytes = group, device, nbytes
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._epoch = 0
        with cupy.cuda.Device(device.index):
            self._memory = cupy.cuda.Memory(FLAG_BYTES + nbytes)
            cupy.cuda.runtime.memset(self._memory.ptr, 0, FLAG_BYTES)
            cupy.cuda.runtime.deviceSynchronize()  # flags are zero before any peer can store into them
            handle = cupy.cuda.runtime.ipcGetMemHandle(self._memory.ptr)
            handles = [None] * self.world
            dist.all_gather_object(handles, handle, group=group)
            self._opened = {d: cupy.cuda.runtime.ipcOpenMemHandle(h)
                            for d, h in enumerate(handles) if d != self.rank}
        self._ptrs = [self._memory.ptr if d == self.rank else self._opened[d] for d in range(self.world)]
        self.base = torch.tensor(self._ptrs, dtype=torch.int64, device=device)
        array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(self._memory, FLAG_BYTES))
        self.data = torch.from_dlpack(array)
        self._runtime = cupy.cuda.runtime
        # the barrier's arguments that never change, converted once (host time per call)
        self._barrier_threads = 32 * -(-self.world // 32)
        self._rank_world = (np.int32(self.rank), np.int32(self.world))
        self._derived: dict = {}

    def copy_to(self, rank: int, offset: int, src: torch.Tensor) -> None:
        """Copy the contiguous ``src`` to byte ``offset`` of rank ``rank``'s data region, on the
        current stream."""
        if not src.is_contiguous() or offset + src.nbytes > self.nbytes:
            raise ValueError(f"src must be contiguous and fit at offset {offset} of {self.nbytes} bytes")
        runtime = self._runtime
        runtime.memcpyAsync(self._ptrs[rank] + FLAG_BYTES + offset, src.data_ptr(), src.nbytes,
                            runtime.memcpyDefault, kernels.current_stream_ptr(self.device.index))

    def barrier(self) -> None:
        """Queue the device barrier of all ranks on the current stream (``csrc/peer.cu``)."""
        self._epoch = (self._epoch + 1) & 0xFFFFFFFF
        kernels.launch("peer", "peer_barrier", 1, self._barrier_threads, [
            self.base, *self._rank_world, np.uint32(self._epoch), _BARRIER_TIMEOUT_NS], device=self.device)

    def derived(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, made once per ``key`` for this workspace and kept with it: views of its rows
        and scratch buffers that every call of one size and setting reuses (host time per call)."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def unmap_peers(self) -> None:
        """Unmap the other ranks' buffers (after the device has finished every kernel using them)."""
        for ptr in self._opened.values():
            self._runtime.ipcCloseMemHandle(ptr)
        self._opened = {}
        self.data = self.base = None
        self._derived = {}

    def free(self) -> None:
        """Free this rank's buffer: only once every rank has unmapped it (a collective between)."""
        self._memory = None


def workspace(group: dist.ProcessGroup | None, nbytes: int, device: torch.device) -> PeerWorkspace:
    """The cached workspace of ``group`` on ``device`` with at least ``nbytes`` of data (collective
    when it has to be created or grown: every rank must ask for the same sizes in the same order)."""
    key = (_group_key(group), device.index, kernels.current_stream_ptr(device.index))
    current = _workspaces.get(key)
    if current is not None and current.nbytes >= nbytes:
        return current
    if current is None:
        problem = peer_access_problem(group, device)
        if problem is not None:
            raise RuntimeError(f"transport='p2p': {problem}; use transport='all_to_all'")
    size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
    if current is not None:
        torch.cuda.synchronize(device)  # no kernel of ours still uses the old buffers
        current.unmap_peers()
    _workspaces[key] = PeerWorkspace(group, size, device)
    if current is not None:
        current.free()  # after the new workspace's handle exchange: every rank has unmapped it
    return _workspaces[key]


def release_workspaces() -> None:
    """Unmap and free every cached workspace. Collective: every rank calls it, while the
    workspaces' process groups still exist (one barrier per workspace between unmapping and
    freeing, as ``cudaIpcCloseMemHandle`` must come before the owner's free)."""
    if not _workspaces:
        return
    for ws in _workspaces.values():
        torch.cuda.synchronize(ws.device)
        ws.unmap_peers()
    for ws in _workspaces.values():
        dist.barrier(group=ws.group)
        ws.free()
    _workspaces.clear()
