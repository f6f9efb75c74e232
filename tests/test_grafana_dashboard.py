"""The Grafana dashboard in serving/grafana: a valid dashboard whose queries use only what the server exports.

The exported series are not listed here: they come from the metric objects `serving.metrics.metrics()`
registers with prometheus_client's default registry, so renaming a metric or a label breaks this test
until the dashboard follows. Fast and offline: no Grafana, no Prometheus, no model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[1] / "serving" / "grafana" / "champion-serving.json"

# BentoML's own HTTP metrics (`metrics={"namespace": "bentoml_service"}` in serving/service.py), with the
# labels its RunnerTrafficMetricsMiddleware gives them; they are not ours to derive, so they are listed.
BENTOML_HTTP = ("endpoint", "service_name", "service_version", "http_response_code", "runner_name")
BENTOML_SERIES = {
    "bentoml_service_request_total": frozenset(BENTOML_HTTP),
    "bentoml_service_request_duration_seconds_bucket": frozenset({*BENTOML_HTTP, "le"}),
    "bentoml_service_request_duration_seconds_sum": frozenset(BENTOML_HTTP),
    "bentoml_service_request_duration_seconds_count": frozenset(BENTOML_HTTP),
    "bentoml_service_request_in_progress": frozenset(BENTOML_HTTP) - {"http_response_code"},
}

# The sample names each metric type exposes in multiprocess mode (no `_created`), and the extra label.
SUFFIXES = {
    "counter": (("_total", ()),),
    "gauge": (("", ()),),
    "histogram": (("_bucket", ("le",)), ("_sum", ()), ("_count", ())),
    "summary": (("_sum", ()), ("_count", ())),
}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w$.:])[a-zA-Z_:][\w:]*")
_SELECTOR = re.compile(r"(?<![\w$.:])([a-zA-Z_:][\w:]*)\s*\{((?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)")


def exported_series() -> dict[str, frozenset[str]]:
    """Every sample name the server exports, mapped to its label names, from the registered collectors."""
    from prometheus_client import REGISTRY

    from serving.metrics import Metrics, metrics

    instances = metrics()
    registered = REGISTRY._collector_to_names  # the default registry, which the server's /metrics serves
    series: dict[str, frozenset[str]] = {}
    for field in dataclasses.fields(Metrics):
        collector = getattr(instances, field.name)
        assert collector in registered, f"metrics().{field.name} is not registered with prometheus_client"
        labels = frozenset(collector._labelnames)
        for family in collector.describe():
            assert family.type in SUFFIXES, f"{family.name}: no rule for {family.type} metrics here"
            for suffix, extra in SUFFIXES[family.type]:
                name = family.name + suffix
                assert name in registered[collector], f"{name} is not among {registered[collector]}"
                series[name] = labels | set(extra)
    return series


def monitoring_series() -> dict[str, frozenset[str]]:
    """What the scheduler process exports on its /metrics (monitoring.metrics), a normal registry."""
    from prometheus_client import REGISTRY

    from monitoring.metrics import metrics

    registered = REGISTRY._collector_to_names
    series: dict[str, frozenset[str]] = {}
    for collector in vars(metrics()).values():
        assert collector in registered, f"{collector} is not registered with prometheus_client"
        for family in collector.describe():
            for suffix, extra in SUFFIXES[family.type]:
                assert family.name + suffix in registered[collector]
                series[family.name + suffix] = frozenset(collector._labelnames) | set(extra)
    return series


def known_series() -> dict[str, frozenset[str]]:
    return {**exported_series(), **monitoring_series(), **BENTOML_SERIES}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and those nested in (collapsed) rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation that carries an `expr`."""
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append(
                    (f"panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}", target["expr"])
                )
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    return found


def _skeleton(expr: str) -> str:
    """`expr` without string literals, label matchers, range durations and grouping label lists."""
    expr = _STRING.sub('""', expr)
    expr = _MATCHERS.sub("{}", expr)
    expr = _RANGE.sub("[]", expr)
    return _GROUPING.sub(" ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or $vars."""
    skeleton = _skeleton(expr)
    names = set()
    for match in _IDENT.finditer(skeleton):
        rest = skeleton[match.end() :].lstrip()
        if match.group() in PROMQL_WORDS or rest.startswith("("):
            continue  # a keyword, or a function / aggregation call
        names.add(match.group())
    return names


def _group(text: str, start: int, forward: bool) -> str:
    """The balanced parenthesised group opening (forward) or closing (backward) at `start`."""
    depth, step, i = 0, (1 if forward else -1), start
    while 0 <= i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0) * step
        if depth == 0:
            return text[start : i + 1] if forward else text[i : start + 1]
        i += step
    raise ValueError(f"unbalanced parentheses in {text!r}")


def label_problems(expr: str, series: dict[str, frozenset[str]]) -> list[str]:
    """Labels the expression selects or groups by that its metrics do not have."""
    problems = []
    for metric, body in _SELECTOR.findall(expr):
        for label, _, _ in _MATCHER.findall(body):
            if metric in series and label not in series[metric]:
                problems.append(f"{metric} has no label {label!r}")
    masked = _STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)  # keeps offsets
    every = set().union(*(series.get(m, frozenset()) for m in metric_names(expr)))
    for clause in _GROUPING.finditer(masked):
        keyword, labels = clause.group(1), {x.strip() for x in clause.group(2).split(",") if x.strip()}
        if keyword not in ("by", "without"):  # vector matching: the label must exist on some operand
            problems += [f"{keyword} ({label}): no metric here has it" for label in sorted(labels - every)]
            continue
        after = masked[clause.end() :].lstrip()
        if after.startswith("("):  # sum by (x) (arg)
            argument = _group(masked, len(masked) - len(after), forward=True)
        else:  # sum (arg) by (x)
            before = masked[: clause.start()].rstrip()
            argument = _group(masked, len(before) - 1, forward=False)
        for metric in sorted(metric_names(argument)):
            known = series.get(metric, frozenset())
            problems += [
                f"{keyword} ({label}): {metric} has no such label" for label in sorted(labels - known)
            ]
            if metric.endswith("_bucket") and keyword == "by" and "le" not in labels:
                problems.append(f"by ({', '.join(sorted(labels))}) over {metric} drops the 'le' label")
    return problems


def dashboard_problems(dashboard: dict, series: dict[str, frozenset[str]]) -> list[str]:
    """Everything in the dashboard's queries that the server does not export, one line each."""
    problems = []
    for where, expr in queries(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric found in {expr!r}")
        problems += [f"{where}: {name} is not exported by the server" for name in sorted(names - set(series))]
        problems += [f"{where}: {p}" for p in label_problems(expr, series)]
        for metric, body in _SELECTOR.findall(expr):
            if "model" in series.get(metric, ()) and 'model=~"$model"' not in body:
                problems.append(f'{where}: {metric} is not filtered by model=~"$model"')
        for metric in names & {m for m, labels in series.items() if "model" in labels}:
            if not re.search(re.escape(metric) + r"\s*\{", expr):
                problems.append(f'{where}: {metric} is not filtered by model=~"$model"')
        for window in re.findall(r"\[([^\]]*)\]", expr):
            if window != "$__rate_interval":
                problems.append(f"{where}: range [{window}] should be $__rate_interval")
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        for metric, label in _LABEL_VALUES.findall(f"{query} {variable.get('definition', '')}"):
            if metric not in series:
                problems.append(f"variable {variable['name']}: {metric} is not exported by the server")
            elif label not in series[metric]:
                problems.append(f"variable {variable['name']}: {metric} has no label {label!r}")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    return known_series()


def test_exported_series_come_from_the_registered_metrics():
    series = exported_series()
    assert series["champion_requests_total"] == {"model", "version", "arm"}
    assert series["champion_request_latency_seconds_bucket"] == {"model", "version", "arm", "le"}
    assert series["champion_errors_total"] == {"model", "version", "arm", "kind"}
    assert series["champion_served_version"] == {"model", "alias", "version", "format"}
    assert "champion_requests" not in series and "champion_requests_created" not in series


def test_dashboard_structure(dashboard):
    assert dashboard["title"] and dashboard["uid"] == "champion-serving"
    assert dashboard["schemaVersion"] == 39
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos), panel["title"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"panel {panel['id']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        description = panel["description"]
        assert description.endswith(".") and ". " not in description, f"one sentence: {panel['title']}"
        assert "unit" in panel["fieldConfig"]["defaults"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_template_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    assert model["definition"] == "label_values(champion_requests_total, model)"
    assert model["query"]["query"] == model["definition"]


def test_units(dashboard):
    units = {
        p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in all_panels(dashboard) if p["type"] != "row"
    }
    for title, unit in units.items():
        if "latency" in title.lower():
            assert unit == "s", title
        if "/s" in title:
            assert unit == "reqps", title
        if any(word in title.lower() for word in ("share", "agreement", "confidence")):
            assert unit == "percentunit", title


def test_every_query_uses_exported_metrics_and_labels(dashboard, series):
    assert queries(dashboard), "the dashboard has no queries"
    assert dashboard_problems(dashboard, series) == []


def test_every_champion_metric_is_on_the_dashboard(dashboard, series):
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    from serving.metrics import Metrics, metrics

    for field in dataclasses.fields(Metrics):
        family = getattr(metrics(), field.name)._name
        assert any(name.startswith(family) and name in series for name in used), f"{family} has no panel"


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (le, version) (rate(a_bucket{model=~"$model", x="b{c}(d)"}'
        "[$__rate_interval]))) / on (version) group_left() b_total offset 5m"
        " > bool 1e3 and sum(c:recorded[5m:1m]) without (arm) or vector(0) unless d"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded", "d"}
    assert metric_names("sum(rate(x_total[$__interval])) by (arm)") == {"x_total"}


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("champion_requests_total{", "champion_requestz_total{", "champion_requestz_total is not exported"),
        ("champion_confidence_bucket{", "champion_confidence{", "champion_confidence is not exported"),
        ("sum by (version, arm)", "sum by (version, tenant)", "has no such label"),
        ("sum by (le, version, arm)", "sum by (version, arm)", "drops the 'le' label"),
        ('agrees="True"', 'agreed="True"', "has no label 'agreed'"),
        ('{model=~"$model"}', "{}", 'is not filtered by model=~"$model"'),
        ("[$__rate_interval]", "[5m]", "should be $__rate_interval"),
        ("rate(bentoml_service_request_total", "rate(bentoml_service_requests_total", "is not exported"),
    ],
)
def test_problems_are_flagged(dashboard, series, old, new, complaint):
    """A corrupted copy of the dashboard fails the check, so the check can fail."""
    broken = copy.deepcopy(dashboard)
    hits = 0
    for panel in all_panels(broken):
        for target in panel.get("targets", []):
            if old in target.get("expr", ""):
                target["expr"] = target["expr"].replace(old, new)
                hits += 1
    assert hits, f"{old!r} is not in any query; update this test"
    problems = dashboard_problems(broken, series)
    assert any(complaint in p for p in problems), problems


def test_bad_model_variable_is_flagged(dashboard, series):
    broken = copy.deepcopy(dashboard)
    model = next(v for v in broken["templating"]["list"] if v["name"] == "model")
    model["definition"] = model["query"]["query"] = "label_values(champion_requests_total, modle)"
    assert any("has no label 'modle'" in p for p in dashboard_problems(broken, series))
