"""The generative gate as a pure function: paired bootstrap on per-row scores, slices, floors, safety."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from champion.generation_gate import GenerationGateConfig, decide_generation_gate

INTENTS = ["track_order", "cancel_order", "get_refund", "reset_password"]


def table(correct, valid=None, tp=None, fp=None, fn=None) -> pd.DataFrame:
    """A per-row score table as pipelines.generation_eval.per_row writes it, from 0/1 intent correctness."""
    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    return pd.DataFrame(
        {
            "valid_json": np.ones(n, bool) if valid is None else np.asarray(valid, bool),
            "intent_correct": correct,
            "category_correct": correct,
            "exact_match": correct,
            "entity_tp": np.zeros(n) if tp is None else tp,
            "entity_fp": np.zeros(n) if fp is None else fp,
            "entity_fn": np.zeros(n) if fn is None else fn,
            "reply_rouge_l": correct * 0.5,
        }
    )


def slices(n: int) -> list[str]:
    return [INTENTS[i % len(INTENTS)] for i in range(n)]


CFG = GenerationGateConfig(resamples=400)


def test_a_tie_is_refused():
    rng = np.random.default_rng(0)
    same = table(rng.random(200) < 0.7)
    decision = decide_generation_gate(same, same, slices(200), CFG)
    assert not decision.promote and "not surely better" in decision.reason
    assert decision.evidence["delta"] == 0 and decision.evidence["delta_interval"] == [0.0, 0.0]


def test_a_clearly_better_challenger_passes_and_a_shuffled_one_is_refused():
    rng = np.random.default_rng(1)
    champion = table(rng.random(240) < 0.6)
    better = table(rng.random(240) < 0.9)
    decision = decide_generation_gate(champion, better, slices(240), CFG, model="m")
    assert decision.promote, decision.reason
    assert decision.reason.startswith("passed: the challenger's intent_accuracy")
    assert decision.evidence["delta_interval"][0] > 0 and decision.evidence["model"] == "m"
    # Trained on shuffled targets: right by chance only (1 in 4 intents).
    shuffled = table(rng.random(240) < 0.25)
    refused = decide_generation_gate(champion, shuffled, slices(240), CFG)
    assert not refused.promote and refused.evidence["delta_interval"][1] < 0


def test_the_interval_is_paired():
    """The same answers but 10 more rows right: unpaired, each side's own spread (about +-0.06 at n=240)
    would swamp a +0.04 gain; paired, only the 10 discordant rows vary, so the gain is sure."""
    rng = np.random.default_rng(2)
    base = rng.random(240) < 0.5
    improved = base.copy()
    improved[np.flatnonzero(~base)[:10]] = True
    decision = decide_generation_gate(table(base), table(improved), slices(240), CFG)
    low, high = decision.evidence["delta_interval"]
    assert decision.promote, decision.reason
    assert 0 < low < 10 / 240 < high
    unpaired = 2 * 1.96 * np.sqrt(2 * 0.25 / 240)  # width of the interval of two independent means
    assert high - low < unpaired / 2


def test_a_slice_that_surely_loses_blocks_promotion():
    n = 400
    groups = slices(n)
    refund = np.array([g == "get_refund" for g in groups])
    champion = refund | (np.arange(n) % 5 < 3)  # refunds all right, the rest 60%
    challenger = ~refund | (np.arange(n) % 8 < 4)  # the rest all right, refunds half: better overall
    decision = decide_generation_gate(table(champion), table(challenger), groups, CFG)
    assert not decision.promote and "intent 'get_refund' loses 0.500" in decision.reason, decision.reason
    assert decision.evidence["per_slice"]["get_refund"]["interval"][1] < 0


def test_a_safety_regression_refuses_whatever_the_metric():
    rng = np.random.default_rng(3)
    champion, better = table(rng.random(200) < 0.5), table(rng.random(200) < 0.95)
    safety = {
        "champion": {"injection-a": True, "pii-b": True, "weather": False},
        "challenger": {"injection-a": False, "pii-b": True, "weather": False},
    }
    decision = decide_generation_gate(champion, better, slices(200), CFG, safety=safety)
    assert not decision.promote
    assert "fails 1 safety case(s) the champion passes (injection-a)" in decision.reason
    assert decision.evidence["safety"]["regressions"] == ["injection-a"]
    # A case both fail is no regression; with the rule switched off the metric decides.
    safety["challenger"]["injection-a"] = True
    assert decide_generation_gate(champion, better, slices(200), CFG, safety=safety).promote


def test_entity_f1_is_micro_and_floors_apply():
    n = 200
    tp_a, fn_a = np.ones(n), np.zeros(n)
    tp_b, fn_b = np.ones(n), np.zeros(n)
    fn_a[: n // 2] = 1  # the champion misses an entity on half the rows: F1 = 2*200/(400+100) = 0.8
    ok = np.ones(n, bool)
    cfg = GenerationGateConfig(resamples=400, metric="entity_f1", floors={"valid_json": 0.9})
    champion = table(ok, tp=tp_a, fn=fn_a)
    challenger = table(ok, tp=tp_b, fn=fn_b)
    decision = decide_generation_gate(champion, challenger, slices(n), cfg)
    assert decision.evidence["champion"]["entity_f1"] == pytest.approx(0.8)
    assert decision.evidence["challenger"]["entity_f1"] == 1.0 and decision.promote
    invalid = table(ok, valid=np.arange(n) % 5 != 0, tp=tp_b, fn=fn_b)  # 80% valid JSON
    refused = decide_generation_gate(champion, invalid, slices(n), cfg)
    assert not refused.promote and "valid_json is 0.800, under its floor 0.900" in refused.reason


def test_weighted_metric_and_too_few_rows():
    cfg = GenerationGateConfig(
        resamples=400, metric="weighted", weights={"intent_accuracy": 3, "valid_json": 1}
    )
    champion, challenger = table(np.arange(200) % 2 == 0), table(np.ones(200, bool))
    decision = decide_generation_gate(champion, challenger, slices(200), cfg)
    assert decision.evidence["primary"] == {"champion": pytest.approx(0.625), "challenger": 1.0}
    few = decide_generation_gate(champion.head(20), challenger.head(20), slices(20), cfg)
    assert not few.promote and "20 labelled conversations, fewer than the 100" in few.reason


def test_bad_gate_settings_name_the_field():
    with pytest.raises(ValidationError, match="gate.weights: 'bleu' is not a metric"):
        GenerationGateConfig(metric="weighted", weights={"bleu": 1})
    with pytest.raises(ValidationError, match="needs at least one positive weight"):
        GenerationGateConfig(metric="weighted")
    with pytest.raises(ValidationError, match="gate.floors: 'accuracy' is not a metric"):
        GenerationGateConfig(floors={"accuracy": 0.9})


def test_a_no_better_challenger_is_rarely_promoted():
    """Over 60 holdouts where both models are equally good (independent errors, 70% right), the gate
    promotes at most a few: its false-promotion rate stays near the 2.5% of a one-sided 95% interval."""
    rng = np.random.default_rng(4)
    promoted = 0
    for trial in range(60):
        a, b = rng.random(200) < 0.7, rng.random(200) < 0.7
        cfg = GenerationGateConfig(resamples=200, seed=trial)
        promoted += decide_generation_gate(table(a), table(b), slices(200), cfg).promote
    assert promoted <= 4, promoted
