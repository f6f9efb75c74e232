"""Kill -9 at every step of registering, promoting and training: the next operation (or `champion doctor
--fix`) leaves no version without its audit event, no alias move without its row, no orphaned RUNNING run,
and each alias's history one unbroken chain that ends where MLflow's alias is."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal

import pytest
from helpers import crash_child, make_versions

from champion.registry import assign_alias, doctor, promote
from champion.repair import REGISTRATION_TAG
from champion_cli.cli import main

NAME = "tiny-intents"
_ENV_KEYS = ("CHAMPION_HOME", "CHAMPION_ACTOR", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL")


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported MLflow and the pipelines once: a kill costs ~0.1 s."""
    ctx = multiprocessing.get_context("forkserver")
    mlflow_stores = ["mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store"]
    training = ["torch", "transformers", "peft", "pipelines.model", "mlflow.transformers"]
    ctx.set_forkserver_preload(["helpers", "champion.registry", *mlflow_stores, *training])
    return ctx


def _crash(ctx, point: str, op: str, **args) -> None:
    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    child = ctx.Process(target=crash_child, args=(env, point, op, args))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, f"{op} never reached {point} (exit {child.exitcode})"


def assert_settled(reg, name: str = NAME) -> None:
    """The invariants every crash must leave true once the next operation ran."""
    from champion.audit import alias_events, registrations

    with reg.audit.engine.connect() as conn:
        statuses = conn.execute(alias_events.select().with_only_columns(alias_events.c.status)).scalars()
        assert "pending" not in set(statuses)
        regs = conn.execute(registrations.select().with_only_columns(registrations.c.status)).scalars()
        assert "pending" not in set(regs)
    model = reg.client.get_registered_model(name)
    events = reg.audit.events(name)
    audited = {e.to_version for e in events}
    for mv in reg.client.search_model_versions(f"name = '{name}'"):
        if REGISTRATION_TAG in mv.tags:  # made by register_version (the others by make_versions)
            assert str(mv.version) in audited, f"v{mv.version} was registered but has no audit event"
    for alias in {e.alias for e in events} | set(model.aliases):
        chain = [e for e in events if e.alias == alias]
        for before, after in itertools.pairwise(chain):
            assert after.from_version == before.to_version, f"'{alias}' history broken at event {after.id}"
            assert after.action != "external", f"an alias move without its row: {after}"
        now = model.aliases.get(alias)
        assert chain[-1].to_version == (None if now is None else str(now))
    for run in reg.client.search_runs(
        [e.experiment_id for e in reg.client.search_experiments()], "attributes.status = 'RUNNING'"
    ):
        raise AssertionError(f"run {run.info.run_id} is still RUNNING after its process died")


@pytest.mark.parametrize("settle", ["next_operation", "doctor"])
def test_kill_9_at_every_step_of_promote_rollback_and_register(registry, forkserver, settle, capsys):
    versions = make_versions(registry, NAME, [0.5, 0.6, 0.7, 0.8])
    assign_alias(registry, NAME, "challenger", versions[0], reason="start")
    promote(registry, NAME, versions[0], reason="start")
    kills = [
        ("alias:announced", "promote", {"version": versions[1]}),
        ("alias:moved", "promote", {"version": versions[1]}),
        ("alias:done", "promote", {"version": versions[2]}),
        ("alias:announced", "rollback", {}),
        ("alias:moved", "rollback", {}),
        ("alias:moved", "assign", {"version": versions[3]}),
        ("alias:announced", "assign", {"version": versions[2]}),
        ("register:announced", "register", {"uri": "file:///tmp/champion-test-model"}),
        ("register:registered", "register", {"uri": "file:///tmp/champion-test-model"}),
        ("alias:announced", "register", {"uri": "file:///tmp/champion-test-model"}),
        ("alias:moved", "register", {"uri": "file:///tmp/champion-test-model"}),
    ]
    for i, (point, op, args) in enumerate(kills):
        _crash(forkserver, point, op, name=NAME, **args)
        if settle == "doctor":
            assert main(["doctor", NAME]) == 1 or point == "alias:done"  # found, not yet fixed
            assert main(["doctor", "--fix"]) == 0
            assert main(["doctor"]) == 0  # nothing left
        else:  # any registry operation settles first
            target = versions[i % 2]
            assign_alias(registry, NAME, "challenger", target, reason="next operation") if target != (
                registry.client.get_registered_model(NAME).aliases.get("challenger")
            ) else promote(registry, NAME, target, reason="next operation", force=True)
        assert_settled(registry)
    capsys.readouterr()


def test_kill_9_during_finetune_leaves_no_running_run_or_unaliased_version(
    registry, forkserver, tiny_model_dir, tickets_csv
):
    paths = {"data": str(tickets_csv), "model": str(tiny_model_dir)}
    for point in ("finetune:step#3", "register:registered", "alias:moved"):
        _crash(forkserver, point, "finetune", name=NAME, **paths)
        findings = doctor(registry, fix=True)
        assert findings, f"a kill at {point} left nothing for doctor to settle"
        assert any(f.kind == "running_run" for f in findings)  # the run was RUNNING when it died
        if registry.client.search_registered_models(f"name = '{NAME}'"):
            assert_settled(registry)
    runs = registry.client.search_runs([e.experiment_id for e in registry.client.search_experiments()])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 3
    assert all("died" in r.data.tags["champion.failure"] for r in runs)


def _conclude_canary_child(env: dict[str, str], point: str, args: dict) -> None:
    """A canary promotion (two alias moves in one audited step) killed at `point`, in a forked child."""
    os.environ.update(env)
    os.environ["CHAMPION_CRASH_AT"] = point
    from champion.registry import conclude_canary, connect

    conclude_canary(connect(), NAME, args["champion"], args["challenger"], True, "crash test", {})
    os._exit(0)  # the crash point was not reached


def test_kill_9_in_a_canary_promotion_settles_each_of_its_moves(registry, forkserver):
    """A canary promotion moves `champion` and retires `challenger` in one audited step: a kill at any
    point leaves each alias's history one chain that ends where MLflow's alias is, once settled."""
    versions = make_versions(registry, NAME, [0.5, 0.6, 0.7, 0.8])
    promote(registry, NAME, versions[0], reason="start")
    for point, challenger in zip(("alias:announced", "alias:moved", "alias:done"), versions[1:], strict=True):
        champion = registry.audit.aliases(NAME)["champion"]
        assign_alias(registry, NAME, "challenger", challenger, reason="the next canary")
        env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
        child = forkserver.Process(target=_conclude_canary_child, args=(env, point, {"champion": champion,
                                   "challenger": challenger}))  # fmt: skip
        child.start()
        child.join(120)
        assert child.exitcode == -signal.SIGKILL, f"never reached {point} (exit {child.exitcode})"
        assert main(["doctor", "--fix"]) == 0
        assert_settled(registry)
        aliases = registry.audit.aliases(NAME)
        expected = champion if point == "alias:announced" else challenger
        assert aliases["champion"] == expected, (point, aliases)
