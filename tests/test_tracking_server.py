"""A shared setup: an MLflow tracking server backed by PostgreSQL, and the audit history in PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import tiny_finetune_config

from champion.registry import connect, history, promote, show_model
from pipelines.finetune import finetune

pytestmark = pytest.mark.postgres


@pytest.fixture
def tracking_server(pg_url, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    artifacts = tmp_path / "server-artifacts"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            pg_url,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.read() == b"OK":
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_finetune_and_promote_through_a_tracking_server(
    tracking_server, pg_url, home, tickets_csv, tiny_model_dir, monkeypatch
):
    import mlflow

    url, artifacts = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("CHAMPION_AUDIT_URL", pg_url)
    reg = connect()
    assert reg.tracking_uri == url

    result = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, train={"epochs": 1}), registry=reg)
    assert promote(
        reg, result.model_name, result.version, reason="first champion on the shared server"
    ).allowed

    assert show_model(reg, result.model_name)["aliases"] == {"challenger": "1", "champion": "1"}
    assert [e.action for e in history(reg, result.model_name)] == ["assign", "promote"]
    assert mlflow.get_run(result.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(artifacts.rglob("*.safetensors"))  # the model went to the server's store, not a local folder
    assert not (home / "artifacts").exists() and not (home / "mlflow.db").exists()
    out = mlflow.pyfunc.load_model(f"models:/{result.model_name}@champion").predict(["where is my order"])
    assert len(out) == 1
    reg.close()
