"""Behaviour of the built-in support-ticket generator (pipelines.ticketgen)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pipelines import ticketgen
from pipelines.ticketgen import INTENTS, generate_tickets, write_tickets


def _words(texts: pd.Series) -> list[str]:
    return [word for text in texts for word in re.findall(r"[a-z]+", text.lower())]


def _oov_share(texts: pd.Series, vocabulary: set[str]) -> float:
    words = _words(texts)
    return sum(word not in vocabulary for word in words) / len(words)


def test_intents_are_many_unique_snake_case_names() -> None:
    assert len(INTENTS) >= 16
    assert len(set(INTENTS)) == len(INTENTS)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", name) for name in INTENTS)
    for pair in [("refund_request", "billing_dispute"), ("cancel_order", "subscription_cancel")]:
        assert set(pair) <= set(INTENTS)


def test_each_intent_has_at_least_eight_distinct_templates() -> None:
    for name in INTENTS:
        assert len(set(ticketgen._TEMPLATES[name])) >= 8, name


def test_same_arguments_give_identical_frames() -> None:
    kwargs = {"seed": 7, "typo_rate": 0.1, "vocabulary_shift": 0.4, "label_weights": {"track_order": 3.0}}
    pd.testing.assert_frame_equal(generate_tickets(500, **kwargs), generate_tickets(500, **kwargs))


def test_output_does_not_depend_on_hash_randomisation() -> None:
    script = (
        "import hashlib; from pipelines.ticketgen import generate_tickets; "
        "f = generate_tickets(200, seed=3, typo_rate=0.2, vocabulary_shift=0.5); "
        "print(hashlib.sha256(f.to_csv(index=False).encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, check=True
        )
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def test_different_seeds_give_different_frames() -> None:
    a, b = generate_tickets(300, seed=1), generate_tickets(300, seed=2)
    assert (a["text"] != b["text"]).mean() > 0.9


@pytest.mark.parametrize("n_rows", [1, 7, 19, 500])
def test_columns_row_count_and_values(n_rows: int) -> None:
    frame = generate_tickets(n_rows)
    assert list(frame.columns) == ["text", "label"]
    assert len(frame) == n_rows
    assert set(frame["label"]) <= set(INTENTS)
    assert all(isinstance(text, str) and text.strip() and "\n" not in text for text in frame["text"])


def test_every_intent_appears_with_default_arguments() -> None:
    counts = generate_tickets(2000)["label"].value_counts()
    assert set(counts.index) == set(INTENTS)
    assert counts.min() >= 3


def test_one_row_per_intent_when_rows_equal_intents() -> None:
    frame = generate_tickets(len(INTENTS), seed=3)
    assert sorted(frame["label"]) == sorted(INTENTS)


def test_fewer_rows_than_intents_gives_distinct_labels() -> None:
    frame = generate_tickets(5, seed=4)
    assert frame["label"].nunique() == 5


def test_requested_intents_present_and_no_others() -> None:
    chosen = ["refund_request", "track_order", "reset_password", "wrong_item"]
    frame = generate_tickets(200, intents=chosen)
    assert set(frame["label"]) == set(chosen)


def test_held_out_intents_are_absent() -> None:
    held_out = {"close_account", "promo_code_issue", "invoice_request"}
    frame = generate_tickets(1000, intents=[name for name in INTENTS if name not in held_out])
    assert not held_out & set(frame["label"])
    assert len(set(frame["label"])) == len(INTENTS) - len(held_out)


def test_intent_order_and_duplicates_do_not_change_output() -> None:
    a = generate_tickets(100, intents=["track_order", "cancel_order"])
    b = generate_tickets(100, intents=["cancel_order", "track_order", "cancel_order"])
    pd.testing.assert_frame_equal(a, b)


def test_label_weight_makes_intent_clearly_most_frequent() -> None:
    counts = generate_tickets(2000, label_weights={"refund_request": 5.0})["label"].value_counts()
    assert counts.index[0] == "refund_request"
    assert counts.iloc[0] > 3 * counts.iloc[1]


def test_tiny_weight_still_gets_the_minimum_rows() -> None:
    counts = generate_tickets(200, label_weights={"close_account": 1e-6})["label"].value_counts()
    assert counts["close_account"] == 3


def test_zero_weight_excludes_an_intent() -> None:
    frame = generate_tickets(500, label_weights={"damaged_item": 0.0})
    assert "damaged_item" not in set(frame["label"])
    assert len(set(frame["label"])) == len(INTENTS) - 1


def test_typos_perturb_the_same_tickets() -> None:
    clean = generate_tickets(1000, seed=1, typo_rate=0.0)
    noisy = generate_tickets(1000, seed=1, typo_rate=0.3)
    assert clean["label"].equals(noisy["label"])
    assert (clean["text"] != noisy["text"]).mean() > 0.5
    for before, after in zip(clean["text"], noisy["text"], strict=True):
        # Odd items are letter runs, even items what lies between them.
        before_parts, after_parts = re.split(r"([A-Za-z]+)", before), re.split(r"([A-Za-z]+)", after)
        # Typos edit letters inside words: never punctuation, digits or the number of words.
        assert len(before_parts) == len(after_parts)
        assert before_parts[::2] == after_parts[::2]
        assert all(
            abs(len(x) - len(y)) <= 1 for x, y in zip(before_parts[1::2], after_parts[1::2], strict=True)
        )


def test_zero_typo_rate_adds_no_unknown_words_while_typos_do() -> None:
    vocabulary = set(_words(generate_tickets(2000, seed=0, typo_rate=0.0)["text"]))
    clean = _oov_share(generate_tickets(1000, seed=1, typo_rate=0.0)["text"], vocabulary)
    noisy = _oov_share(generate_tickets(1000, seed=1, typo_rate=0.3)["text"], vocabulary)
    assert clean < 0.01
    assert noisy > 0.1


def test_vocabulary_shift_changes_words_but_not_labels() -> None:
    vocabulary = set(_words(generate_tickets(2000, seed=0, typo_rate=0.0)["text"]))
    base = generate_tickets(1000, seed=1, typo_rate=0.0)
    shifted = generate_tickets(1000, seed=1, typo_rate=0.0, vocabulary_shift=1.0)
    assert base["label"].equals(shifted["label"])
    assert (base["text"] != shifted["text"]).mean() > 0.7
    base_oov, shifted_oov = _oov_share(base["text"], vocabulary), _oov_share(shifted["text"], vocabulary)
    assert shifted_oov > 0.08
    assert shifted_oov > 5 * base_oov
    slang = Counter(_words(shifted["text"]))
    assert all(slang[word] > 0 and word not in vocabulary for word in ("pls", "acct", "pkg", "u"))


def test_partial_vocabulary_shift_sits_between_none_and_full() -> None:
    vocabulary = set(_words(generate_tickets(2000, seed=0, typo_rate=0.0)["text"]))
    shares = [
        _oov_share(generate_tickets(800, seed=2, typo_rate=0.0, vocabulary_shift=s)["text"], vocabulary)
        for s in (0.0, 0.5, 1.0)
    ]
    assert shares[0] < shares[1] < shares[2]


def test_texts_are_diverse() -> None:
    frame = generate_tickets(2000, seed=5)
    assert frame["text"].nunique() >= 0.8 * len(frame)
    assert frame["text"].str.islower().mean() > 0.1  # some tickets are typed all lowercase
    assert frame["text"].str.split().str.len().max() >= 30  # long multi-sentence messages exist
    assert frame["text"].str.split().str.len().min() <= 4  # and terse one-liners


def test_ten_thousand_rows_are_fast() -> None:
    start = time.perf_counter()
    generate_tickets(10_000, seed=1, typo_rate=0.05, vocabulary_shift=0.3)
    assert time.perf_counter() - start < 5.0  # target is well under 2 s; slack for shared CI machines


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_write_tickets_round_trips(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / "nested" / "dir" / f"tickets{suffix}"
    returned = write_tickets(target, 300, seed=9, typo_rate=0.1, vocabulary_shift=0.5)
    assert returned == target
    assert target.is_file()
    expected = generate_tickets(300, seed=9, typo_rate=0.1, vocabulary_shift=0.5)
    pd.testing.assert_frame_equal(_read(target), expected)


def test_write_tickets_jsonl_has_one_object_per_line(tmp_path: Path) -> None:
    target = write_tickets(tmp_path / "t.jsonl", 25, seed=2)
    lines = target.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25
    assert all(set(json.loads(line)) == {"text", "label"} for line in lines)


@pytest.mark.parametrize("name", ["tickets.txt", "tickets.json.gz", "tickets"])
def test_write_tickets_rejects_unknown_suffix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        write_tickets(tmp_path / "out" / name, 10)
    message = str(excinfo.value)
    assert Path(name).suffix in message
    assert all(allowed in message for allowed in (".csv", ".jsonl", ".parquet"))
    assert not (tmp_path / "out").exists()


def test_write_tickets_validates_before_creating_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="typo_rate"):
        write_tickets(tmp_path / "out" / "t.csv", 10, typo_rate=2.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n_rows": 0}, "n_rows"),
        ({"n_rows": -5}, "n_rows"),
        ({"intents": []}, "intents"),
        ({"intents": "refund_request"}, "intents"),
        ({"intents": ["refund_request", "teleport_parcel"]}, "intents"),
        ({"label_weights": {"teleport_parcel": 1.0}}, "label_weights"),
        ({"label_weights": {"refund_request": -1.0}}, "label_weights"),
        ({"label_weights": {"refund_request": math.nan}}, "label_weights"),
        ({"label_weights": dict.fromkeys(INTENTS, 0.0)}, "label_weights"),
        ({"intents": ["refund_request"], "label_weights": {"cancel_order": 2.0}}, "label_weights"),
        ({"typo_rate": -0.1}, "typo_rate"),
        ({"typo_rate": 1.5}, "typo_rate"),
        ({"typo_rate": math.nan}, "typo_rate"),
        ({"vocabulary_shift": -1.0}, "vocabulary_shift"),
        ({"vocabulary_shift": 1.01}, "vocabulary_shift"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        generate_tickets(**kwargs)


def test_unknown_intent_names_are_listed_with_the_choices() -> None:
    with pytest.raises(ValueError) as excinfo:
        generate_tickets(10, intents=["refund_request", "teleport_parcel"])
    assert "teleport_parcel" in str(excinfo.value)
    assert "INTENTS" in str(excinfo.value)


def test_linear_bag_of_words_learns_the_task_but_not_perfectly() -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.svm import LinearSVC

    train, test = generate_tickets(2000, seed=0), generate_tickets(1000, seed=1)
    vectorizer = CountVectorizer()
    model = LinearSVC().fit(vectorizer.fit_transform(train["text"]), train["label"])
    accuracy = (model.predict(vectorizer.transform(test["text"])) == test["label"]).mean()
    assert 0.85 < accuracy < 0.99
