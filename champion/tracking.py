"""MLflow helpers shared by the pipelines: experiments, lineage tags, logging a classifier."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from champion.config import artifact_root, redact_uri

# The libraries a served model needs; exact versions so a loaded model behaves as it did when logged.
MODEL_REQUIREMENTS = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")
LINEAGE_LIBRARIES = ("torch", "transformers", "peft", "mlflow", "datasets", "accelerate", "champion")


def ensure_experiment(name: str) -> str:
    """The experiment's id; a new one keeps its artifacts under CHAMPION_HOME when the store is embedded."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None  # a tracking server decides where its artifacts go
    if not mlflow.get_tracking_uri().startswith(("http:", "https:", "databricks")):
        location = (artifact_root() / name).as_uri()  # a database store would default to ./mlruns
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our lookup and create
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as MLflow params (`section.key`); a store URI's password is hidden (MLflow shows params to
    anyone who can read the experiment)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
            continue
        value = value if not isinstance(value, list) else ",".join(map(str, value))
        out[name] = redact_uri(value) if isinstance(value, str) else value
    return out


def code_version() -> dict[str, str]:
    """The git commit of the code that ran, and whether the work tree had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def library_versions(names: tuple[str, ...] = LINEAGE_LIBRARIES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[f"versions.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def model_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def log_classifier(model, tokenizer, example: list[str], name: str = "model"):
    """Log a sequence classifier with the transformers flavour (safetensors) into the active run."""
    import logging

    import mlflow

    # For a local base model mlflow warns that the hub's model card and licence cannot be fetched; that is
    # expected offline and says nothing about our model, so only errors get through while logging.
    flavor_logger = logging.getLogger("mlflow.transformers")
    level = flavor_logger.level
    flavor_logger.setLevel(logging.ERROR)
    try:
        # A {"model", "tokenizer"} dict, not a path: mlflow 3.17 with transformers 5.23 fails on a path.
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=name,
            task="text-classification",
            input_example=example,
            pip_requirements=model_requirements(),  # mlflow's defaults would add torchvision, which we lack
        )
    finally:
        flavor_logger.setLevel(level)
