"""Fresh labelled data: the feedback labels of the inference log plus any labelled files a user brings,
split into rows a retrain may learn from and a fresh holdout that no retrain ever trains on.

The split is keyed on the text: a seeded hash of the model name and the normalised text decides the side,
so a text lands on the same side every time it is seen (the holdout only grows as labels arrive), the
same text asked twice can never sit on both sides, and each class is split in the configured share in
expectation (stratified by construction, not by exact count). The holdout's sha256 identifies it in every
gate decision.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field

from champion.config import StrictModel
from champion.errors import ChampionError

if TYPE_CHECKING:
    import pandas as pd

LABELLED_ARMS = ("champion", "canary", "challenger")  # shadow rows repeat a champion row's request id
TARGETED_REVIEW = "review:targeted"  # labels of rows the review queue's rules picked: train only


class FreshConfig(StrictModel):
    from_log: bool = True  # the inference log's feedback labels of this model
    log_url: str | None = None  # default: the serving default (CHAMPION_INFERENCE_LOG_URL, else sqlite)
    files: list[str] = Field(default_factory=list)  # labelled CSV/JSONL/Parquet files (text, label)
    holdout_share: float = Field(0.3, gt=0, lt=1)  # of the distinct texts, kept for the gate only
    seed: int = 0  # part of the hash: changing it re-deals every text, so keep it fixed per model
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


def holdout_side(texts, model_name: str, share: float, seed: int):
    """A boolean array: True where the text belongs to the fresh holdout (a seeded hash of the text)."""
    import numpy as np

    out = np.empty(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        digest = hashlib.sha256(f"{model_name}\x00{seed}\x00{normalise(text)}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2**64 < share
    return out


def labelled_log_rows(model_name: str, log_url: str | None = None) -> pd.DataFrame:
    """The model's logged predictions that have a feedback label: text, label (the true one), source."""
    import pandas as pd

    from serving.config import default_log_url
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
            f"fresh.log_url: the inference log at {url} cannot be read ({first}); is it up?"
        ) from None
    frame = frame[frame["true_label"].notna()].drop_duplicates("request_id", keep="last")
    samples = _review_samples(model_name, url)
    source = frame["request_id"].map(lambda rid: f"review:{samples[rid]}" if rid in samples else "feedback")
    return pd.DataFrame(
        {"text": frame["text"].astype(str), "label": frame["true_label"].astype(str), "source": source}
    ).reset_index(drop=True)


def _review_samples(model_name: str, url: str) -> dict[str, str]:
    """request_id -> the review sample (random | targeted) of the rows a reviewer labelled."""
    import sqlalchemy as sa

    from champion.review import review_items

    engine = sa.create_engine(url)
    try:
        if not sa.inspect(engine).has_table(review_items.name):
            return {}
        c = review_items.c
        query = sa.select(c.request_id, c.sample).where(c.model_name == model_name, c.status == "labelled")
        with engine.connect() as conn:
            return dict(conn.execute(query).all())
    finally:
        engine.dispose()


def fresh_data(model_name: str, cfg: FreshConfig, exclude_texts=None) -> FreshData:
    """Every fresh labelled row, split into (train, holdout) by text. Rows whose text is in
    `exclude_texts` (what a retrain trains on anyway, e.g. the original training split) are dropped from
    the holdout, and counted, so the holdout never holds a text either model was trained on."""
    import pandas as pd

    from pipelines.compare import read_labelled_file

    parts = []
    if cfg.from_log:
        parts.append(labelled_log_rows(model_name, cfg.log_url))
    for i, path in enumerate(cfg.files):
        parts.append(read_labelled_file(path, field=f"fresh.files[{i}]").assign(source=str(path)))
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["text", "label", "source"])
    rows = rows.assign(text=rows["text"].astype(str).str.strip(), label=rows["label"].astype(str).str.strip())
    rows = rows[(rows["text"] != "") & (rows["label"] != "")].reset_index(drop=True)
    side = holdout_side(rows["text"].tolist(), model_name, cfg.holdout_share, cfg.seed)
    # Rows a reviewer labelled because a rule picked them (low confidence, disagreement, drift) are not a
    # sample of production: they teach the retrain, never judge it. The holdout keeps only unbiased rows.
    targeted = (rows["source"] == TARGETED_REVIEW).to_numpy()
    train, holdout = (
        rows[~side | targeted].reset_index(drop=True),
        rows[side & ~targeted].reset_index(drop=True),
    )
    overlap = 0
    taught = set(train.loc[train["source"] == TARGETED_REVIEW, "text"].map(normalise))
    if exclude_texts is not None:
        taught |= {normalise(t) for t in exclude_texts}
    if taught and len(holdout):
        seen = holdout["text"].map(normalise).isin(taught)
        overlap = int(seen.sum())
        holdout = holdout[~seen].reset_index(drop=True)
    counts = {
        "labelled_rows": len(rows),
        "by_source": rows["source"].value_counts().to_dict() if len(rows) else {},
        "fresh_train_rows": len(train),
        "holdout_rows": len(holdout),
        "holdout_by_source": holdout["source"].value_counts().to_dict() if len(holdout) else {},
        "targeted_review_rows": int(targeted.sum()),
        "holdout_dropped_seen_in_training": overlap,
        "holdout_share": cfg.holdout_share,
        "seed": cfg.seed,
    }
    return FreshData(train, holdout, counts)


def require_disjoint(holdout: pd.DataFrame, trained_on) -> None:
    """Refuse a holdout that shares any text with what the challenger trained on."""
    taught = {normalise(t) for t in trained_on}
    shared = [t for t in holdout["text"] if normalise(t) in taught]
    if shared:
        raise ChampionError(
            f"the fresh holdout shares {len(shared)} texts with the challenger's training rows "
            f"(e.g. {shared[0][:60]!r}); a gate on it would flatter the challenger, so it is refused."
        )
