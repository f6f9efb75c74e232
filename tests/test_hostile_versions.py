"""A version made only of allowed files must still not run code: every reader of a registered version's
weights goes through one checked path (allowlist, contents, recorded digest) and loads with plain
transformers calls.

The hostile version is what an attacker with write access to the registry would make: the champion's own
files (JSON and a real `model.safetensors`), a `config.json` whose `auto_map` points at a Python module in a
folder outside the version, and an MLmodel whose `pipeline_model_type` is not a transformers class (so
MLflow's loader would pass `trust_remote_code=True`). It is registered with the MLflow client directly, with a
correct digest tag and the champion's run and tags, so the digest, recipe and reference look-ups all pass and
only the content check stands in the way. Importing the module writes a marker file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_INTENTS, tiny_finetune_config

from champion.errors import ChampionError

NAME = "tiny-intents"
EVIL_TYPE = "EvilForSequenceClassification"


@dataclass
class World:
    reg: object
    home: Path
    root: Path
    champion: str
    evil: str  # auto_map + pipeline_model_type, correct digest
    marker: Path
    tickets: Path


def _copy_of_version(reg, version: str, into: Path) -> Path:
    import mlflow

    src = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(into) + "-dl"))
    shutil.copytree(src, into)
    (into / "registered_model_meta").unlink(missing_ok=True)
    return into


def _register_by_hand(reg, folder: Path, like: str, digest: bool = True) -> str:
    """Register `folder` with the MLflow client, as a hostile registry writer would: the run and tags of
    version `like` (its recipe and reference), and a correct digest of the files unless `digest` is off."""
    from champion.registry import REGISTRATION_TAG
    from champion.safety import DIGEST_TAG, files_digest

    mv = reg.client.get_model_version(NAME, like)
    tags = {k: v for k, v in mv.tags.items() if k not in (DIGEST_TAG, REGISTRATION_TAG)}
    if digest:
        tags[DIGEST_TAG] = files_digest(folder)
    made = reg.client.create_model_version(NAME, source=f"file://{folder}", run_id=mv.run_id, tags=tags)
    return str(made.version)


def _hostile(reg, champion: str, root: Path, marker: Path) -> str:
    outside = root / "outside"  # never part of any version
    outside.mkdir()
    (outside / "evilmod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from transformers import BertConfig, BertForSequenceClassification\n\n\n"
        "class EvilConfig(BertConfig):\n    pass\n\n\n"
        f"class {EVIL_TYPE}(BertForSequenceClassification):\n    config_class = EvilConfig\n"
    )
    folder = _copy_of_version(reg, champion, root / "evil-version")
    config_path = folder / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {
        "AutoConfig": f"{outside}--evilmod.EvilConfig",
        "AutoModelForSequenceClassification": f"{outside}--evilmod.{EVIL_TYPE}",
    }
    config_path.write_text(json.dumps(config, indent=2))
    mlmodel = folder / "MLmodel"
    text = mlmodel.read_text()
    assert "pipeline_model_type: BertForSequenceClassification" in text
    mlmodel.write_text(
        text.replace(
            "pipeline_model_type: BertForSequenceClassification", f"pipeline_model_type: {EVIL_TYPE}"
        )
    )
    _assert_mlflow_would_run_it(folder, marker)
    return _register_by_hand(reg, folder, champion)


def _assert_mlflow_would_run_it(folder: Path, marker: Path) -> None:
    """The version is really hostile: MLflow's own loader (what Champion used) imports the module. In a child
    process, so this process never holds the module."""
    import subprocess
    import sys

    load = "import sys, mlflow; mlflow.transformers.load_model(sys.argv[1], return_type='components')"
    env = {**os.environ, "HF_MODULES_CACHE": str(folder.parent / "hf-modules")}  # not the user's cache
    subprocess.run([sys.executable, "-c", load, str(folder)], capture_output=True, timeout=120, env=env)
    assert marker.exists(), "MLflow's loader did not import the module: the hostile version tests nothing"
    marker.unlink()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """One CHAMPION_HOME for the module: a fine-tuned champion and the hostile version beside it."""
    from champion.registry import connect, promote
    from pipelines.finetune import finetune
    from pipelines.ticketgen import write_tickets

    root = tmp_path_factory.mktemp("hostile")
    patch = pytest.MonkeyPatch()
    patch.setenv("CHAMPION_HOME", str(root / "home"))
    patch.setenv("CHAMPION_ACTOR", "pytest")
    for key in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL", "CHAMPION_ALLOW_LEGACY_VERSIONS"):
        patch.delenv(key, raising=False)
    reg = connect()
    try:
        tickets = write_tickets(root / "tickets.csv", 320, seed=3, intents=TINY_INTENTS)
        learn = {"method": "full", "train": {"epochs": 2, "learning_rate": 3e-3}}
        champion = finetune(tiny_finetune_config(tickets, tiny_model_dir, **learn), registry=reg).version
        promote(reg, NAME, champion, reason="first champion")
        marker = root / "marker-imported"
        evil = _hostile(reg, champion, root, marker)
        yield World(reg, root / "home", root, champion, evil, marker, tickets)
    finally:
        reg.close()
        patch.undo()


@pytest.fixture
def champion_alias_on(world):
    """Make a version the audited champion without today's checks (a version promoted by a release that did
    not check file contents is still the champion after an upgrade), and put the real one back afterwards.
    An alias set only in MLflow would not do: every reader follows the audit history, not MLflow's alias."""
    from champion.audit import AliasEvent

    def move(version: str) -> None:
        with world.reg.audit.lock(NAME, "champion") as history:
            was = world.reg.audit.aliases(NAME).get("champion")
            history.append(AliasEvent(NAME, "champion", "promote", was, version, "pytest", "older release"))
        world.reg.client.set_registered_model_alias(NAME, "champion", version)

    yield move
    move(world.champion)


def _labelled(world, rows: int = 40):
    import pandas as pd

    return pd.read_csv(world.tickets).head(rows)


def _serving(world, _move):
    from serving.model import load_version

    load_version(world.reg.client, NAME, world.evil, device="cpu")


def _predict(world, move):
    from champion_cli.cli import main

    move(world.evil)
    code = main(["predict", NAME, "where is my order"])
    if code != 0:
        raise ChampionError(f"exit code {code}")


def _drift(world, _move):
    from monitoring.check import drift

    sample = world.root / "window.csv"
    _labelled(world)[["text"]].to_csv(sample, index=False)
    drift(NAME, version=world.evil, file=sample, registry=world.reg, store=False)


def _reference(world, _move):
    from monitoring.reference import reference_for_version

    reference_for_version(world.reg, NAME, world.evil, _labelled(world))


def _compare(world, _move):
    from pipelines.compare import compare

    compare(world.reg, NAME, world.champion, world.evil, _labelled(world), log_mlflow=False)


def _distil(world, _move):
    from pipelines.distil import DistilConfig, distil

    cfg = DistilConfig.model_validate(
        {
            "model_name": NAME,
            "teacher": world.evil,
            "train": {"epochs": 1, "batch_size": 16, "progress": False, "device": "cpu"},
            "budget": {"min_rows": 20, "min_f1_ratio": 0.5},
            "cost": {"rows": 32, "repeats": 1, "batch_size": 16},
        }
    )
    distil(cfg, registry=world.reg)


def _compress(world, _move):
    from pipelines.compress import CompressConfig, compress

    cfg = CompressConfig.model_validate(
        {"to": "int8", "budget": {"min_rows": 20, "min_agreement": 0.9}, "cost": {"rows": 32, "repeats": 1}}
    )
    compress(NAME, world.evil, cfg, registry=world.reg)


def _retrain(world, move, version: str | None = None):
    from pipelines.retrain import RetrainConfig, retrain
    from pipelines.ticketgen import generate_tickets

    fresh = world.root / "fresh.csv"
    generate_tickets(200, seed=21, intents=TINY_INTENTS).to_csv(fresh, index=False)
    move(version or world.evil)
    cfg = RetrainConfig.model_validate(
        {
            "model_name": NAME,
            "init": "champion",
            "fresh": {"from_log": False, "files": [str(fresh)], "holdout_share": 0.5},
            "gate": {"resamples": 200, "min_rows": 20},
        }
    )
    result = retrain(cfg, world.reg)
    raise AssertionError(f"the retrain was not refused: {result.outcome}: {result.reason}")


def _review_labels(world, _move):
    from monitoring.review import version_labels

    if version_labels(NAME, world.evil) is not None:  # the console's reviewer view reads its config.json
        return
    raise ChampionError("no labels (refused, logged)")


PATHS = {
    "serving": _serving,
    "predict": _predict,
    "drift": _drift,
    "reference": _reference,
    "compare": _compare,
    "distil": _distil,
    "compress": _compress,
    "retrain-init-champion": _retrain,
    "review-labels": _review_labels,
}


def _cached(world, version: str) -> list[Path]:
    folder = world.home / "cache" / "models" / NAME
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.glob(f"{version}-*")) + sorted(folder.glob("tmp*")) if p.is_dir()]


@pytest.mark.parametrize("path", list(PATHS))
def test_every_loading_path_refuses_the_hostile_version_and_imports_nothing(
    world, champion_alias_on, path, capsys, caplog
):
    with pytest.raises(ChampionError) as err:
        PATHS[path](world, champion_alias_on)
    said = f"{err.value}\n{capsys.readouterr().err}\n{caplog.text}"
    assert "'model/config.json'" in said and "auto_map" in said, said  # the file and the field
    assert not world.marker.exists(), f"{path} imported the module the version's auto_map points at"
    assert _cached(world, world.evil) == [], "a refused download stays in the cache"


def test_promote_and_registration_refuse_the_hostile_files(world, tmp_path):
    import mlflow

    from champion.registry import promote, register_version
    from champion.safety import UnsafeModelError

    decision = promote(world.reg, NAME, world.evil, reason="looks fine", force=True)
    assert not decision.allowed and "auto_map" in decision.reason, decision.reason
    hostile = world.reg.client.get_model_version(NAME, world.evil).source.removeprefix("file://")
    mlflow.set_experiment("hostile")
    with mlflow.start_run():
        mlflow.log_artifacts(hostile, "model")
        uri = f"runs:/{mlflow.active_run().info.run_id}/model"
    with pytest.raises(UnsafeModelError, match=r"'model/config\.json' has the field 'auto_map'"):
        register_version(world.reg, NAME, uri, {}, "challenger", "by hand")
    assert not world.marker.exists()


def test_an_mlmodel_type_that_is_not_a_transformers_class_is_refused_on_its_own(world):
    """Without the auto_map, the MLmodel's pipeline_model_type alone is refused (MLflow would trust code)."""
    from serving.model import load_version

    folder = _copy_of_version(world.reg, world.evil, world.root / "type-only")
    config = json.loads((folder / "model" / "config.json").read_text())
    del config["auto_map"]
    (folder / "model" / "config.json").write_text(json.dumps(config))
    version = _register_by_hand(world.reg, folder, world.champion)
    with pytest.raises(
        ChampionError, match=rf"'MLmodel' field flavors\.transformers\.pipeline_model_type is '{EVIL_TYPE}'"
    ):
        load_version(world.reg.client, NAME, version, device="cpu")
    assert _cached(world, version) == []


def test_a_version_without_its_digest_is_refused_unless_legacy_versions_are_allowed(world, monkeypatch):
    from serving.model import load_version

    folder = _copy_of_version(world.reg, world.champion, world.root / "no-digest")
    version = _register_by_hand(world.reg, folder, world.champion, digest=False)
    with pytest.raises(
        ChampionError, match="no recorded champion.files_sha256.*CHAMPION_ALLOW_LEGACY_VERSIONS=1"
    ):
        load_version(world.reg.client, NAME, version, device="cpu")
    assert _cached(world, version) == []
    monkeypatch.setenv("CHAMPION_ALLOW_LEGACY_VERSIONS", "1")
    loaded = load_version(world.reg.client, NAME, version, device="cpu")
    assert list(loaded.labels) == sorted(TINY_INTENTS) or set(loaded.labels) == set(TINY_INTENTS)


def test_a_file_changed_after_registration_is_refused_by_retrains_start_too(world, champion_alias_on):
    """The retrain's `init: champion` read the champion's files without the digest check."""
    from monitoring.review import version_labels
    from serving.model import load_version

    folder = _copy_of_version(world.reg, world.champion, world.root / "tampered")
    version = _register_by_hand(world.reg, folder, world.champion)
    load_version(world.reg.client, NAME, version, device="cpu")  # fine as registered, now cached
    config = folder / "model" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    cached = _cached(world, version)[0] / "model" / "config.json"
    cached.write_text(cached.read_text().replace('"hidden_act"', '"hidden_act" ', 1))  # the cache, too
    with pytest.raises(ChampionError, match="sha256 no longer matches"):
        _retrain(world, champion_alias_on, version)
    assert version_labels(NAME, version) is None
    assert _cached(world, version) == []
