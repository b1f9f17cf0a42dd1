"""PendingCollective: the finish step runs once; a failure stays a failure on every later wait."""

from __future__ import annotations

from datetime import timedelta

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


class _Work:
    """A stand-in for the ``torch.distributed.Work`` of an exchange in flight."""

    def __init__(self, calls: list, error: BaseException | None = None) -> None:
        self.calls, self.error = calls, error

    def wait(self, *timeout: timedelta) -> bool:
        self.calls.append(("wait", *timeout))
        if self.error is not None:
            raise self.error
        return True


def test_wait_passes_its_timeout_to_the_exchange_before_the_finish_step():
    calls = []
    handle = PendingCollective(lambda: calls.append(("finish",)), work=_Work(calls))
    timeout = timedelta(seconds=5)
    assert handle.wait(timeout) and handle.wait(timeout)
    assert calls == [("wait", timeout), ("finish",)]


def test_wait_without_timeout_keeps_the_exchanges_default():
    calls = []
    assert PendingCollective(lambda: calls.append(("finish",)), work=_Work(calls)).wait()
    assert calls == [("wait",), ("finish",)]


def test_a_timed_out_exchange_fails_the_handle_without_finishing():
    calls = []
    handle = PendingCollective(lambda: calls.append(("finish",)), work=_Work(calls, RuntimeError("timed out")))
    with pytest.raises(RuntimeError, match="timed out"):
        handle.wait(timedelta(milliseconds=1))
    with pytest.raises(RuntimeError, match="timed out"):
        handle.wait()
    assert not handle.is_completed() and calls == [("wait", timedelta(milliseconds=1))]


@pytest.mark.parametrize("timeout", [5, 0.5, "1s"])
def test_timeout_must_be_a_timedelta(timeout):
    with pytest.raises(TypeError, match="timeout must be None or a datetime.timedelta"):
        PendingCollective(lambda: None).wait(timeout)
