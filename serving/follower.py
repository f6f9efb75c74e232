"""Follow the registry: notice alias moves, load and warm the new version off the hot path, swap atomically.

Each server worker runs one `Follower` thread. Requests read `follower.served` once per batch: an immutable
snapshot, replaced by a single reference assignment, so a swap never fails or mixes a request's versions.
The champion being replaced stays loaded as `previous`, so a rollback is a swap, not a load.
What the aliases are is the reader's business: the server's reads the audit history, so an alias moved in
MLflow directly is not followed until a person adopts the move (serving/server.py `_read_aliases`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.model import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    champion: LoadedModel | None = None
    challenger: LoadedModel | None = None
    previous: LoadedModel | None = None  # the champion before this one, kept warm for rollbacks

    def loaded(self) -> dict[str, LoadedModel]:
        return {m.version: m for m in (self.previous, self.challenger, self.champion) if m is not None}


@dataclass(frozen=True)
class Swap:
    alias: str
    from_version: str | None
    to_version: str
    at: float  # time.time() when the new version started answering
    load_seconds: float  # 0 when the version was already warm


@dataclass
class Follower:
    name: str
    read_aliases: Callable[[], dict[str, str]]  # {alias: version} as the audit history names them now
    load: Callable[[str], LoadedModel]  # load and warm one version
    poll_seconds: float = 1.0
    need_challenger: bool = False
    keep_previous: bool = True
    retry_failed_seconds: float = 60.0
    on_swap: Callable[[Swap, Served], None] | None = None
    served: Served = field(default_factory=Served)
    swaps: deque = field(default_factory=lambda: deque(maxlen=1_000))  # the latest swaps, oldest first
    last_error: str | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _synced: threading.Condition = field(default_factory=threading.Condition)
    _requested: int = 0
    _completed: int = 0
    _failed: dict[str, float] = field(default_factory=dict)  # version -> when loading it last failed
    _thread: threading.Thread | None = None

    def start(self) -> Follower:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"follow-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sync_now(self, timeout: float = 120.0) -> Served:
        """Ask the follower thread to check the registry at once; returns what is served afterwards."""
        with self._synced:
            self._requested += 1
            ticket = self._requested
            self._wake.set()
            if not self._synced.wait_for(lambda: self._completed >= ticket or self._stop.is_set(), timeout):
                raise TimeoutError(f"the registry check did not finish within {timeout:.0f} s")
        return self.served

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._synced:  # requests made after this point wait for the next check
                ticket = self._requested
                self._wake.clear()
            try:
                self.sync()
            except Exception as err:  # the registry may be briefly unreachable; keep serving what we have
                self.last_error = f"{type(err).__name__}: {err}"
                log.warning("registry check for %s failed: %s", self.name, self.last_error)
            with self._synced:
                self._completed = ticket
                self._synced.notify_all()
            self._wake.wait(self.poll_seconds)

    def sync(self) -> Served:
        """One registry check: load whatever the aliases now name and swap it in."""
        aliases = self.read_aliases()
        served = self.served
        champion = self._resolve(aliases.get("champion"), served.champion, served)
        challenger = served.challenger
        if self.need_challenger:
            challenger = self._resolve(aliases.get("challenger"), served.challenger, served)
            if aliases.get("challenger") is None:
                challenger = None  # a retired challenger stops taking traffic at once
        if champion is served.champion and challenger is served.challenger:
            return served
        previous = served.previous
        if champion is not served.champion and served.champion is not None and self.keep_previous:
            previous = served.champion
        new = Served(champion, challenger, previous if previous is not champion else None)
        self.served = new  # the swap: one reference assignment, seen by the next batch
        now = time.time()
        for alias, old, model in (
            ("champion", served.champion, champion),
            ("challenger", served.challenger, challenger),
        ):
            if model is not None and model is not old:
                fresh = model.version not in served.loaded()
                swap = Swap(
                    alias,
                    old.version if old else None,
                    model.version,
                    now,
                    model.load_seconds if fresh else 0.0,
                )
                log.info(
                    "%s: '%s' now served by v%s (was %s)", self.name, alias, model.version, swap.from_version
                )
                self.swaps.append(swap)
                if self.on_swap is not None:
                    self.on_swap(swap, new)
        return new

    def _resolve(
        self, version: str | None, current: LoadedModel | None, served: Served
    ) -> LoadedModel | None:
        if version is None:
            return current  # alias deleted: keep answering with what we have rather than fail
        if current is not None and current.version == version:
            return current
        warm = served.loaded().get(version)
        if warm is not None:
            return warm
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_failed_seconds:
            return current
        try:
            model = self.load(version)
        except Exception as err:
            self._failed[version] = time.monotonic()
            self.last_error = f"v{version} failed to load: {err}"
            log.error(
                "%s: keeping v%s; %s", self.name, current.version if current else "none", self.last_error
            )
            return current
        self._failed.pop(version, None)
        self.last_error = None
        return model
