"""Drift checks of a text-generation model's traffic: calibrated on a reference, quiet on windows drawn like
it (the false-alarm rate measured over many), firing on constructed shifts of prompts, answers, the model's
own confidence and people's judgements; and `champion drift` end to end on a served tiny causal LM."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monitoring.config import MonitorConfig
from monitoring.lm_drift import LMReference, check_generation_drift, window_features

INTENTS = [f"intent_{i}" for i in range(8)]
CFG = MonitorConfig.model_validate({"calibration": {"resamples": 400}})


def answers(n: int, rng, *, prompt=40.0, length=30.0, valid=0.97, logprob=-0.3, intents=INTENTS, right=0.9):
    """Feature rows as `window_features` makes them: token counts, JSON or not, the named intent, the mean
    log-probability, and the true intent (right `right` of the time)."""
    named = rng.choice(intents, n)
    ok = rng.random(n) < valid
    truth = np.where(rng.random(n) < right, named, rng.choice(INTENTS, n))
    return pd.DataFrame(
        {
            "prompt_tokens": rng.poisson(prompt, n).astype(float),
            "completion_tokens": rng.poisson(length, n).astype(float),
            "valid_json": ok,
            "intent": np.where(ok, named, "").astype(object),
            "logprob": rng.normal(logprob, 0.1, n),
            "true_intent": truth.astype(object),
        }
    )


@pytest.fixture(scope="module")
def reference():
    return LMReference(answers(400, np.random.default_rng(0)))


def fired(window, reference, cfg=CFG) -> list[str]:
    return [c.name for c in check_generation_drift(window, reference, cfg).checks if c.drifted]


def test_windows_drawn_like_the_reference_rarely_alarm(reference):
    """60 windows of 200 answers from the reference's own distribution: the whole decision's false-alarm
    budget is 1 %, so more than 3 alarms would be far out of line."""
    rng = np.random.default_rng(1)
    alarms = sum(bool(fired(answers(200, rng), reference)) for _ in range(60))
    assert alarms <= 3, alarms


@pytest.mark.parametrize(
    ("shift", "check"),
    [
        ({"prompt": 60.0}, "prompt_length"),  # longer messages (a new channel, pasted e-mails)
        ({"length": 45.0}, "answer_length"),
        ({"valid": 0.8}, "valid_json"),  # the model breaks its format more often
        ({"logprob": -0.45}, "answer_logprob"),  # less sure of its own tokens: unfamiliar requests
        ({"intents": INTENTS[:3]}, "intent_mix"),  # traffic concentrates on three intents
    ],
)
def test_each_constructed_shift_fires_its_check(reference, shift, check):
    decision = check_generation_drift(answers(200, np.random.default_rng(2), **shift), reference, CFG)
    assert decision.status == "drift" and check in [c.name for c in decision.fired], decision.reason
    result = next(c for c in decision.checks if c.name == check)
    assert result.value > result.threshold and result.reason.startswith(f"{check}: ")


def test_judged_answers_show_concept_drift_and_small_windows_say_so(reference):
    worse = answers(200, np.random.default_rng(3), right=0.6)  # people correct 40% of the intents
    decision = check_generation_drift(worse, reference, CFG)
    concept = next(c for c in decision.checks if c.name == "concept")
    assert concept.drifted and "the interval lies below it" in concept.reason
    few = check_generation_drift(answers(20, np.random.default_rng(4)), reference, CFG)
    assert few.status == "insufficient_data"
    assert all(c.status == "insufficient_data" for c in few.checks), [c.reason for c in few.checks]


def test_logged_rows_become_features_and_partial_answers_are_left_out():
    good = json.dumps({"intent": "track_order", "category": "ORDER", "entities": {}, "reply": "Soon."})
    frame = pd.DataFrame(
        {
            "label": ["stop", "length", "cancelled", "stop", "stop"],
            "output": [good, "not json", '{"intent": "trac', good, good],
            "prompt_tokens": [10, 12, 11, 9, 10],
            "completion_tokens": [20, 32, 3, 20, 21],
            "score": [-0.2, -1.5, -0.9, -0.3, -0.25],
            "rating": [None, None, None, 1, -1],
            "correction": [json.dumps({"intent": "cancel_order"}), None, None, None, None],
        }
    )
    features, partial = window_features(frame)
    assert partial == 1 and len(features) == 4
    assert list(features["valid_json"]) == [True, False, True, True]
    assert list(features["intent"]) == ["track_order", "", "track_order", "track_order"]
    # A correction names the truth; a rating of 1 confirms the answer, -1 marks it wrong; else unknown.
    truth = list(features["true_intent"])
    assert truth[0] == "cancel_order" and truth[1] is None and truth[2] == "track_order"
    assert truth[3] not in INTENTS and truth[3] != "track_order"


def test_champion_drift_on_a_served_tiny_lm(tmp_path, tiny_llama_dir, capsys):
    """Answers served by the LM server, logged, then `champion drift` reads them: the generative checks
    judge the window against the version's reference (its held-out messages answered by the engine), the
    decision and its alarms are stored, and a report is written."""
    from lm_world import sft_tiny, write_tiny_replies

    from champion.registry import connect, promote
    from monitoring.check import drift, format_decision
    from serving.config import ServeConfig
    from serving.inference_log import InferenceLog
    from serving.lm_server import ChatParams, LMServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_HOME", str(tmp_path / "home"))
        for shared_store in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL", "CHAMPION_INFERENCE_LOG_URL"):
            mp.delenv(shared_store, raising=False)
        reg = connect()
        version = sft_tiny(reg, write_tiny_replies(tmp_path), tiny_llama_dir, 0).version
        promote(reg, "tiny-replies", version, reason="served")
        log_url = f"sqlite:///{tmp_path / 'log.db'}"
        cfg = ServeConfig.model_validate({"model": "tiny-replies", "task": "text-generation", "threads": 1,
                                          "generation": {"max_tokens": 8}})  # fmt: skip
        server = LMServer(
            cfg, registry=reg, inference_log=InferenceLog(log_url, spool_dir=tmp_path / "s")
        ).start()
        try:
            long = "my parcel " * 20  # far longer than anything held out
            for i in range(40):
                message = [{"role": "user", "content": f"{long} where is order {i}"}]
                server.chat(ChatParams(messages=message, max_tokens=6, temperature=0)).stream.result(30)
        finally:
            server.close()
        monitor = MonitorConfig.model_validate(
            {"generation": {name: {"min_rows": 20, "floor": 0.1} for name in
                            ("prompt_length", "answer_length", "intent_mix", "valid_json", "answer_logprob")},
             "calibration": {"resamples": 200}, "report": {"mlflow": False}}
        )  # fmt: skip
        run = drift("tiny-replies", monitor, log_url=log_url, registry=reg, report_dir=tmp_path / "report")
        reg.close()
    decision = run.decision
    assert decision.rows == 40 and decision.window["task"] == "text-generation"
    assert {c.name for c in decision.checks} == {"prompt_length", "answer_length", "intent_mix", "valid_json",
                                                 "answer_logprob", "concept"}  # fmt: skip
    prompt = next(c for c in decision.checks if c.name == "prompt_length")
    assert prompt.drifted and decision.status == "drift", prompt.reason
    assert run.check_id is not None and set(run.alarms) >= {"performance", "input", "any"}
    assert (tmp_path / "report" / "drift.html").is_file() and (
        tmp_path / "report" / "decision.json"
    ).is_file()
    assert "prompt_length:" in format_decision(run)
