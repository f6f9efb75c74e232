"""Fresh labelled data: the labels of the inference log plus any labelled files a user brings, split into
rows a retrain may learn from and a fresh holdout that no retrain ever trains on.

Only labels that saw production as it was may judge a challenger. By default the holdout takes reviewers'
answers on the review queue's unbiased sample (`review:random`) and the files the operator brings; labels
sent to /feedback (by whoever holds the ingest key) and reviewers' answers on the rows a rule picked
(`review:targeted`) only teach the retrain (`holdout_sources` says otherwise, if every sender is trusted).

The split is keyed on the text: a keyed hash of the model name and the normalised text decides the side, so
a text lands on the same side every time it is seen (the holdout only grows as labels arrive), the same text
asked twice can never sit on both sides, and each class is split in the configured share in expectation
(stratified by construction, not by exact count). The key is a secret made once per CHAMPION_HOME (a 0600
file, never logged), so nobody can write a text that lands where they want it; a configured `seed` replaces
it where a split must be reproducible elsewhere. The holdout's sha256 identifies it in every gate decision.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from champion.config import StrictModel, champion_home, default_log_url, home_secret, redact_uri
from champion.db import engine_for
from champion.errors import ChampionError

if TYPE_CHECKING:
    import pandas as pd

LABELLED_ARMS = ("champion", "canary", "challenger")  # shadow rows repeat a champion row's request id
RANDOM_REVIEW = "review:random"  # reviewers' labels of the review queue's unbiased sample
TARGETED_REVIEW = "review:targeted"  # labels of rows the review queue's rules picked: train only
FEEDBACK = "feedback"  # labels sent to /feedback: anyone holding the ingest key may have sent them
FILES = "files"  # the labelled files of `files`
SECRET_FILE = "holdout.secret"  # in CHAMPION_HOME, 0600: the key of the holdout split


class FreshConfig(StrictModel):
    from_log: bool = True  # the inference log's labels of this model: reviewers' answers and /feedback
    log_url: str | None = None  # default: the serving default (CHAMPION_INFERENCE_LOG_URL, else sqlite)
    files: list[str] = Field(default_factory=list)  # labelled CSV/JSONL/Parquet files (text, label)
    holdout_share: float = Field(0.3, gt=0, lt=1)  # of the distinct texts, kept for the gate only
    # The labels the holdout may take. /feedback labels are not among them by default: whoever holds the
    # ingest key could send labels chosen to flatter a challenger, and a gate judged on them would let a
    # worse model through. They still teach the retrain. Add "feedback" only if every sender is trusted.
    holdout_sources: list[Literal["review:random", "feedback", "files"]] = Field(
        default_factory=lambda: [RANDOM_REVIEW, FILES]
    )
    # null: the split is keyed by the secret of this CHAMPION_HOME (holdout.secret), so no text can be
    # written to land in the holdout; a number makes the split reproducible anywhere, and predictable.
    seed: int | None = None
    min_train_rows: int = Field(20, ge=0)  # fresh rows a retrain needs to learn from
    # How often each fresh-train row appears in the retrain's training split: above 1 weights what production
    # looks like now (and the intents that are new) over the original data, without more epochs.
    repeat: int = Field(1, ge=1, le=20)


@dataclass
class FreshData:
    train: pd.DataFrame  # text, label, source
    holdout: pd.DataFrame  # text, label, source
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def holdout_sha256(self) -> str:
        from pipelines.compare import holdout_sha256

        return holdout_sha256(self.holdout)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().lower())


def holdout_side(texts, model_name: str, share: float, seed: int | bytes):
    """A boolean array: True where the text belongs to the fresh holdout. `seed`: a secret key (bytes, an
    HMAC of the text) or a configured number (a plain hash, as reproducible as it is predictable)."""
    import numpy as np

    out = np.empty(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        if isinstance(seed, bytes):
            digest = hmac.new(seed, f"{model_name}\x00{normalise(text)}".encode(), hashlib.sha256).digest()
        else:
            digest = hashlib.sha256(f"{model_name}\x00{seed}\x00{normalise(text)}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2**64 < share
    return out


def holdout_secret(home: Path | None = None) -> bytes:
    """The split's secret key: 32 random bytes made once per CHAMPION_HOME, kept in a 0600 file."""
    try:
        return bytes.fromhex(home_secret(SECRET_FILE, home))
    except ValueError:
        raise ChampionError(
            f"{(home or champion_home()) / SECRET_FILE}: the holdout's secret key is not hex; delete the "
            "file (the holdout is dealt anew) or restore it from a backup."
        ) from None


def labelled_log_rows(model_name: str, log_url: str | None = None) -> pd.DataFrame:
    """The model's logged predictions that have a label: text, label (the true one), source. A reviewed
    row keeps the reviewer's answer (feedback sent later for the same request does not replace it)."""
    import pandas as pd

    from serving.inference_log import InferenceLog

    url = log_url or default_log_url()
    try:
        log = InferenceLog(url, retention_days=None)
        try:
            frame = log.read(model_name, arms=list(LABELLED_ARMS), labelled_only=True)
        finally:
            log.engine.dispose()
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ChampionError(
            f"fresh.log_url: the inference log at {redact_uri(url)} cannot be read ({first}); is it up?"
        ) from None
    frame = frame[frame["true_label"].notna()].drop_duplicates("request_id", keep="last")
    reviewed = _reviewed(model_name, url)
    source = frame["request_id"].map(
        lambda rid: f"review:{reviewed[rid][0]}" if rid in reviewed else FEEDBACK
    )
    answers = frame["request_id"].map(lambda rid: reviewed[rid][1] if rid in reviewed else None)
    label = answers.where(answers.notna(), frame["true_label"]).astype(str)
    return pd.DataFrame({"text": frame["text"].astype(str), "label": label, "source": source}).reset_index(
        drop=True
    )


def _reviewed(model_name: str, url: str) -> dict[str, tuple[str, str]]:
    """request_id -> (the review sample: random | targeted, the reviewer's answer) of the labelled rows."""
    import sqlalchemy as sa

    from monitoring.review import review_items

    engine = engine_for(url)
    try:
        if not sa.inspect(engine).has_table(review_items.name):
            return {}
        c = review_items.c
        query = sa.select(c.request_id, c.sample, c.answer).where(
            c.model_name == model_name, c.status == "labelled"
        )
        with engine.connect() as conn:
            return {rid: (sample, answer) for rid, sample, answer in conn.execute(query)}
    finally:
        engine.dispose()


def split_seed(cfg: FreshConfig) -> int | bytes:
    """The configured seed, else this CHAMPION_HOME's secret key."""
    return cfg.seed if cfg.seed is not None else holdout_secret()


def fresh_data(model_name: str, cfg: FreshConfig, exclude_texts=None) -> FreshData:
    """Every fresh labelled row, split into (train, holdout) by text. Only rows of `holdout_sources` may
    land in the holdout. Rows whose text is in `exclude_texts` (what a retrain trains on anyway, e.g. the
    original training split) are dropped from the holdout, and counted, so the holdout never holds a text
    either model was trained on."""
    import pandas as pd

    from pipelines.compare import read_labelled_file

    parts = []
    if cfg.from_log:
        rows = labelled_log_rows(model_name, cfg.log_url)
        parts.append(rows.assign(kind=rows["source"]))
    for i, path in enumerate(cfg.files):
        parts.append(read_labelled_file(path, field=f"fresh.files[{i}]").assign(source=str(path), kind=FILES))
    columns = ["text", "label", "source", "kind"]
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    rows = rows.assign(text=rows["text"].astype(str).str.strip(), label=rows["label"].astype(str).str.strip())
    rows = rows[(rows["text"] != "") & (rows["label"] != "")].reset_index(drop=True)
    side = holdout_side(rows["text"].tolist(), model_name, cfg.holdout_share, split_seed(cfg))
    # Rows a reviewer labelled because a rule picked them (low confidence, disagreement, drift) are not a
    # sample of production, and /feedback labels may come from anyone with the ingest key: they teach the
    # retrain, never judge it (unless `holdout_sources` says so). The holdout keeps only what it may take.
    allowed = rows["kind"].isin(cfg.holdout_sources).to_numpy()
    in_holdout = side & allowed
    train, holdout = rows[~in_holdout].reset_index(drop=True), rows[in_holdout].reset_index(drop=True)
    overlap = 0
    # What trusted rows teach leaves the holdout; an untrusted /feedback row never takes a text out of it.
    teaches = (train["kind"] != FEEDBACK) & ~train["kind"].isin(cfg.holdout_sources)
    taught = set(train.loc[teaches, "text"].map(normalise))
    if exclude_texts is not None:
        taught |= {normalise(t) for t in exclude_texts}
    if taught and len(holdout):
        seen = holdout["text"].map(normalise).isin(taught)
        overlap = int(seen.sum())
        holdout = holdout[~seen].reset_index(drop=True)
    judged = set(holdout["text"].map(normalise))
    shadowing = ((train["kind"] == FEEDBACK) & train["text"].map(normalise).isin(judged)).to_numpy()
    train = train[~shadowing].reset_index(drop=True)
    counts = {
        "labelled_rows": len(rows),
        "by_source": rows["source"].value_counts().to_dict() if len(rows) else {},
        "fresh_train_rows": len(train),
        "holdout_rows": len(holdout),
        "holdout_by_source": holdout["source"].value_counts().to_dict() if len(holdout) else {},
        "holdout_sources": list(cfg.holdout_sources),
        "targeted_review_rows": int((rows["kind"] == TARGETED_REVIEW).sum()),
        "holdout_dropped_seen_in_training": overlap,
        "feedback_dropped_holdout_text": int(shadowing.sum()),
        "holdout_share": cfg.holdout_share,
        "seed": cfg.seed if cfg.seed is not None else "secret",  # the key itself is never logged
    }
    return FreshData(train.drop(columns="kind"), holdout.drop(columns="kind"), counts)


def require_disjoint(holdout: pd.DataFrame, trained_on) -> None:
    """Refuse a holdout that shares any text with what the challenger trained on."""
    taught = {normalise(t) for t in trained_on}
    shared = [t for t in holdout["text"] if normalise(t) in taught]
    if shared:
        raise ChampionError(
            f"the fresh holdout shares {len(shared)} texts with the challenger's training rows "
            f"(e.g. {shared[0][:60]!r}); a gate on it would flatter the challenger, so it is refused."
        )
