"""PendingCollective: the finish step runs once; a failure stays a failure on every later wait."""

from __future__ import annotations

import pytest

from lpdist.comm import PendingCollective


def test_finish_runs_once_and_every_wait_reports_success():
    runs = []
    handle = PendingCollective(lambda: runs.append(1))
    assert not handle.is_completed()
    assert handle.wait() and handle.wait()
    assert handle.is_completed() and runs == [1]


def test_a_failed_wait_fails_again_and_never_reports_completion():
    runs = []

    def finish() -> None:
        runs.append(1)
        raise RuntimeError("peer closed the connection")

    handle = PendingCollective(finish)
    with pytest.raises(RuntimeError, match="peer closed") as first:
        handle.wait()
    assert not handle.is_completed()
    with pytest.raises(RuntimeError) as second:
        handle.wait()
    assert second.value is first.value
    assert not handle.is_completed() and runs == [1]  # the failed step is not run twice
