"""Loading, hashing and splitting labelled text data."""

from __future__ import annotations

import pandas as pd
import pytest

from champion.errors import ChampionError
from pipelines.data import DataConfig, load_splits
from pipelines.ticketgen import generate_tickets


@pytest.fixture
def frame() -> pd.DataFrame:
    return generate_tickets(600, seed=5).rename(columns={"text": "body", "label": "intent"})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_formats_give_the_same_content_and_hash(tmp_path, frame, suffix):
    path = tmp_path / f"data{suffix}"
    {
        ".csv": lambda p: frame.to_csv(p, index=False),
        ".jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
        ".parquet": lambda p: frame.to_parquet(p),
    }[suffix](path)
    reference = tmp_path / "ref.csv"
    frame.to_csv(reference, index=False)
    splits = load_splits(DataConfig(source=str(path), text_column="body", label_column="intent"))
    ref = load_splits(DataConfig(source=str(reference), text_column="body", label_column="intent"))
    assert splits.sha256 == ref.sha256 and len(splits.sha256) == 64
    assert (
        splits.file_sha256["source"] != ""
        and len(splits.train) + len(splits.validation) + len(splits.test) == 600
    )


def test_split_is_stratified_seeded_and_disjoint(tmp_path, frame):
    # The generator repeats some texts; a row number in each makes every row recognisable after the split.
    frame = frame.assign(body=[f"{text} (row {i})" for i, text in enumerate(frame["body"])])
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    cfg = DataConfig(
        source=str(path),
        text_column="body",
        label_column="intent",
        validation_size=0.15,
        test_size=0.15,
        seed=1,
    )
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.sha256 == b.sha256 and a.train.equals(b.train)
    c = load_splits(cfg.model_copy(update={"seed": 2}))
    assert c.sha256 != a.sha256
    for split in (a.train, a.validation, a.test):
        assert set(split["label"]) == set(a.labels)  # every class in every split
    assert abs(len(a.test) / 600 - 0.15) < 0.03
    assert len(a.train) + len(a.validation) + len(a.test) == 600
    texts = [set(s["text"]) for s in (a.train, a.validation, a.test)]
    assert sum(map(len, texts)) == 600, "a row appears twice, within a split or across splits"
    train, validation, test = texts
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert set().union(*texts) == set(frame["body"])  # nothing lost, nothing invented


def test_max_rows_subsamples_every_class(tmp_path, frame):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    splits = load_splits(
        DataConfig(source=str(path), text_column="body", label_column="intent", max_rows=200)
    )
    total = len(splits.train) + len(splits.validation) + len(splits.test)
    assert 180 <= total <= 220 and set(splits.test["label"]) == set(frame["intent"])


def test_fixed_test_source(tmp_path, frame):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    frame.iloc[:500].to_csv(train, index=False)
    frame.iloc[500:].to_csv(test, index=False)
    splits = load_splits(
        DataConfig(source=str(train), test_source=str(test), text_column="body", label_column="intent")
    )
    assert len(splits.test) == 100 and len(splits.train) + len(splits.validation) == 500
    assert set(splits.file_sha256) == {"source", "test_source"}


def test_blank_rows_are_dropped(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame(
        {
            "text": ["a b", "", "c d", None, "e f", "g h", "i j", "k l"],
            "label": ["x", "x", "x", "y", "x", "y", "y", "y"],
        }
    ).to_csv(path, index=False)
    splits = load_splits(DataConfig(source=str(path)))
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 6


@pytest.mark.parametrize(
    ("content", "overrides", "message"),
    [
        ("text,label\n", {}, "has no rows with both a text and a label"),
        ("", {}, "is empty"),
        ("body,label\nhi,a\n", {}, "data.text_column: column 'text' is not in .* \\(columns: body, label\\)"),
        ("text,label\n" + "a,x\nb,x\nc,x\nd,y\n", {}, "class 'y' .* has only 1 row"),
        ("text,label\na,x\n", {"source": "missing.csv"}, "data.source: file 'missing.csv' does not exist"),
    ],
)
def test_bad_data_is_one_clear_sentence(tmp_path, monkeypatch, content, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(ChampionError, match=message):
        load_splits(DataConfig(**{"source": "d.csv", **overrides}))


def test_unknown_suffix_of_existing_file_asks_for_format(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\n")
    with pytest.raises(ChampionError, match="set data.format"):
        load_splits(DataConfig(source=str(path)))


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ChampionError, match="data.source: 'no-org/no-dataset' is not a local file"):
        load_splits(DataConfig(source="no-org/no-dataset"))
