"""Scores of generated support answers: JSON validity, exact fields, entity F1, reply overlap and similarity.

Pure functions: no model, no I/O. An answer that does not parse counts as wrong on every field, with no
entities and an empty reply. Entity values compare after `strip().casefold()` (the bitext file writes
"Platinum" for a message's "platinum"); intent and category compare exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pipelines.chat import ANSWER_KEYS, parse_answer, target, target_json

_TOKEN_RE = re.compile(r"[a-z0-9]+")  # rouge-score's default tokenizer: lower case, letters and digits


def per_row(
    answers: list[str],
    rows: pd.DataFrame,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> pd.DataFrame:
    """One line per answer: the message, reference and answer, and what was right in it; with `embed`, also
    each reply's cosine to its reference (`reply_similarity`, 0 for an empty reply)."""
    _check_lengths(answers, rows)
    lines = []
    for answer, (_, row) in zip(answers, rows.iterrows(), strict=True):
        expected = target(row)
        parsed = parse_answer(answer)
        got = parsed if parsed is not None else {}
        valid = parsed is not None and all(key in parsed for key in ANSWER_KEYS)
        gold, predicted = _entity_pairs(expected["entities"]), _entity_pairs(got.get("entities"))
        intent_ok = got.get("intent") == expected["intent"]
        category_ok = got.get("category") == expected["category"]
        reply = got.get("reply") if isinstance(got.get("reply"), str) else ""
        lines.append(
            {
                "message": str(row["instruction"]),
                "reference": target_json(row),
                "answer": answer,
                "valid_json": valid,
                "intent_correct": intent_ok,
                "category_correct": category_ok,
                "entity_tp": len(gold & predicted),
                "entity_fp": len(predicted - gold),
                "entity_fn": len(gold - predicted),
                "exact_match": intent_ok and category_ok and gold == predicted,
                "reply": reply,
                "reference_reply": expected["reply"],
                "reply_rouge_l": rouge_l(reply, expected["reply"]),
            }
        )
    table = pd.DataFrame(lines)
    if embed is not None:
        table["reply_similarity"] = reply_cosines(list(table["reply"]), list(table["reference_reply"]), embed)
    return table


def score_answers(
    answers: list[str],
    rows: pd.DataFrame,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> dict[str, float]:
    """Means over the rows, micro entity F1, and the mean reply cosine under `embed` when given.

    `entity_f1` is 2·TP / (2·TP + FP + FN) over (type, value) pairs of all rows; 1.0 when no row has or
    predicts an entity. `reply_similarity` counts an empty or missing reply as 0.
    """
    table = per_row(answers, rows, embed)
    tp, fp, fn = (int(table[column].sum()) for column in ("entity_tp", "entity_fp", "entity_fn"))
    scores = {
        "valid_json": float(table["valid_json"].mean()),
        "intent_accuracy": float(table["intent_correct"].mean()),
        "category_accuracy": float(table["category_correct"].mean()),
        "entity_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "exact_match": float(table["exact_match"].mean()),
        "reply_rouge_l": float(table["reply_rouge_l"].mean()),
    }
    if embed is not None:
        scores["reply_similarity"] = float(table["reply_similarity"].mean())
    scores["rows"] = float(len(table))
    return scores


def reply_similarity(
    replies: list[str], references: list[str], embed: Callable[[list[str]], np.ndarray]
) -> float:
    """Mean cosine between each reply's and its reference's `embed` vector; an empty reply scores 0."""
    return float(reply_cosines(replies, references, embed).mean()) if replies else 0.0


def reply_cosines(
    replies: list[str], references: list[str], embed: Callable[[list[str]], np.ndarray]
) -> np.ndarray:
    """Each reply's cosine to its reference under `embed`; an empty reply scores 0."""
    cosines = np.zeros(len(replies))
    keep = [i for i, reply in enumerate(replies) if reply.strip()]
    if keep:
        got = np.asarray(embed([replies[i] for i in keep]), dtype=float)
        want = np.asarray(embed([references[i] for i in keep]), dtype=float)
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cosines[keep] = np.einsum("ij,ij->i", got, want) / np.where(norms == 0, 1.0, norms)
    return cosines


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens; 0.0 when either side has no token (as rouge-score)."""
    a, b = _TOKEN_RE.findall(candidate.lower()), _TOKEN_RE.findall(reference.lower())
    if not a or not b:
        return 0.0
    lcs = _lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the table at a time."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _entity_pairs(entities: Any) -> set[tuple[str, str]]:
    if not isinstance(entities, dict):
        return set()
    return {(str(kind), str(value).strip().casefold()) for kind, value in entities.items()}


def _check_lengths(answers: list[str], rows: pd.DataFrame) -> None:
    if len(answers) != len(rows):
        raise ValueError(f"got {len(answers)} answers for {len(rows)} rows; pass one answer per row.")
    if not len(rows):
        raise ValueError("there are no rows to score; pass at least one row and its answer.")
