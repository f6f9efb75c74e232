"""A version's training rows rebuilt from its lineage (`pipelines.data.training_data`), on tiny models: a
retrained version (fresh rows with a new intent) distils without the label-count refusal, a retrain of a
retrain rebuilds the rows it kept and added, and a changed file or changed recorded rows is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_INTENTS, tiny_finetune_config

from champion.errors import ChampionError

NAME = "tiny-intents"
NEW_INTENT = "damaged_item"  # an intent v1 never saw; v2's fresh rows teach it
LEARN = {"method": "full", "train": {"epochs": 1, "learning_rate": 3e-3}}  # the rows matter, not accuracy


def _fresh_file(folder, name: str, rows: int, seed: int, intents):
    from pipelines.ticketgen import generate_tickets

    path = folder / name
    generate_tickets(rows, seed=seed, intents=list(intents)).to_csv(path, index=False)
    return path


def _retrain(registry, fresh):
    from pipelines.retrain import RetrainConfig, retrain

    cfg = RetrainConfig.model_validate(
        {
            "model_name": NAME,
            "overrides": ["train.epochs=1"],
            "fresh": {"from_log": False, "files": [str(fresh)], "holdout_share": 0.3},
            "gate": {"resamples": 200, "min_rows": 10, "max_class_drop": 1.0},
            "promotion": "none",  # the gate's verdict does not matter here; the versions' rows do
        }
    )
    result = retrain(cfg, registry)
    assert result.challenger_version, result.reason
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """One CHAMPION_HOME for the module: v1 fine-tuned on the tiny intents; v2 retrained from it on fresh
    rows with a new intent (then made champion); v3 retrained from v2 on other fresh rows."""
    from champion.registry import connect, promote
    from pipelines.finetune import finetune
    from pipelines.ticketgen import write_tickets

    root = tmp_path_factory.mktemp("lineage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_HOME", str(root / "home"))
        mp.setenv("CHAMPION_ACTOR", "pytest")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("CHAMPION_AUDIT_URL", raising=False)
        reg = connect()
        try:
            data = write_tickets(root / "tickets.csv", 160, seed=3, intents=TINY_INTENTS)
            v1 = finetune(tiny_finetune_config(data, tiny_model_dir, **LEARN), registry=reg).version
            promote(reg, NAME, v1, reason="first champion")
            fresh2 = _fresh_file(root, "fresh2.csv", 100, 21, [*TINY_INTENTS, NEW_INTENT])
            v2 = _retrain(reg, fresh2).challenger_version
            promote(reg, NAME, v2, reason="the retrained version", force=True)
            fresh3 = _fresh_file(root, "fresh3.csv", 100, 22, TINY_INTENTS)
            v3 = _retrain(reg, fresh3).challenger_version
        finally:
            reg.close()
    return {"root": root, "data": data, "v1": v1, "v2": v2, "v3": v3, "fresh2": fresh2, "fresh3": fresh3}


@pytest.fixture
def reg(world, monkeypatch):
    """The module's store, opened for this test (MLflow's global tracking URI included)."""
    from champion.registry import connect

    monkeypatch.setenv("CHAMPION_HOME", str(world["root"] / "home"))
    monkeypatch.setenv("CHAMPION_ACTOR", "pytest")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CHAMPION_AUDIT_URL", raising=False)
    registry = connect()
    yield registry
    registry.close()


def _tags(reg, version: str) -> dict[str, str]:
    return dict(reg.client.get_model_version(NAME, version).tags)


def test_a_retrained_version_is_rebuilt_and_distilled_with_its_new_labels(reg, world):
    from pipelines.data import training_data
    from pipelines.distil import DistilConfig, distil
    from serving.model import load_version

    v1, v2 = world["v1"], world["v2"]
    source, rows = training_data(reg, NAME, v1), training_data(reg, NAME, v2)
    assert rows.sha256 == _tags(reg, v2)["data_sha256"] != source.sha256
    # The file's splits, then the fresh rows v2 learnt from (the new intent among them); held-out rows alike.
    assert rows.train.iloc[: len(source.train)].equals(source.train) and rows.test.equals(source.test)
    added = rows.train.iloc[len(source.train) :]
    assert len(added) == rows.extra_rows == int(_tags(reg, v2)["retrain.fresh_train_rows"]) > 0
    assert set(added["text"]) <= set(pd.read_csv(world["fresh2"])["text"])
    assert NEW_INTENT in set(added["label"]) and rows.labels == sorted([*TINY_INTENTS, NEW_INTENT])
    assert list(load_version(reg.client, NAME, v2).labels) == rows.labels

    # Distilling the retrained champion no longer stops at "predicts 5 labels but its data has 4".
    cfg = DistilConfig.model_validate(
        {
            "model_name": NAME,
            "train": {"epochs": 1, "batch_size": 16, "progress": False, "device": "cpu"},
            "budget": {"min_rows": 20, "min_f1_ratio": 0.1},
            "cost": {"rows": 32, "repeats": 1, "batch_size": 16},
        }
    )
    result = distil(cfg, registry=reg)
    assert result.teacher_version == v2
    assert list(load_version(reg.client, NAME, result.version).labels) == rows.labels
    assert _tags(reg, result.version)["data_sha256"] == rows.sha256
    # A student's rows are its teacher's, rebuilt through it.
    assert training_data(reg, NAME, result.version).sha256 == rows.sha256


def test_a_retrain_of_a_retrain_keeps_what_its_parent_learnt_and_rebuilds_its_rows(reg, world):
    from pipelines.data import training_data
    from pipelines.fresh import normalise

    v1, v2, v3 = world["v1"], world["v2"], world["v3"]
    tags = _tags(reg, v3)
    assert tags["retrain.parent_version"] == v2
    rows, parent, source = (training_data(reg, NAME, v) for v in (v3, v2, v1))
    assert rows.sha256 == tags["data_sha256"] and tags["source_data_sha256"] == source.sha256
    # v3 = v1's file splits + the rows v2 learnt from, but those a fresh row of v3 with the same text
    # replaces + v3's fresh rows.
    learnt = parent.train.iloc[len(source.train) :]
    added = rows.train.iloc[len(source.train) :].reset_index(drop=True)
    fresh3 = set(pd.read_csv(world["fresh3"])["text"].map(normalise))
    kept = learnt[~learnt["text"].map(normalise).isin(fresh3)].reset_index(drop=True)
    assert int(tags["retrain.kept_rows"]) == len(kept) > 0
    assert added.iloc[: len(kept)].equals(kept)
    fresh = added.iloc[len(kept) :]
    assert len(fresh) == int(tags["retrain.fresh_train_rows"]) > 0
    assert set(fresh["text"]) <= set(pd.read_csv(world["fresh3"])["text"])
    assert NEW_INTENT in rows.labels  # what v2 learnt is not forgotten by its retrain


def test_a_changed_file_or_changed_recorded_rows_is_refused_with_the_fix(reg, world):
    from champion.tables import content_sha256
    from pipelines.data import EXTRA_ROWS_ARTIFACT, EXTRA_ROWS_TAG, extra_rows_text, training_data

    v2, data = world["v2"], world["data"]
    original = data.read_text()
    try:
        data.write_text(original + "one more ticket about my order,track_order\n")
        with pytest.raises(
            ChampionError,
            match=rf"'{re.escape(str(data))}' changed since v{v2} was trained on it .*restore it",
        ):
            training_data(reg, NAME, v2)
        data.unlink()
        with pytest.raises(ChampionError, match="which is gone; put it back, or pass --data FILE"):
            training_data(reg, NAME, v2)
    finally:
        data.write_text(original)

    # The rows kept in v2's run, changed: named, with the fix.
    run_id = reg.client.get_model_version(NAME, v2).run_id
    rows = training_data(reg, NAME, v2)
    added = rows.train.iloc[len(rows.train) - rows.extra_rows :]
    try:
        reg.client.log_text(run_id, extra_rows_text(added.assign(label="track_order")), EXTRA_ROWS_ARTIFACT)
        with pytest.raises(
            ChampionError, match=rf"{EXTRA_ROWS_ARTIFACT} in run {run_id} changed since v{v2}"
        ):
            training_data(reg, NAME, v2)
    finally:
        reg.client.log_text(run_id, extra_rows_text(added), EXTRA_ROWS_ARTIFACT)
    assert (
        training_data(reg, NAME, v2).sha256 == rows.sha256
        and content_sha256(added) == _tags(reg, v2)[EXTRA_ROWS_TAG]
    )

    # A version retrained before its rows were kept: refused, or its source alone where the caller asks.
    reg.client.delete_model_version_tag(NAME, v2, EXTRA_ROWS_TAG)
    try:
        with pytest.raises(
            ChampionError, match=r"fresh rows that were not recorded with it .*pass --data FILE"
        ):
            training_data(reg, NAME, v2)
        assert (
            training_data(reg, NAME, v2, unrecorded="source").sha256 == _tags(reg, v2)["source_data_sha256"]
        )
    finally:
        reg.client.set_model_version_tag(NAME, v2, EXTRA_ROWS_TAG, content_sha256(added))


def test_an_sft_version_records_its_rows_and_is_refused_with_a_sentence(registry, tiny_llama_dir, tmp_path):
    import yaml
    from lm_world import sft_tiny, write_tiny_replies

    from pipelines.data import training_data
    from pipelines.sft import SFTDataConfig, load_reply_splits

    version = sft_tiny(registry, write_tiny_replies(tmp_path), tiny_llama_dir, 0).version
    with pytest.raises(ChampionError, match="is a text-generation version .*load_reply_splits rebuilds them"):
        training_data(registry, "tiny-replies", version)
    # Its lineage is enough to rebuild them: the recorded data config splits into the recorded hash.
    mv = registry.client.get_model_version("tiny-replies", version)
    recipe = yaml.safe_load(
        Path(registry.client.download_artifacts(mv.run_id, "config.yaml", str(tmp_path))).read_text()
    )
    assert load_reply_splits(SFTDataConfig(**recipe["data"])).sha256 == mv.tags["data_sha256"]
