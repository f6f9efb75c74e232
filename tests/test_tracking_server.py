"""A shared setup: an MLflow tracking server backed by PostgreSQL, and the audit history in PostgreSQL."""

from __future__ import annotations

import sys

import pytest
from conftest import tiny_finetune_config
from helpers import http_process

from champion.registry import connect, history, promote, show_model
from pipelines.finetune import finetune

pytestmark = pytest.mark.postgres


@pytest.fixture
def tracking_server(pg_url, tmp_path):
    artifacts = tmp_path / "server-artifacts"
    command = lambda port: [  # noqa: E731
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
    ]
    with http_process(command, tmp_path / "mlflow-server.log") as url:
        yield url, artifacts


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
