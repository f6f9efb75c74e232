"""Retrain when performance moves, not when inputs merely change (issue 27): two alarms over the same
judged windows, the performance one starts the scheduled retrain by default, the input one only alerts,
and `alarm: any` (or `checks`) opts back in to retraining on input drift."""

from __future__ import annotations

import pytest
import yaml
from conftest import tiny_finetune_config

from champion.errors import ChampionError
from monitoring.drift import CheckResult, DriftDecision
from monitoring.store import PERFORMANCE_CHECKS, DriftStore, counts_toward
from pipelines.jobs import drift_episode, retrain_alarm

INPUT_ONLY = [("ok", ()), ("drift", ("embedding", "text_content")), ("drift", ("prediction",))]
PERFORMANCE = [("ok", ()), ("drift", ("embedding", "concept")), ("drift", ("estimated_accuracy",))]


def _windows(statuses) -> list[dict]:
    return [
        {"id": i, "status": s, "checks": [{"name": n, "drifted": True} for n in fired]}
        for i, (s, fired) in enumerate(statuses, 1)
    ]


def _decision(status: str, fired: tuple[str, ...], name: str = "m", version: str = "1") -> DriftDecision:
    checks = [CheckResult(c, "statistic", 0.3, 0.1, True, 500, "drift", f"{c} fired.") for c in fired]
    checks.append(CheckResult("text_length", "wasserstein", 0.01, 0.1, False, 500, "ok", "quiet."))
    return DriftDecision(status, name, version, 500, checks)


def test_the_performance_checks_are_one_public_set_with_room_for_language_models():
    assert {"concept", "estimated_accuracy", "valid_json", "answer_logprob"} == set(PERFORMANCE_CHECKS)
    assert counts_toward("performance", "drift", ["confidence", "estimated_accuracy"])
    assert not counts_toward("performance", "drift", ["embedding", "prediction"])
    assert counts_toward("input", "drift", ["confidence", "estimated_accuracy"])  # confidence is an input
    assert not counts_toward("input", "drift", ["concept"])
    assert not counts_toward("any", "ok", []) and counts_toward("any", "drift", ["valid_json"])
    with pytest.raises(ValueError, match="alarm: 'inputs' is not one of performance, input, any"):
        counts_toward("inputs", "drift", [])


def test_only_input_checks_fired_no_retrain_and_the_input_alarm_is_on(home):
    windows = _windows(INPUT_ONLY)
    assert drift_episode(windows, 2, 3, alarm="performance") is None
    fired = ["embedding", "prediction", "text_content"]
    assert drift_episode(windows, 2, 3, alarm="input") == {"started_by": 3, "fired": fired}
    store = DriftStore(f"sqlite:///{home / 'drift.db'}")
    for status, fired in INPUT_ONLY:
        store.record(_decision(status, fired))
    alarms = store.alarm_states("m", "1", 2, 3)
    assert (alarms["performance"].alarm, alarms["input"].alarm, alarms["any"].alarm) == (False, True, True)
    assert (alarms["performance"].drifted, alarms["input"].drifted, alarms["any"].considered) == (0, 2, 3)
    assert alarms["input"].reason == (
        "input alarm on: 2 of the last 3 judged windows drifted on an input check (alarm at 2 of 3)."
    )
    assert store.alarm_state("m", "1", 2, 3) == alarms["any"]  # the drift state of earlier releases
    store.close()


def test_performance_checks_fired_the_performance_alarm_starts_the_episode(home):
    windows = _windows(PERFORMANCE)
    episode = drift_episode(windows, 2, 3, alarm="performance")
    # The episode lists every check of the windows that counted, input ones beside the performance ones.
    assert episode == {"started_by": 3, "fired": ["concept", "embedding", "estimated_accuracy"]}
    store = DriftStore(f"sqlite:///{home / 'drift.db'}")
    for status, fired in PERFORMANCE:
        store.record(_decision(status, fired))
    store.record(_decision("drift", ("embedding",)), source="file")  # a file never moves an alarm
    alarms = store.alarm_states("m", "1", 2, 3)
    assert alarms["performance"].alarm and alarms["performance"].drifted == 2
    assert not alarms["input"].alarm and alarms["input"].drifted == 1
    store.close()


def test_the_opt_in_counts_input_drift_again_and_a_bad_choice_is_one_sentence():
    windows = _windows(INPUT_ONLY)
    assert retrain_alarm().alarm == "performance" and retrain_alarm().label == "performance"
    any_ = retrain_alarm("any")
    assert drift_episode(windows, 2, 3, any_.checks, any_.alarm)["started_by"] == 3  # as before issue 27
    chosen = retrain_alarm(checks=["embedding"])  # one window of the two: no alarm on these checks
    assert chosen.label == "checks:embedding" and not drift_episode(
        windows, 2, 3, chosen.checks, chosen.alarm
    )
    chosen = retrain_alarm(checks=["embedding", "prediction"])
    assert drift_episode(windows, 2, 3, chosen.checks, chosen.alarm)["started_by"] == 3
    with pytest.raises(ChampionError, match="alarm: 'inputs' is not one of performance, input, any"):
        retrain_alarm("inputs")
    with pytest.raises(ChampionError, match="checks: embeding is no drift check"):
        retrain_alarm(checks=["embeding"])
    with pytest.raises(ChampionError, match="give alarm or checks, not both"):
        retrain_alarm("any", ["concept"])


def test_drift_prints_both_alarms(home):
    from monitoring.check import DriftRun, format_decision

    store = DriftStore(f"sqlite:///{home / 'drift.db'}")
    for status, fired in INPUT_ONLY:
        store.record(_decision(status, fired))
    alarms = store.alarm_states("m", "1", 2, 3)
    store.close()
    run = DriftRun(_decision("drift", ("prediction",)), alarms["any"], 3, None, None, alarms)
    lines = format_decision(run).splitlines()
    assert "alarm: 2 of the last 3 judged windows drifted (alarm at 2 of 3)." in lines
    performance = next(line for line in lines if "performance alarm" in line)
    assert performance.startswith("  performance alarm off: 0 of the last 3 judged windows") and (
        "starts the scheduled retrain" in performance
    )
    inputs = next(line for line in lines if "input alarm" in line)
    assert inputs.startswith("  input alarm on: 2 of") and "starts no retrain unless" in inputs


@pytest.fixture
def champion(registry, tiny_model_dir, tickets_csv, tmp_path, home):
    """A promoted tiny champion and a retrain config with no fresh labels: a launched retrain is skipped
    (nothing trained) after it read the champion's recipe, which keeps this cheap."""
    from champion.registry import promote
    from pipelines.finetune import finetune

    version = finetune(tiny_finetune_config(tickets_csv, tiny_model_dir, train={"epochs": 1}),
                       registry=registry).version  # fmt: skip
    promote(registry, "tiny-intents", version, reason="first champion")
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "model_name": "tiny-intents", "promotion": "none", "fresh": {"from_log": False, "files": []},
        "triggers": {"cooldown_minutes": 60, "timeout_minutes": 10},
    }))  # fmt: skip
    return {"version": version, "config": str(config)}


def _store(version: str, windows) -> list[int]:
    from champion.config import default_log_url

    store = DriftStore(default_log_url())
    ids = [store.record(_decision(status, fired, "tiny-intents", version)) for status, fired in windows]
    store.close()
    return ids


def test_the_scheduled_job_retrains_on_the_performance_alarm_only_unless_it_opts_in(registry, champion):
    from champion.registry import story
    from pipelines.jobs import retrain_on_drift

    version = champion["version"]
    _store(version, INPUT_ONLY)
    quiet = retrain_on_drift("tiny-intents", champion["config"])
    assert not quiet["started"] and quiet["alarm"] == "performance"
    needed = "2 of 3 judged windows that drifted on a performance check needed"
    assert quiet["reason"] == f"no performance alarm on v{version} ({needed})."
    assert not [e for e in story(registry, "tiny-intents") if e["type"] == "loop"]

    # The opt-in of the shipped config's comment: input drift starts a retrain, as before issue 27.
    opted = retrain_on_drift("tiny-intents", champion["config"], alarm="any")
    assert opted["started"] and opted["alarm"] == "any" and opted["outcome"] == "skipped", opted

    # Now labelled accuracy and the label-free estimate fall: the default starts a retrain on its own key.
    ids = _store(version, [("drift", ("concept", "estimated_accuracy")), ("drift", ("estimated_accuracy",))])
    result = retrain_on_drift("tiny-intents", champion["config"])
    assert result["started"] and result["alarm"] == "performance" and result["outcome"] == "skipped", result
    assert result["trigger_key"] == f"drift:tiny-intents:v{version}:check-{ids[1]}"  # 2 of the last 3
    drift_steps = [e for e in story(registry, "tiny-intents") if e["action"] == "drift"]
    assert [e["evidence"]["drift_alarm"] for e in drift_steps] == ["any", "performance"]
    assert drift_steps[-1]["reason"] == (
        f"performance alarm on v{version}: 2 of the last 3 judged windows drifted on a performance check "
        f"(from window {ids[1]}; checks: concept, estimated_accuracy)."
    )


def test_each_alarm_is_a_gauge_and_their_max_is_the_old_series(home):
    from prometheus_client import REGISTRY

    from monitoring.check import DriftRun
    from monitoring.metrics import observe_drift

    store = DriftStore(f"sqlite:///{home / 'drift.db'}")
    for status, fired in INPUT_ONLY:
        store.record(_decision(status, fired, "gauged"))
    alarms = store.alarm_states("gauged", "1", 2, 3)
    store.close()
    observe_drift(
        DriftRun(_decision("drift", ("prediction",), "gauged"), alarms["any"], 3, None, None, alarms)
    )

    def alarm(kind):
        return REGISTRY.get_sample_value(
            "champion_drift_alarm", {"model": "gauged", "version": "1", "kind": kind}
        )

    assert (alarm("performance"), alarm("input"), alarm("any")) == (0, 1, 1)
