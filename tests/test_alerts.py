"""The Prometheus alerting rules: promtool checks and unit-tests them where it is installed; everywhere, each
rule is well-formed and uses only metrics that the service and the scheduler actually export."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).parents[1] / "serving" / "prometheus" / "alerts.yml"
WANTED = {  # what the alerts must watch (issue: error rate, p99, log backlog, drift, old approvals)
    "ChampionHighErrorRate": "champion_errors_total",
    "ChampionP99LatencyHigh": "champion_request_latency_seconds_bucket",
    "ChampionInferenceLogBehind": "champion_inference_log_behind_seconds",
    "ChampionPerformanceAlarm": 'champion_drift_alarm{kind="performance"}',  # issue 27: what retrains
    "ChampionInputDriftAlarm": 'champion_drift_alarm{kind="input"}',  # an alert, no retrain by default
    "ChampionPendingApprovalOld": "champion_pending_approval_oldest_timestamp_seconds",
    "ChampionAliasUnaudited": "champion_alias_unaudited",  # issue 24: moved in MLflow, not adopted
}
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "max",
    "min",
    "time",
    "histogram_quantile",
    "le",
    "kind",
    "model",
    "version",
    "job",
    "alias",
}


def _exported() -> set[str]:
    """Every series name the two /metrics endpoints can show (counters as _total, histograms _bucket...)."""
    from monitoring.metrics import metrics as monitoring_metrics
    from serving.metrics import metrics as serving_metrics

    names = set()
    served = serving_metrics()
    for metric in [*(getattr(served, f.name) for f in fields(served)), *vars(monitoring_metrics()).values()]:
        for family in metric.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""]
            )
            names |= {family.name + s for s in suffixes}
    return names


def test_every_rule_is_complete_and_uses_exported_metrics():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    exported = _exported()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"page", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        used = {w for w in re.findall(r"\b(champion_\w+)", rule["expr"])}
        assert used and used <= exported, f"{name} uses {used - exported}, which nothing exports"
        words = set(re.findall(r"\b([a-z_]+)\b", re.sub(r'"[^"]*"', "", rule["expr"]))) - used
        assert words <= PROMQL_WORDS, f"{name}: unexpected words {words - PROMQL_WORDS}"
    for alert, metric in WANTED.items():
        assert metric in rules[alert]["expr"]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
def test_promtool_checks_the_rules_and_each_alert_fires_and_stays_quiet():
    check = subprocess.run(["promtool", "check", "rules", RULES.name], cwd=RULES.parent, capture_output=True,
                           text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    count = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert f"SUCCESS: {count} rules found" in check.stdout
    unit = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=RULES.parent,
                          capture_output=True, text=True)  # fmt: skip
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = set(re.findall(r"alertname: (\w+)", (RULES.parent / "alerts_test.yml").read_text()))
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert tested == rules, f"alerts without a unit test: {rules - tested}"


# The tests' PROMETHEUS_MULTIPROC_DIR (for the service) makes prometheus_client warn on label removal; the
# scheduler process that runs this job serves its own registry without it.
@pytest.mark.filterwarnings("ignore:Removal of labels has not been implemented")
def test_the_approvals_job_expires_and_publishes_what_waits(registry):
    from helpers import make_versions
    from prometheus_client import REGISTRY

    from champion.approval import reject, request_approval
    from champion.registry import promote
    from monitoring.jobs import approvals

    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    make_versions(registry, "other", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    asked = datetime.now(UTC) - timedelta(hours=30)
    request_approval(registry, "clf", v2, "direct", v1, "passed", {}, hours=72, actor="scheduler", now=asked)
    request_approval(registry, "other", "2", "direct", None, "passed", {}, hours=1, actor="scheduler",
                     now=asked)  # fmt: skip
    result = approvals()
    assert result == {"expired": ["other v2"], "waiting": ["clf v2"]}

    def sample(name, model):
        return REGISTRY.get_sample_value(name, {"model": model})

    assert sample("champion_pending_approvals", "clf") == 1
    assert sample("champion_pending_approval_oldest_timestamp_seconds", "clf") == pytest.approx(
        asked.timestamp(), abs=1
    )
    assert time.time() - sample("champion_pending_approval_oldest_timestamp_seconds", "clf") > 86400  # alert
    assert sample("champion_pending_approval_oldest_timestamp_seconds", "other") is None

    reject(registry, "clf", v2, reason="no", actor="ana")
    assert approvals() == {"expired": [], "waiting": []}
    assert sample("champion_pending_approvals", "clf") == 0
    assert sample("champion_pending_approval_oldest_timestamp_seconds", "clf") is None
