"""Progress of long loops: a tqdm bar on a terminal, a few plain lines in a log.

A log that is not a terminal (CI, `make demo > demo.log`, a scheduler's job log) would get one tqdm redraw
per step. There a loop prints a line only when it runs long enough to need one: at each tenth of the loop,
at most one line per `min_seconds`; the recipes' own line per epoch says the rest.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

THIRD_PARTY_OFF = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts"
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" and "Writing model shards" too
}


def interactive() -> bool:
    """Whether stderr is a terminal, where a bar redraws in place instead of adding lines."""
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable, desc: str, disable: bool = False, min_seconds: float = 30.0) -> Any:
    """`iterable` with progress: tqdm on a terminal, else a line per tenth of it (at most one per
    `min_seconds`); both have tqdm's `set_postfix`, and `disable` shows nothing."""
    if disable or interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, disable=disable, leave=False)
    return _Lines(iterable, desc, min_seconds)


class _Lines:
    """Iterates like tqdm, printing `desc: step i/n (p%), postfix, Ts` to stderr now and then."""

    def __init__(self, iterable: Iterable, desc: str, min_seconds: float) -> None:
        self.iterable, self.desc, self.min_seconds = iterable, desc, min_seconds
        self.postfix = ""

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def __iter__(self) -> Iterator:
        total = len(self.iterable) if hasattr(self.iterable, "__len__") else None  # type: ignore[arg-type]
        started = last = time.monotonic()
        for step, item in enumerate(self.iterable, start=1):
            yield item
            if not total or step * 10 // total == (step - 1) * 10 // total:
                continue  # a line only where a tenth of the loop ends
            now = time.monotonic()
            if now - last >= self.min_seconds:
                last = now
                extra = f", {self.postfix}" if self.postfix else ""
                print(
                    f"{self.desc}: step {step}/{total} ({100 * step // total}%){extra}, {now - started:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )


def quiet_third_party_bars() -> None:
    """MLflow's and Hugging Face's bars off when stderr is not a terminal; a variable the user set wins."""
    if interactive():
        return
    for key, value in THIRD_PARTY_OFF.items():
        os.environ.setdefault(key, value)
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].strip().lower() not in {"1", "true", "yes", "on"}:
        return
    # Both read the variable when first imported; one imported already is told directly.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
