"""Soak benchmark (not a test): a real `champion serve` under steady load for 10 minutes, with the champion
alias moved every minute and the inference log's PostgreSQL restarted once.

Registers all-MiniLM-L6-v2 with three random 19-intent heads (as benchmarks.serving does) in a scratch
CHAMPION_HOME, starts a throwaway PostgreSQL cluster for the inference log (tests/pgserver.py: initdb and
pg_ctl, so the machine's own server is never touched), then runs `champion serve` with configs/serve_cpu.yaml
and `clients` closed-loop clients. Every minute the champion moves to the next version; at the middle of the
run PostgreSQL is stopped for `--outage` seconds and started again.

Reported, per minute and in total: requests answered and failed (target 0), p50/p99 latency, the server's
resident memory (all its processes; a leak shows as steady growth), and at the end the rows lost: answered
request ids missing from the inference log after a graceful stop (target 0). Results are appended to
benchmarks/results/soak_cpu.json. Run:

    .venv/bin/python -m benchmarks.soak                  # 10 minutes
    .venv/bin/python -m benchmarks.soak --minutes 2 --outage 10    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import serving as bench
from benchmarks.common import ROOT

RESULTS = ROOT / "benchmarks" / "results" / "soak_cpu.json"
TEXTS = [
    "where is my order, it was due on monday",
    "I need to reset my password, the link expired",
    "my card was declined at the shop",
    "please send me the invoice for last month",
]


class Load:
    """Closed-loop clients on keep-alive connections; every answer and failure is kept with its time."""

    def __init__(self, port: int, clients: int):
        self.port = port
        self.answers: list[tuple[float, float, list[str]]] = []  # (done at, latency s, request ids)
        self.failures: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, worker: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = json.dumps({"texts": [TEXTS[worker % len(TEXTS)]]})
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except Exception as err:  # a dropped connection is a failed request too
                self.failures.append((time.monotonic(), f"{type(err).__name__}: {err}"))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                continue
            done = time.monotonic()
            if response.status != 200:
                self.failures.append((done, f"{response.status}: {data[:200]!r}"))
                continue
            self.answers.append((done, done - sent, [item["request_id"] for item in json.loads(data)]))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds PostgreSQL is down")
    args = parser.parse_args()

    from tests.pgserver import find_binaries, start_throwaway

    binaries = find_binaries()
    if binaries is None:
        raise SystemExit("the soak needs PostgreSQL's server binaries (initdb, pg_ctl) for its log database.")
    home = Path(tempfile.mkdtemp(prefix="champion-soak-"))
    os.environ["CHAMPION_HOME"] = str(home)
    env = bench.server_env(home, threads=2)
    print(f"registering three MiniLM versions in {home} ...", flush=True)
    versions = bench.register_versions(3)
    pg = start_throwaway(binaries)
    log_url = pg.url("postgres")
    try:
        port = bench.free_port()
        config, _ = bench.ours_config(home, port, None)
        import yaml

        data = yaml.safe_load(config.read_text())
        data["log"] = {**data.get("log", {}), "url": log_url}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        report = _soak(env, config, port, versions, pg, args)
    finally:
        pg.stop()
    report.update({"at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": bench.server_machine(2)})
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps([*runs, report], indent=2) + "\n")
    _print(report)


def _soak(env, config: Path, port: int, versions: list[str], pg, args) -> dict:
    from champion.registry import connect, promote
    from serving.inference_log import InferenceLog

    reg = connect()
    total = args.minutes * 60
    moves, outage, rss = [], {}, []
    log_file = Path(env["CHAMPION_HOME"]) / "soak-serve.log"
    with bench.server(bench.ours_command(config, port), env, "/readyz", port, log_file) as pid:
        load = Load(port, args.clients)
        started = time.monotonic()
        next_move, next_sample, step = started + 60, started, 0
        outage_at = started + total / 2
        while time.monotonic() - started < total:
            now = time.monotonic()
            if now >= next_sample:
                rss.append((now - started, _rss_mb(pid)))
                next_sample += 5
            if now >= next_move:
                step += 1
                target = versions[step % len(versions)]
                decision = promote(reg, bench.NAME, target, reason=f"soak minute {step}", force=True)
                moves.append((now - started, target, decision.allowed))
                next_move += 60
            if not outage and now >= outage_at:
                print(f"stopping PostgreSQL for {args.outage:.0f} s", flush=True)
                outage["stopped_at"] = now - started
                pg.ctl("stop")
                time.sleep(args.outage)
                pg.ctl("start")
                outage["started_at"] = time.monotonic() - started
            time.sleep(0.2)
        load.finish()
        ended = time.monotonic()
    # The server was stopped gracefully (SIGTERM): everything it answered must be in PostgreSQL now.
    reader = InferenceLog(pg.url("postgres"))
    logged = set(reader.read(bench.NAME)["request_id"])
    reader.close()
    reg.close()
    answered = [rid for *_, ids in load.answers for rid in ids]
    minutes = []
    for m in range(int(args.minutes + 0.999)):
        lo, hi = started + 60 * m, started + 60 * (m + 1)
        latencies = [lat for done, lat, _ in load.answers if lo <= done < hi]
        in_minute = [mb for t, mb in rss if 60 * m <= t < 60 * (m + 1)]
        minutes.append({
            "minute": m + 1,
            "answered": len(latencies),
            "failed": sum(1 for t, _ in load.failures if lo <= t < hi),
            "p50_ms": round(1000 * percentile(latencies, 0.50), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "rss_mb": round(max(in_minute), 1) if in_minute else None,
        })  # fmt: skip
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "seconds": round(ended - started, 1),
        "answered": len(answered),
        "failed": len(load.failures),
        "failures_sample": [f for _, f in load.failures[:5]],
        "rows_lost": len(set(answered) - logged),
        "rows_logged_twice": len(answered) - len(set(answered)),
        "alias_moves": [{"at_s": round(t, 1), "to": v, "allowed": ok} for t, v, ok in moves],
        "postgres_outage_s": outage,
        "rss_mb_first_minute": minutes[0]["rss_mb"],
        "rss_mb_last_minute": minutes[-1]["rss_mb"],
        "per_minute": minutes,
    }


def _print(report: dict) -> None:
    print(
        f"\nsoak: {report['seconds']:.0f} s, {report['clients']} clients, {len(report['alias_moves'])} alias "
        f"moves, PostgreSQL down {report['postgres_outage_s']}"
    )
    print(
        f"answered {report['answered']}, failed {report['failed']} (target 0), rows lost "
        f"{report['rows_lost']} (target 0); server RSS {report['rss_mb_first_minute']} MB in minute 1, "
        f"{report['rss_mb_last_minute']} MB in the last"
    )
    print(f"{'min':>4} {'answered':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8}")
    for m in report["per_minute"]:
        print(
            f"{m['minute']:>4} {m['answered']:>9} {m['failed']:>7} {m['p50_ms']:>8} {m['p99_ms']:>8} "
            f"{m['rss_mb']!s:>8}"
        )


if __name__ == "__main__":
    main()
