"""The fine-tuning pipeline on a tiny random BERT: it learns, logs lineage, registers atomically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_finetune_config
from helpers import make_versions

from champion.errors import ChampionError
from champion.registry import history, list_models, promote, show_model
from pipelines.finetune import finetune

ROOT = Path(__file__).resolve().parent.parent


def test_full_finetune_learns_logs_and_registers(registry, tickets_csv, tiny_model_dir):
    import mlflow

    cfg = tiny_finetune_config(
        tickets_csv, tiny_model_dir, method="full", train={"epochs": 6, "learning_rate": 3e-3}
    )
    result = finetune(cfg, registry=registry)

    assert result.metrics["val_accuracy"] > 0.4  # four intents: chance is 0.25
    assert result.metrics["train_cpu_seconds"] > 0  # core-seconds of the training steps
    run = mlflow.get_run(result.run_id)
    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(result.run_id, "train_loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert run.data.params["data.rows_train"] == "256" and run.data.params["method"] == "full"
    assert run.data.tags["git_commit"] and run.data.tags["versions.torch"].startswith("2.")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "labels.json", "test_metrics.json", "test_confusion_matrix.png"} <= artifacts
    logged_config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{result.run_id}/config.yaml"))
    assert logged_config == cfg.model_dump(mode="json")

    mv = registry.client.get_model_version("tiny-intents", result.version)
    assert mv.tags["data_sha256"] == run.data.tags["data_sha256"] and len(mv.tags["data_sha256"]) == 64
    assert mv.tags["task"] == "text-classification"  # every version names its task
    assert float(mv.tags["metric.val_macro_f1"]) == pytest.approx(result.metrics["val_macro_f1"], abs=1e-6)
    assert mv.tags["base_model"] == str(tiny_model_dir) and mv.tags["config_sha256"]
    assert show_model(registry, "tiny-intents")["aliases"] == {"challenger": result.version}
    [event] = history(registry, "tiny-intents")
    assert event.alias == "challenger" and result.run_id in event.reason

    model_dir = Path(mlflow.artifacts.download_artifacts("models:/tiny-intents@challenger"))
    assert list(model_dir.rglob("*.safetensors")) and not list(model_dir.rglob("*.bin"))
    requirements = (model_dir / "requirements.txt").read_text()
    assert "torch==" in requirements and "torchvision" not in requirements

    predictions = mlflow.pyfunc.load_model("models:/tiny-intents@challenger").predict(["where is my package"])
    assert predictions["label"][0] in set(
        yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{result.run_id}/labels.json"))["labels"]
    )


def test_lora_keeps_base_frozen_and_logs_adapter(registry, tickets_csv, tiny_model_dir):
    import mlflow
    import torch
    from transformers import DataCollatorWithPadding

    from pipelines.data import load_splits
    from pipelines.finetune import _loader, _train_epoch
    from pipelines.model import apply_lora, load_classifier, load_tokenizer, resolve_device

    cfg = tiny_finetune_config(tickets_csv, tiny_model_dir)
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model.base)
    model = apply_lora(load_classifier(cfg.model.base, splits.labels), cfg.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = _loader(
        splits.train,
        tok,
        {label: i for i, label in enumerate(splits.labels)},
        cfg,
        DataCollatorWithPadding(tok),
        shuffle=True,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _train_epoch(model, loader, optimizer, scheduler, resolve_device("cpu", "auto"), cfg, 1)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, name  # every trainable parameter moved, nothing else did
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    result = finetune(cfg, registry=registry)
    adapter = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "lora_adapter")}
    assert "lora_adapter/adapter_model.safetensors" in adapter
    loaded = mlflow.transformers.load_model(
        f"models:/tiny-intents/{result.version}", return_type="components"
    )
    assert not any("lora" in n for n, _ in loaded["model"].named_parameters())  # merged, plain model


def test_early_stopping_stops(registry, tickets_csv, tiny_model_dir):
    import mlflow

    cfg = tiny_finetune_config(
        tickets_csv,
        tiny_model_dir,
        method="full",
        train={"epochs": 8, "learning_rate": 1e-9, "early_stopping_patience": 1},
    )
    result = finetune(cfg, registry=registry)
    losses = mlflow.MlflowClient().get_metric_history(result.run_id, "val_macro_f1")
    assert len(losses) < 8 and result.metrics["best_epoch"] == 1


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"data": {"text_column": "body"}}, "data.text_column: column 'body' is not in"),
        ({"data": {"label_column": "intent"}}, "data.label_column: column 'intent' is not in"),
        ({"data": {"source": "/no/such/file.csv"}}, "data.source: file '/no/such/file.csv' does not exist"),
        ({"model": {"base": "/no/such/model"}}, "model.base: '/no/such/model'"),
        ({"model": {"base": "no-such-org/no-such-model"}}, "model.base: 'no-such-org/no-such-model'"),
        ({"lora": {"target_modules": ["q_proj"]}}, "lora.target_modules"),
    ],
)
def test_bad_input_leaves_nothing_registered(registry, tickets_csv, tiny_model_dir, sections, message):
    cfg = tiny_finetune_config(tickets_csv, tiny_model_dir, **sections)
    with pytest.raises(ChampionError, match=message):
        finetune(cfg, registry=registry)
    assert list_models(registry) == []


def test_interrupted_training_registers_nothing(home, tickets_csv, tiny_model_dir, registry, tmp_path):
    import mlflow

    make_versions(registry, "tiny-intents", [0.5])
    promote(registry, "tiny-intents", "1", reason="existing champion")
    cfg = tiny_finetune_config(tickets_csv, tiny_model_dir, train={"epochs": 500})
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            [sys.executable, "-m", "champion_cli", "finetune", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # wait until training has started and logged an epoch
                runs = mlflow.search_runs(
                    experiment_names=["tests"], filter_string="attributes.status = 'RUNNING'"
                )
                if len(runs) and "metrics.train_loss" in runs and runs["metrics.train_loss"].notna().any():
                    break
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.5)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()  # never leave a 500-epoch run behind when the test fails
        assert proc.returncode == 130, err
        assert "stopping after the current step" in err
        assert "nothing was registered and the aliases are unchanged" in err

    info = show_model(registry, "tiny-intents")
    assert [v["version"] for v in info["versions"]] == ["1"] and info["aliases"] == {"champion": "1"}
    assert len(history(registry, "tiny-intents")) == 1
    statuses = set(mlflow.search_runs(experiment_names=["tests"])["status"])
    assert statuses == {"KILLED"}
