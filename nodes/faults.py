"""Crash points for tests: a named place in the commit protocol where a test can kill the process.

`SDFLOW_CRASH_AT=name` (or `name:N`, the N-th time that place is reached, from 1) makes the process
SIGKILL itself there: no cleanup, no flushing, exactly what a preempted machine does. Unset, it costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

_reached: Counter = Counter()
_lock = threading.Lock()


def crash_point(name: str) -> None:
    spec = os.environ.get("SDFLOW_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _lock:
        _reached[name] += 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
