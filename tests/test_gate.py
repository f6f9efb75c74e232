"""The champion/challenger gate as a pure function of labels and two models' predictions on the same rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from champion.gate import GateConfig, decide_gate


def _labels(n: int = 1000, k: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([f"intent_{i}" for i in rng.integers(0, k, n)], dtype=object)


def _model(y: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Right on a share `accuracy` of rows (chosen at random), a random other label elsewhere."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pred = y.copy()
    wrong = rng.random(len(y)) > accuracy
    pred[wrong] = rng.choice(classes, wrong.sum())
    return pred


def test_passes_a_clearly_better_challenger_with_its_evidence():
    y = _labels()
    champion, challenger = _model(y, 0.75, 1), _model(y, 0.90, 2)
    decision = decide_gate(y, champion, challenger, holdout_sha256="abc")
    assert decision.promote, decision.reason
    ev = decision.evidence
    assert ev["holdout_sha256"] == "abc" and ev["rows"] == len(y)
    assert ev["champion"]["macro_f1"] == pytest.approx(f1_score(y, champion, average="macro"))
    assert ev["challenger"]["accuracy"] == pytest.approx(np.mean(challenger == y))
    low, high = ev["macro_f1_delta_interval"]
    assert 0 < low < ev["macro_f1_delta"] < high
    assert ev["mcnemar"]["challenger_only_right"] > ev["mcnemar"]["champion_only_right"]
    assert ev["mcnemar"]["p_value"] < 1e-6
    assert "passed" in decision.reason and "1000 fresh holdout rows" in decision.reason


def test_refuses_a_challenger_trained_on_shuffled_labels():
    y = _labels()
    shuffled = np.random.default_rng(3).permutation(y)  # what a model that learnt nothing predicts
    decision = decide_gate(y, _model(y, 0.8, 1), shuffled)
    assert not decision.promote
    assert decision.evidence["macro_f1_delta_interval"][1] < 0
    assert decision.reason.startswith("refused")


def test_refuses_a_challenger_that_only_ties():
    y = _labels()
    champion = _model(y, 0.85, 1)
    same_errors = champion.copy()
    decision = decide_gate(y, champion, same_errors)
    assert not decision.promote
    assert decision.evidence["macro_f1_delta_interval"] == [0.0, 0.0]
    tie = _model(y, 0.85, 7)  # as good on average, wrong on other rows
    assert not decide_gate(y, champion, tie).promote


def test_the_interval_is_paired():
    """A challenger that fixes 25 of the champion's errors and breaks none is surely better: the paired
    interval sees that, while resampling the two models' rows independently could not."""
    y = _labels(1000)
    champion = _model(y, 0.80, 1)
    challenger = champion.copy()
    wrong = np.flatnonzero(champion != y)[:25]
    challenger[wrong] = y[wrong]
    decision = decide_gate(y, champion, challenger)
    low, high = decision.evidence["macro_f1_delta_interval"]
    assert decision.promote and low > 0
    # Unpaired: each model's macro-F1 resampled on its own rows; the difference's spread is far wider.
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(300):
        i, j = rng.integers(0, len(y), len(y)), rng.integers(0, len(y), len(y))
        diffs.append(
            f1_score(y[j], challenger[j], average="macro") - f1_score(y[i], champion[i], average="macro")
        )
    assert np.quantile(diffs, 0.025) < 0 < low
    assert high - low < (np.quantile(diffs, 0.975) - np.quantile(diffs, 0.025)) / 3


def test_refuses_below_the_minimum_holdout():
    y = _labels(150)
    decision = decide_gate(y, _model(y, 0.5, 1), y.copy())  # even a perfect challenger
    assert not decision.promote
    assert "150 labelled rows" in decision.reason and "200" in decision.reason


def test_a_class_that_collapses_is_refused_even_when_the_average_rises():
    y = _labels(2000, k=8)
    champion = _model(y, 0.70, 1)
    challenger = _model(y, 0.95, 2)
    hurt = y == "intent_3"
    challenger[hurt] = "intent_4"  # the challenger never gets intent_3 right any more
    decision = decide_gate(y, champion, challenger, GateConfig(max_class_drop=0.1))
    assert decision.evidence["macro_f1_delta_interval"][0] > 0
    assert not decision.promote
    assert "class 'intent_3' loses" in decision.reason
    assert decision.evidence["per_class"]["intent_3"]["challenger"] == 0.0


def test_small_classes_are_listed_not_floor_checked():
    y = _labels(1000, k=4)
    y[:5] = "rare"
    champion = _model(y, 0.70, 1)
    champion[:5] = "rare"
    challenger = _model(y, 0.95, 2)
    challenger[:5] = "intent_0"  # loses the rare class completely, on 5 rows
    decision = decide_gate(y, champion, challenger, GateConfig(min_class_rows=10))
    assert decision.promote, decision.reason
    assert decision.evidence["classes_too_small"] == ["rare"]


def test_a_new_intent_counts_as_zero_for_the_champion_that_cannot_predict_it():
    y = _labels(1000, k=4)
    y[:100] = "new_intent"
    champion = _model(y, 0.9, 1)
    champion[:100] = "intent_0"  # the champion does not know the new intent
    challenger = champion.copy()
    challenger[:100] = "new_intent"
    decision = decide_gate(y, champion, challenger, champion_labels=[f"intent_{i}" for i in range(4)])
    assert decision.promote
    assert decision.evidence["new_classes"] == ["new_intent"]
    assert decision.evidence["per_class"]["new_intent"]["champion"] == 0.0
    labels = sorted(set(y))
    assert decision.evidence["champion"]["macro_f1"] == pytest.approx(
        f1_score(y, champion, labels=labels, average="macro")
    )


def test_mcnemar_can_be_required():
    y = _labels(1000)
    champion = _model(y, 0.80, 1)
    challenger = champion.copy()
    wrong = np.flatnonzero(champion != y)[:12]
    challenger[wrong] = y[wrong]  # a small, sure gain in macro-F1; McNemar at 12 vs 0 has p ~ 5e-4
    assert decide_gate(y, champion, challenger).promote
    strict = decide_gate(y, champion, challenger, GateConfig(mcnemar_alpha=1e-4))
    assert not strict.promote and "McNemar" in strict.reason


def test_margin_demands_a_larger_gain():
    y = _labels()
    champion, challenger = _model(y, 0.80, 1), _model(y, 0.84, 2)
    assert decide_gate(y, champion, challenger).promote
    assert not decide_gate(y, champion, challenger, GateConfig(margin=0.1)).promote


def test_false_promotions_of_an_equal_challenger_stay_rare():
    """Two models of the same accuracy, 200 holdouts: the gate promotes at most the interval's one-sided
    tail (2.5% at 95%), with sampling slack."""
    promoted = 0
    for seed in range(200):
        y = _labels(300, k=6, seed=seed)
        promoted += decide_gate(
            y, _model(y, 0.8, 2 * seed + 1), _model(y, 0.8, 2 * seed + 2), GateConfig(resamples=400)
        ).promote
    assert promoted <= 12  # 6%: the 2.5% target plus room for 200 draws


def test_misaligned_rows_are_an_error():
    with pytest.raises(ValueError, match="aligned rows"):
        decide_gate(["a", "b"], ["a"], ["a", "b"])


def test_a_class_drop_within_its_noise_does_not_veto():
    """A 12-row class that loses three hits falls by more than 0.1 of F1, but its own paired interval
    reaches zero: chance, not a sure loss, so the floor does not refuse a challenger that is surely better."""
    y = _labels(2000, k=6)
    y[:12] = "small"
    champion, challenger = _model(y, 0.70, 1), _model(y, 0.90, 2)
    for pred in (champion, challenger):
        pred[12:][pred[12:] == "small"] = "intent_0"  # only the 12 rows of the small class say "small"
        pred[:12] = "small"
    challenger[:3] = "intent_0"
    decision = decide_gate(y, champion, challenger, GateConfig(min_class_rows=10, max_class_drop=0.1))
    small = decision.evidence["per_class"]["small"]
    assert small["rows"] == 12 and -small["change"] > 0.1 and small["interval"][1] >= 0
    assert decision.promote, decision.reason


def test_the_variant_budget_judges_a_student_on_f1_and_a_compressed_copy_on_agreement():
    from champion.gate import VariantBudget, decide_variant

    budget = VariantBudget(min_rows=100)
    measured = {"rows": 500, "agreement": 0.985, "source": {"macro_f1": 0.90}, "variant": {"macro_f1": 0.89}}
    copy = decide_variant("onnx-int8", measured, budget)
    assert not copy.promote and "98.50%" in copy.reason and "outside the budget of 99%" in copy.reason
    assert decide_variant(
        "onnx-int8", {**measured, "agreement": 0.99}, budget
    ).promote  # the bound is inclusive
    student = decide_variant("student", measured, budget)  # 0.89 / 0.90 = 98.9% of the F1: within 97%
    assert student.promote and student.evidence["f1_ratio"] == pytest.approx(0.89 / 0.90)
    low = {**measured, "variant": {"macro_f1": 0.87}}  # 96.7%
    assert not decide_variant("student", low, budget).promote
    few = decide_variant("student", {**measured, "rows": 99}, budget)
    assert not few.promote and "fewer than the 100" in few.reason
