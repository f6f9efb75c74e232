"""Ctrl-C handling: a first signal is a stop request, a second interrupts; deferred signals arrive after."""

from __future__ import annotations

import os
import signal

import pytest

from champion.signals import graceful_stop, signals_deferred


def test_first_signal_requests_a_stop_and_a_second_interrupts():
    with graceful_stop() as stop:
        stop.check()  # nothing requested yet
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):  # the previous handler is back for the second signal
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deferred_signals_arrive_after_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the block finished")
    assert done == ["the block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
