"""Concurrent promotions and rollbacks from many processes: a shared PostgreSQL registry, and the embedded
sqlite one, whose promotion lock is a `flock` on a file beside the audit database (one lock per file)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import random

from helpers import make_versions

from champion.registry import champion_lineage, connect, history, promote, rollback, show_model

WORKERS, OPERATIONS = 6, 6


def _worker(urls: tuple[str, str], worker: int, versions: list[str], barrier, results) -> None:
    import os

    os.environ["CHAMPION_ACTOR"] = f"worker-{worker}"
    reg = connect(*urls)
    rng = random.Random(worker)
    barrier.wait()  # start together so the operations really overlap
    done = []
    for i in range(OPERATIONS):
        if rng.random() < 0.3:
            decision = rollback(reg, "shared", reason=f"w{worker} op{i}")
        else:
            decision = promote(reg, "shared", rng.choice(versions), reason=f"w{worker} op{i}", force=True)
        if decision.allowed:
            done.append(decision.event_id)
    reg.close()
    results.put((worker, done))


def test_concurrent_promotions_keep_one_consistent_history(store_urls, monkeypatch):
    monkeypatch.setenv("CHAMPION_ACTOR", "setup")
    reg = connect(*store_urls)
    versions = make_versions(reg, "shared", [0.5, 0.6, 0.7, 0.8])
    promote(reg, "shared", versions[0], reason="initial champion")

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(store_urls, w, versions, barrier, results)) for w in range(WORKERS)
    ]
    for p in procs:
        p.start()
    reported = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    events = history(reg, "shared")
    worker_ids = sorted(i for ids in reported.values() for i in ids)
    assert [e.id for e in events[1:]] == worker_ids  # every successful move has exactly one event
    assert len(events) > WORKERS  # the workers really did move the alias, concurrently
    assert {e.action for e in events} <= {"promote", "rollback"}  # no move went unrecorded ("external")
    for before, after in itertools.pairwise(events):
        assert after.from_version == before.to_version, f"broken chain at event {after.id}"
    for i, event in enumerate(events):  # each rollback went to the champion before the one it replaced
        if event.action == "rollback":
            assert event.to_version == champion_lineage(events[:i])[-2]
    assert show_model(reg, "shared")["aliases"]["champion"] == events[-1].to_version
    assert champion_lineage(events)[-1] == events[-1].to_version
    reg.close()
