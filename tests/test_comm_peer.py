"""The caching and lifetime rules of lpdist.comm.peer's workspaces, with a stand-in for the CUDA
IPC buffers (the GPU side is checked by tests/gpu_multi/comm_check.py): sizes grow to powers of
two, a buffer that grows is unmapped before the new one's handles are exchanged and freed only
after that exchange, and ``release_workspaces`` unmaps everything before any rank frees."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lpdist.comm import peer


@pytest.fixture
def events(monkeypatch):
    log: list[str] = []

    class FakeWorkspace:
        def __init__(self, group, nbytes, device):
            self.group, self.nbytes, self.device = group, nbytes, device
            log.append(f"new {nbytes}")  # the handle exchange, a collective, happens here

        def unmap_peers(self):
            log.append(f"unmap {self.nbytes}")

        def free(self):
            log.append(f"free {self.nbytes}")

    monkeypatch.setattr(peer, "PeerWorkspace", FakeWorkspace)
    monkeypatch.setattr(peer, "peer_access_problem", lambda group, device: None)
    monkeypatch.setattr(peer, "_group_key", lambda group: "g")
    monkeypatch.setattr(peer, "_workspaces", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=7))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
    monkeypatch.setattr(peer.dist, "barrier", lambda group=None: log.append("barrier"))
    return log


DEVICE = torch.device("cuda", 0)  # only its index is read; nothing runs on it


def test_workspace_grows_to_powers_of_two_in_a_safe_order(events):
    first = peer.workspace(None, 100, DEVICE)
    assert first.nbytes == 1 << 20 and events == ["new 1048576"]
    assert peer.workspace(None, 1 << 20, DEVICE) is first and events == ["new 1048576"]
    grown = peer.workspace(None, (1 << 20) + 1, DEVICE)
    assert grown.nbytes == 2 << 20
    assert events[1:] == ["synchronize", "unmap 1048576", "new 2097152", "free 1048576"]
    assert peer.workspace(None, 5000, DEVICE) is grown


def test_refused_group_raises_naming_the_other_transport(events, monkeypatch):
    monkeypatch.setattr(peer, "peer_access_problem", lambda group, device: "every rank of the group must use "
                                                                           "its own GPU")
    with pytest.raises(RuntimeError, match="p2p.*own GPU.*all_to_all"):
        peer.workspace(None, 100, DEVICE)
    assert events == []


def test_release_unmaps_every_workspace_before_any_is_freed(events, monkeypatch):
    peer.workspace(None, 100, DEVICE)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=8))
    peer.workspace(None, 3 << 20, DEVICE)  # another stream: a workspace of its own
    events.clear()
    peer.release_workspaces()
    assert events == ["synchronize", "unmap 1048576", "synchronize", "unmap 4194304",
                      "barrier", "free 1048576", "barrier", "free 4194304"]
    assert peer._workspaces == {}
    events.clear()
    peer.release_workspaces()  # nothing left: no collective
    assert events == []
