"""What every benchmark shares: the record of the machine and the commit it measured, and a measurement run
in a child process that answers with one JSON line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine(**extra: Any) -> dict[str, Any]:
    """The CPUs, the platform and the torch version, with `extra` (e.g. pinned threads) after them."""
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        **extra,
    }


def code_state(paths: tuple[str, ...], diff: bool = False) -> dict[str, str]:
    """The commit, and what is uncommitted in `paths` (the code a benchmark measures; others may edit the
    tree while it runs); with `diff`, the local changes themselves."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    state = {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--porcelain", *paths)}
    if diff:
        state["diff"] = git("diff", "HEAD", "--", *paths)
    return state


def module_command(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter, for a child run from the repository root."""
    return [sys.executable, "-m", module, *args]


def child_json(command: list[str], env: dict[str, str], what: str, prefix: str = "") -> Any:
    """Run `command` from the repository root and return the JSON on the last line of its output that starts
    with `prefix`; a failed child raises with the end of its stderr."""
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(prefix) and line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(prefix) :])
