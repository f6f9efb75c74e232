"""A synthetic served model for the drift checks: real generated tickets, a simulated classifier's outputs.

Each intent has an embedding centre; the "model" is calibrated on the intents it knows (right with the
probability it states, about 80% of the time) and guesses with low confidence on the ones it does not.
Windows drawn from `world.draw` with the defaults come from the reference's distribution (iid); the knobs
build the shifts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from monitoring.drift import Window
from monitoring.reference import Reference, fingerprint, seen_in
from pipelines.ticketgen import INTENTS, generate_tickets

KNOWN = list(INTENTS[:12])
HELD_OUT = list(INTENTS[12:16])
DIM = 16


class World:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = {intent: rng.normal(0, 1.0, DIM) for intent in KNOWN + HELD_OUT}
        self.train_texts = generate_tickets(3000, seed=seed + 100, intents=KNOWN)["text"]
        self.train_fp = np.unique(fingerprint(self.train_texts))
        self._seed = seed + 1000

    def draw(
        self,
        n: int,
        seed: int,
        intents: list[str] | None = None,
        label_weights: dict[str, float] | None = None,
        vocabulary_shift: float = 0.0,
        confidence_scale: float = 1.0,
        accuracy_scale: float = 1.0,
    ) -> pd.DataFrame:
        """Rows with text, true label, predicted label, confidence, tokens, unk_share and an embedding."""
        rng = np.random.default_rng(seed)
        frame = generate_tickets(
            n,
            seed=seed,
            intents=intents or KNOWN,
            label_weights=label_weights,
            vocabulary_shift=vocabulary_shift,
        )
        known = frame["label"].isin(KNOWN).to_numpy()
        confidence = np.where(known, rng.beta(8, 2, n), rng.beta(3, 4, n))
        # Calibrated on the intents it knows (right with the probability it states), never right on the rest.
        right = known & (rng.random(n) < confidence * accuracy_scale)
        confidence = confidence * confidence_scale
        guesses = rng.choice(KNOWN, n)
        pred = np.where(right, frame["label"], guesses)
        emb = np.stack([self.centres[label] for label in frame["label"]]) + rng.normal(0, 0.8, (n, DIM))
        words = frame["text"].str.split().str.len().to_numpy()
        return frame.assign(
            pred_label=pred,
            confidence=confidence.astype(np.float32),
            tokens=(words * 1.3 + 2).astype(np.int64),
            unk_share=np.where(rng.random(n) < 0.02, 0.1, 0.0).astype(np.float32),
            embedding=list(emb.astype(np.float32)),
        )

    def reference(self, n: int = 2000) -> Reference:
        frame = self.draw(n, seed=self._seed)
        rows = pd.DataFrame(
            {
                "text": frame["text"],
                "label": frame["label"],
                "pred_label": frame["pred_label"],
                "confidence": frame["confidence"],
                "tokens": frame["tokens"],
                "unk_share": frame["unk_share"],
                "seen_in_training": seen_in(fingerprint(frame["text"]), self.train_fp),
                "split": "test",
            }
        )
        emb = np.stack(frame["embedding"].to_numpy())
        probs = np.zeros((n, len(KNOWN)), np.float32)
        return Reference(KNOWN, rows, probs, emb, self.train_fp, {"labels": KNOWN, "rows": n})


def window(frame: pd.DataFrame, labelled: bool = False) -> Window:
    """The Window the checks read, as describe_window would have filled it (every row described)."""
    return Window(
        pred_labels=frame["pred_label"].astype(str).to_numpy(),
        confidence=frame["confidence"].astype(np.float64).to_numpy(),
        texts=frame["text"].astype(str).to_numpy(),
        true_labels=frame["label"].to_numpy(dtype=object) if labelled else None,
        tokens=frame["tokens"].to_numpy(),
        unk_share=frame["unk_share"].to_numpy(),
        fingerprints=fingerprint(frame["text"]),
        embeddings=np.stack(frame["embedding"].to_numpy()) if len(frame) else None,
        sample_index=np.arange(len(frame)),
        sampled_from=len(frame),
    )
