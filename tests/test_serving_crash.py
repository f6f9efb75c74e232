"""A real `champion serve` killed with SIGKILL under load: no answered prediction is lost from the
inference log, no worker outlives its server, and a restart on the same port comes up."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import psutil
import pytest
from helpers import http_process, launch_http
from test_serving_http import NAME, Client, read_log, serve_command, served_versions, write_yaml  # noqa: F401


def _tree(pid: int) -> list[psutil.Process]:
    """The process and everything under it, wherever BentoML put them (workers may start a session)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _holders(port: int) -> list[str]:
    """Who listens on `port`, for the failure message."""
    held = []
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port:
            try:
                name = psutil.Process(conn.pid).cmdline()[:4] if conn.pid else "?"
            except psutil.NoSuchProcess:
                name = "gone"
            held.append(f"{conn.pid} {conn.status} {name}")
    return held


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Load:
    """`clients` threads sending predictions; keeps the request ids of every answered one."""

    def __init__(self, url: str, clients: int):
        self.url, self.answered, self.failed = url, [], 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, worker: int) -> None:
        client = Client(self.url)
        while not self.stop.is_set():
            try:
                status, _, body = client.predict([f"where is my order {worker}", "reset my password"])
            except Exception:  # the server was killed under us: unanswered, so not expected in the log
                self.failed += 1
                time.sleep(0.05)
                client = Client(self.url)
                continue
            if status == 200:
                self.answered += [item["request_id"] for item in body]

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_kill_9_of_the_whole_server_under_load_loses_no_answered_prediction(tmp_path, home, served_versions):  # noqa: F811
    """First `champion serve` alone (its workers must follow it out and free the port), then five times
    every process of the server at once, as an OOM kill or a container stop does, each under 16 clients."""
    config = write_yaml(tmp_path / "serve.yaml", workers=2, log={"batch_size": 64, "flush_seconds": 0.2})
    command, port, answered = serve_command(config), None, []
    for round_ in range(6):
        proc, url = launch_http(command, tmp_path / f"serve-{round_}.log", ready="/readyz", port=port)
        port = int(url.rsplit(":", 1)[1])
        try:
            load = Load(url, clients=16)
            time.sleep(1.5)
            tree = _tree(proc.pid)
            assert len(tree) >= 3, f"expected champion serve and its two workers, found {tree}"
            if round_ == 0:
                os.kill(proc.pid, signal.SIGKILL)  # the server process alone
                deadline = time.monotonic() + 10
                while any(_alive(p) for p in tree[1:]) or not _port_free(port):
                    assert time.monotonic() < deadline, (
                        f"10 s after the server died: alive {[p for p in tree[1:] if _alive(p)]}, "
                        f"port {port} held by {_holders(port)}"
                    )
                    time.sleep(0.2)
            else:
                for process in tree:
                    process.send_signal(signal.SIGKILL)
            load.finish()
            answered += load.answered
            assert load.answered, "the load generator got no answer before the kill"
        finally:
            proc.kill()
            proc.wait()
    # What the killed workers left in the spool is written by the next log started on it: here, the test's.
    from serving.inference_log import InferenceLog

    log = InferenceLog(f"sqlite:///{home / 'inference.db'}", adopt_seconds=0.2).start()
    deadline = time.monotonic() + 60
    while list((home / "inference.spool").glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.close() == 0
    rows = read_log(home)
    assert rows.request_id.is_unique, "a prediction was logged twice"
    missing = set(answered) - set(rows.request_id)
    assert not missing, f"{len(missing)} of {len(answered)} answered predictions are not in the log"
    assert not list((home / "inference.spool").glob("*.jsonl")), "the spool was not emptied"


@pytest.fixture
def own_postgres():
    """A throwaway PostgreSQL cluster this test may stop and start (never the machine's own server)."""
    from pgserver import find_binaries, start_throwaway

    binaries = find_binaries()
    if binaries is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are needed for the outage test.")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed.")
    server = start_throwaway(binaries)
    yield server
    server.stop()


@pytest.mark.postgres
def test_the_service_keeps_answering_through_a_postgres_outage_and_writes_everything_after(
    tmp_path,
    home,
    served_versions,  # noqa: F811
    own_postgres,
):
    """PostgreSQL stopped for 30 s under 16 clients: zero failed requests, /readyz stays ready, the log
    says it is behind, and every answered prediction is in the database once it is back."""
    import urllib.request

    url = own_postgres.url("postgres")
    config = write_yaml(tmp_path / "serve.yaml", log={"url": url, "batch_size": 64, "flush_seconds": 0.2})
    with http_process(serve_command(config), tmp_path / "serve.log", ready="/readyz") as base:
        load = Load(base, clients=16)
        time.sleep(3)
        own_postgres.ctl("stop")
        stopped_at, answered_before = time.monotonic(), len(load.answered)
        try:
            time.sleep(15)
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as ready:
                assert ready.status == 200
            metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
            time.sleep(max(0.0, stopped_at + 30 - time.monotonic()))
        finally:
            own_postgres.ctl("start")
        assert len(load.answered) > answered_before + 100, "the service stopped answering during the outage"
        time.sleep(2)
        load.finish()
        assert load.failed == 0
        gauges = {
            row.split("{")[0]: float(row.split()[-1])
            for row in metrics.splitlines()
            if row.startswith("champion_inference_log_")
        }
        assert gauges["champion_inference_log_database_up"] == 0.0
        assert gauges["champion_inference_log_behind_seconds"] > 5
        deadline = time.monotonic() + 60
        from serving.inference_log import InferenceLog

        reader = InferenceLog(url)
        while len(reader.read(NAME)) < len(load.answered) and time.monotonic() < deadline:
            time.sleep(0.5)
    rows = reader.read(NAME)
    reader.close()
    assert rows.request_id.is_unique and set(load.answered) <= set(rows.request_id)
    log_text = (tmp_path / "serve.log").read_text()
    assert "is not taking writes" in log_text and "is back after" in log_text
