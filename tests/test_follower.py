"""The follower's swap logic, with an in-memory alias table and a loader that records what it loads."""

from __future__ import annotations

import sys
import threading
import time

from serving.follower import Follower
from serving.model import LoadedModel


class Versions:
    """Stands in for the registry's alias table and for loading: the follower only sees these callables."""

    def __init__(self, **aliases):
        self.aliases = dict(aliases)
        self.loaded: list[str] = []
        self.broken: set[str] = set()

    def read(self) -> dict[str, str]:
        return dict(self.aliases)

    def load(self, version: str) -> LoadedModel:
        if version in self.broken:
            raise OSError(f"artifact of v{version} is unreadable")
        self.loaded.append(version)
        return LoadedModel("m", version, None, None, ("a", "b"), 32, "cpu", 0.5)


def follower(versions: Versions, **kw) -> Follower:
    return Follower("m", versions.read, versions.load, **kw)


def test_promotion_swaps_and_keeps_the_previous_champion_warm():
    v = Versions(champion="1")
    f = follower(v)
    assert f.sync().champion.version == "1"
    v.aliases["champion"] = "2"
    served = f.sync()
    assert (served.champion.version, served.previous.version) == ("2", "1")
    v.aliases["champion"] = "1"  # rollback
    served = f.sync()
    assert served.champion.version == "1" and served.previous.version == "2"
    assert v.loaded == ["1", "2"]  # the rollback loaded nothing
    assert [(s.from_version, s.to_version, s.load_seconds) for s in f.swaps] == [
        (None, "1", 0.5),
        ("1", "2", 0.5),
        ("2", "1", 0.0),
    ]


def test_without_keep_previous_a_rollback_loads_again():
    v = Versions(champion="1")
    f = follower(v, keep_previous=False)
    f.sync()
    v.aliases["champion"] = "2"
    assert f.sync().previous is None
    v.aliases["champion"] = "1"
    f.sync()
    assert v.loaded == ["1", "2", "1"]


def test_a_version_that_fails_to_load_leaves_the_old_one_serving():
    v = Versions(champion="1")
    f = follower(v, retry_failed_seconds=3600)
    f.sync()
    v.aliases["champion"] = "2"
    v.broken.add("2")
    assert f.sync().champion.version == "1"
    assert "v2 failed to load" in f.last_error
    v.broken.clear()
    assert f.sync().champion.version == "1"  # not retried before retry_failed_seconds
    f.retry_failed_seconds = 0
    assert f.sync().champion.version == "2" and f.last_error is None


def test_challenger_is_followed_only_when_the_policy_needs_it():
    v = Versions(champion="1", challenger="2")
    assert follower(v).sync().challenger is None
    f = follower(v, need_challenger=True)
    assert f.sync().challenger.version == "2"
    del v.aliases["challenger"]  # retired (e.g. a canary rolled back)
    assert f.sync().challenger is None
    del v.aliases["champion"]  # an alias deleted by hand: keep answering rather than go down
    assert f.sync().champion.version == "1"


def test_thread_notices_a_move_within_the_poll_interval_and_sync_now_is_immediate():
    v = Versions(champion="1")
    f = follower(v, poll_seconds=0.05).start()
    try:
        f.sync_now(timeout=5)
        v.aliases["champion"] = "2"
        deadline = time.monotonic() + 2
        while f.served.champion.version != "2":
            assert time.monotonic() < deadline, "the follower did not notice the move"
            time.sleep(0.01)
        f.poll_seconds = 3600
        f.sync_now(timeout=5)  # let the thread settle into its long wait
        v.aliases["champion"] = "3"
        assert f.sync_now(timeout=5).champion.version == "3"
    finally:
        f.stop()


def test_readers_never_see_a_half_swapped_state():
    v = Versions(champion="1", challenger="1")
    f = follower(v, need_challenger=True)
    f.sync()
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            s = f.served
            seen.add((s.champion.version, s.challenger.version))

    reader = threading.Thread(target=read)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so the reader runs during swaps
    try:
        reader.start()
        for i in range(2, 50):
            v.aliases.update(champion=str(i), challenger=str(i))
            f.sync()
            deadline = time.monotonic() + 2
            while (str(i), str(i)) not in seen and time.monotonic() < deadline:
                time.sleep(0.0005)  # let the reader see this state before the next swap
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert len(seen) >= 40, f"the reader saw only {len(seen)} of 49 states, so few swaps were checked"
    assert all(a == b for a, b in seen), sorted(seen)  # both aliases moved together in one swap
