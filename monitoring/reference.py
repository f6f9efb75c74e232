"""The monitoring reference of a model version: held-out rows as that version saw them.

Built at fine-tune time from the validation and test rows (never training rows, whose confidences are
inflated) and logged with the run under `monitoring/reference/`; the version's tag `monitoring.reference`
points at it, so the drift job finds the served version's reference from the registry alone. For a version
registered before this existed, `champion monitor reference NAME VERSION --data FILE` builds one.

Each row keeps its text, true label, predicted label, top probability, token count and share of unknown
tokens, whether its text occurs in the training data, its full probability vector and its mean-pooled
embedding from the version's own encoder. A fingerprint of every training text is kept beside them (8
bytes a text), for the share of production texts never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from champion.errors import ChampionError
from champion.repair import process_tags

if TYPE_CHECKING:
    import pandas as pd

REFERENCE_TAG = "monitoring.reference"  # version tag: the artifact URI of its reference
ARTIFACT_PATH = "monitoring/reference"
FORMAT_VERSION = 1


@dataclass
class Reference:
    labels: list[str]  # the version's classes, in the order of its probability vectors
    rows: pd.DataFrame  # text, label, pred_label, confidence, tokens, unk_share, seen_in_training, split
    probs: np.ndarray  # (rows, classes) float32
    embeddings: np.ndarray  # (rows, hidden) float32
    train_fingerprints: np.ndarray | None  # sorted uint64 fingerprints of the training texts, if known
    meta: dict[str, Any] = field(default_factory=dict)
    # Null distributions already computed, by (check, window rows, ...): a scheduled job checks windows of
    # the same size again and again, and the null depends only on the reference and that size.
    nulls: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def accuracy(self) -> float:
        return float((self.rows["label"] == self.rows["pred_label"]).mean())


def fingerprint(texts) -> np.ndarray:
    """8-byte fingerprints of texts after the normalisation any two equal tickets share (case, spaces)."""
    out = np.empty(len(texts), dtype=np.uint64)
    for i, text in enumerate(texts):
        norm = " ".join(str(text).lower().split())
        out[i] = int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")
    return out


def seen_in(fingerprints: np.ndarray, known: np.ndarray | None) -> np.ndarray | None:
    """For each fingerprint, whether it is among the sorted `known` ones (None when unknown)."""
    if known is None:
        return None
    if known.size == 0:
        return np.zeros(len(fingerprints), dtype=bool)
    pos = np.clip(np.searchsorted(known, fingerprints), 0, known.size - 1)
    return known[pos] == fingerprints


def build_reference(
    model, held_out: pd.DataFrame, train_texts=None, meta: dict[str, Any] | None = None
) -> Reference:
    """Score `held_out` (columns text, label and optionally split) with `model` (a serving LoadedModel)."""
    import pandas as pd

    if held_out.empty:
        raise ChampionError("the reference needs held-out rows with a text and a label; none were given.")
    texts = list(held_out["text"].astype(str))
    seen = model.describe(texts)
    probs = seen["probs"]
    best = probs.argmax(axis=1)
    known = np.unique(fingerprint(train_texts)) if train_texts is not None else None
    in_training = seen_in(fingerprint(texts), known)
    rows = pd.DataFrame(
        {
            "text": texts,
            "label": held_out["label"].astype(str).to_numpy(),
            "pred_label": [model.labels[i] for i in best],
            "confidence": probs[np.arange(len(best)), best].astype(np.float32),
            "tokens": seen["tokens"],
            "unk_share": seen["unk_share"],
            "seen_in_training": in_training if in_training is not None else np.zeros(len(texts), bool),
            "split": held_out["split"].to_numpy() if "split" in held_out else "held_out",
        }
    )
    info = {
        "format": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": len(rows),
        "labels": list(model.labels),
        "max_tokens": model.max_tokens,
        "training_fingerprints": known is not None,
        "accuracy": float((rows["label"] == rows["pred_label"]).mean()),
        **(meta or {}),
    }
    return Reference(list(model.labels), rows, probs.astype(np.float32), seen["embeddings"], known, info)


def save_reference(ref: Reference, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ref.rows.to_parquet(folder / "rows.parquet", index=False)
    np.save(folder / "probs.npy", ref.probs.astype(np.float16))
    np.save(folder / "embeddings.npy", ref.embeddings.astype(np.float16))
    if ref.train_fingerprints is not None:
        np.save(folder / "train_fingerprints.npy", ref.train_fingerprints)
    (folder / "meta.json").write_text(json.dumps(ref.meta, indent=2, sort_keys=True))
    return folder


def read_reference(folder: Path) -> Reference:
    import pandas as pd

    meta = json.loads((folder / "meta.json").read_text())
    fingerprints = folder / "train_fingerprints.npy"
    return Reference(
        labels=list(meta["labels"]),
        rows=pd.read_parquet(folder / "rows.parquet"),
        probs=np.load(folder / "probs.npy").astype(np.float32),
        embeddings=np.load(folder / "embeddings.npy").astype(np.float32),
        train_fingerprints=np.load(fingerprints) if fingerprints.exists() else None,
        meta=meta,
    )


def log_reference(ref: Reference) -> str:
    """Log `ref` into the active MLflow run; returns the URI to put on the version's REFERENCE_TAG."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(save_reference(ref, Path(tmp) / "reference")), ARTIFACT_PATH)
    return f"runs:/{mlflow.active_run().info.run_id}/{ARTIFACT_PATH}"


def load_reference(reg, name: str, version: str, cache: Path | None = None) -> Reference:
    """The reference of `name` v`version`, found through its registry tag (downloaded once, then cached)."""
    import mlflow

    from champion.config import champion_home
    from champion.registry import TASK_TAG, TEXT_GENERATION

    mv = reg.client.get_model_version(name, str(version))
    if mv.tags.get(TASK_TAG) == TEXT_GENERATION:
        raise ChampionError(
            f"version {version} of '{name}' is a text-generation model: its reference is its held-out "
            "answers (monitoring.lm_drift.load_lm_reference), which `champion drift` reads itself."
        )
    uri = mv.tags.get(REFERENCE_TAG)
    if not uri:
        raise ChampionError(
            f"version {version} of '{name}' has no monitoring reference (tag {REFERENCE_TAG}); build one "
            f"from held-out labelled rows with `champion monitor reference {name} {version} --data FILE`."
        )
    folder = (cache or champion_home() / "cache" / "reference") / name / str(version)
    stamp = folder / "source.txt"
    if not (stamp.exists() and stamp.read_text() == uri):
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            except Exception as err:
                raise ChampionError(
                    f"the monitoring reference of '{name}' v{version} ({uri}) could not be read ({err}); "
                    f"rebuild it with `champion monitor reference {name} {version} --data FILE`."
                ) from None
            local.rename(folder)
        stamp.write_text(uri)
    return read_reference(folder)


def reference_for_version(
    reg, name: str, version: str, data: pd.DataFrame, train_texts=None, source: str = ""
) -> Reference:
    """Build, log and tag the reference of an already registered version (`champion monitor reference`)."""
    import mlflow

    from champion import tracking
    from serving.model import load_version

    model = load_version(reg.client, name, version)
    ref = build_reference(
        model, data, train_texts, meta={"model": name, "version": str(version), "source": source}
    )
    experiment = tracking.ensure_experiment("champion-monitoring")
    with mlflow.start_run(
        experiment_id=experiment, run_name=f"reference-{name}-v{version}", tags=process_tags()
    ):
        mlflow.set_tags({"model": name, "version": str(version), "kind": "reference"})
        uri = log_reference(ref)
    reg.client.set_model_version_tag(name, str(version), REFERENCE_TAG, uri)
    return ref
