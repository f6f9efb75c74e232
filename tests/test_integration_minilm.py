"""The real packaged all-MiniLM-L6-v2 on small slices: fine-tune -> register -> load by alias -> predict."""

from __future__ import annotations

from pathlib import Path

import pytest

from champion.cli import main
from champion.registry import show_model
from pipelines.finetune import FinetuneConfig, finetune
from pipelines.ticketgen import INTENTS, write_tickets

pytestmark = pytest.mark.integration

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def _minilm(data: dict, method: str, train: dict, name: str) -> FinetuneConfig:
    """The real MiniLM on CPU with short inputs, pinned threads and no progress bars."""
    return FinetuneConfig.model_validate(
        {
            "data": data,
            "model": {"max_length": 48},
            "method": method,
            "train": {"device": "cpu", "num_threads": 2, "progress": False, **train},
            "registry": {"model_name": name},
        }
    )


def test_minilm_lora_on_tickets_registers_a_working_model(registry, tmp_path):
    import mlflow

    data = write_tickets(tmp_path / "tickets.csv", 600, seed=11)
    cfg = _minilm({"source": str(data)}, "lora", {"epochs": 2, "learning_rate": 3e-3}, "minilm-tickets")
    result = finetune(cfg, registry=registry)
    assert result.metrics["val_accuracy"] > 0.25  # 19 intents: chance is about 0.05

    mv = registry.client.get_model_version("minilm-tickets", result.version)
    assert mv.tags["base_model"] == "all-MiniLM-L6-v2" and mv.tags["method"] == "lora"
    model = mlflow.pyfunc.load_model("models:/minilm-tickets@challenger")
    out = model.predict(["my parcel has not arrived yet, where is it?", "I forgot my password"])
    assert set(out["label"]) <= set(INTENTS) and (out["score"] > 0).all()


@pytest.mark.skipif(not BANKING77.is_dir(), reason="../shared/data/banking77 is not present")
def test_minilm_full_on_banking77_with_fixed_test_set(registry, tmp_path):
    import pandas as pd

    test = pd.read_csv(BANKING77 / "test.csv").groupby("category").head(4)  # 308 of the 3,080 test rows
    test.to_csv(tmp_path / "test.csv", index=False)
    data = {
        "source": str(BANKING77 / "train.csv"),
        "test_source": str(tmp_path / "test.csv"),
        "label_column": "category",
        "max_rows": 1200,
    }
    cfg = _minilm(data, "full", {"epochs": 1, "learning_rate": 2e-4}, "minilm-banking77")
    result = finetune(cfg, registry=registry)
    tags = registry.client.get_model_version("minilm-banking77", result.version).tags
    assert tags["data_file_sha256.test_source"] and tags["data_file_sha256.source"]
    assert float(tags["metric.test_accuracy"]) > 0.05  # 77 classes after one short epoch: above chance


def test_demo_runs_end_to_end(home, capsys):
    assert main(["demo", "--rows", "400", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "1/8 generated 400 support tickets across 15 intents" in out and "4/8 promoted" in out
    assert "5/8 serving support-intents@champion with BentoML, sending 400 tickets" in out
    assert "serves v1 (champion policy)" in out and "champion ui" in out
    # The normal window is judged ok, the drifted one (held-out intents, new vocabulary) drift, with reasons.
    normal, drifted = out.split("6/8 drift check")[1].split("7/8 sending 400 drifted tickets")
    assert "support-intents v1: OK on 400 rows" in normal, normal
    assert (
        "support-intents v1: DRIFT on 400 rows" in drifted and "is above its calibrated threshold" in drifted
    )
    # 3 sample tickets + 800 of traffic, all answered by v1 and written by the server's graceful shutdown
    assert "8/8 the inference log holds 803 predictions (v1: 803)" in out
    from champion.registry import connect

    reg = connect()
    assert show_model(reg, "support-intents")["aliases"] == {"champion": "1", "challenger": "1"}
    reg.close()
