"""Handle returned by quantized collectives called with ``async_op=True``.

Quantization and the exchange are issued before it is returned; ``wait()`` runs the remaining
decode step (on CUDA it is enqueued on the then-current stream, like ``Work.wait()`` orders a
NCCL collective before later work on that stream).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["PendingCollective", "finished"]


class PendingCollective:
    """Completes a quantized collective on ``wait()``; safe to wait more than once.

    The finish step runs at most once. If it raises (a peer failed, the exchange timed out),
    the output was not written and the handle stays failed: every later ``wait()`` re-raises
    that exception and ``is_completed()`` stays False.
    """

    def __init__(self, finish: Callable[[], None]) -> None:
        self._finish: Callable[[], None] | None = finish
        self._failure: BaseException | None = None

    def wait(self, timeout: object = None) -> bool:
        """Finish the collective (first call) and return True; re-raise its failure if it failed."""
        if self._failure is not None:
            raise self._failure
        if self._finish is not None:
            finish, self._finish = self._finish, None
            try:
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
