"""`champion compare` / `pipelines.compare`: two registered versions scored on the same labelled rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import TINY_INTENTS, tiny_finetune_config
from helpers import register_tiny_versions

from champion_cli.cli import main


@pytest.fixture
def versions(registry, tiny_model_dir, tickets_csv, tmp_path):
    """v1: an untrained head (always says the first intent); v2: fine-tuned; v3: fine-tuned on shuffled
    labels (it learnt nothing true)."""
    from pipelines.finetune import finetune

    untrained = register_tiny_versions(registry, tiny_model_dir, sorted(TINY_INTENTS), 1)[0]
    learn = {"method": "full", "train": {"epochs": 6, "learning_rate": 3e-3}}
    trained = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, **learn), registry=registry).version
    frame = pd.read_csv(tickets_csv)
    frame["label"] = frame["label"].sample(frac=1.0, random_state=0).to_numpy()
    shuffled_csv = tmp_path / "shuffled.csv"
    frame.to_csv(shuffled_csv, index=False)
    shuffled = finetune(
        tiny_finetune_config(shuffled_csv, tiny_model_dir, **learn), registry=registry
    ).version
    return {"untrained": untrained, "trained": trained, "shuffled": shuffled}


@pytest.fixture
def holdout_csv(tmp_path):
    from pipelines.ticketgen import write_tickets

    return write_tickets(tmp_path / "fresh.csv", 400, seed=11, intents=TINY_INTENTS)


def test_a_clearly_better_version_passes_and_the_run_keeps_the_numbers(
    registry, versions, holdout_csv, capsys
):
    import mlflow

    # The untrained champion answers one intent for everything, which scores that class an F1 of 0.4
    # without any skill; the tiny trained model may do worse on it, so the per-class floor is loosened.
    code = main(["compare", "tiny-intents", versions["untrained"], versions["trained"],
                 "--data", str(holdout_csv), "--json", "--set", "max_class_drop=0.6"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out["reason"]
    assert out["evidence"]["config"]["max_class_drop"] == 0.6
    assert out["promote"] is True and out["reason"].startswith("passed")
    ev = out["evidence"]
    assert ev["rows"] == 400 and len(ev["holdout_sha256"]) == 64
    assert ev["challenger"]["macro_f1"] > ev["champion"]["macro_f1"]
    assert ev["macro_f1_delta_interval"][0] > 0
    assert ev["champion_version"] == versions["untrained"] and ev["challenger_version"] == versions["trained"]
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.tags["promote"] == "true"
    assert run.data.metrics["macro_f1_delta_low"] == pytest.approx(ev["macro_f1_delta_interval"][0])
    assert run.data.metrics["rows"] == 400
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "gate")}
    assert artifacts == {"gate/decision.json", "gate/per_class_f1.png"}


def test_a_challenger_trained_on_shuffled_labels_is_refused(registry, versions, holdout_csv, capsys):
    code = main(["compare", "tiny-intents", versions["trained"], versions["shuffled"],
                 "--data", str(holdout_csv), "--no-mlflow"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("KEEP CHAMPION: refused")
    assert "McNemar" in out and "holdout: 400 rows" in out


def test_the_same_file_gives_the_same_holdout_hash_in_any_row_order(tmp_path, holdout_csv):
    from pipelines.compare import holdout_sha256, read_labelled_file

    frame = read_labelled_file(holdout_csv)
    shuffled = tmp_path / "shuffled.jsonl"
    frame.sample(frac=1.0, random_state=1).to_json(shuffled, orient="records", lines=True)
    assert holdout_sha256(read_labelled_file(shuffled)) == holdout_sha256(frame)


def test_bad_input_is_one_sentence(registry, versions, holdout_csv, tmp_path, capsys):
    no_label = tmp_path / "texts.csv"
    pd.DataFrame({"text": ["where is my order"]}).to_csv(no_label, index=False)
    broken = tmp_path / "broken.yaml"
    broken.write_text("gate: {margin: [0.1\n")
    cases = [
        (["compare", "tiny-intents", "1", "2", "--data", str(no_label)], "no 'label' column"),
        (["compare", "tiny-intents", "2", "2", "--data", str(holdout_csv)], "both sides are v2"),
        (["compare", "tiny-intents", "1", "99", "--data", str(holdout_csv)], "version '99'"),
        (["compare", "nope", "1", "2", "--data", str(holdout_csv)], "model 'nope' is not in the registry"),
        (["compare", "tiny-intents", "1", "2", "--data", str(tmp_path / "missing.csv")], "does not exist"),
        (["compare", "tiny-intents", "1", "2", "--data", str(holdout_csv), "--set", "margin=lots"],
         "'gate.margin'"),
        (["compare", "tiny-intents", "1", "2", "--data", str(holdout_csv), "--set", "bogus=1"],
         "unknown key 'gate.bogus'"),
        (["compare", "tiny-intents", "1", "2", "--data", str(holdout_csv), "--config", str(broken)],
         "is not valid YAML"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, (argv, err)
        assert len(err.strip().splitlines()) == 1


def test_too_few_fresh_rows_refuse_with_the_count(registry, versions, tmp_path, capsys):
    from pipelines.ticketgen import write_tickets

    small = write_tickets(tmp_path / "small.csv", 60, seed=5, intents=TINY_INTENTS)
    code = main(["compare", "tiny-intents", versions["untrained"], versions["trained"],
                 "--data", str(small), "--no-mlflow", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["promote"] is False
    assert "60 labelled rows" in out["reason"] and out["evidence"]["rows"] == 60
