"""Handle returned by quantized collectives called with ``async_op=True``.

Quantization and the exchange are issued before it is returned; ``wait()`` waits for the
exchange still in flight and runs the remaining decode step (on CUDA it is enqueued on the
then-current stream, like ``Work.wait()`` orders a NCCL collective before later work on that
stream).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, Protocol

__all__ = ["PendingCollective", "finished"]


class Waitable(Protocol):
    """What ``PendingCollective`` waits on: a ``torch.distributed.Work`` or another handle."""

    def wait(self, timeout: timedelta = ...) -> bool: ...


class PendingCollective:
    """Completes a quantized collective on ``wait()``; safe to wait more than once.

    ``work``: the exchange still in flight (None when there is none), waited on before the
    ``finish`` step (the decode) runs; both run at most once. If either raises (a peer failed,
    the exchange timed out), the output was not written and the handle stays failed: every later
    ``wait()`` re-raises that exception and ``is_completed()`` stays False.
    """

    def __init__(self, finish: Callable[[], None], work: Waitable | None = None) -> None:
        self._finish: Callable[[], None] | None = finish
        self._work = work
        self._failure: BaseException | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Finish the collective (first call) and return True; re-raise its failure if it failed.

        ``timeout`` goes to the in-flight exchange's ``Work.wait``: with NCCL the host then blocks
        until the exchange is done and an exception is raised once ``timeout`` has passed (the
        handle stays failed). None keeps ``Work.wait()``'s default (on CUDA the current stream
        waits, the host does not).
        """
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be None or a datetime.timedelta, got {type(timeout).__name__}")
        if self._failure is not None:
            raise self._failure
        if self._finish is not None:
            finish, work, self._finish, self._work = self._finish, self._work, None, None
            try:
                if work is not None:
                    work.wait() if timeout is None else work.wait(timeout)
                finish()
            except BaseException as exc:
                self._failure = exc
                raise
        return True

    def is_completed(self) -> bool:
        """Whether ``wait()`` has finished the collective successfully."""
        return self._finish is None and self._failure is None


def finished(async_op: bool) -> PendingCollective | None:
    """What a collective returns once everything is already issued (nothing left for ``wait()``):
    a handle whose ``wait()`` does nothing when ``async_op``, else None."""
    return PendingCollective(lambda: None) if async_op else None
