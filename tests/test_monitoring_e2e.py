"""End to end with real processes: `champion serve` answers traffic, `champion drift` judges its log, and the
scheduler runs the drift check and exports its gauges on /metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import yaml
from conftest import TINY_INTENTS, tiny_finetune_config
from helpers import http_process
from test_scheduler import Scheduler, _env

from champion.registry import promote
from pipelines.ticketgen import INTENTS, generate_tickets

NAME = "tiny-intents"
OTHER = [i for i in INTENTS if i not in TINY_INTENTS][:4]


def _post(url: str, texts: list[str]) -> None:
    for start in range(0, len(texts), 25):
        body = json.dumps({"texts": texts[start : start + 25]}).encode()
        request = urllib.request.Request(f"{url}/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200


def _logged(home, count: int, timeout: float = 30) -> None:
    from serving.inference_log import InferenceLog

    log = InferenceLog(f"sqlite:///{home / 'inference.db'}")
    deadline = time.monotonic() + timeout
    try:
        while len(log.read(NAME)) < count:
            assert time.monotonic() < deadline, "the server did not log its predictions"
            time.sleep(0.3)
    finally:
        log.engine.dispose()


def _drift(home, *args: str) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "champion_cli", "drift", NAME, "--json", "--no-mlflow", *args],
        capture_output=True, text=True, env=_env(home), timeout=300,
    )  # fmt: skip
    assert out.returncode in (0, 3, 4), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_serve_traffic_drift_and_the_scheduler_metrics(tmp_path, home, registry, tickets_csv, tiny_model_dir):
    from pipelines.finetune import finetune

    result = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, train={"epochs": 4}), registry)
    promote(registry, NAME, result.version, reason="first champion")
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump({"threads": 1, "log": {"flush_seconds": 0.2}}))

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "champion_cli.cli",
            "serve",
            NAME,
            "--config",
            str(serve_yaml),
            "--port",
            str(port),
        ]

    with http_process(command, tmp_path / "serve.log", ready="/readyz", env=_env(home)) as url:
        _post(url, generate_tickets(300, seed=21, intents=TINY_INTENTS)["text"].tolist())
        _logged(home, 300)
        code, quiet = _drift(home, "--last", "300")
        assert (code, quiet["status"], quiet["rows"]) == (0, "ok", 300), quiet
        assert quiet["version"] == result.version

        _post(url, generate_tickets(300, seed=22, intents=OTHER, vocabulary_shift=0.5)["text"].tolist())
        _logged(home, 600)
        code, loud = _drift(home, "--last", "300")
        assert (code, loud["status"]) == (3, "drift"), loud
        fired = [c["name"] for c in loud["checks"] if c["drifted"]]
        assert fired and all(c["threshold"] is not None for c in loud["checks"] if c["drifted"])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    schedule = tmp_path / "schedule.yaml"
    job = {
        "id": "drift",
        "func": "monitoring.jobs:drift_check",
        "kwargs": {"model": NAME, "last": 300},
        "trigger": {"interval": {"seconds": 600}},
    }
    schedule.write_text(yaml.safe_dump({"metrics_port": port, "jobs": [job]}))
    sched = Scheduler(schedule, home, tmp_path / "sched.log")
    try:
        sched.wait_for("scheduler active")
        run = subprocess.run(
            [sys.executable, "-m", "champion_cli", "schedule", "run-now", "drift", "--config", str(schedule)],
            capture_output=True, text=True, env=_env(home), timeout=300,
        )  # fmt: skip
        assert run.returncode == 0 and f"drift: ok (scheduled, pid {sched.proc.pid})" in run.stdout, (
            run.stderr
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            exported = response.read().decode()
    finally:
        sched.stop()
    labels = f'model="{NAME}",version="{result.version}"'
    assert f"champion_drift_status{{{labels}}} 1.0" in exported  # the drifted window is the last 300
    assert f'champion_drift_check_drifted{{check="{fired[0]}",{labels}}} 1.0' in exported, [
        line for line in exported.splitlines() if "drifted{" in line
    ]
    assert 'champion_job_runs_total{job="drift",outcome="ok"} 1.0' in exported
    assert "champion_scheduler_leader 1.0" in exported
