"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def make_versions(
    reg, name: str, scores: list[float | None], source: str = "file:///tmp/champion-test-model"
) -> list[str]:
    """Register `name` with one version per score (tagged metric.val_macro_f1), without training anything."""
    reg.client.create_registered_model(name)
    versions = []
    for score in scores:
        tags = {"data_sha256": "d" * 64}
        if score is not None:
            tags["metric.val_macro_f1"] = str(score)
        versions.append(str(reg.client.create_model_version(name, source=source, tags=tags).version))
    return versions


@contextmanager
def http_process(command: Callable[[int], list[str]], log: Path, timeout: float = 120) -> Iterator[str]:
    """Start `command(port)` on a free loopback port, wait for GET /health == OK, yield the base URL.

    Output goes to `log` (a pipe nobody reads would fill up and stall the server); the whole process
    group is stopped afterwards.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(command(port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.read() == b"OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{command(port)[:4]} did not answer /health:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
