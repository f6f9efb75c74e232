"""`champion demo`: the loop end to end on generated support tickets, with embedded sqlite stores."""

from __future__ import annotations

import time
from pathlib import Path

from champion.config import champion_home, load_config, redact_uri, tracking_uri

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = CONFIGS / "minilm_lora_cpu.yaml"
SERVE_CONFIG = CONFIGS / "serve_demo.yaml"
# The share of the demo's traffic in the review queue's unbiased sample, which a reviewer labels (with the
# rows the queue's rules pick): only the sample may judge a challenger, so the labels go through the queue.
LABELLED = 0.8
REVIEW = {"daily_budget": 100_000, "random_share": LABELLED, "random_budget_share": 1.0}
SAMPLE_TICKETS = [
    "hi, my parcel still hasn't shown up and the tracking hasn't moved in 5 days",
    "I was charged twice for the same order, please fix this",
    "forgot my password and the reset email never arrives",
]
NEW_INTENT_TICKET = "the parcel came but the blender inside is missing, only the manual was in the box"


HELD_OUT_INTENTS = 4  # the last intents of the generator: never trained on, streamed later as drift


def run_demo(
    rows: int = 2400,
    epochs: int = 3,
    base: str | None = None,
    config: Path = DEMO_CONFIG,
    traffic_rows: int = 400,
) -> dict:
    """Run the loop; returns what happened and how long the loop took (for tests and benchmarks/gate.py)."""
    from champion.registry import connect, promote, served_version, story
    from monitoring.check import drift, format_decision
    from monitoring.config import MonitorConfig
    from monitoring.store import PERFORMANCE_CHECKS
    from pipelines.compare import compare
    from pipelines.finetune import FinetuneConfig, finetune
    from pipelines.fresh import FreshConfig, fresh_data
    from pipelines.jobs import retrain_on_drift
    from pipelines.ticketgen import INTENTS, generate_tickets, write_tickets
    from serving.client import start_server
    from serving.config import inference_log_url, load_serve_config
    from serving.inference_log import InferenceLog

    home = champion_home()
    known, held_out = list(INTENTS[:-HELD_OUT_INTENTS]), list(INTENTS[-HELD_OUT_INTENTS:])
    data = write_tickets(home / "data" / "tickets.csv", rows, seed=0, intents=known)
    print(f"1/12 generated {rows} support tickets across {len(known)} intents -> {data}")
    print(f"     ({', '.join(held_out)} are kept back: they arrive later, as drift)")

    overrides = [f"data.source={data}", f"train.epochs={epochs}"] + ([f"model.base={base}"] if base else [])
    cfg = load_config(FinetuneConfig, config, overrides)
    print(f"2/12 fine-tuning {cfg.model.base} with {cfg.method} on {cfg.train.device} ({config.name})")
    reg = connect()
    result = finetune(cfg, registry=reg)
    name, first = result.model_name, result.version
    print(
        f"3/12 registered {name} v{first} as '{cfg.registry.alias}' "
        f"(test accuracy {result.metrics['test_accuracy']:.3f}, "
        f"macro-F1 {result.metrics['test_macro_f1']:.3f}), with its held-out monitoring reference"
    )

    decision = promote(reg, name, first, reason="demo: promote the freshly trained challenger")
    state = "promoted" if decision.allowed else "kept the current champion"
    print(f"4/12 {state}: {decision.reason}")

    normal = generate_tickets(traffic_rows, seed=1, intents=known)
    drifted = [
        generate_tickets(traffic_rows, seed=seed, intents=known[:8] + held_out, vocabulary_shift=0.6)
        for seed in (2, 3)
    ]
    monitor = MonitorConfig()
    print(
        f"5/12 serving {name}@champion with BentoML ({SERVE_CONFIG.name}: a canary for any challenger),"
        f" sending {len(normal)} tickets like its training data; the review queue samples {LABELLED:.0%}"
        " of them for a reviewer"
    )
    with start_server(name, config=SERVE_CONFIG) as client:
        answers = client.predict(SAMPLE_TICKETS)
        truth = _send(client, normal)
        sent = len(SAMPLE_TICKETS) + len(truth)
        status = client.reload()
        print(f"     {client.url} serves v{status['champion']} ({status['policy']} policy); answers:")
        for text, answer in zip(SAMPLE_TICKETS, answers, strict=True):
            print(f"       {answer['label']:<22} {answer['score']:.2f}  v{answer['version']}  {text}")
        _wait_logged(name, sent)
        print(f"     a reviewer labelled {_review(name, truth)} of them from the review queue")
        print(f"6/12 drift check on the last {len(normal)} predictions (Evidently report logged to MLflow):")
        print(_indent(format_decision(drift(name, monitor, last=len(normal), registry=reg))))

        print(
            f"7/12 sending 2 x {traffic_rows} drifted tickets (the held-out intents, reworded vocabulary), "
            "reviewed as they come, and checking each window"
        )
        for window in drifted:
            batch = _send(client, window)
            sent, truth = sent + len(batch), truth | batch
            _wait_logged(name, sent)
            _review(name, truth)
            checked = drift(name, monitor, last=len(window), registry=reg)
            print(_indent(format_decision(checked)))

        retrain_config = _retrain_config(home, name)
        # The job's default trigger: the performance alarm. The reviewed new intents make the labelled
        # accuracy (concept) fall, so the demo needs no opt-in to input drift (alarm: any).
        performance = [c.name for c in checked.decision.fired if c.name in PERFORMANCE_CHECKS]
        print(
            f"8/12 {checked.alarms['performance'].reason[:-1]}: {', '.join(performance) or 'none'} fired in "
            "the last window. The scheduler's job retrains on that alarm (input drift alone only alerts), in "
            f"its own process ({retrain_config.name}), on the champion's data plus the fresh labels; then "
            "the gate"
        )
        alarm_at = time.monotonic()
        launched = retrain_on_drift(name, str(retrain_config), alarm="performance")
        retrain_s = time.monotonic() - alarm_at
        print(f"     {launched.get('outcome', 'not started')} after {retrain_s:.0f} s: {launched['reason']}")
        challenger = launched.get("challenger_version")
        summary = {"outcome": launched.get("outcome"), "challenger": challenger, "retrain_s": retrain_s}

        if launched.get("outcome") == "canary":
            print(f"9/12 the service's canary sends half of the traffic to v{challenger} and watches it")
            traffic = generate_tickets(3000, seed=4, intents=known)
            verdict, switched_at = _run_canary(client, reg, name, challenger, traffic)
            print(f"     {verdict}")
            if switched_at is not None:
                summary["alarm_to_new_version_s"] = switched_at - alarm_at
                print(
                    f"     from the alarm to the service answering from v{challenger}: "
                    f"{switched_at - alarm_at:.0f} s (the retrain and gate took {retrain_s:.0f} s)"
                )
        else:
            print("9/12 no challenger for the canary: the retrain did not pass the gate")
        answers = client.predict([*SAMPLE_TICKETS, NEW_INTENT_TICKET])
        print("10/12 the service answers from the version it follows now:")
        for text, answer in zip([*SAMPLE_TICKETS, NEW_INTENT_TICKET], answers, strict=True):
            print(f"       {answer['label']:<22} {answer['score']:.2f}  v{answer['version']}  {text}")

    champion = served_version(reg, name, "champion")
    if champion is not None and str(champion) != first:
        holdout = fresh_data(name, FreshConfig(), exclude_texts=None).holdout
        refused = compare(reg, name, str(champion), first, holdout, log_mlflow=False).decision
        verdict = "promoted" if refused.promote else "refused"
        print(
            f"11/12 the other way round: v{first} as a challenger to v{champion} on the same fresh "
            f"holdout is {verdict}: {refused.reason}"
        )
    else:
        print("11/12 the champion did not change, so there is no older version to compare it with")

    print("12/12 the story of this loop (`champion history`):")
    for entry in story(reg, name):
        version = entry.get("to_version") or entry.get("version")
        version = f"v{version}" if version else "-"
        what = entry["alias"] if entry["type"] == "alias" else "loop"
        when, reason = entry["at"][11:19], entry["reason"][:110]
        print(f"       {when}  {what:<10} {entry['action']:<16} {version:<4} {reason}")
    log = InferenceLog(inference_log_url(load_serve_config(SERVE_CONFIG, name)))
    logged = log.read(name)
    log.close()
    counts = ", ".join(f"v{v}: {n}" for v, n in logged.groupby("model_version").size().items())
    labelled = int(logged["true_label"].notna().sum())
    print(
        f"     the inference log holds {len(logged)} predictions ({counts}), {labelled} with a reviewer's"
        " label"
    )
    from monitoring.review import ReviewConfig, ReviewQueue

    queue = ReviewQueue(inference_log_url(load_serve_config(SERVE_CONFIG, name)))
    selection = queue.select(name, ReviewConfig(**REVIEW))  # the demo's budget: its reviewer used today's
    queue.close()
    print(f"     review queue: {selection.reason}")
    store = redact_uri(tracking_uri())  # a store URI may carry a password
    print(f"""
Where to look:
  champion models show {name}      versions, aliases, metrics, data hashes, gate tags
  champion history {name}          alias moves, retrains and gate verdicts, in order
  champion drift {name} --last 400 a drift check on the latest traffic (exit 0 ok, 3 drift)
  champion retrain {name}          retrain on fresh labels; the gate decides
  champion serve {name}            serve the champion on http://127.0.0.1:3000 (follows alias moves)
  champion console                 the web console on http://127.0.0.1:8765: the loop's story, drift,
                                   approvals, reviews (first: champion console-user NAME --role approver)
  champion ui{" " * (len(name) + 16)}the MLflow UI on {store} (champion-gate, champion-monitoring)
  state lives in {home}""")
    reg.close()
    return summary


def _retrain_config(home: Path, name: str) -> Path:
    """configs/retrain.yaml for the demo: the canary decides, and a short retrain."""
    import yaml

    cfg = yaml.safe_load((CONFIGS / "retrain.yaml").read_text())
    # One epoch over the original rows with each fresh row three times: the new intents get the weight of
    # what production looks like now, and the retrain takes less time than two plain epochs.
    cfg.update(model_name=name, promotion="canary", overrides=["train.epochs=1"])
    cfg["fresh"]["repeat"] = 3
    path = home / "retrain_demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run_canary(client, reg, name: str, challenger: str, traffic, timeout: float = 240.0):
    """Send traffic until the canary has promoted or retired `challenger`; (what happened, with its reason;
    when the service first answered from the promoted version, or None)."""
    texts = traffic["text"].tolist()
    deadline, start = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and start < len(texts):
        client.predict(texts[start : start + 16])
        start += 16
        events = [e for e in reg.audit.events(name) if e.action in ("canary_promote", "canary_rollback")]
        done = [e for e in events if str(e.evidence.get("canary_challenger")) == str(challenger)]
        if done:
            e = done[-1]
            verb = "promoted" if e.action == "canary_promote" else "retired"
            switched = None
            for _ in range(120):  # the server follows the alias within its poll interval
                if e.action != "canary_promote":
                    break
                if client.predict(texts[:1])[0]["version"] == str(challenger):
                    switched = time.monotonic()
                    break
                time.sleep(0.25)
            return f"after {start} tickets the canary {verb} v{challenger}: {e.reason}", switched
    return f"the canary had not concluded after {start} tickets; v{challenger} stays the challenger.", None


def _send(client, tickets) -> dict[str, str]:
    """Send the tickets 16 at a time; returns each answer's request id with the ticket's true label."""
    texts, labels = tickets["text"].tolist(), tickets["label"].tolist()
    truth = {}
    for i in range(0, len(texts), 16):
        answers = client.predict(texts[i : i + 16])
        truth |= {answer["request_id"]: labels[i + j] for j, answer in enumerate(answers)}
    return truth


def _review(name: str, truth: dict[str, str]) -> int:
    """The demo's reviewer, who knows the truth, answers what the review queue offers: its unbiased sample
    (LABELLED of the traffic), which the fresh holdout may take, and the rows its rules picked, which only
    teach a retrain. Returns how many it labelled."""
    from monitoring.review import ReviewConfig, ReviewQueue

    queue = ReviewQueue()
    try:
        queue.select(name, ReviewConfig(**REVIEW))
        labelled = 0
        while (item := queue.next(name)) is not None:
            label = truth.get(item.request_id)  # the sample tickets have no true label: skipped
            queue.answer(name, item.request_id, "demo-reviewer", label, skip=label is None)
            labelled += label is not None
        return labelled
    finally:
        queue.close()


def _wait_logged(name: str, count: int, timeout: float = 30.0) -> None:
    """The server writes its log in batches off the request path; wait until this traffic is in it."""

    from champion.config import default_log_url
    from serving.inference_log import InferenceLog

    log = InferenceLog(default_log_url())
    deadline = time.monotonic() + timeout
    try:
        while len(log.read(name, with_feedback=False)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        log.engine.dispose()


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


# --- `champion demo --slm`: the language-model loop --------------------------------------------------------

SLM_CONFIG = CONFIGS / "smollm2_sft_cpu.yaml"
SLM_SERVE_CONFIG = CONFIGS / "serve_slm_cpu.yaml"
SLM_STEPS = 8
SLM_METRIC = "val_intent_accuracy"  # a text-generation version has no macro-F1: promote on its intents


def run_slm_demo(
    rows: int = 160,
    epochs: int = 1,
    base: str | None = None,
    eval_rows: int = 8,
    answers: int = 3,
    config: Path = SLM_CONFIG,
    serve_config: Path = SLM_SERVE_CONFIG,
    overrides: list[str] | None = None,
) -> dict:
    """The language-model loop on generated support messages: the base zero-shot, LoRA SFT, register,
    promote, serve (OpenAI API, streamed), feedback, the inference log. Returns what happened (for tests).

    `config`'s recipe with fewer rows, epochs and held-out rows, so it takes minutes on a laptop's CPU;
    `overrides` go last (tests pass a tiny base's settings)."""
    from champion.registry import connect, promote
    from pipelines.chat import target_json
    from pipelines.replygen import INTENTS, write_replies
    from pipelines.sft import SFTConfig, load_reply_splits, sft
    from serving.client import start_server
    from serving.config import inference_log_url, load_serve_config
    from serving.inference_log import InferenceLog

    started = time.monotonic()
    home = champion_home()
    data = write_replies(home / "data" / "replies.csv", rows, seed=0)
    print(
        f"1/{SLM_STEPS} generated {rows} support messages with JSON answers across {len(INTENTS)} "
        f"intents -> {data}"
    )

    # 17 steps instead of the config's 80: at about 3x its learning rate the answers are valid JSON already.
    settings = [f"data.source={data}", "data.generate=null", f"data.max_eval_rows={eval_rows}",
                f"train.epochs={epochs}", "train.learning_rate=0.001"]  # fmt: skip
    settings += [f"model.base={base}"] if base else []
    cfg = load_config(SFTConfig, config, settings + list(overrides or []))
    held_out = load_reply_splits(cfg.data).test.head(eval_rows)  # the rows sft() scores as test_*
    clock = time.monotonic()
    zero_shot = _score_base(cfg, held_out)
    print(
        f"2/{SLM_STEPS} the base {cfg.model.base}, zero-shot on {len(held_out)} held-out messages: "
        f"{_scores(zero_shot)} ({time.monotonic() - clock:.0f} s)"
    )

    print(
        f"3/{SLM_STEPS} LoRA SFT of {cfg.model.base} on {_device_name(cfg)} ({config.name}: "
        f"r={cfg.lora.r}, {epochs} epoch(s), answer-only loss, a held-out evaluation each epoch)"
    )
    reg = connect()
    clock = time.monotonic()
    result = sft(cfg, registry=reg)
    train_s = time.monotonic() - clock
    name, version = result.model_name, result.version
    tuned = {k[5:]: v for k, v in result.metrics.items() if k.startswith("test_")}
    print(
        f"     registered {name} v{version} as '{cfg.registry.alias}' after {train_s:.0f} s; on the same "
        f"held-out messages: {_scores(tuned)}"
    )

    decision = promote(
        reg, name, version, reason="demo: promote the freshly fine-tuned challenger", metric=SLM_METRIC
    )
    print(
        f"4/{SLM_STEPS} {'promoted' if decision.allowed else 'kept the current champion'}: {decision.reason}"
    )

    served = load_serve_config(serve_config, name)
    print(f"5/{SLM_STEPS} serving {name}@champion with the OpenAI-compatible API ({serve_config.name})")
    summary: dict = {"model": name, "version": version, "zero_shot": zero_shot, "tuned": tuned}
    with start_server(name, config=serve_config) as client:
        print(f"     {client.url}/v1/chat/completions")
        print(f"6/{SLM_STEPS} {answers} held-out messages answered through the API, streamed (greedy):")
        calls = [
            _stream(client, name, message, cfg.generation.max_new_tokens)
            for message in held_out["instruction"].head(answers)
        ]
        good, bad = calls[0], calls[-1]
        correction = target_json(held_out.iloc[len(calls) - 1].to_dict())
        _wait_for_requests(InferenceLog(inference_log_url(served)), name, [c["request_id"] for c in calls])
        client.rate(good["request_id"], rating=1)
        client.rate(bad["request_id"], rating=-1, correction=correction)
        print(
            f"7/{SLM_STEPS} feedback: +1 for {good['request_id']}, -1 and the answer it should have given "
            f"for {bad['request_id']}"
        )

    log = InferenceLog(inference_log_url(served))
    logged = log.read(name, generated=True)
    log.close()
    mine = logged[logged.request_id.isin([c["request_id"] for c in calls])]
    print(
        f"8/{SLM_STEPS} the inference log's rows for these answers (InferenceLog.read(name, generated=True)):"
    )
    print("       request_id                        version  ttft_ms  tokens  tokens/s  rating  correction")
    for row in mine.itertuples():
        rating = "" if row.rating is None or row.rating != row.rating else f"{int(row.rating):+d}"
        fixed = (row.correction or "")[:40]
        print(
            f"       {row.request_id:<33} v{row.model_version:<6}  {row.ttft_ms:>7.0f}  "
            f"{row.completion_tokens:>6}  {row.tokens_per_s:>8.1f}  {rating:>6}  {fixed}"
        )
    total_s = time.monotonic() - started
    print(f"     the whole loop took {total_s / 60:.1f} min ({total_s:.0f} s)")
    print(f"""
Where to look:
  champion models show {name}      the version, its held-out scores, base digest and data hash
  champion history {name}          the promotion, with its reason
  champion serve {name} --config configs/serve_slm_cpu.yaml the OpenAI API on http://127.0.0.1:3000/v1
  champion chat {name} "where is my order 123"            one answer, streamed (add --url to ask a server)
  state lives in {home}""")
    reg.close()
    return {**summary, "answers": calls, "logged": mine, "seconds": total_s, "train_seconds": train_s}


def _score_base(cfg, rows) -> dict[str, float]:
    """The base model's scores on `rows`, answering zero-shot with the same prompt and decoding as sft()."""
    import gc

    from pipelines.generation_eval import score_answers
    from pipelines.lm import load_causal_lm, resolve_base
    from pipelines.model import resolve_device
    from pipelines.sft import generate_answers

    device = resolve_device(cfg.train.device, cfg.train.precision)
    model, tokenizer = load_causal_lm(resolve_base(cfg.model.base), device=device.type, dtype="fp32")
    answers = generate_answers(model, tokenizer, list(rows["instruction"]), cfg, device)
    del model
    gc.collect()  # the base's weights go before training loads them again
    return score_answers(answers, rows)


def _device_name(cfg) -> str:
    from pipelines.model import resolve_device

    return resolve_device(cfg.train.device, cfg.train.precision).type


def _scores(scores: dict[str, float]) -> str:
    return (
        f"valid JSON {scores['valid_json']:.2f}, intent accuracy {scores['intent_accuracy']:.2f}, "
        f"entity F1 {scores['entity_f1']:.2f}"
    )


def _stream(client, name: str, message: str, max_tokens: int) -> dict:
    """One streamed answer, printed as it arrives; its request id, version and time to first token."""
    print(f"     > {message}\n       ", end="", flush=True)
    sent, first, text, last = time.monotonic(), None, "", {}
    for piece in client.chat(
        name, [{"role": "user", "content": message}], max_tokens=max_tokens, temperature=0
    ):
        if isinstance(piece, dict):
            last = piece
            continue
        first = first or time.monotonic()
        text += piece
        print(piece, end="", flush=True)
    took = time.monotonic() - sent
    ttft = ((first or time.monotonic()) - sent) * 1000
    tokens = (last.get("usage") or {}).get("completion_tokens")
    print(
        f"\n       [v{last.get('version')}, first token after {ttft:.0f} ms, {tokens} tokens in {took:.1f} s]"
    )
    return {
        "request_id": last.get("request_id"),
        "version": last.get("version"),
        "text": text,
        "ttft_ms": ttft,
    }


def _wait_for_requests(log, name: str, request_ids: list[str], timeout: float = 30.0) -> None:
    """The server ships its log in batches; feedback needs the answers in it."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            logged = log.read(name, with_feedback=False)
            if len(logged) and set(request_ids) <= set(logged.request_id):
                return
            time.sleep(0.2)
    finally:
        log.engine.dispose()  # not close(): this process must not ship the running server's spool
