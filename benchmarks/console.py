"""Console and review-queue benchmark (not a test): the review page's server time per review, and the queue
selection's time, with 1M predictions in the inference log.

In a scratch CHAMPION_HOME: writes `--rows` predictions (default 1,000,000; 15 labels, 5% disagreeing canary
answers, a spread of confidences) straight into the sqlite inference log, then
1. times `review select` over all of them (the first pass reads every row) and an incremental pass after
   10,000 more rows (what the hourly job does), with peak memory;
2. starts a real `champion console` on loopback, logs in, and reviews `--reviews` texts the way the page
   does: GET the review page (the next item, today's progress, rendered), POST the answer (label in the
   same transaction as its feedback row), follow the redirect. Reported per review: p50, p95 and mean of
   that round trip, measured by the client on loopback, so it bounds the server time from above.

Target (issue 11): under 50 ms per review on 2 cores. Results are appended to
benchmarks/results/console_cpu.json. Run:

    .venv/bin/python -m benchmarks.console                      # 1M rows, 300 reviews
    .venv/bin/python -m benchmarks.console --rows 100000 --reviews 50   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT

RESULTS = ROOT / "benchmarks" / "results" / "console_cpu.json"
LABELS = [f"intent_{i:02d}" for i in range(15)]
MODEL = "bench-intents"
PASSWORD = "benchmark password"


def fill_log(db: Path, rows: int, start: int = 0, seed: int = 0) -> float:
    """Append `rows` predictions with plain sqlite (the log's own writer would take minutes for 1M)."""
    from serving.inference_log import InferenceLog

    InferenceLog(f"sqlite:///{db}", retention_days=None).engine.dispose()  # the tables, as the log makes them
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC).replace(tzinfo=None)  # sqlite keeps UTC as naive text, as SQLAlchemy writes it
    clock = time.perf_counter()
    conn = sqlite3.connect(db)
    chunk = 50_000
    for first in range(start, start + rows, chunk):
        n = min(chunk, start + rows - first)
        logits = rng.normal(0, 1, (n, len(LABELS))) * rng.uniform(0.5, 4, (n, 1))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        top = probs.argmax(axis=1)
        canary = rng.random(n) < 0.05
        batch = []
        for i in range(n):
            rid = f"b{first + i:08d}"
            at = (now - timedelta(seconds=int((start + rows - first - i) * 0.08))).isoformat(sep=" ")
            arm = "canary" if canary[i] else "champion"
            agrees = (0 if rng.random() < 0.3 else 1) if canary[i] else None
            batch.append((rid, at, MODEL, "1", arm, f"customer message number {first + i} about an order",
                          LABELS[top[i]], float(probs[i, top[i]]), 12.0, agrees,
                          probs[i].astype("<f2").tobytes()))  # fmt: skip
        conn.executemany(
            "INSERT INTO champion_predictions (request_id, at, model_name, model_version, arm, text, label, "
            "score, latency_ms, agrees, probs) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            batch,
        )
        conn.commit()
    conn.close()
    return time.perf_counter() - clock


def time_selection(url: str, budget: int) -> dict:
    from monitoring.review import ReviewConfig, ReviewQueue

    queue = ReviewQueue(url)
    cfg = ReviewConfig(daily_budget=budget, drift_windows=False)
    clock = time.perf_counter()
    result = queue.select(MODEL, cfg, labels=lambda _v: LABELS)
    seconds = time.perf_counter() - clock
    queue.close()
    return {"seconds": round(seconds, 2), "considered": result.considered, "queued": result.queued,
            "reason": result.reason}  # fmt: skip


def time_reviews(home: Path, url: str, reviews: int) -> dict:
    import httpx

    from tests.helpers import launch_http, stop_process_group

    champion = str(Path(sys.executable).parent / "champion")
    subprocess.run([champion, "console-user", "bench", "--password-stdin"], input=PASSWORD + "\n", text=True,
                   check=True, capture_output=True)  # fmt: skip
    command = lambda port: [champion, "console", "--port", str(port), "--log-url", url]  # noqa: E731
    proc, base = launch_http(command, home / "console.log", timeout=60)
    try:
        client = httpx.Client(base_url=base, follow_redirects=True, timeout=30)
        client.post("/login", data={"name": "bench", "password": PASSWORD, "next": "/"}).raise_for_status()
        page = client.get(f"/models/{MODEL}/review")
        times = []
        for i in range(reviews + 5):  # the first five warm the server up and are not counted
            request_id = re.search(r'data-request-id="([^"]+)"', page.text).group(1)
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            labels = re.findall(r'name="label" value="([^"]+)"', page.text)
            form = {"csrf": csrf, "request_id": request_id}
            form.update({"skip": "1"} if i % 10 == 9 else {"label": labels[i % len(labels)]})
            clock = time.perf_counter()
            page = client.post(f"/models/{MODEL}/review", data=form)  # answer, 303, the next page
            elapsed = time.perf_counter() - clock
            assert page.status_code == 200 and ("labelled" in page.text or "skipped" in page.text), page.text[
                :300
            ]
            if i >= 5:
                times.append(elapsed * 1000)
        client.close()
    finally:
        stop_process_group(proc)
    times.sort()
    return {
        "reviews": len(times),
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[int(len(times) * 0.95) - 1], 1),
        "mean_ms": round(statistics.fmean(times), 1),
        "max_ms": round(times[-1], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.console", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reviews", type=int, default=300)
    parser.add_argument("--budget", type=int, default=2_000, help="the day's review budget for the benchmark")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="champion-bench-console-"))
    os.environ["CHAMPION_HOME"] = str(home)
    os.environ["CHAMPION_ACTOR"] = "benchmark"
    db = home / "inference.db"
    url = f"sqlite:///{db}"
    print(f"writing {args.rows:,} predictions to {db} ...", flush=True)
    fill_seconds = fill_log(db, args.rows)
    first = time_selection(url, args.budget)
    print(
        f"selection over {first['considered']:,} rows: {first['seconds']} s ({first['reason']})", flush=True
    )
    fill_log(db, 10_000, start=args.rows, seed=1)
    incremental = time_selection(url, args.budget)
    print(f"incremental selection ({incremental['considered']:,} new rows): {incremental['seconds']} s")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    review = time_reviews(home, url, args.reviews)
    print(f"per review (GET page + POST answer, loopback): p50 {review['p50_ms']} ms, "
          f"p95 {review['p95_ms']} ms, mean {review['mean_ms']} ms over {review['reviews']}")  # fmt: skip
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "log_bytes": db.stat().st_size,
        "fill_seconds": round(fill_seconds, 1),
        "selection_first_pass": first,
        "selection_incremental": incremental,
        "peak_rss_mib_after_selection": round(peak_mib),
        "review_round_trip": review,
        "target_ms": 50,
        "cpus": os.cpu_count(),
        "command": "python -m benchmarks.console " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*history, result], indent=2) + "\n")
    print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
