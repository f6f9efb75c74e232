"""The real packaged all-MiniLM-L6-v2 on small slices: fine-tune -> register -> load by alias -> predict."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_minilm_distils_into_the_packaged_paraphrase_l3(registry, tmp_path):
    """A real MiniLM-L6 teacher taught to the packaged 3-layer paraphrase-MiniLM-L3-v2 (another encoder with
    the teacher's vocabulary): registered as its student, with its lineage and its own held-out numbers."""
    from champion.registry import promote
    from pipelines.distil import DistilConfig, distil
    from serving.model import load_version

    data = write_tickets(tmp_path / "tickets.csv", 500, seed=12)
    cfg = _minilm({"source": str(data)}, "full", {"epochs": 2, "learning_rate": 2e-4}, "minilm-distil")
    teacher = finetune(cfg, registry=registry)
    promote(registry, "minilm-distil", teacher.version, reason="teacher of the L3 student")
    student_cfg = DistilConfig.model_validate(
        {
            "model_name": "minilm-distil",
            "student": {"init": "base", "base": "paraphrase-MiniLM-L3-v2"},
            "train": {
                "epochs": 3,
                "learning_rate": 3e-4,
                "device": "cpu",
                "num_threads": 2,
                "progress": False,
            },
            "budget": {"min_rows": 20, "min_f1_ratio": 0.5},
            "cost": {"rows": 64, "repeats": 1, "batch_size": 16},
        }
    )
    result = distil(student_cfg, registry=registry)
    tags = registry.client.get_model_version("minilm-distil", result.version).tags
    assert tags["variant"] == "student" and tags["source_version"] == teacher.version
    assert tags["student_init"] == "base:paraphrase-MiniLM-L3-v2"
    student = load_version(registry.client, "minilm-distil", result.version, device="cpu")
    source = load_version(registry.client, "minilm-distil", teacher.version, device="cpu")
    assert student.model.config.num_hidden_layers == 3 and student.labels == source.labels
    # Learned from the teacher: well above chance (1 in 15) on the held-out rows the teacher is judged on.
    assert float(tags["metric.test_accuracy"]) > 0.3, tags["metric.test_accuracy"]
    assert float(tags["source.test_macro_f1"]) == pytest.approx(
        float(
            registry.client.get_model_version("minilm-distil", teacher.version).tags["metric.test_macro_f1"]
        ),
        abs=1e-4,
    )
