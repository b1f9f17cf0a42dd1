"""Handle returned by quantized collectives called with ``async_op=True``.

Quantization and the exchange are issued before it is returned; ``wait()`` runs the remaining
decode step (on CUDA it is enqueued on the then-current stream, like ``Work.wait()`` orders a
NCCL collective before later work on that stream).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["PendingCollective"]


class PendingCollective:
    """Completes a quantized collective on ``wait()``; safe to wait more than once."""

    def __init__(self, finish: Callable[[], None]) -> None:
        self._finish: Callable[[], None] | None = finish

    def wait(self, timeout: object = None) -> bool:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        return self._finish is None
