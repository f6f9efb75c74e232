"""Labelled text data: load it (champion/tables.py reads and hashes files), clean it, split it stratified."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from champion.config import StrictModel
from champion.errors import ChampionError
from champion.tables import content_sha256, file_sha256, read_table


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
    )
