"""The drift job end to end on a tiny fine-tuned model: the registry's reference, the served log, a file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_INTENTS, tiny_finetune_config

from champion.errors import ChampionError
from champion.registry import promote
from monitoring.config import MonitorConfig
from pipelines.ticketgen import INTENTS, generate_tickets

NAME = "tiny-intents"
OTHER_INTENTS = [i for i in INTENTS if i not in TINY_INTENTS][:4]


@pytest.fixture
def champion_version(registry, tickets_csv, tiny_model_dir):
    from pipelines.finetune import finetune

    cfg = tiny_finetune_config(tickets_csv, tiny_model_dir, train={"epochs": 4})
    result = finetune(cfg, registry)
    promote(registry, NAME, result.version, reason="first champion")
    return result


@pytest.fixture
def server(home, champion_version):
    from serving.config import ServeConfig
    from serving.server import ModelServer

    cfg = ServeConfig.model_validate({"model": NAME, "follow": {"poll_seconds": 0.1}, "threads": 1})
    server = ModelServer(cfg).start()
    server.wait_ready(timeout=60)
    yield server
    server.close()


def _send(server, texts: list[str]) -> list:
    answers = []
    for start in range(0, len(texts), 32):
        answers += server.predict(texts[start : start + 32])
    server.log.flush()
    return answers


def _cfg() -> MonitorConfig:
    return MonitorConfig.model_validate({"report": {"mlflow": False}})


def test_finetune_logs_a_held_out_reference_that_the_registry_points_at(registry, champion_version):
    from monitoring.reference import REFERENCE_TAG, load_reference

    mv = registry.client.get_model_version(NAME, champion_version.version)
    assert mv.tags[REFERENCE_TAG].startswith(f"runs:/{champion_version.run_id}/")
    ref = load_reference(registry, NAME, champion_version.version)
    run = registry.client.get_run(champion_version.run_id)
    held_out = int(run.data.params["data.rows_validation"]) + int(run.data.params["data.rows_test"])
    assert len(ref) == held_out and set(ref.rows["split"]) == {"validation", "test"}  # never training rows
    assert ref.labels == sorted(TINY_INTENTS) and ref.probs.shape == (held_out, len(TINY_INTENTS))
    assert np.allclose(ref.probs.sum(axis=1), 1, atol=1e-2) and ref.embeddings.shape == (held_out, 32)
    # Probabilities are stored as float16, so near-ties may swap: the predicted label's is the top one.
    picked = ref.probs[np.arange(len(ref)), [ref.labels.index(p) for p in ref.rows["pred_label"]]]
    assert (picked >= ref.probs.max(axis=1) - 1e-3).all()
    # Its accuracy is the held-out accuracy the run measured on the test split.
    test = ref.rows[ref.rows["split"] == "test"]
    assert (test["label"] == test["pred_label"]).mean() == pytest.approx(run.data.metrics["test_accuracy"])
    assert ref.train_fingerprints is not None and len(ref.train_fingerprints) > 100


def test_the_log_keeps_every_class_probability(server):
    from serving.inference_log import decode_probs

    answers = _send(server, ["where is my order", "please reset my password"])
    rows = server.log.read(NAME)
    for answer, blob in zip(answers, rows["probs"], strict=True):
        probs = decode_probs(blob)
        assert probs.shape == (len(TINY_INTENTS),) and abs(probs.sum() - 1) < 5e-3
        assert abs(probs.max() - answer.score) < 1e-3


def test_served_traffic_is_ok_and_other_intents_drift(home, registry, server, champion_version):
    from monitoring.check import drift

    normal = generate_tickets(300, seed=11, intents=TINY_INTENTS)["text"].tolist()
    _send(server, normal)
    quiet = drift(NAME, _cfg(), last=300, registry=registry)
    assert quiet.decision.status == "ok", quiet.decision.reason
    assert quiet.decision.version == champion_version.version and quiet.decision.rows == 300

    shifted = generate_tickets(300, seed=12, intents=OTHER_INTENTS, vocabulary_shift=0.5)["text"].tolist()
    _send(server, shifted)
    loud = drift(NAME, _cfg(), last=300, registry=registry)
    assert loud.decision.status == "drift"
    assert {"text_content", "prediction"} & {c.name for c in loud.decision.fired}, loud.decision.reason
    # Both stored; one drifted window of the last two is no alarm yet at 2 of 3.
    assert loud.alarm is not None and loud.alarm.drifted == 1 and not loud.alarm.alarm
    again = drift(NAME, _cfg(), last=300, registry=registry)
    assert again.alarm.alarm and again.alarm.drifted == 2, again.alarm.reason


def test_a_labelled_file_is_scored_by_the_served_version(tmp_path, registry, champion_version):
    from monitoring.check import drift

    frame = generate_tickets(200, seed=13, intents=TINY_INTENTS)[["text", "label"]]
    frame.loc[5, "text"] = ""  # blank and missing texts are dropped and counted, not scored
    frame.loc[6, "text"] = None
    path = tmp_path / "tickets.parquet"
    frame.to_parquet(path)
    run = drift(NAME, _cfg(), file=path, registry=registry, report_dir=tmp_path / "report")
    d = run.decision
    assert d.rows == 198 and d.window["dropped_blank"] == 2 and d.window["source"] == "file"
    concept = next(c for c in d.checks if c.name == "concept")
    assert concept.rows == 198 and concept.status in ("ok", "drift")
    saved = json.loads((tmp_path / "report" / "decision.json").read_text())
    assert saved["status"] == d.status and (tmp_path / "report" / "drift.html").stat().st_size > 10_000


def test_drift_file_leaves_the_alarm_as_it_was(tmp_path, registry, champion_version, home, capsys):
    from champion_cli.cli import main
    from monitoring.drift import CheckResult, DriftDecision
    from monitoring.store import DriftStore

    version = champion_version.version
    store = DriftStore(f"sqlite:///{home / 'inference.db'}")
    for status in ("ok", "drift"):  # two windows of the log: one drifted, no alarm at 2 of 3
        check = CheckResult("prediction", "jensen_shannon", 0.3, 0.1, status == "drift", 500, status, "x.")
        store.record(DriftDecision(status, NAME, version, 500, [check]))
    before = store.alarm_state(NAME, version, 2, 3)
    what_if = tmp_path / "what-if.csv"
    generate_tickets(150, seed=18, intents=OTHER_INTENTS, vocabulary_shift=0.5).to_csv(what_if, index=False)
    for _ in range(2):
        assert main(["drift", NAME, "--file", str(what_if), "--no-mlflow"]) in (0, 3)
    assert store.alarm_state(NAME, version, 2, 3) == before  # the same alarm, drifted, considered
    assert "a check of a file: stored apart, it never counts toward the alarm" in capsys.readouterr().out
    assert [r["source"] for r in store.history(NAME)] == ["file", "file", "log", "log"]
    store.close()


def test_the_report_is_logged_to_mlflow_against_the_version(registry, server, champion_version):
    import mlflow

    from monitoring.check import drift

    _send(server, generate_tickets(150, seed=14, intents=TINY_INTENTS)["text"].tolist())
    run = drift(NAME, MonitorConfig(), last=150, registry=registry)
    logged = registry.client.get_run(run.report_run_id)
    assert logged.data.tags["model"] == NAME and logged.data.tags["version"] == champion_version.version
    assert logged.data.tags["status"] == run.decision.status and logged.data.tags["window.last"] == "150"
    assert logged.data.metrics["prediction.threshold"] > 0
    files = {f.path for f in registry.client.list_artifacts(run.report_run_id, "drift")}
    assert {"drift/drift.html", "drift/drift.json", "drift/decision.json"} <= files
    assert mlflow.get_experiment(logged.info.experiment_id).name == "champion-monitoring"


def test_a_window_mixing_versions_checks_only_the_served_one(registry, server, champion_version):
    from datetime import UTC, datetime

    from monitoring.check import drift
    from serving.inference_log import PredictionRecord

    _send(server, generate_tickets(120, seed=15, intents=TINY_INTENTS)["text"].tolist())
    now = datetime.now(UTC)
    old = [PredictionRecord(f"old-{i}", now, NAME, "99", "champion", "hi", TINY_INTENTS[0], 0.9, 1.0)
           for i in range(30)]  # fmt: skip
    server.log.append(old)
    server.log.flush()
    run = drift(NAME, _cfg(), registry=registry)
    assert run.decision.rows == 120 and run.decision.window["other_versions"] == {"99": 30}


def test_bad_input_is_one_sentence(tmp_path, registry, champion_version, home):
    from helpers import make_versions

    from monitoring.check import drift

    with pytest.raises(ChampionError, match="--last: 0 is not a window"):
        drift(NAME, _cfg(), last=0, registry=registry)
    make_versions(registry, "bare", [0.5])
    with pytest.raises(
        ChampionError,
        match=r"version 1 of 'bare' has no monitoring reference.*champion monitor reference bare 1",
    ):
        drift("bare", _cfg(), version="1", registry=registry)
    (tmp_path / "notext.csv").write_text("body\nhello\n")
    with pytest.raises(ChampionError, match="--file: .* has no 'text' column"):
        drift(NAME, _cfg(), file=tmp_path / "notext.csv", registry=registry)
    with pytest.raises(ChampionError, match="the inference log at .* cannot be read"):
        drift(NAME, _cfg(), registry=registry, log_url="postgresql+psycopg2://nobody@127.0.0.1:9/none")


def test_an_empty_window_is_insufficient_data_and_stored(registry, champion_version, home):
    from monitoring.check import drift
    from monitoring.store import DriftStore

    run = drift(NAME, _cfg(), registry=registry)
    assert run.decision.status == "insufficient_data" and run.decision.rows == 0
    stored = DriftStore(f"sqlite:///{home / 'inference.db'}").history(NAME)
    assert [r["status"] for r in stored] == ["insufficient_data"] and stored[0]["checks"][0][
        "name"
    ] == "prediction"


def test_cli_exit_codes_and_json(registry, server, champion_version, capsys, tmp_path):
    from champion_cli.cli import main

    assert main(["drift", NAME, "--last", "50", "--no-mlflow", "--json"]) == 4  # nothing logged yet
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "insufficient_data" and out["model"] == NAME and out["rows"] == 0
    _send(server, generate_tickets(200, seed=16, intents=TINY_INTENTS)["text"].tolist())
    code = main(["drift", NAME, "--last", "200", "--no-mlflow", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == {"ok": 0, "drift": 3}[out["status"]] and out["version"] == champion_version.version
    for check in out["checks"]:
        assert {"name", "statistic", "value", "threshold", "drifted", "rows", "status"} <= set(check)
    _send(
        server, generate_tickets(200, seed=17, intents=OTHER_INTENTS, vocabulary_shift=0.5)["text"].tolist()
    )
    assert main(["drift", NAME, "--last", "200", "--no-mlflow"]) == 3
    printed = capsys.readouterr().out
    assert "DRIFT on 200 rows" in printed and "text_content" in printed
    assert main(["drift", NAME, "--since", "yesterday"]) == 2
    assert "--since: 'yesterday' is not an ISO time" in capsys.readouterr().err


def test_monitor_reference_builds_one_for_an_old_version(tmp_path, registry, tiny_model_dir, home, capsys):
    from helpers import register_tiny_versions

    from champion_cli.cli import main
    from monitoring.reference import load_reference

    (version,) = register_tiny_versions(registry, tiny_model_dir, TINY_INTENTS, 1)
    held_out = generate_tickets(120, seed=18, intents=TINY_INTENTS)
    held_out.to_csv(tmp_path / "held_out.csv", index=False)
    assert main(["monitor", "reference", NAME, version, "--data", str(tmp_path / "held_out.csv")]) == 0
    assert (
        f"built the monitoring reference of {NAME} v{version} from 120 held-out rows"
        in capsys.readouterr().out
    )
    ref = load_reference(registry, NAME, version)
    assert len(ref) == 120 and ref.train_fingerprints is None
    unseen = next(c for c in _check_on(ref) if c.name == "unseen_texts")
    assert unseen.status == "not_computable" and "fingerprints" in unseen.reason


def _check_on(ref):
    from drift_world import window

    from monitoring.drift import check_drift

    frame = ref.rows.assign(embedding=list(ref.embeddings))
    return check_drift(window(frame), ref, _cfg()).checks


def test_evidently_report_leaves_out_text_it_cannot_read(tmp_path, registry, champion_version):
    from monitoring.check import drift

    path = tmp_path / "stop.csv"
    pd.DataFrame({"text": ["it is the"] * 150}).to_csv(path, index=False)
    run = drift(NAME, _cfg(), file=path, registry=registry, report_dir=tmp_path / "r")
    assert run.decision.status in ("ok", "drift") and (tmp_path / "r" / "drift.html").exists()


def test_a_large_window_is_sampled_and_says_so(registry, server, champion_version):
    from monitoring.check import drift

    _send(server, generate_tickets(150, seed=19, intents=TINY_INTENTS)["text"].tolist())
    cfg = MonitorConfig.model_validate({"report": {"mlflow": False}, "max_rows": 100})
    run = drift(NAME, cfg, registry=registry)
    assert run.decision.rows == 150 and run.decision.window["sampled_rows"] == 100
    assert all(c.rows <= 100 for c in run.decision.checks)


def test_the_arm_filter_picks_the_traffic_arm(registry, server, champion_version):
    from monitoring.check import drift

    _send(server, generate_tickets(40, seed=20, intents=TINY_INTENTS)["text"].tolist())
    assert drift(NAME, _cfg(), arms=["champion"], registry=registry).decision.rows == 40
    assert drift(NAME, _cfg(), arms=["canary"], registry=registry).decision.status == "insufficient_data"
