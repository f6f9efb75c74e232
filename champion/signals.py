"""Ctrl-C and SIGTERM handling: stop long work at safe points, and never split a registry write."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM; long work calls `check()` where stopping is safe."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Turn the first signal into a stop request; a second one interrupts at once (previous handlers).

    An exception raised at an arbitrary point can land inside an MLflow database write and leave its
    sqlite connection locked; stopping between training steps cannot.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, object] = {}

    def request(signum, _frame) -> None:
        stop.signum = signum
        for sig, old in previous.items():
            signal.signal(sig, old)
        print(
            "\nstopping after the current step (send it again to abort at once)", file=sys.stderr, flush=True
        )

    previous.update({sig: signal.signal(sig, request) for sig in _SIGNALS})
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block (an alias move and its audit row) is done, then deliver."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for sig in received[:1]:
            signal.raise_signal(sig)
