"""Retraining behind the gate, on tiny models: fresh labels, lineage checks, the gate, promotion, records."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
import pytest
from conftest import TINY_INTENTS, tiny_finetune_config

from champion.errors import ChampionError
from champion_cli.cli import main

NEW_INTENT = "damaged_item"  # an intent the champion was never trained on
LEARN = {"method": "full", "train": {"epochs": 6, "learning_rate": 3e-3}}


@pytest.fixture
def champion(registry, tiny_model_dir, tickets_csv):
    """v1 of tiny-intents, fine-tuned on the four tiny intents and promoted."""
    from champion.registry import promote
    from pipelines.finetune import finetune

    version = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, **LEARN), registry=registry).version
    promote(registry, "tiny-intents", version, reason="first champion")
    return version


def _fresh_file(tmp_path, name: str, rows: int, seed: int, intents):
    from pipelines.ticketgen import generate_tickets

    frame = generate_tickets(rows, seed=seed, intents=list(intents))
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _cfg(*files, **changes):
    from pipelines.retrain import RetrainConfig

    base = {
        "model_name": "tiny-intents",
        "fresh": {"from_log": False, "files": [str(f) for f in files], "holdout_share": 0.5},
        "gate": {"resamples": 500},
    }
    for key, value in changes.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return RetrainConfig.model_validate(base)


def _aliases(registry) -> dict[str, str]:
    return {k: str(v) for k, v in registry.client.get_registered_model("tiny-intents").aliases.items()}


def _versions(registry) -> int:
    return len(registry.client.search_model_versions("name='tiny-intents'"))


def test_a_retrain_that_learns_a_new_intent_passes_the_gate_and_is_served_with_it(
    registry, champion, tmp_path
):
    from pipelines.retrain import retrain
    from serving.model import load_version

    fresh = _fresh_file(tmp_path, "fresh.csv", 700, 21, [*TINY_INTENTS, NEW_INTENT])
    # The tiny random encoder can trade one old class for the new one; the per-class floor is tested in
    # test_gate.py, so here it is off and the test is about learning the new intent.
    result = retrain(_cfg(fresh, gate={"max_class_drop": 1.0}), registry)
    assert result.outcome == "promoted", result.reason
    new = result.challenger_version
    assert _aliases(registry)["champion"] == new and _aliases(registry)["candidate"] == new
    assert result.counts["challenger_labels_new"] == [NEW_INTENT]
    ev = result.gate.evidence
    assert ev["new_classes"] == [NEW_INTENT] and ev["per_class"][NEW_INTENT]["champion"] == 0.0
    assert ev["macro_f1_delta_interval"][0] > 0

    # Lineage and the gate's numbers on the version; the served model knows the new label.
    tags = registry.client.get_model_version("tiny-intents", new).tags
    assert tags["retrain.parent_version"] == champion and tags["retrain.trigger"] == "manual"
    assert tags["gate.promote"] == "true" and tags["gate.holdout_sha256"] == ev["holdout_sha256"]
    assert int(tags["retrain.fresh_train_rows"]) == result.counts["fresh_train_rows"] > 0
    served = load_version(registry.client, "tiny-intents", new)
    assert NEW_INTENT in served.labels and len(served.labels) == 5

    # One story: started -> registered as candidate -> gate -> promoted -> finished.
    from champion.registry import story

    steps = [(e["type"], e["action"]) for e in story(registry, "tiny-intents")]
    tail = steps[steps.index(("loop", "retrain_started")) :]
    assert tail == [("loop", "retrain_started"), ("alias", "assign"), ("loop", "gate"),
                    ("alias", "gate_promote"), ("loop", "retrain_finished")]  # fmt: skip

    # The retrained champion can be retrained in turn: its recipe is its source data, checked by the hash
    # of what that source splits into (its data_sha256 also covers the fresh rows it learnt from).
    assert (
        tags["source_data_sha256"]
        == registry.client.get_model_version("tiny-intents", champion).tags["source_data_sha256"]
        != tags["data_sha256"]
    )
    again = retrain(_cfg(fresh, promotion="none", gate={"max_class_drop": 1.0}), registry)
    assert again.outcome in ("not_promoted", "refused") and again.champion_version == new


def test_a_challenger_trained_on_shuffled_labels_is_refused_and_nothing_moves(
    registry, champion, tickets_csv, tmp_path
):
    from pipelines.fresh import holdout_secret, holdout_side
    from pipelines.retrain import retrain

    fresh = _fresh_file(tmp_path, "fresh.csv", 700, 22, TINY_INTENTS)
    # Everything the retrain learns from has shuffled labels (the fresh rows it trains on, and a replacement
    # of the original data); the holdout keeps the true ones (dealt by this home's secret, as retrain does).
    frame = pd.read_csv(fresh)
    side = holdout_side(frame["text"].tolist(), "tiny-intents", 0.5, holdout_secret())
    train = frame[~side].copy()
    train["label"] = train["label"].sample(frac=1.0, random_state=1).to_numpy()
    pd.concat([train, frame[side]]).to_csv(fresh, index=False)
    original = pd.read_csv(tickets_csv)
    original["label"] = original["label"].sample(frac=1.0, random_state=2).to_numpy()
    shuffled = tmp_path / "shuffled.csv"
    original.to_csv(shuffled, index=False)
    result = retrain(_cfg(fresh, init="base", data=str(shuffled)), registry)
    assert result.outcome == "refused", result.reason
    assert _aliases(registry)["champion"] == champion
    tags = registry.client.get_model_version("tiny-intents", result.challenger_version).tags
    assert tags["gate.promote"] == "false" and float(tags["gate.macro_f1_delta_high"]) < 0
    assert tags["retrain.init"] == "base"


def test_too_few_fresh_labels_train_nothing(registry, champion, tmp_path):
    from pipelines.retrain import retrain

    before, aliases = _versions(registry), _aliases(registry)
    fresh = _fresh_file(tmp_path, "fresh.csv", 60, 23, TINY_INTENTS)
    result = retrain(_cfg(fresh), registry)
    assert result.outcome == "skipped" and "fewer than gate.min_rows (200)" in result.reason
    result = retrain(_cfg(fresh, fresh={"min_train_rows": 500}), registry)
    assert result.outcome == "skipped" and "fewer than fresh.min_train_rows (500)" in result.reason
    assert _versions(registry) == before and _aliases(registry) == aliases
    assert main(["retrain", "tiny-intents", "--set", "fresh.from_log=false",
                 "--set", f"fresh.files=[{fresh}]"]) == 1  # fmt: skip


def test_the_champions_data_must_be_unchanged_unless_replaced(registry, champion, tickets_csv, tmp_path):
    from pipelines.retrain import retrain

    fresh = _fresh_file(tmp_path, "fresh.csv", 60, 24, TINY_INTENTS)
    original = tickets_csv.read_text()
    tickets_csv.write_text(original + "one more ticket about my order,track_order\n")
    with pytest.raises(ChampionError, match="changed since v1 was trained on it"):
        retrain(_cfg(fresh), registry)
    tickets_csv.unlink()
    with pytest.raises(ChampionError, match="which is gone; put it back, or pass --data FILE"):
        retrain(_cfg(fresh), registry)
    replacement = tmp_path / "replacement.csv"
    replacement.write_text(original)
    assert retrain(_cfg(fresh, data=str(replacement)), registry).outcome == "skipped"  # checks passed
    outcomes = [r["outcome"] for r in _attempts(registry)]
    assert outcomes == ["failed", "failed", "skipped"]


def _attempts(registry) -> list[dict]:
    import sqlalchemy as sa

    from champion.audit import retrain_runs

    with registry.audit.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(retrain_runs).order_by(retrain_runs.c.id)).mappings()]


def test_a_trigger_key_starts_at_most_one_retrain(registry, champion, tmp_path, monkeypatch):
    import pipelines.finetune
    from pipelines.retrain import AlreadyClaimed, retrain

    key = "drift:tiny-intents:v1:check-7"
    few = _fresh_file(tmp_path, "few.csv", 60, 25, TINY_INTENTS)
    # Too few labels: nothing is trained, so the key is given back and the same trigger may try again.
    assert retrain(_cfg(few), registry, trigger="drift", trigger_key=key).outcome == "skipped"

    def broken(*args, **kwargs):
        raise RuntimeError("the machine went away (simulated)")

    monkeypatch.setattr(pipelines.finetune, "finetune", broken)
    enough = _fresh_file(tmp_path, "enough.csv", 700, 25, TINY_INTENTS)
    with pytest.raises(RuntimeError, match="simulated"):
        retrain(_cfg(enough), registry, trigger="drift", trigger_key=key)  # a real attempt: the key is spent
    with pytest.raises(AlreadyClaimed, match="has already started a retrain"):
        retrain(_cfg(enough), registry, trigger="drift", trigger_key=key)
    attempts = _attempts(registry)
    assert [a["outcome"] for a in attempts] == ["skipped", "failed"]
    assert (
        attempts[0]["trigger_key"] == f"{key}#skipped-{attempts[0]['id']}"
        and attempts[1]["trigger_key"] == key
    )


def test_a_failed_retrain_registers_nothing_and_is_recorded(registry, champion, tmp_path, monkeypatch):
    import pipelines.finetune
    from pipelines.retrain import retrain

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(pipelines.finetune, "finetune", broken)
    fresh = _fresh_file(tmp_path, "fresh.csv", 700, 26, TINY_INTENTS)
    before, aliases = _versions(registry), _aliases(registry)
    with pytest.raises(RuntimeError, match="simulated"):
        retrain(_cfg(fresh), registry)
    assert _versions(registry) == before and _aliases(registry) == aliases
    attempt = _attempts(registry)[-1]
    assert attempt["outcome"] == "failed" and "simulated" in attempt["detail"] and attempt["ended_at"]


def test_the_gate_compares_with_the_champion_of_the_moment(registry, champion, tmp_path, monkeypatch):
    """Another version is promoted while the retrain trains: the gate says so and compares against it."""
    import pipelines.finetune
    from champion.registry import promote
    from pipelines.retrain import retrain

    real = pipelines.finetune.finetune
    other: list[str] = []

    def finetune_while_someone_promotes(*args, **kwargs):
        result = real(*args, **kwargs)
        other.append(real(*args, **kwargs).version)  # a second version, promoted by "someone else"
        promote(registry, "tiny-intents", other[-1], reason="an operator", force=True)
        return result

    monkeypatch.setattr(pipelines.finetune, "finetune", finetune_while_someone_promotes)
    fresh = _fresh_file(tmp_path, "fresh.csv", 700, 27, TINY_INTENTS)
    result = retrain(_cfg(fresh, promotion="none"), registry)
    ev = result.gate.evidence
    assert ev["champion_version"] == other[-1] and ev["champion_changed_during_retrain"] == [
        champion,
        other[-1],
    ]
    assert result.champion_version == other[-1]


def test_canary_promotion_hands_the_version_to_the_service_as_challenger(registry, champion, tmp_path):
    from pipelines.retrain import retrain

    fresh = _fresh_file(tmp_path, "fresh.csv", 700, 28, [*TINY_INTENTS, NEW_INTENT])
    result = retrain(_cfg(fresh, promotion="canary", gate={"max_class_drop": 1.0}), registry)
    assert result.outcome == "canary", result.reason
    assert _aliases(registry)["champion"] == champion
    assert _aliases(registry)["challenger"] == result.challenger_version
    event = [e for e in registry.audit.events("tiny-intents") if e.alias == "challenger"][-1]
    assert event.evidence["gate"]["promote"] is True and event.evidence["gate"]["holdout_sha256"]


def test_fresh_labels_come_from_the_inference_log_feedback(registry, champion, tmp_path):
    from champion.config import default_log_url
    from pipelines.fresh import FreshConfig, fresh_data, holdout_side
    from pipelines.ticketgen import generate_tickets
    from serving.inference_log import InferenceLog, PredictionRecord

    frame = generate_tickets(300, seed=29, intents=TINY_INTENTS)
    log = InferenceLog(default_log_url()).start()
    now = datetime.now(UTC)
    records = [
        PredictionRecord(f"r{i}", now, "tiny-intents", champion, arm, text, "track_order", 0.5, 1.0)
        for i, text in enumerate(frame["text"])
        for arm in (["champion", "shadow"] if i % 2 else ["champion"])  # a shadow copy shares the id
    ]
    log.append(records)
    log.flush()
    for i, label in enumerate(frame["label"][:200]):
        log.add_feedback(f"r{i}", label)
    log.close()
    # By default /feedback labels only teach: whoever holds the ingest key must not steer the gate.
    default = fresh_data("tiny-intents", FreshConfig(holdout_share=0.3))
    assert default.counts["labelled_rows"] == 200 and default.counts["by_source"] == {"feedback": 200}
    assert len(default.train) == 200 and len(default.holdout) == 0
    # Configured to trust every sender, with the public seed: the split of before, text by text.
    cfg = FreshConfig(holdout_share=0.3, holdout_sources=["review:random", "feedback", "files"], seed=0)
    data = fresh_data("tiny-intents", cfg)
    assert len(data.train) + len(data.holdout) == 200
    texts = list(frame["text"][:200])
    assert set(data.holdout["text"]) == {t for t, s in zip(texts, holdout_side(texts, "tiny-intents", 0.3, 0),
                                                            strict=True) if s}  # fmt: skip
    again = fresh_data("tiny-intents", cfg)
    assert again.holdout_sha256 == data.holdout_sha256  # the same labels, the same holdout
    shared = set(data.train["text"]) & set(data.holdout["text"])
    assert not shared  # a text never sits on both sides


def test_the_holdout_drops_texts_seen_in_training_and_a_shared_text_is_refused(tmp_path):
    from pipelines.fresh import FreshConfig, fresh_data, require_disjoint

    assert fresh_data("m", FreshConfig(from_log=False)).counts["labelled_rows"] == 0
    path = tmp_path / "labels.jsonl"
    pd.DataFrame({"text": [f"ticket number {i}" for i in range(100)], "label": "a"}).to_json(
        path, orient="records", lines=True
    )
    cfg = FreshConfig(from_log=False, holdout_share=0.5, files=[str(path)])
    full = fresh_data("m", cfg)
    seen = list(full.holdout["text"][:5])
    dropped = fresh_data("m", cfg, exclude_texts=[f"  {s.upper()} " for s in seen])  # normalised match
    assert dropped.counts["holdout_dropped_seen_in_training"] == 5
    assert len(dropped.holdout) == len(full.holdout) - 5
    with pytest.raises(ChampionError, match="shares 1 texts with the challenger's training rows"):
        require_disjoint(full.holdout, [seen[0]])


def test_retrain_cli_json_and_bad_input(registry, champion, tmp_path, capsys):
    fresh = _fresh_file(tmp_path, "fresh.csv", 60, 30, TINY_INTENTS)
    files = ["--set", "fresh.from_log=false", "--set", f"fresh.files=[{fresh}]"]
    code = main(["retrain", "tiny-intents", *files, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["outcome"] == "skipped" and out["gate"] is None
    cases = [
        (["retrain", "nope"], "model 'nope' is not in the registry"),
        (["retrain", "tiny-intents", "--set", "promotion=sideways"], "'promotion'"),
        (["retrain", "tiny-intents", "--set", "fresh.from_log=false", "--set", "fresh.files=[/no/such.csv]"],
         "fresh.files[0]: '/no/such.csv' does not exist"),
        (["retrain", "tiny-intents", "--config", str(tmp_path / "none.yaml")], "does not exist"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, (argv, err)


def test_with_approval_required_a_gate_pass_waits_for_a_person(registry, champion, tmp_path, monkeypatch):
    from champion.approval import approve, pending_promotions
    from pipelines.retrain import retrain

    fresh = _fresh_file(tmp_path, "fresh.csv", 700, 28, [*TINY_INTENTS, NEW_INTENT])
    monkeypatch.setenv("CHAMPION_ACTOR", "scheduler")
    result = retrain(_cfg(fresh, approval="required", gate={"max_class_drop": 1.0}), registry)
    assert result.outcome == "pending", result.reason
    assert f"champion approve tiny-intents {result.challenger_version}" in result.reason
    before = _aliases(registry)
    assert (
        before["champion"] == champion and before["challenger"] != result.challenger_version
    )  # nothing moved
    (item,) = pending_promotions(registry, "tiny-intents")
    assert item.version == result.challenger_version and item.compared_with == champion
    assert item.evidence["gate"]["promote"] is True

    monkeypatch.setenv("CHAMPION_ACTOR", "ana")
    assert approve(registry, "tiny-intents", item.version, reason="new intent looks right").allowed
    assert _aliases(registry) == {**before, "champion": result.challenger_version}
