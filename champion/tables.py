"""Tables as they are on disk (CSV, JSONL, Parquet) or on the hub, and the hashes that identify them.

Every floor reads files through here: the data pipelines, a drift check of a file, a comparison's labelled
set. `file_sha256` identifies raw bytes; `content_sha256` the (text, label) rows a model sees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from champion.errors import ChampionError

FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _format_of(source: str, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = Path(source).suffix.lower()
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    if Path(source).exists():
        raise ChampionError(
            f"data.source: cannot tell the format of '{source}' from its suffix; "
            f"set data.format to csv, jsonl or parquet."
        )
    return "hub"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(*frames: pd.DataFrame) -> str:
    """A hash of what the model sees: (text, label) rows, independent of file format and dtypes."""
    digest = hashlib.sha256()
    for frame in frames:
        for text, label in zip(frame["text"], frame["label"], strict=True):
            digest.update(json.dumps([text, label], ensure_ascii=False).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def read_table(
    source: str, fmt: str = "auto", hub_split: str = "train", field: str = "data.source"
) -> pd.DataFrame:
    """Read a table as it is on disk (or on the hub); errors name `field`."""
    fmt = _format_of(source, fmt)
    if fmt == "hub":
        return _read_hub(source, hub_split, field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ChampionError(
            f"{field}: file '{source}' does not exist; point {field} at a CSV, JSONL or Parquet file "
            f"or a hub dataset name."
        )
    try:
        if fmt == "csv":
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False, convert_dates=False)
        return pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError) as err:
        if isinstance(err, pd.errors.EmptyDataError):
            raise ChampionError(
                f"{field}: '{source}' is empty; it needs a header and labelled rows."
            ) from None
        raise ChampionError(
            f"{field}: '{source}' could not be read as {fmt} ({err}); fix the file."
        ) from None


def _read_hub(name: str, split: str, field: str) -> pd.DataFrame:
    from datasets import load_dataset  # heavy; only online users of hub names need it

    try:
        return load_dataset(name, split=split).to_pandas()
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        raise ChampionError(
            f"{field}: '{name}' is not a local file and could not be loaded from the hub "
            f"({type(err).__name__}); check the path or name, or go online."
        ) from None
