"""The `champion` command. Heavy libraries are imported inside each verb, so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from champion.errors import ChampionError, InterruptedRun


def _terminate_as_interrupt(signum, frame):  # SIGTERM (kill, schedulers) gets the Ctrl-C clean-up path
    raise KeyboardInterrupt


def cmd_finetune(args: argparse.Namespace) -> int:
    from champion.config import load_config
    from pipelines.finetune import FinetuneConfig, finetune

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    result = finetune(cfg)
    if not result.version:  # another rank of a torchrun / accelerate launch: rank 0 registers and reports
        return 0
    m = result.metrics
    print(f"registered {result.model_name} v{result.version} as '{cfg.registry.alias}' (run {result.run_id})")
    print(f"  validation: accuracy {m['val_accuracy']:.4f}, macro-F1 {m['val_macro_f1']:.4f}")
    print(f"  test:       accuracy {m['test_accuracy']:.4f}, macro-F1 {m['test_macro_f1']:.4f}")
    print(f'  next: champion promote {result.model_name} {result.version} --reason "..."')
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from champion.config import load_config
    from pipelines.sft import SFTConfig, sft

    cfg = load_config(SFTConfig, args.config, args.overrides)
    result = sft(cfg)
    if not result.version:  # another rank of a torchrun / accelerate launch: rank 0 registers and reports
        return 0
    m = result.metrics
    print(f"registered {result.model_name} v{result.version} as '{cfg.registry.alias}' (run {result.run_id})")
    for split in ("val", "test"):
        print(
            f"  {'validation' if split == 'val' else 'test':<11} valid JSON {m[f'{split}_valid_json']:.3f}, "
            f"intent accuracy {m[f'{split}_intent_accuracy']:.3f}, entity F1 {m[f'{split}_entity_f1']:.3f}, "
            f"exact match {m[f'{split}_exact_match']:.3f}"
        )
    print(f'  next: champion promote {result.model_name} {result.version} --reason "..."')
    return 0


def cmd_distil(args: argparse.Namespace) -> int:
    from champion.config import load_config
    from pipelines.distil import DistilConfig, distil

    cfg = load_config(DistilConfig, args.config, args.overrides)
    result = distil(cfg)
    if not result.version:  # another rank of a torchrun / accelerate launch: rank 0 registers and reports
        return 0
    m = result.metrics
    verdict = "within budget" if result.decision.promote else "REFUSED"
    print(f"registered {result.name} v{result.version} (student of v{result.teacher_version}) as "
          f"'candidate' (run {result.run_id}): {verdict}")  # fmt: skip
    print(f"  {result.decision.reason}")
    print(f"  test: accuracy {m['test_accuracy']:.4f}, macro-F1 {m['test_macro_f1']:.4f} (teacher "
          f"{m['teacher_test_accuracy']:.4f}, {m['teacher_test_macro_f1']:.4f}); x{m['speedup_batch']:.2f} "
          f"throughput")  # fmt: skip
    if result.promoted:
        print(f"  promoted to champion (champion history {result.name})")
    elif result.decision.promote:
        print(f'  next: champion promote {result.name} {result.version} --reason "..."')
    return 0 if result.decision.promote else 1


def cmd_models(args: argparse.Namespace) -> int:
    from champion.config import redact_uri
    from champion.registry import TASK_TAG, TEXT_CLASSIFICATION, connect, list_models, show_model

    reg = connect()
    if args.models_verb == "list":
        models = list_models(reg)
        if args.json:
            print(json.dumps(models, indent=2))
        elif not models:
            where = redact_uri(reg.tracking_uri)
            print(f"no registered models in {where}; run `champion finetune CONFIG` first.")
        else:
            _table(
                [
                    [
                        m["name"],
                        m["aliases"].get("champion", "-"),
                        m["aliases"].get("challenger", "-"),
                        m["latest"] or "-",
                        m["updated"] or "-",
                    ]
                    for m in models
                ],
                ["NAME", "CHAMPION", "CHALLENGER", "LATEST", "UPDATED"],
            )
        return 0
    info = show_model(reg, args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{info['name']}  aliases: "
        + (", ".join(f"{k}=v{v}" for k, v in sorted(info["aliases"].items())) or "none")
    )
    rows = []
    for v in info["versions"]:
        t = v["tags"]
        kind = t.get("variant") or t.get("method", "-")
        if t.get("source_version"):
            kind += f" of v{t['source_version']}"
        if t.get("gate.within_budget") == "false":
            kind += " (outside budget)"
        rows.append(
            [
                v["version"],
                ",".join(v["aliases"]) or "-",
                t.get("metric.val_macro_f1", t.get("metric.heldout_macro_f1", "-"))[:6],
                t.get("metric.test_accuracy", t.get("metric.heldout_accuracy", "-"))[:6],
                kind,
                t.get("format", "safetensors"),
                _cost(t),
                t.get("data_sha256", "-")[:12],
                t.get(TASK_TAG, TEXT_CLASSIFICATION),  # versions from before the tag are classifiers
                v["created"],
            ]
        )
    header = ["VERSION", "ALIASES", "VAL_F1", "TEST_ACC", "KIND", "FORMAT", "CPU-S/1K (COST/1M)", "DATA"]
    _table(rows, [*header, "TASK", "CREATED"])
    return 0


def _cost(tags: dict[str, str]) -> str:
    """CPU-seconds per 1,000 predictions and the cost per million (a language model: per 1,000 generated
    tokens and their cost), where a compress/distil run measured it."""
    seconds = tags.get("cost.cpu_seconds_per_1k")
    if seconds is None:
        tokens = tags.get("cost.cpu_seconds_per_1k_tokens")
        if tokens is None:
            return "-"
        return f"{float(tokens):.1f}/1k tok ({float(tags.get('cost.per_1k_tokens', 'nan')):.5f})"
    return f"{float(seconds):.2f} ({float(tags.get('cost.per_million', 'nan')):.3f})"


def _decision_exit(decision, verb: str) -> int:
    if decision.allowed:
        print(f"{verb}: {decision.reason} (audit event #{decision.event_id})")
        return 0
    print(f"{verb} refused: {decision.reason}", file=sys.stderr)
    return 1


def cmd_promote(args: argparse.Namespace) -> int:
    from champion.registry import connect, promote

    decision = promote(connect(), args.name, args.version, args.reason, force=args.force, metric=args.metric)
    return _decision_exit(decision, "promote")


def cmd_rollback(args: argparse.Namespace) -> int:
    from champion.registry import connect, rollback

    return _decision_exit(rollback(connect(), args.name, args.reason), "rollback")


def cmd_adopt(args: argparse.Namespace) -> int:
    from champion.registry import adopt, connect

    version = None if args.version.lower() == "none" else args.version
    return _decision_exit(adopt(connect(), args.name, args.alias, version, args.reason), "adopt")


def cmd_pending(args: argparse.Namespace) -> int:
    from champion.approval import pending_promotions
    from champion.registry import connect

    items = pending_promotions(connect(), args.name)
    if args.json:
        print(json.dumps([i.to_dict() for i in items], indent=2, default=str))
    elif not items:
        print("no promotion waits for approval.")
    else:
        rows = [
            [
                i.model_name,
                i.version,
                i.target,
                i.requested_by,
                f"{i.expires_at:%Y-%m-%d %H:%M}",
                i.gate_reason,
            ]
            for i in items
        ]
        _table(rows, ["MODEL", "VERSION", "TARGET", "ASKED BY", "EXPIRES (UTC)", "GATE"])
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from champion.approval import approve
    from champion.registry import connect

    return _decision_exit(approve(connect(), args.name, args.version, args.reason), "approve")


def cmd_reject(args: argparse.Namespace) -> int:
    from champion.approval import reject
    from champion.registry import connect

    item = reject(connect(), args.name, args.version, args.reason)
    print(f"rejected: v{item.version} of {item.model_name} stays registered and moves nowhere")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from champion.config import load_config
    from monitoring.review import ReviewConfig, ReviewQueue

    queue = ReviewQueue(args.log_url)
    try:
        if args.review_verb == "select":
            if _served_task(args.name, None) == "text-generation":
                raise ChampionError(
                    f"'{args.name}' is a text-generation model; the review queue picks classifiers' answers "
                    "only for now (rate generated answers through the service's /feedback)."
                )
            cfg = load_config(ReviewConfig, args.config) if args.config else ReviewConfig()
            result = queue.select(args.name, cfg)
            print(json.dumps(result.__dict__, default=str) if args.json else result.reason)
        elif args.review_verb == "next":
            item = queue.next(args.name)
            if item is None:
                print(f"nothing waits for review for {args.name}.")
                return 0
            if args.json:
                print(json.dumps(item.__dict__, default=str))
            else:
                print(f"{item.request_id} [{item.sample}: {', '.join(item.reasons)}] {item.text!r}")
                for label, p in item.choices:
                    print(f"  {p:.3f}  {label}")
        else:
            item = queue.answer(
                args.name, args.request_id, args.reviewer or _actor(), args.label, skip=args.skip
            )
            print(f"{item.status}: {item.request_id}" + (f" as {item.answer!r}" if item.answer else ""))
    finally:
        queue.close()
    return 0


def _actor() -> str:
    from champion.audit import current_actor

    return current_actor()


def cmd_console(args: argparse.Namespace) -> int:
    from champion_cli.console import serve

    serve(args.host, args.port, allowed_hosts=args.allowed_host, trusted_proxies=args.trusted_proxy,
          log_url=args.log_url, review_config=args.review_config, mlflow_ui=args.mlflow_ui,
          monitor_config=args.monitor_config)  # fmt: skip
    return 0


def cmd_console_user(args: argparse.Namespace) -> int:
    import getpass

    from champion_cli.console_auth import role_of_account, set_role, set_user, users_path

    if args.role and not args.password_stdin and role_of_account(args.name) is not None:
        set_role(args.name, args.role)  # an existing account: its role only, no password prompt
        print(f"console account {args.name!r} is now {args.role} (password unchanged; sessions ended)")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ChampionError("password: the two entries differ; nothing changed.")
    role = set_user(args.name, password, role=args.role)
    print(f"console account {args.name!r} ({role}) saved in {users_path()}")
    return 0


def cmd_console_token(args: argparse.Namespace) -> int:
    from champion_cli.console_auth import new_token, revoke_token

    if args.revoke:
        had = revoke_token(args.name)
        print(f"console token of {args.name!r} revoked" if had else f"{args.name!r} had no console token")
        return 0
    path = new_token(args.name, out=Path(args.out) if args.out else None)
    print(f"console token of {args.name!r} written to {path} (mode 0600; an earlier one stops working); "
          "a script sends it as `Authorization: Bearer $(cat FILE)` and acts as that account.")  # fmt: skip
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from champion.registry import connect, story

    entries = story(connect(), args.name)
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    if not entries:
        print(f"nothing recorded for {args.name} yet.")
        return 0
    rows = []
    for e in entries:
        if e["type"] == "alias":
            what = f"{e['from_version'] or '-'} -> {e['to_version'] or '-'}"
            rows.append([str(e["id"]), e["at"][:19], e["alias"], e["action"], what, e["actor"], e["reason"]])
        else:
            version = e["version"] or "-"
            rows.append([f"L{e['id']}", e["at"][:19], "-", e["action"], version, e["actor"], e["reason"]])
    _table(rows, ["#", "AT", "ALIAS", "ACTION", "VERSION", "BY", "REASON"])
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from champion.registry import connect, doctor

    findings = doctor(connect(), args.name, fix=args.fix)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    elif not findings:
        print("nothing left half-done: every alias move and registration is settled, no orphaned runs.")
    else:
        rows = [[f.model or "-", f.kind, f.subject, f.action] for f in findings]
        _table(rows, ["MODEL", "KIND", "WHAT", "FIXED" if args.fix else "WOULD BE FIXED (run with --fix)"])
    return 0 if all(f.fixed for f in findings) else 1  # an unaudited alias waits for `adopt`


def cmd_ui(args: argparse.Namespace) -> int:
    from champion.config import artifact_root, champion_home, prepare_environment, redact_uri, tracking_uri

    prepare_environment()
    uri = tracking_uri()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}  # not in argv: `ps` shows argv to every user
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    if uri.startswith("sqlite:"):
        champion_home().mkdir(parents=True, exist_ok=True)
        command += ["--default-artifact-root", artifact_root().as_uri()]
    print(f"MLflow UI on http://{args.host}:{args.port} for {redact_uri(uri)} (Ctrl-C stops it)", flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached


def cmd_data(args: argparse.Namespace) -> int:
    from pipelines.ticketgen import write_tickets

    kwargs = {"seed": args.seed, "typo_rate": args.typo_rate, "vocabulary_shift": args.vocabulary_shift}
    if args.intents:
        kwargs["intents"] = args.intents.split(",")
    try:
        path = write_tickets(args.out, args.rows, **kwargs)
    except ValueError as err:
        raise ChampionError(str(err)) from None
    print(f"wrote {args.rows} support tickets to {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from champion.config import prepare_environment
    from serving.config import (
        CONFIG_ENV,
        FEEDBACK_KEY_ENV,
        ensure_feedback_key,
        load_serve_config,
        write_config,
    )

    prepare_environment()
    cfg = load_serve_config(args.config, args.name, port=args.port, host=args.host, workers=args.workers)
    if cfg.task == "auto":
        cfg = load_serve_config(
            args.config, args.name, port=args.port, host=args.host, workers=args.workers,
            task=_served_task(cfg.model, cfg.tracking_uri),
        )  # fmt: skip
    generative = cfg.task == "text-generation"
    env = dict(os.environ)
    env[CONFIG_ENV] = str(write_config(cfg))
    env["HF_HUB_OFFLINE"] = "1"  # the server loads only checked local files; it never reaches the hub
    # Each worker pins its own torch threads; these keep OpenMP/MKL pools from oversubscribing the cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(cfg.threads))
    if (made := ensure_feedback_key()) is not None:
        print(f"{FEEDBACK_KEY_ENV} was not set; this server's key for /feedback and /reload is in {made}")
    api = "the OpenAI API at /v1" if generative else "/predict"
    print(
        f"serving {cfg.model}@champion ({cfg.task}, {cfg.traffic.policy} policy; {api}) on "
        f"http://{cfg.host}:{cfg.port} with {cfg.workers} worker(s); Ctrl-C stops it",
        flush=True,
    )
    target = "serving.lm_service:ChampionLMService" if generative else "serving.service:ChampionService"
    command = [sys.executable, "-m", "bentoml", "serve", target,
               "--host", cfg.host, "--port", str(cfg.port)]  # fmt: skip
    os.execve(sys.executable, command, env)
    return 0  # not reached


def _served_task(name: str, tracking: str | None) -> str:
    """What `name` does, from the registry: its champion's `task` tag, else its newest version's (a server
    started before the first promotion), else a classifier."""
    from champion.registry import CHAMPION, TEXT_CLASSIFICATION, connect, served_version
    from serving.model import task_of

    reg = connect(tracking)
    try:
        version = served_version(reg, name, CHAMPION)
        if version is None:
            versions = reg.client.search_model_versions(f"name = '{name}'")
            if not versions:
                return TEXT_CLASSIFICATION
            version = str(max(int(v.version) for v in versions))
        return task_of(dict(reg.client.get_model_version(name, version).tags))
    finally:
        reg.close()


def cmd_chat(args: argparse.Namespace) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}
    ]
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    params = {k: v for k, v in params.items() if v is not None}
    if args.url:
        from serving.client import ServeClient

        pieces = ServeClient(args.url.rstrip("/")).chat(args.name, messages, **params)
    else:
        pieces = _chat_locally(args.name, messages, params)
    last: dict = {}
    for piece in pieces:
        if isinstance(piece, dict):
            last = piece
        elif not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps(last, indent=2))
    else:
        usage = last.get("usage") or {}
        tokens = usage.get("completion_tokens")
        print(f"\n[v{last.get('version')} {last.get('finish_reason')}, {tokens} tokens]", file=sys.stderr)
    return 0


def _chat_locally(name: str, messages: list[dict], params: dict):
    """An answer from NAME@champion loaded here: the same prompt, engine and limits as the service's."""
    from champion.registry import connect
    from serving.config import ServeConfig
    from serving.generation import Delta, Engine, InvalidRequest
    from serving.lm_model import load_generative_version
    from serving.lm_server import ChatParams, check_messages, generation_request

    try:
        check_messages(messages, ServeConfig(model=name))
    except InvalidRequest as err:
        raise ChampionError(str(err)) from None
    reg = connect()
    version = _champion_version(reg, name)
    lm = load_generative_version(reg.client, name, version, device="auto")
    engine = Engine(lm.model, lm.tokenizer, version, max_batch=1, context=lm.active)
    try:
        for event in engine.submit(generation_request(lm, ChatParams(messages=messages, **params))):
            if isinstance(event, Delta):
                yield event.text
            else:
                usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
                yield {"finish_reason": event.finish_reason, "usage": usage, "version": version}
    except InvalidRequest as err:
        raise ChampionError(str(err)) from None
    finally:
        engine.close()
        reg.close()


def cmd_predict(args: argparse.Namespace) -> int:
    if args.url:
        from serving.client import ServeClient

        answers = ServeClient(args.url.rstrip("/")).predict(args.texts, args.probabilities)
    else:
        from champion.registry import connect
        from serving.model import load_version

        reg = connect()
        version = _champion_version(reg, args.name)
        model = load_version(reg.client, args.name, version, device="cpu")
        rows = model.predict_proba(args.texts)
        answers = []
        for row in rows:
            best = int(row.argmax())
            answer = {"label": model.labels[best], "score": float(row[best]), "version": version}
            if args.probabilities:
                answer["probabilities"] = dict(zip(model.labels, map(float, row), strict=True))
            answers.append(answer)
    if args.json:
        print(json.dumps(answers, indent=2))
        return 0
    for text, answer in zip(args.texts, answers, strict=True):
        print(f"{answer['label']}\t{answer['score']:.3f}\tv{answer['version']}\t{text}")
    return 0


def _champion_version(reg, name: str) -> str:
    from champion.registry import CHAMPION, served_version

    version = served_version(reg, name, CHAMPION)
    if version is None:
        raise ChampionError(f"model '{name}' has no champion; promote a version with `champion promote`.")
    return version


def cmd_demo(args: argparse.Namespace) -> int:
    from champion_cli.demo import run_demo, run_slm_demo

    if args.slm:
        run_slm_demo(**{k: v for k, v in (("rows", args.rows), ("epochs", args.epochs)) if v}, base=args.base)
    else:
        run_demo(rows=args.rows or 2400, epochs=args.epochs or 3, base=args.base)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from champion.config import load_config
    from monitoring.check import EXIT_CODES, drift, format_decision
    from monitoring.config import MonitorConfig

    cfg = load_config(MonitorConfig, args.config, []) if args.config else MonitorConfig()
    if args.no_mlflow:
        cfg.report.mlflow = False
    run = drift(
        args.name,
        cfg,
        version=args.version,
        last=args.last,
        since=_when(args.since, "--since"),
        until=_when(args.until, "--until"),
        arms=args.arm,
        file=args.file,
        report_dir=Path(args.report) if args.report else None,
    )
    if args.json:
        out = run.decision.to_dict()
        out["alarm"] = None if run.alarm is None else {**vars(run.alarm), "reason": run.alarm.reason}
        out["alarms"] = {kind: {**vars(a), "reason": a.reason} for kind, a in run.alarms.items()}
        out["report_run_id"] = run.report_run_id
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_decision(run))
    return EXIT_CODES[run.decision.status]


def _when(text: str | None, flag: str):
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ChampionError(
            f"{flag}: '{text}' is not an ISO time; write e.g. 2026-12-01T09:00:00Z."
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_compare(args: argparse.Namespace) -> int:
    from champion.registry import TEXT_GENERATION, connect
    from pipelines.compare import compare, format_comparison, read_labelled_file
    from pipelines.retrain import load_retrain_config

    if _served_task(args.name, None) == TEXT_GENERATION:
        return _compare_generation(args)
    if args.suite:
        raise ChampionError("--suite: the safety suite is for text-generation models; drop --suite.")
    # The gate section of a retrain config (configs/retrain.yaml), read and checked as `retrain` reads it.
    cfg = load_retrain_config(args.config, [f"gate.{item}" for item in args.set or []]).gate
    holdout = read_labelled_file(args.data)
    reg = connect()
    comp = compare(
        reg, args.name, args.champion_version, args.challenger_version, holdout, cfg,
        log_mlflow=not args.no_mlflow, data_file=str(args.data),
    )  # fmt: skip
    if args.json:
        print(json.dumps({**comp.decision.to_dict(), "mlflow_run_id": comp.run_id}, indent=2, default=str))
    else:
        print(format_comparison(comp))
    return 0 if comp.decision.promote else 1


def _compare_generation(args: argparse.Namespace) -> int:
    """`champion compare` for a text-generation model: labelled conversations and the safety suite."""
    from champion.config import apply_overrides, load_config, parse_config
    from champion.registry import connect
    from pipelines.chat import load_reply_rows
    from pipelines.lm_gate import LMGateConfig, compare_generation, format_generation_comparison

    overrides = [f"gate.{item}" for item in args.set or []]
    if args.config:
        cfg = load_config(LMGateConfig, args.config, overrides)
    else:
        cfg = parse_config(LMGateConfig, apply_overrides({}, overrides), source="--set")
    if args.suite:
        cfg = cfg.model_copy(update={"suite": [*cfg.suite, *args.suite]})
    holdout = load_reply_rows(args.data)
    reg = connect()
    try:
        comp = compare_generation(
            reg, args.name, args.champion_version, args.challenger_version, holdout, cfg,
            log_mlflow=not args.no_mlflow, data_file=str(args.data),
        )  # fmt: skip
    finally:
        reg.close()
    if args.json:
        print(json.dumps({**comp.decision.to_dict(), "mlflow_run_id": comp.run_id}, indent=2, default=str))
    else:
        print(format_generation_comparison(comp))
    return 0 if comp.decision.promote else 1


def cmd_compress(args: argparse.Namespace) -> int:
    from champion.config import apply_overrides, load_config, parse_config
    from pipelines.compress import CompressConfig, compress

    if args.config:
        cfg = load_config(CompressConfig, args.config, args.set or [])
    else:
        cfg = parse_config(CompressConfig, apply_overrides({}, args.set or []), source="--set")
    if args.to:
        cfg.to = args.to
    if args.data:
        cfg.data = args.data
    if args.promote:
        cfg.promote = True
    result = compress(args.name, args.version, cfg)
    m = result.measured
    if args.json:
        out = {k: v for k, v in result.__dict__.items() if k != "decision"}
        print(json.dumps({**out, "gate": result.decision.to_dict()}, indent=2, default=str))
        return 0 if result.decision.promote else 1
    if m.get("task") == "text-generation":
        from pipelines.lm_compress import summary_lines

        print("\n".join(summary_lines(result)))
        return 0 if result.decision.promote else 1
    verdict = "within budget" if result.decision.promote else "REFUSED"
    print(f"registered {result.name} v{result.version} ({result.format} of v{result.source_version}) as "
          f"'candidate': {verdict}")  # fmt: skip
    print(f"  agreement {m['agreement']:.2%} on {m['rows']} held-out rows; macro-F1 "
          f"{m['variant']['macro_f1']:.4f} (source {m['source']['macro_f1']:.4f})")  # fmt: skip
    src, var = m["source_speed"], m["variant_speed"]
    print(f"  single text p50 {var['single_ms_p50']:.1f} ms (source {src['single_ms_p50']:.1f}); "
          f"{var['rows_per_s']:.0f} rows/s at batch {var['batch_size']} (source {src['rows_per_s']:.0f}), "
          f"x{m['speedup_batch']:.2f}")  # fmt: skip
    print(f"  CPU-seconds per 1,000 predictions {var['cpu_seconds_per_1k']:.2f} "
          f"(source {src['cpu_seconds_per_1k']:.2f})")  # fmt: skip
    if result.promoted:
        print(f"  promoted to champion (champion history {result.name})")
    elif result.decision.promote:
        print(f'  next: champion promote {result.name} {result.version} --reason "..."')
    return 0 if result.decision.promote else 1


RETRAIN_EXIT = {"promoted": 0, "canary": 0, "pending": 0, "refused": 1, "not_promoted": 1, "skipped": 1}


def cmd_retrain(args: argparse.Namespace) -> int:
    from champion.registry import connect
    from pipelines.lm_retrain import LMRetrainConfig, load_any_retrain_config, retrain_lm
    from pipelines.retrain import retrain

    reg = connect()
    try:
        cfg = load_any_retrain_config(reg, args.name, args.config, args.set)
        about = dict(item.partition("=")[::2] for item in args.about or [])
        if isinstance(cfg, LMRetrainConfig):
            if args.data:
                cfg.fresh.files = [*cfg.fresh.files, args.data]  # labelled conversations, dealt as files are
            run = retrain_lm
        else:
            if args.data:
                cfg.data = args.data
            run = retrain
        result = run(
            cfg, reg, trigger=args.trigger, trigger_key=args.trigger_key, about=about, claimed=args.claimed
        )
    finally:
        reg.close()
    if args.json:
        out = {k: v for k, v in result.__dict__.items() if k != "gate"}
        out["gate"] = None if result.gate is None else result.gate.to_dict()
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"{result.outcome.upper()}: {result.reason}")
        if result.challenger_version:
            print(f"  challenger: {args.name} v{result.challenger_version} (run {result.run_id})")
        c = result.counts
        dropped = c.get("holdout_dropped_seen_in_training", 0)
        print(f"  fresh labels: {c.get('fresh_train_rows', 0)} to learn from, {c.get('holdout_rows', 0)} "
              f"in the holdout ({dropped} dropped: seen in training)")  # fmt: skip
        print(f"  the story: champion history {args.name}")
    return RETRAIN_EXIT[result.outcome]


def cmd_monitor(args: argparse.Namespace) -> int:
    from champion.registry import connect
    from monitoring.reference import reference_for_version
    from pipelines.data import DataConfig, load_labelled

    cfg = DataConfig(source=args.data, text_column=args.text_column, label_column=args.label_column)
    data = load_labelled(cfg, args.data, "--data")
    reg = connect()
    ref = reference_for_version(reg, args.name, args.version, data, source=args.data)
    print(
        f"built the monitoring reference of {args.name} v{args.version} from {len(ref)} held-out rows "
        f"(accuracy {ref.accuracy:.3f} on them); `champion drift {args.name}` now finds it."
    )
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from champion.config import load_config
    from monitoring import scheduler

    cfg = (
        load_config(scheduler.ScheduleConfig, args.config, []) if args.config else scheduler.ScheduleConfig()
    )
    if args.schedule_verb == "start":
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # this process serves its own /metrics
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)  # a line per run is too much
        scheduler.start(cfg, standby=args.standby, out=lambda line: print(line, flush=True))
        return 0
    if args.schedule_verb == "list":
        jobs = scheduler.list_jobs(cfg)
        if args.json:
            print(json.dumps(jobs, indent=2))
        elif not jobs:
            print("no jobs in the store; `champion schedule start --config configs/schedule.yaml` adds them.")
        else:
            rows = [
                [j["id"], j["trigger"], "paused" if j["paused"] else j["next_run"], j["last_outcome"] or "-",
                 j["last_started"] or "-"]
                for j in jobs
            ]  # fmt: skip
            _table(rows, ["JOB", "TRIGGER", "NEXT RUN", "LAST", "LAST STARTED"])
        return 0
    if args.schedule_verb == "run-now":
        run = scheduler.run_now(cfg, args.job)
        print(f"{args.job}: {run['outcome']} ({run['how']}, pid {run['pid']})" +
              (f": {run['error']}" if run["error"] else ""))  # fmt: skip
        return 0 if run["outcome"] == "ok" else 1
    getattr(scheduler, args.schedule_verb)(cfg, args.job)
    print(f"{args.job}: {args.schedule_verb}d")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="champion",
        description="Keep the best model in production: fine-tune, register, promote, roll back.",
        epilog="State lives in $CHAMPION_HOME (default ./.champion); MLFLOW_TRACKING_URI and "
        "CHAMPION_AUDIT_URL point it at a shared server instead.",
    )
    from champion import __version__

    parser.add_argument("--version", action="version", version=f"champion {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = verb("finetune", cmd_finetune, "Fine-tune a model from a YAML config and register it as challenger.")
    p.add_argument("config", help="YAML config, e.g. configs/minilm_lora_cpu.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. train.epochs=1"
    )

    p = verb("sft", cmd_sft, "LoRA-tune a small causal LM (message -> JSON answer) from a YAML config and "
             "register it as challenger.")  # fmt: skip
    p.add_argument("config", help="YAML config, e.g. configs/smollm2_sft_cpu.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. train.epochs=1"
    )

    p = verb("distil", cmd_distil, "Distil a registered teacher (default NAME@champion) into a smaller "
             "student and register it. Exit 0 within budget, 1 refused, 2 bad input.")  # fmt: skip
    p.add_argument("config", help="YAML config, e.g. configs/minilm_distil_l3_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. teacher=3")

    p = verb("models", cmd_models, "List registered models or show one model's versions.")
    sub = p.add_subparsers(dest="models_verb", required=True, metavar="list|show")
    sub.add_parser("list", help="all registered models with their aliases").add_argument(
        "--json", action="store_true"
    )
    show = sub.add_parser("show", help="one model's versions, aliases, metrics and lineage")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")

    p = verb("promote", cmd_promote, "Point the champion alias at a version, if it beats the champion.")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", required=True, help="why; recorded in the audit history")
    p.add_argument("--force", action="store_true", help="promote even if its validation metric is worse")
    p.add_argument(
        "--metric", default="val_macro_f1", help="version metric to compare (default val_macro_f1)"
    )

    p = verb("adopt", cmd_adopt, "Make an alias move done outside Champion (MLflow UI or API) yours, "
             "audited: servers follow it only then.")  # fmt: skip
    p.add_argument("name")
    p.add_argument("alias", help="champion or challenger")
    p.add_argument("version", help="where MLflow's alias is now (see `champion doctor`), or none if deleted")
    p.add_argument("--reason", required=True, help="why; recorded in the audit history")

    p = verb("rollback", cmd_rollback, "Return the champion alias to the previous champion.")
    p.add_argument("name")
    p.add_argument("--reason", required=True, help="why; recorded in the audit history")

    p = verb("pending", cmd_pending, "Promotions that passed the gate and wait for a person's approval.")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    decisions = (
        ("approve", cmd_approve, "Approve a pending promotion and make its move."),
        ("reject", cmd_reject, "Reject a pending promotion; nothing moves."),
    )
    for name, func, what in decisions:
        p = verb(name, func, what)
        p.add_argument("name")
        p.add_argument("version")
        p.add_argument("--reason", required=True, help="why; recorded in the audit history")

    p = verb("review", cmd_review, "The review queue: select predictions for people to label, take the next, "
             "answer it.")  # fmt: skip
    sub = p.add_subparsers(dest="review_verb", required=True, metavar="select|next|answer")
    sel = sub.add_parser(
        "select", help="queue what the newly logged predictions deserve, within today's budget"
    )
    nxt = sub.add_parser("next", help="the item to review now, with the model's best labels")
    ans = sub.add_parser("answer", help="label an item (or --skip); the label becomes feedback")
    for q in (sel, nxt, ans):
        q.add_argument("name")
        q.add_argument("--log-url", help="the inference log database (default: the serving default)")
        q.add_argument("--json", action="store_true")
    sel.add_argument("--config", help="YAML with the review section's fields (configs/review.yaml)")
    ans.add_argument("request_id")
    group = ans.add_mutually_exclusive_group(required=True)
    group.add_argument("--label", help="the true label; one not among the model's is a new intent")
    group.add_argument("--skip", action="store_true")
    ans.add_argument("--reviewer", help="who answers (default: CHAMPION_ACTOR, else user@host)")

    p = verb("console", cmd_console, "The web console: models, the loop's story, drift, approvals, review.")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--host", default="127.0.0.1", help="loopback by default; anything else belongs behind TLS"
    )
    p.add_argument("--log-url", help="the inference log database (default: the serving default)")
    p.add_argument("--review-config", help="YAML of the review queue (configs/review.yaml): the day's budget")
    p.add_argument("--monitor-config", help="the YAML `champion drift` runs with (configs/monitor.yaml): the "
                   "console reads the drift store it names (default: the log database)")  # fmt: skip
    p.add_argument(
        "--mlflow-ui", help="the MLflow UI's address, for links to runs (e.g. http://127.0.0.1:5000)"
    )
    p.add_argument("--allowed-host", action="append", metavar="NAME", help="a name people reach it by "
                   "(repeatable); other Host names get 400 (default: loopback names and --host)")  # fmt: skip
    p.add_argument("--trusted-proxy", action="append", metavar="ADDR", help="a reverse proxy's address whose "
                   "X-Forwarded-For/-Proto are believed (repeatable; default: none)")  # fmt: skip
    p = verb("console-user", cmd_console_user, "Create a console login, change its password, or its role "
             "(--role alone on an existing account).")  # fmt: skip
    p.add_argument("name")
    p.add_argument("--role", choices=["labeller", "approver", "admin"],
                   help="labeller: review; approver: also approve/reject promotions; admin: everything "
                   "(a new account is a labeller)")  # fmt: skip
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    p = verb("console-token", cmd_console_token, "Make a console token for a script acting as account NAME; "
             "written to a 0600 file whose path is printed.")  # fmt: skip
    p.add_argument("name")
    p.add_argument("--out", help="the file to write (default: CHAMPION_HOME/keys/console-NAME.token)")
    p.add_argument("--revoke", action="store_true", help="remove the account's token instead")

    p = verb("history", cmd_history, "The audit history of a model's alias changes.")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    p = verb("doctor", cmd_doctor, "Find what killed processes left half-done (alias moves, "
             "registrations, runs left RUNNING), which --fix settles, and aliases moved outside Champion "
             "(see adopt). Exit 1: something left to fix.")  # fmt: skip
    p.add_argument("name", nargs="?", help="one model (default: all, and the runs of every experiment)")
    p.add_argument("--fix", action="store_true", help="settle what is found, as the next operation would")
    p.add_argument("--json", action="store_true")

    p = verb("ui", cmd_ui, "Start the MLflow UI on Champion's store.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    p = verb("data", cmd_data, "Generate synthetic support-ticket data (CSV, JSONL or Parquet by suffix).")
    p.add_argument("out", help="output file, e.g. .champion/data/tickets.csv")
    p.add_argument("--rows", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--intents", help="comma-separated subset of intents")
    p.add_argument("--typo-rate", type=float, default=0.03)
    p.add_argument("--vocabulary-shift", type=float, default=0.0)

    p = verb("serve", cmd_serve, "Serve NAME@champion over HTTP with BentoML, following the registry.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--config", help="serving YAML, e.g. configs/serve_cpu.yaml (defaults otherwise)")
    p.add_argument("--port", type=int, help="port (default 3000, or the config's)")
    p.add_argument("--host", help="interface (default 127.0.0.1, or the config's)")
    p.add_argument("--workers", type=int, help="server worker processes (default 1, or the config's)")

    p = verb("chat", cmd_chat, "Ask NAME@champion (a text-generation model) one message; streams the answer.")
    p.add_argument("name", help="registered model name")
    p.add_argument("message", help="the user's message")
    p.add_argument("--url", help="ask a running `champion serve` at this URL instead of loading the model")
    p.add_argument("--system", help="a system message (default: the one the version was trained with)")
    p.add_argument("--max-tokens", type=int, help="most new tokens (default: the version's setting)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default: the version's setting)")
    p.add_argument("--seed", type=int, help="makes a sampled answer reproducible")
    p.add_argument("--json", action="store_true", help="print the last chunk (usage, version) as JSON only")

    p = verb("predict", cmd_predict, "Label texts with NAME@champion, locally or through a running server.")
    p.add_argument("name", help="registered model name")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--url", help="ask a running `champion serve` at this URL instead of loading the model")
    p.add_argument("--probabilities", action="store_true", help="include every class's probability")
    p.add_argument("--json", action="store_true")

    p = verb("drift", cmd_drift, "Check a window of the inference log (or a file) for drift against the "
             "served version's reference. Exit 0 ok, 3 drift, 4 insufficient data, 2 bad input.")  # fmt: skip
    p.add_argument("name", help="registered model name")
    p.add_argument("--version", help="the version to check (default: the champion)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--last", type=int, help="the last N logged predictions of that version")
    window.add_argument("--since", help="predictions logged since this ISO time (UTC unless it says)")
    p.add_argument("--until", help="and before this ISO time")
    p.add_argument(
        "--arm",
        action="append",
        choices=["champion", "canary", "challenger", "shadow"],
        help="only this traffic arm's predictions (repeat for several; default all but shadow)",
    )
    p.add_argument("--file", help="CSV, JSONL or Parquet with a text column (and optionally label)")
    p.add_argument("--config", help="monitoring YAML, e.g. configs/monitor.yaml (defaults otherwise)")
    p.add_argument("--report", help="also write drift.html, drift.json and decision.json to this folder")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    p.add_argument("--json", action="store_true")

    p = verb("retrain", cmd_retrain, "Retrain the champion on its data plus fresh labels; the gate decides. "
             "Exit 0 promoted (or handed to the canary), 1 refused or skipped, 2 bad input.")  # fmt: skip
    p.add_argument("name", help="registered model name")
    p.add_argument("--config", help="retrain YAML, e.g. configs/retrain.yaml (defaults otherwise)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. gate.margin=0.01")
    p.add_argument(
        "--data",
        help="retrain on this file instead of the champion's original one (a text-generation "
        "model: labelled conversations added to fresh.files)",
    )
    p.add_argument("--trigger-key", help="an idempotency key: a key already used is refused")
    p.add_argument("--json", action="store_true")
    # Set by the scheduler's retrain jobs (pipelines/jobs.py), which claim the key before starting us.
    p.add_argument(
        "--trigger", default="manual", choices=["manual", "drift", "schedule"], help=argparse.SUPPRESS
    )
    p.add_argument("--claimed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--about", action="append", help=argparse.SUPPRESS)

    p = verb("compare", cmd_compare, "Run the champion/challenger gate on two versions and a labelled "
             "file (both score the same rows). Exit 0 pass, 1 refused, 2 bad input.")  # fmt: skip
    p.add_argument("name", help="registered model name")
    p.add_argument("champion_version", metavar="CHAMPION_VERSION")
    p.add_argument("challenger_version", metavar="CHALLENGER_VERSION")
    p.add_argument(
        "--data",
        required=True,
        help="CSV, JSONL or Parquet with text and label columns (a text-generation model: a support-replies "
        "table with instruction, intent, category, entity_type, entity_value and response)",
    )
    p.add_argument(
        "--config",
        help="a YAML with a gate section, e.g. configs/retrain.yaml, or configs/lm_gate.yaml for a "
        "text-generation model (defaults otherwise)",
    )
    p.add_argument(
        "--suite",
        action="append",
        metavar="FILE",
        help="a text-generation model: a YAML or JSONL file of your own safety cases, run besides the "
        "built-in set (repeatable; see configs/safety_suite.yaml)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a gate setting, e.g. margin=0.01"
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation run to MLflow")
    p.add_argument("--json", action="store_true", help="print the decision: promote, reason, evidence")

    p = verb("compress", cmd_compress, "Build an int8, ONNX or ONNX-int8 copy of a version (int8 or a GGUF "
             "for a text-generation one), measure it against its source and register it. Exit 0 within "
             "budget, 1 refused, 2 bad input.")  # fmt: skip
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="the source version (fp32 safetensors, or what `champion sft` registered)")
    p.add_argument("--to", choices=["int8", "onnx", "onnx-int8", "gguf-q8_0"],
                   help="the format (default onnx-int8; gguf-q8_0, text generation's default)")  # fmt: skip
    p.add_argument("--config", help="compress YAML, e.g. configs/minilm_int8.yaml (defaults otherwise)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. budget.min_agreement=0.98"
    )
    p.add_argument("--data", help="labelled rows to judge on (default: the source's held-out test rows)")
    p.add_argument("--promote", action="store_true", help="promote it at once if within budget")
    p.add_argument("--json", action="store_true")

    p = verb("monitor", cmd_monitor, "Monitoring set-up: build a version's reference from held-out rows.")
    sub = p.add_subparsers(dest="monitor_verb", required=True, metavar="reference")
    ref = sub.add_parser("reference", help="score held-out labelled rows with a version and record them")
    ref.add_argument("name")
    ref.add_argument("version")
    ref.add_argument("--data", required=True, help="held-out labelled rows (never training rows)")
    ref.add_argument("--text-column", default="text")
    ref.add_argument("--label-column", default="label")

    p = verb("schedule", cmd_schedule, "Scheduled jobs (drift checks): one active scheduler per job store.")
    sub = p.add_subparsers(dest="schedule_verb", required=True, metavar="start|list|run-now|pause|resume")
    start = sub.add_parser("start", help="run the scheduler until SIGTERM or Ctrl-C")
    start.add_argument("--standby", action="store_true", help="wait while another is active, then take over")
    listing = sub.add_parser("list", help="the jobs in the store, their next run and last outcome")
    listing.add_argument("--json", action="store_true")
    for name, help in (
        ("run-now", "run a job now (through the active scheduler if one runs)"),
        ("pause", "stop a job's runs until resumed"),
        ("resume", "resume a paused job"),
    ):
        sub.add_parser(name, help=help).add_argument("job", help="job id, as in the schedule config")
    for action in sub.choices.values():
        action.add_argument("--config", help="schedule YAML, e.g. configs/schedule.yaml (defaults otherwise)")

    p = verb("demo", cmd_demo, "Run the loop end to end on generated data: fine-tune, register, promote.")
    p.add_argument("--slm", action="store_true", help="the language-model loop: SmolLM2 LoRA SFT, OpenAI API")
    p.add_argument("--rows", type=int, help="generated rows (default 2400; 160 with --slm)")
    p.add_argument("--epochs", type=int, help="training epochs (default 3; 1 with --slm)")
    p.add_argument("--base", help="base model instead of all-MiniLM-L6-v2 or SmolLM2 (a folder or hub id)")
    return parser


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def main(argv: list[str] | None = None) -> int:
    from champion.config import redact_uri, secure_home
    from champion.progress import quiet_third_party_bars

    args = build_parser().parse_args(argv)
    secure_home()  # umask 077: stores, keys, spools and logs are the user's alone
    quiet_third_party_bars()  # before transformers is imported: it reads the setting once
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return args.func(args)
    except InterruptedRun as err:
        print(f"interrupted: {err}", file=sys.stderr)
        for note in getattr(err, "__notes__", ()):
            print(f"note: {note}", file=sys.stderr)
        return 130
    except ChampionError as err:
        print(f"error: {redact_uri(str(err))}", file=sys.stderr)
        for note in getattr(err, "__notes__", ()):  # e.g. what a failed clean-up left behind
            print(f"note: {redact_uri(note)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # a store that did not answer: its URI (and password) is in the message
        import traceback

        print(redact_uri("".join(traceback.format_exception(err))), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
