"""Communication counters: calls, elements and bytes each rank sends, per transport.

``bytes_sent`` counts what leaves this rank over the wire for the collective as executed
(all-to-all: the W-1 rows for other ranks; ring collectives: (W-1)/W of the buffer per pass),
including block scales and alignment padding, so it can be compared with a bf16 collective's
``(W-1)/W * 2 * numel`` bytes.

Every call a rank takes part in counts once, an empty one too (0 elements, 0 bytes), whatever
the collective and transport: ``calls`` is the number of collectives run. A rank outside the
call's group does nothing and records nothing. ``all_reduce`` counts as its two steps, one
reduce-scatter (under its transport) and one ``"all_gather"``.
"""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["stats", "reset_stats", "record"]

_lock = threading.Lock()
_counters: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "elements": 0, "bytes_sent": 0})


def record(transport: str, *, elements: int, bytes_sent: int) -> None:
    """Add one call moving ``elements`` input elements and ``bytes_sent`` bytes to ``transport``."""
    with _lock:
        c = _counters[transport]
        c["calls"] += 1
        c["elements"] += int(elements)
        c["bytes_sent"] += int(bytes_sent)


def stats() -> dict[str, dict[str, int]]:
    """A copy of the counters: ``{transport: {"calls", "elements", "bytes_sent"}}``.

    An empty call counts as a call with 0 elements and 0 bytes (see the module docstring).
    """
    with _lock:
        return {name: dict(c) for name, c in _counters.items()}


def reset_stats() -> None:
    """Zero all counters."""
    with _lock:
        _counters.clear()
