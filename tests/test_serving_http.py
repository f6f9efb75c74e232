"""A real `champion serve` (BentoML over HTTP on loopback): swaps under load, graceful shutdown."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import TINY_INTENTS
from helpers import http_process, register_tiny_versions

from champion.registry import promote, rollback

NAME = "tiny-intents"


def write_yaml(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"threads": 1, "follow": {"poll_seconds": 0.2}, **sections}))
    return path


def serve_command(config: Path):
    return lambda port: [sys.executable, "-m", "champion_cli", "serve", NAME, "--config", str(config),
                         "--port", str(port)]  # fmt: skip


class Client:
    """One keep-alive HTTP connection, as a load generator thread would hold."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)

    def predict(self, texts: list[str]) -> tuple[int, dict[str, str], object]:
        body = json.dumps({"texts": texts})
        self.conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data or b"null")


@pytest.fixture
def served_versions(home, registry, tiny_model_dir):
    versions = register_tiny_versions(registry, tiny_model_dir, TINY_INTENTS, 3)
    promote(registry, NAME, versions[0], reason="first champion")
    return versions


def read_log(home: Path):
    from serving.inference_log import InferenceLog

    log = InferenceLog(f"sqlite:///{home / 'inference.db'}")
    try:
        return log.read(NAME)
    finally:
        log.close()


def test_swaps_under_load_fail_nothing_and_log_every_request_once(tmp_path, home, registry, served_versions):
    """16 clients for 30 s while the champion moves 5 times and rolls back once."""
    config = write_yaml(tmp_path / "serve.yaml", batching={"max_batch_size": 16, "max_latency_ms": 20_000})
    results: list[tuple[float, int, str, list[str]]] = []  # (time, status, version header, request ids)
    failures: list[str] = []
    mismatches: list[str] = []  # asserted in the test's own thread, not inside the load threads
    stop = threading.Event()

    def load(url: str, worker: int) -> None:
        client = Client(url)
        texts = [f"where is my order number {worker}"]
        while not stop.is_set():
            try:
                status, headers, body = client.predict(texts)
            except Exception as err:  # a dropped connection is a failed request too
                failures.append(f"{type(err).__name__}: {err}")
                client = Client(url)
                continue
            if status != 200:
                failures.append(f"{status}: {body}")
                continue
            ids = [item["request_id"] for item in body]
            if {item["version"] for item in body} != {headers["x-model-version"]}:
                mismatches.append(f"body {body} under header version {headers['x-model-version']}")
            results.append((time.time(), status, headers["x-model-version"], ids))

    with http_process(serve_command(config), tmp_path / "serve.log", ready="/readyz") as url:
        threads = [threading.Thread(target=load, args=(url, i)) for i in range(16)]
        for t in threads:
            t.start()
        v1, v2, v3 = served_versions
        moves = []
        steps = [
            ("promote", v2, False),
            ("promote", v3, False),
            ("rollback", v2, False),
            ("promote", v3, False),
            ("promote", v1, True),
            ("promote", v2, False),
        ]
        started = time.monotonic()
        for i, (action, version, force) in enumerate(steps):
            time.sleep(max(0.0, started + 4 * (i + 1) - time.monotonic()))
            if action == "rollback":
                decision = rollback(registry, NAME, reason="load test rollback")
            else:
                decision = promote(registry, NAME, version, reason="load test", force=force)
            assert decision.allowed and decision.target_version == version, decision.reason
            moves.append((time.time(), version))
        time.sleep(max(0.0, started + 30 - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(timeout=60)
    # The server has been stopped gracefully (SIGTERM); its inference log must be complete.
    assert not failures, failures[:5]
    assert not mismatches, mismatches[:5]
    assert not any(t.is_alive() for t in threads), "a load thread is still running"
    assert len(results) > 200, "the load generator hardly ran"
    for (moved_at, version), (next_at, _) in zip(moves, [*moves[1:], (float("inf"), None)], strict=True):
        answered = [t for t, _, v, _ in results if v == version and moved_at <= t < next_at]
        assert answered, f"v{version} never answered after its alias move"
    sent = [rid for *_, ids in results for rid in ids]
    rows = read_log(home)
    served = rows[rows.arm != "shadow"]
    assert served.request_id.is_unique
    assert set(served.request_id) == set(sent) and len(served) == len(sent)
    by_id = dict(zip(served.request_id, served.model_version, strict=True))
    assert all(by_id[ids[0]] == version for _, _, version, ids in results)


def test_graceful_shutdown_writes_every_answered_prediction(tmp_path, home, served_versions):
    """The log's writer holds rows for 60 s; only the shutdown flush can have written them."""
    config = write_yaml(tmp_path / "serve.yaml", log={"flush_seconds": 60, "batch_size": 100_000})
    command = serve_command(config)
    sent = []
    with http_process(command, tmp_path / "serve.log", ready="/readyz") as url:
        client = Client(url)
        for i in range(40):
            status, _, body = client.predict([f"ticket {i}", "please reset my password"])
            assert status == 200, body
            sent += [item["request_id"] for item in body]
        assert read_log(home).empty  # still queued in the server
    rows = read_log(home)
    assert sorted(rows.request_id) == sorted(sent)


def test_champion_predict_cli_talks_to_the_server_and_to_the_registry(tmp_path, home, served_versions):
    config = write_yaml(tmp_path / "serve.yaml")
    with http_process(serve_command(config), tmp_path / "serve.log", ready="/readyz") as url:
        command = [sys.executable, "-m", "champion_cli", "predict", NAME, "where is my order", "--json"]
        out = subprocess.run([*command, "--url", url], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)[0]
        assert answer["version"] == "1" and answer["label"] in TINY_INTENTS
    local = subprocess.run(
        [sys.executable, "-m", "champion_cli", "predict", NAME, "where is my order", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    mine = json.loads(local.stdout)[0]  # loaded from the registry in this process: the same answer
    assert (mine["label"], mine["version"]) == (answer["label"], "1")
    assert abs(mine["score"] - answer["score"]) < 1e-5
    gone = subprocess.run(
        [sys.executable, "-m", "champion_cli", "predict", NAME, "x", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode == 2 and "no server answers at http://127.0.0.1:9" in gone.stderr


def _answers_by_worker(url: str, requests: int) -> list[tuple[str, str]]:
    """(worker pid, version) of `requests` predictions, 8 at a time on fresh connections."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_) -> tuple[str, str]:
        client = Client(url)
        try:
            status, headers, body = client.predict(["hi"])
        finally:
            client.conn.close()
        assert status == 200, body
        return headers["x-worker-pid"], headers["x-model-version"]

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(requests)))


def test_each_worker_follows_the_registry_on_its_own(tmp_path, home, registry, served_versions):
    """Two workers, each answering with its pid: after a move, every one answers with the new version."""
    config = write_yaml(tmp_path / "serve.yaml", workers=2)
    with http_process(serve_command(config), tmp_path / "serve.log", ready="/readyz") as url:
        workers: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers.update(_answers_by_worker(url, 16))
        assert len(workers) == 2, f"only workers {sorted(workers)} answered; both should take connections"
        assert set(workers.values()) == {"1"}

        promote(registry, NAME, served_versions[1], reason="two workers")
        deadline = time.monotonic() + 30  # poll_seconds is 0.2; loading the tiny model takes well under 1 s
        while set(workers.values()) != {"2"} and time.monotonic() < deadline:
            workers.update(_answers_by_worker(url, 16))
        assert set(workers.values()) == {"2"}, f"a worker still serves the old version: {workers}"
        after = _answers_by_worker(url, 40)
    assert {version for _, version in after} == {"2"}, after
    assert {pid for pid, _ in after} <= set(workers), "an unknown worker answered"


def test_alias_moves_between_formats_under_load_fail_nothing(
    tmp_path, home, registry, served_versions, tickets_csv
):
    """The champion moves from safetensors to ONNX, int8 and back under 8 clients, with two batches in
    flight per worker: no failed request, every answer tagged with the version that made it, and /metrics
    names the format being served."""
    from pipelines.compress import CompressConfig, compress

    v1 = served_versions[0]
    loose = {"budget": {"min_rows": 1, "min_agreement": 0.01}, "cost": {"rows": 32, "repeats": 1}}
    onnx_v = compress(NAME, v1, CompressConfig(to="onnx", data=str(tickets_csv), **loose), registry).version
    int8_v = compress(NAME, v1, CompressConfig(to="int8", data=str(tickets_csv), **loose), registry).version
    config = write_yaml(tmp_path / "serve.yaml", batching={"in_flight": 2})  # two batches at once per worker
    results: list[tuple[float, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def load(url: str, worker: int) -> None:
        client = Client(url)
        while not stop.is_set():
            try:
                status, headers, body = client.predict(
                    [f"refund my order {worker}", "my card was charged twice"]
                )
            except Exception as err:
                failures.append(f"{type(err).__name__}: {err}")
                client = Client(url)
                continue
            if status != 200 or {item["version"] for item in body} != {headers["x-model-version"]}:
                failures.append(f"{status}: {body}")
                continue
            results.append((time.time(), headers["x-model-version"]))

    def scrape(url: str) -> str:
        parsed = urlparse(url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    with http_process(serve_command(config), tmp_path / "serve.log", ready="/readyz") as url:
        threads = [threading.Thread(target=load, args=(url, i)) for i in range(8)]
        for t in threads:
            t.start()
        moves, formats = [], {}
        for version, fmt in ((onnx_v, "onnx"), (int8_v, "int8"), (v1, "safetensors"), (onnx_v, "onnx")):
            time.sleep(3)
            decision = promote(registry, NAME, version, reason=f"to {fmt} under load")
            assert decision.allowed, decision.reason
            moves.append((time.time(), version))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (results and results[-1][1] == version):
                time.sleep(0.1)
            formats[fmt] = scrape(url)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:5]
    assert len(results) > 50, "the load generator hardly ran"
    for (moved_at, version), (next_at, _) in zip(moves, [*moves[1:], (float("inf"), None)], strict=True):
        assert any(v == version and moved_at <= t < next_at for t, v in results), f"v{version} never answered"
    for fmt, text in formats.items():
        line = f'alias="champion",format="{fmt}",model="{NAME}"'
        assert any(line in row and row.endswith(" 1.0") for row in text.splitlines()), (fmt, text[-2000:])


def test_start_server_tries_another_port_when_its_pick_was_taken_meanwhile(
    tmp_path, home, served_versions, monkeypatch
):
    import socket

    import serving.client as client_module

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # someone bound "our" free port between the pick and the server's bind
    picks = iter([taken.getsockname()[1], client_module.free_port()])
    monkeypatch.setattr(client_module, "free_port", lambda: next(picks))
    try:
        with client_module.start_server(
            NAME, config=write_yaml(tmp_path / "serve.yaml"), timeout=120
        ) as client:
            assert client.url != f"http://127.0.0.1:{taken.getsockname()[1]}"
            assert client.predict(["where is my parcel"])[0]["version"] == served_versions[0]
    finally:
        taken.close()
