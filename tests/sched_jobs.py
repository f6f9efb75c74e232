"""Jobs for the scheduler tests, imported by textual reference (`sched_jobs:tick`) in a subprocess."""

from __future__ import annotations

import os
import time


def tick(seconds: float = 0.0) -> dict:
    time.sleep(seconds)
    return {"pid": os.getpid()}


def fail() -> None:
    raise RuntimeError("this job always fails")
