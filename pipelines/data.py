"""Labelled text data: load it (champion/tables.py reads and hashes files), clean it, split it stratified, and
rebuild the rows any registered version was trained on from its lineage (`training_data`)."""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import Field, model_validator

from champion.config import StrictModel, parse_config
from champion.errors import ChampionError
from champion.formats import SOURCE_TAG, VARIANT_TAG, format_of
from champion.registry import TASK_TAG, TEXT_GENERATION, model_version
from champion.tables import content_sha256, file_sha256, read_table

# The rows a retrain added to its source's training split (fresh labels, repeats included, in order), kept in
# the retrained version's run, and their content sha256 on the version: with the recorded config they rebuild
# its training data exactly.
EXTRA_ROWS_ARTIFACT = "lineage/extra_train.jsonl"
EXTRA_ROWS_TAG = "retrain.extra_rows_sha256"


class DataConfig(StrictModel):
    source: str  # a .csv/.jsonl/.parquet file, or a `datasets` hub name such as "PolyAI/banking77"
    format: Literal["auto", "csv", "jsonl", "parquet", "hub"] = "auto"
    hub_split: str = "train"
    test_source: str | None = None  # a fixed test set; without it the test split is cut from `source`
    text_column: str = "text"
    label_column: str = "label"
    validation_size: float = Field(0.1, gt=0, lt=1)
    test_size: float = Field(0.1, gt=0, lt=1)
    seed: int = 42
    max_rows: int | None = Field(None, gt=0)  # stratified subsample of `source`, for quick runs

    @model_validator(mode="after")
    def _sizes_leave_training_rows(self) -> DataConfig:
        if self.validation_size + self.test_size >= 0.9:
            raise ValueError("validation_size + test_size must stay below 0.9 to leave rows for training")
        return self


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    sha256: str  # of the canonical (text, label) content of every row used, in split order
    file_sha256: dict[str, str]  # of the raw source files, where the data came from files
    extra_rows: int = 0  # the last `extra_rows` rows of `train` were added to what the source splits into


def load_labelled(cfg: DataConfig, source: str, field: str) -> pd.DataFrame:
    """Read `source` and return clean `text`/`label` string columns, with blank rows dropped."""
    raw = read_table(source, cfg.format if source == cfg.source else "auto", cfg.hub_split, field)
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in raw.columns:
            columns = ", ".join(map(str, raw.columns)) or "none"
            raise ChampionError(
                f"data.{key}: column '{column}' is not in '{source}' (columns: {columns}); "
                f"set data.{key} to one of them."
            )
    return clean_labelled(pd.DataFrame({"text": raw[cfg.text_column], "label": raw[cfg.label_column]}),
                          field, source)  # fmt: skip


def clean_labelled(frame: pd.DataFrame, field: str, source: str) -> pd.DataFrame:
    """`text` and `label` as stripped strings, rows missing either dropped; none left is an error naming
    `field` and `source`."""
    frame = frame[["text", "label"]].dropna()
    frame = frame.assign(
        text=frame["text"].astype(str).str.strip(), label=frame["label"].astype(str).str.strip()
    )
    frame = frame[(frame["text"] != "") & (frame["label"] != "")].reset_index(drop=True)
    if frame.empty:
        raise ChampionError(
            f"{field}: '{source}' has no rows with both a text and a label; add labelled rows."
        )
    return frame


def stratified_cut(frame: pd.DataFrame, sizes: list[float], seed: int) -> list[pd.DataFrame]:
    """Cut each class into len(sizes)+1 parts (the first gets the rest), each part at least one row."""
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(len(sizes) + 1)]
    for _, group in sorted(frame.groupby("label").groups.items()):
        idx = list(group)
        rng.shuffle(idx)
        start = len(idx)
        for i, size in enumerate(sizes, start=1):
            n = max(1, round(len(idx) * size))
            parts[i].extend(idx[start - n : start])
            start -= n
        parts[0].extend(idx[:start])
    out = []
    for part in parts:
        rng.shuffle(part)
        out.append(frame.loc[part].reset_index(drop=True))
    return out


def _require_rows_per_class(frame: pd.DataFrame, minimum: int, source: str) -> None:
    counts = frame["label"].value_counts()
    small = counts[counts < minimum]
    if not small.empty:
        label, n = small.index[0], int(small.iloc[0])
        raise ChampionError(
            f"data.label_column: class '{label}' in '{source}' has only {n} row(s) but needs at least "
            f"{minimum} to appear in every split; add rows for it or drop the class"
            + (f" ({len(small)} classes are that small)." if len(small) > 1 else ".")
        )


def load_splits(cfg: DataConfig) -> Splits:
    """Load `cfg.source` (and `cfg.test_source`) into stratified, seeded train/validation/test splits."""
    frame = load_labelled(cfg, cfg.source, "data.source")
    if cfg.max_rows is not None and len(frame) > cfg.max_rows:
        frame = stratified_cut(frame, [cfg.max_rows / len(frame)], cfg.seed)[1]
    if cfg.test_source is None:
        _require_rows_per_class(frame, 3, cfg.source)
        train, validation, test = stratified_cut(frame, [cfg.validation_size, cfg.test_size], cfg.seed)
    else:
        _require_rows_per_class(frame, 2, cfg.source)
        train, validation = stratified_cut(frame, [cfg.validation_size], cfg.seed)
        test = load_labelled(cfg, cfg.test_source, "data.test_source")
        unknown = sorted(set(test["label"]) - set(train["label"]))
        if unknown:
            raise ChampionError(
                f"data.test_source: labels {unknown[:5]} never occur in data.source, so no model can predict "
                f"them; remove those rows or add training rows for them."
            )
    files = {}
    for key, source in (("source", cfg.source), ("test_source", cfg.test_source)):
        if source is not None and Path(source).is_file():
            files[key] = file_sha256(source)
    return Splits(
        train=train,
        validation=validation,
        test=test,
        labels=sorted(frame["label"].unique()),
        sha256=content_sha256(train, validation, test),
        file_sha256=files,
    )


def with_extra_training_rows(splits: Splits, extra: pd.DataFrame) -> Splits:
    """`splits` with `extra` (text, label) rows added to the training split only; validation and test stay
    as they were, so metrics remain comparable with the version trained without them. New labels join the
    label set. `sha256` covers the extra rows too."""
    extra = extra[["text", "label"]].astype(str).reset_index(drop=True)
    train = pd.concat([splits.train, extra], ignore_index=True)
    return Splits(
        train=train,
        validation=splits.validation,
        test=splits.test,
        labels=sorted(set(splits.labels) | set(extra["label"])),
        sha256=content_sha256(train, splits.validation, splits.test),
        file_sha256=splits.file_sha256,
        extra_rows=splits.extra_rows + len(extra),
    )


def without_extra_rows(splits: Splits) -> tuple[Splits, pd.DataFrame]:
    """The inverse of `with_extra_training_rows`: what the source alone splits into, and the rows added to it
    (text, label, in order)."""
    keep = len(splits.train) - splits.extra_rows
    train, extra = splits.train.iloc[:keep].reset_index(drop=True), splits.train.iloc[keep:]
    labels = set(train["label"]) | set(splits.validation["label"]) | set(splits.test["label"])
    source = Splits(
        train=train,
        validation=splits.validation,
        test=splits.test,
        labels=sorted(labels),
        sha256=content_sha256(train, splits.validation, splits.test),
        file_sha256=splits.file_sha256,
    )
    return source, extra[["text", "label"]].reset_index(drop=True)


def extra_rows_text(rows: pd.DataFrame) -> str:
    """`rows` (text, label) as the JSON lines of the EXTRA_ROWS_ARTIFACT that `training_data` reads."""
    pairs = zip(rows["text"], rows["label"], strict=True)
    return "".join(json.dumps([text, label], ensure_ascii=False) + "\n" for text, label in pairs)


def training_data(
    reg, name: str, version: str, *, unrecorded: Literal["refuse", "source"] = "refuse"
) -> Splits:
    """The exact train / validation / test rows `name` v`version` was trained and judged on, rebuilt from its
    lineage and checked against the hashes recorded with it.

    A fine-tuned version: what the `data` of its run's config.yaml splits into (its files checked against
    their recorded sha256). A retrained one: that, plus the rows its retrain added (its fresh labels and those
    it kept from its parent), read back from its run. A distilled student: its teacher's rows (or the file it
    was distilled on); an int8 / ONNX variant: its source's. `unrecorded="source"` returns what the source
    alone splits into for a version retrained before its added rows were recorded, instead of refusing it.
    """
    mv = model_version(reg, name, version)
    tags = dict(mv.tags)
    what = f"v{version} of '{name}'"
    if tags.get(TASK_TAG) == TEXT_GENERATION:
        raise ChampionError(
            f"{what} is a text-generation version (champion sft): its (message, answer) rows are not a "
            "classifier's; pipelines.sft.load_reply_splits rebuilds them from the `data` of its run's "
            "config.yaml (checked against its data_sha256 tag)."
        )
    if format_of(tags) != "safetensors":  # int8 / ONNX: built from its source, trained on nothing new
        splits = training_data(reg, name, _source(tags, what), unrecorded=unrecorded)
    elif tags.get(VARIANT_TAG) == "student":
        distilled = _run_yaml(reg, mv.run_id, "config.yaml", what)
        if distilled.get("data") is None:  # trained on its teacher's rows
            splits = training_data(reg, name, _source(tags, what), unrecorded=unrecorded)
        else:  # on `data`, split as the teacher's recipe says (its data.source replaced by `data`)
            teacher_recipe = _run_yaml(reg, mv.run_id, "teacher_config.yaml", what)
            splits = _source_splits(teacher_recipe, tags, name, version)
    else:
        splits = _source_splits(_run_yaml(reg, mv.run_id, "config.yaml", what), tags, name, version)
        extra = _extra_rows(reg, mv.run_id, tags, what, unrecorded)
        if extra is None and "retrain.parent_version" in tags:
            return splits  # unrecorded="source": what its source alone splits into, checked above
        if extra is not None:
            splits = with_extra_training_rows(splits, extra)
    recorded = tags.get("data_sha256")
    if recorded and splits.sha256 != recorded:
        raise ChampionError(
            f"the rows rebuilt from {what}'s lineage are not the ones it was trained on (content sha256 "
            f"{recorded[:12]} recorded, {splits.sha256[:12]} rebuilt); pass --data FILE with its rows."
        )
    return splits


def _source(tags: dict[str, str], what: str) -> str:
    if not tags.get(SOURCE_TAG):
        raise ChampionError(
            f"{what} is a variant without a '{SOURCE_TAG}' tag, so the version it was made from is unknown; "
            "pass --data FILE with the labelled rows to use."
        )
    return tags[SOURCE_TAG]


def _run_text(reg, run_id: str, path: str) -> str:
    """The text of artifact `path` of run `run_id`, read through the registry's own client."""
    with tempfile.TemporaryDirectory(prefix="champion-lineage-") as tmp:
        return Path(reg.client.download_artifacts(run_id, path, tmp)).read_text(encoding="utf-8")


def _run_yaml(reg, run_id: str, path: str, what: str) -> dict:
    try:
        return yaml.safe_load(_run_text(reg, run_id, path)) or {}
    except Exception:
        raise ChampionError(
            f"{what} has no recorded {path} in its run (registered outside Champion?), so the rows it was "
            "trained on cannot be rebuilt; pass --data FILE with the labelled rows to use."
        ) from None


def _source_splits(recipe: dict, tags: dict[str, str], name: str, version: str) -> Splits:
    """What the recipe's `data` splits into, its files checked against the sha256 recorded with the
    version."""
    what = f"v{version} of '{name}'"
    cfg = parse_config(DataConfig, recipe.get("data") or {}, source=f"the data of {what}'s recorded config")
    for key, source in (("source", cfg.source), ("test_source", cfg.test_source)):
        recorded = tags.get(f"data_file_sha256.{key}")
        if not recorded or source is None:
            continue
        if not Path(source).is_file():
            raise ChampionError(
                f"{what} was trained on '{source}', which is gone; put it back, or pass --data FILE to train "
                "on another file."
            )
        now = file_sha256(source)
        if now != recorded:
            raise ChampionError(
                f"'{source}' changed since v{version} was trained on it (sha256 {recorded[:12]} recorded, "
                f"{now[:12]} now); restore it, or pass --data FILE to train on it as it is."
            )
    splits = load_splits(cfg)
    # Versions from before `source_data_sha256` existed were trained on their source alone.
    recorded = tags.get("source_data_sha256") or tags.get("data_sha256")
    if recorded and splits.sha256 != recorded:
        raise ChampionError(
            f"{what}'s data no longer splits into the rows it was trained on (content sha256 {recorded[:12]} "
            f"recorded, {splits.sha256[:12]} now); pass --data FILE."
        )
    return splits


def _extra_rows(reg, run_id: str, tags: dict[str, str], what: str, unrecorded: str) -> pd.DataFrame | None:
    """The rows a retrain added to the version's source splits; None for a version that is no retrain."""
    if "retrain.parent_version" not in tags:
        return None
    recorded = tags.get(EXTRA_ROWS_TAG)
    if recorded is None:
        if unrecorded == "source":
            return None
        raise ChampionError(
            f"{what} was retrained on {tags.get('retrain.fresh_train_rows', 'some')} fresh rows that were "
            f"not recorded with it (it predates {EXTRA_ROWS_ARTIFACT}), so its training rows cannot be "
            "rebuilt; pass --data FILE with the rows to use, or use a version retrained since."
        )
    try:
        text = _run_text(reg, run_id, EXTRA_ROWS_ARTIFACT)
    except Exception:
        raise ChampionError(
            f"{what}'s fresh training rows ({EXTRA_ROWS_ARTIFACT} in run {run_id}) are missing (the retrain "
            "stopped before writing them?), so its training rows cannot be rebuilt; pass --data FILE."
        ) from None
    rows = pd.DataFrame([json.loads(line) for line in text.splitlines() if line], columns=["text", "label"])
    now = content_sha256(rows)
    if now != recorded:
        raise ChampionError(
            f"{EXTRA_ROWS_ARTIFACT} in run {run_id} changed since {what} was trained on it (sha256 "
            f"{recorded[:12]} recorded, {now[:12]} now); restore it, or pass --data FILE."
        )
    return rows
