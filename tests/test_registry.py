"""Promotion, rollback and the audit history on a real sqlite MLflow registry in a temp folder."""

from __future__ import annotations

import pytest
from helpers import make_versions

from champion.audit import AliasEvent
from champion.errors import ChampionError
from champion.registry import (
    adopt,
    assign_alias,
    champion_lineage,
    conclude_canary,
    decide_promotion,
    decide_rollback,
    history,
    list_models,
    promote,
    rollback,
    show_model,
    unaudited_aliases,
)

M = "metric.val_macro_f1"


def _event(action: str, to: str | None, frm: str | None = None) -> AliasEvent:
    return AliasEvent("m", "champion", action, frm, to, "t", "r")


def test_decide_promotion_rules():
    better = decide_promotion("2", {M: "0.9"}, "1", {M: "0.8"})
    assert better.allowed and better.target_version == "2" and "0.9000 >= champion v1" in better.reason
    worse = decide_promotion("2", {M: "0.7"}, "1", {M: "0.8"})
    assert not worse.allowed and "worse" in worse.reason and "--force" in worse.reason
    assert decide_promotion("2", {M: "0.8"}, "1", {M: "0.8"}).allowed  # equal is not worse
    forced = decide_promotion("2", {M: "0.7"}, "1", {M: "0.8"}, force=True)
    assert forced.allowed and forced.evidence["forced"] is True
    assert decide_promotion("1", {}, None, {}).allowed  # first champion needs no metric
    assert not decide_promotion("2", {}, "1", {M: "0.8"}).allowed  # nothing to compare
    assert not decide_promotion("1", {M: "0.9"}, "1", {M: "0.9"}).allowed  # already champion
    other_metric = decide_promotion(
        "2",
        {"metric.val_accuracy": "0.6", M: "0.9"},
        "1",
        {"metric.val_accuracy": "0.7", M: "0.8"},
        metric="val_accuracy",
    )
    assert not other_metric.allowed


def test_lineage_replays_promotions_and_rollbacks():
    events = [_event("promote", "1"), _event("promote", "2"), _event("promote", "3"), _event("rollback", "2")]
    assert champion_lineage(events) == ["1", "2"]
    decision = decide_rollback(events, "2")
    assert decision.allowed and decision.target_version == "1"
    assert not decide_rollback(events[:1], "1").allowed
    assert not decide_rollback([], None).allowed


def test_promote_rollback_and_audit(registry):
    v1, v2, v3 = make_versions(registry, "clf", [0.80, 0.85, 0.70])
    first = promote(registry, "clf", v1, reason="first release")
    assert first.allowed and show_model(registry, "clf")["aliases"] == {"champion": v1}
    assert promote(registry, "clf", v2, reason="better").allowed

    refused = promote(registry, "clf", v3, reason="worse one")
    assert not refused.allowed and "worse" in refused.reason
    assert show_model(registry, "clf")["aliases"]["champion"] == v2
    assert len(history(registry, "clf")) == 2  # a refusal writes nothing

    forced = promote(registry, "clf", v3, reason="hotfix for a known bug", force=True)
    assert forced.allowed
    back = rollback(registry, "clf", reason="v3 misbehaves")
    assert back.allowed and back.target_version == v2
    assert rollback(registry, "clf", reason="again").target_version == v1
    assert not rollback(registry, "clf", reason="nothing before v1").allowed
    assert show_model(registry, "clf")["aliases"]["champion"] == v1

    events = history(registry, "clf")
    assert [(e.action, e.from_version, e.to_version) for e in events] == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("promote", v2, v3),
        ("rollback", v3, v2),
        ("rollback", v2, v1),
    ]
    assert all(e.actor == "pytest" and e.reason and e.at.tzinfo for e in events)
    assert events[2].evidence["forced"] is True and events[2].evidence["candidate_value"] == 0.7

    tags = registry.client.get_model_version("clf", v1).tags
    assert tags["audit.champion.action"] == "rollback" and tags["audit.champion.reason"] == "again"
    assert tags["audit.champion.event_id"] == str(events[-1].id)
    assert "by v2" in registry.client.get_model_version("clf", v3).tags["audit.champion.replaced"]


def test_an_alias_moved_outside_champion_counts_only_once_adopted(registry):
    """A move in the MLflow UI or API is not the history's: the next operations decide on the audited
    champion (a refused one records nothing), `doctor` reports it, and `adopt` makes it a person's move."""
    from champion.registry import doctor

    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    registry.client.set_registered_model_alias("clf", "champion", v2)  # e.g. someone in the MLflow UI
    assert registry.audit.aliases("clf") == {"champion": v1}
    assert unaudited_aliases(registry, "clf") == {"champion": (v1, v2)}
    assert not rollback(registry, "clf", reason="undo the manual change").allowed  # v1 has no earlier one
    assert not promote(registry, "clf", v1, reason="again").allowed  # v1 is the audited champion
    assert [(e.action, e.to_version) for e in history(registry, "clf")] == [("promote", v1)]
    (finding,) = doctor(registry, "clf")
    assert finding.kind == "unaudited_alias" and f"champion adopt clf champion {v2}" in finding.action

    refused = adopt(registry, "clf", "champion", v1, reason="wrong version")
    assert not refused.allowed and f"is on v{v2} in MLflow, not v{v1}" in refused.reason
    adopted = adopt(registry, "clf", "champion", v2, reason="ana moved it in the UI for the hotfix")
    assert adopted.allowed, adopted.reason
    events = history(registry, "clf")
    moves = [(e.action, e.from_version, e.to_version) for e in events]
    assert moves == [("promote", None, v1), ("adopt", v1, v2)]
    assert registry.audit.aliases("clf") == {"champion": v2} and unaudited_aliases(registry, "clf") == {}
    assert doctor(registry, "clf") == []
    assert rollback(registry, "clf", reason="the hotfix was wrong").target_version == v1


def test_assign_challenger_is_audited_separately(registry):
    (v1,) = make_versions(registry, "clf", [0.8])
    assert assign_alias(registry, "clf", "challenger", v1, reason="trained").allowed
    assert not assign_alias(registry, "clf", "challenger", v1, reason="again").allowed
    assert [e.alias for e in history(registry, "clf")] == ["challenger"]
    assert list_models(registry) == [
        {
            "name": "clf",
            "aliases": {"challenger": v1},
            "latest": v1,
            "updated": list_models(registry)[0]["updated"],
        }
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: promote(r, "nope", "1", reason="x"), "model 'nope' is not in the registry"),
        (lambda r: promote(r, "clf", "9", reason="x"), "version '9' of model 'clf' does not exist"),
        (lambda r: promote(r, "clf", "1", reason="  "), "--reason"),
        (lambda r: rollback(r, "nope", reason="x"), "model 'nope' is not in the registry"),
        (lambda r: history(r, "nope"), "champion models list"),
    ],
)
def test_bad_input_is_one_clear_sentence(registry, call, message):
    make_versions(registry, "clf", [0.8])
    with pytest.raises(ChampionError, match=message):
        call(registry)
    assert history(registry, "clf") == []
    assert show_model(registry, "clf")["aliases"] == {}


def test_rollback_to_a_deleted_version_is_refused_clearly(registry):
    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="a")
    promote(registry, "clf", v2, reason="b")
    registry.client.delete_model_version("clf", v1)
    with pytest.raises(ChampionError, match="version '1' of model 'clf' does not exist"):
        rollback(registry, "clf", reason="c")
    assert show_model(registry, "clf")["aliases"]["champion"] == v2
    assert len(history(registry, "clf")) == 2


class _Boom(RuntimeError):
    pass


def _fail_on(client, method: str, calls: set[int]):
    """Make `client.method` raise on the given (1-based) calls, and pass the others through."""
    real, count = getattr(client, method), {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] in calls:
            raise _Boom(f"{method} failed (call {count['n']})")
        return real(*args, **kwargs)

    return wrapper


def test_register_version_deletes_what_it_made_when_the_alias_move_fails(registry, monkeypatch):
    from champion.registry import register_version

    source = "file:///tmp/champion-test-model"
    client = registry.client
    alias_calls = _fail_on(client, "set_registered_model_alias", {1})
    monkeypatch.setattr(client, "set_registered_model_alias", alias_calls)
    with pytest.raises(_Boom):
        register_version(registry, "fresh", source, {"k": "v"}, "champion", "first")
    assert registry.client.search_registered_models(filter_string="name='fresh'") == []  # model gone too
    assert registry.audit.events("fresh") == []

    monkeypatch.undo()
    v1 = register_version(registry, "fresh", source, {}, "champion", "first")
    monkeypatch.setattr(
        registry.client, "set_model_version_tag", _fail_on(registry.client, "set_model_version_tag", {1})
    )
    with pytest.raises(_Boom):
        register_version(registry, "fresh", source, {}, "champion", "second")
    shown = show_model(registry, "fresh")
    assert [v["version"] for v in shown["versions"]] == [v1]  # only the new version was deleted
    assert shown["aliases"] == {"champion": v1}  # and the alias was put back on v1
    assert [e.to_version for e in registry.audit.events("fresh")] == [v1]


def test_register_version_says_what_is_left_when_its_clean_up_fails(registry, monkeypatch):
    from champion.registry import register_version

    source = "file:///tmp/champion-test-model"
    v1 = register_version(registry, "m", source, {}, "champion", "first")
    client = registry.client
    alias_calls = _fail_on(client, "set_registered_model_alias", {1})
    monkeypatch.setattr(client, "set_registered_model_alias", alias_calls)
    monkeypatch.setattr(client, "delete_model_version", _fail_on(client, "delete_model_version", {1}))
    with pytest.raises(_Boom) as info:
        register_version(registry, "m", source, {}, "champion", "second")
    (note,) = info.value.__notes__
    assert "deleting the half-registered 'm' v2 failed as well" in note and "without the alias" in note
    monkeypatch.undo()
    shown = show_model(registry, "m")
    assert [v["version"] for v in shown["versions"]] == ["2", v1] and shown["aliases"] == {"champion": v1}


def test_a_failed_move_puts_the_alias_back_and_records_nothing(registry, monkeypatch):
    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    client = registry.client
    monkeypatch.setattr(client, "set_model_version_tag", _fail_on(client, "set_model_version_tag", {1}))
    with pytest.raises(_Boom) as info:
        promote(registry, "clf", v2, reason="tags will fail")
    assert not getattr(info.value, "__notes__", None)  # the restore worked: nothing to add
    assert show_model(registry, "clf")["aliases"] == {"champion": v1}
    assert [e.to_version for e in history(registry, "clf")] == [v1]


def test_a_failed_restore_says_which_version_the_alias_is_left_on(registry, monkeypatch, caplog):
    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    client = registry.client
    monkeypatch.setattr(client, "set_model_version_tag", _fail_on(client, "set_model_version_tag", {1}))
    # The move itself (call 1) works; putting the alias back (call 2) fails.
    alias_calls = _fail_on(client, "set_registered_model_alias", {2})
    monkeypatch.setattr(client, "set_registered_model_alias", alias_calls)
    with pytest.raises(_Boom) as info:
        promote(registry, "clf", v2, reason="tags and restore fail")
    (note,) = info.value.__notes__
    assert f"restoring alias 'champion' of model 'clf' to v{v1} failed as well" in note
    assert f"it is left on v{v2} with no audit record" in note and note in caplog.text
    monkeypatch.undo()
    assert show_model(registry, "clf")["aliases"] == {"champion": v2}
    # Servers keep serving the audited v1; the leftover shows as an unaudited alias until someone decides.
    assert show_model(registry, "clf")["unaudited"] == {"champion": {"audited": v1, "in_mlflow": v2}}
    assert not promote(registry, "clf", v1, reason="back to the recorded champion", force=True).allowed
    assert adopt(registry, "clf", "champion", v2, reason="v2 was meant to be promoted").allowed
    events = history(registry, "clf")
    assert [(e.action, e.from_version, e.to_version) for e in events] == [
        ("promote", None, v1),
        ("adopt", v1, v2),
    ]


def test_cli_prints_the_notes_of_a_failed_clean_up(capsys, monkeypatch):
    from champion_cli import cli

    def fail(args):
        err = ChampionError("the move failed.")
        err.add_note("the alias is left on v2.")
        raise err

    monkeypatch.setattr(cli, "build_parser", lambda: _Parser(fail))
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "error: the move failed." in err and "note: the alias is left on v2." in err


class _Parser:
    def __init__(self, func):
        self.func = func

    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(func=self.func)


def test_a_canary_promotion_retires_the_challenger_in_the_same_audited_move(registry):
    """Issue 24 item 10: after the canary promoted v2 the console showed "champion v2 / challenger v2"."""
    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    assign_alias(registry, "clf", "challenger", v2, reason="trained")
    decision = conclude_canary(registry, "clf", v1, v2, True, "held every guardrail", {"clients": 40})
    assert decision.allowed and decision.target_version == v2
    assert show_model(registry, "clf")["aliases"] == {"champion": v2}
    champion, challenger = history(registry, "clf")[-2:]
    assert (champion.alias, champion.action, champion.from_version, champion.to_version) == (
        "champion",
        "canary_promote",
        v1,
        v2,
    )
    assert (challenger.alias, challenger.action, challenger.from_version, challenger.to_version) == (
        "challenger",
        "canary_promote",
        v2,
        None,
    )
    assert challenger.reason == champion.reason and registry.audit.aliases("clf") == {"champion": v2}


def test_every_reader_of_the_champion_follows_the_audit_history_not_mlflow(registry, monkeypatch):
    """Drift checks, retrains, their drift trigger, distillation's alias teacher and `champion predict` start
    from the audited champion: an alias set only in MLflow moves none of them until it is adopted."""
    from champion.registry import served_version
    from champion_cli.cli import _champion_version
    from monitoring.check import _alias
    from pipelines.distil import _resolve

    v1, v2 = make_versions(registry, "clf", [0.8, 0.9])
    promote(registry, "clf", v1, reason="first")
    registry.client.set_registered_model_alias("clf", "champion", v2)  # e.g. a registry writer
    readers = {
        "served_version": lambda: served_version(registry, "clf", "champion"),
        "drift": lambda: _alias(registry, "clf", "champion"),
        "predict": lambda: _champion_version(registry, "clf"),
        "distil": lambda: _resolve(registry, "clf", "champion"),
    }
    assert {k: read() for k, read in readers.items()} == dict.fromkeys(readers, v1)
    adopt(registry, "clf", "champion", v2, reason="moved in the UI for the hotfix")
    assert {k: read() for k, read in readers.items()} == dict.fromkeys(readers, v2)
