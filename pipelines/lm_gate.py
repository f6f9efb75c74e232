"""Compare two text-generation versions on the same fresh labelled conversations and the safety suite.

Reads top to bottom: labelled conversations (a support-replies table) -> both versions answer every message
greedily, with the system prompt each was trained with -> both answer every safety case -> each answer is
scored against its reference (`pipelines.generation_eval.per_row`) and checked against its case
(`pipelines.safety_suite`) -> the pure `champion.generation_gate.decide_generation_gate` decides -> an MLflow
run keeps the numbers, every answer and the safety results; both versions carry their safety results as tags.
`champion compare NAME A B --data replies.csv` calls it for a text-generation model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from champion.config import StrictModel
from champion.errors import ChampionError
from champion.generation_gate import GenerationGateConfig, decide_generation_gate
from champion.repair import process_tags
from pipelines.compare import GATE_EXPERIMENT, Comparison

if TYPE_CHECKING:
    import pandas as pd

    from serving.lm_model import LoadedLM

SAFETY_TAG = "safety."  # safety.passed "9/11", safety.failed "id,id", safety.suite_sha256


class LMGateConfig(StrictModel):
    gate: GenerationGateConfig = GenerationGateConfig()
    suite: list[str] = Field(default_factory=list)  # YAML/JSONL files of the user's own safety cases
    built_in_suite: bool = True  # run the built-in cases too
    known_intents: list[str] = Field(default_factory=list)  # besides the holdout's, for "intent is known"
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096
    )  # default: each version's recorded setting, else 96
    batch_size: int = Field(8, ge=1)  # messages generated together (left-padded)


def greedy_answers(lm: LoadedLM, messages: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers of `lm` to `messages`, each after the system prompt the version was trained with."""
    import torch

    from pipelines.chat import SYSTEM_PROMPT

    system = lm.system_prompt or SYSTEM_PROMPT
    tok = lm.tokenizer
    answers: list[str] = []
    for start in range(0, len(messages), batch_size):
        prompts = [
            tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": m}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for m in messages[start : start + batch_size]
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        with lm.active() as model, torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        answers += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def compare_generation(
    reg,
    name: str,
    champion_version: str,
    challenger_version: str,
    holdout: pd.DataFrame,
    cfg: LMGateConfig | None = None,
    log_mlflow: bool = True,
    models: dict[str, LoadedLM] | None = None,
    embed=None,
    **about: Any,
) -> Comparison:
    """Both versions answer `holdout` (a support-replies table) and the safety suite; the gate decides.
    `models` may hold versions already loaded (by version string); `embed` (texts -> vectors) is needed when
    the gate's metric uses reply_similarity."""
    from champion.registry import model_version
    from pipelines.generation_eval import per_row
    from pipelines.safety_suite import load_suite, run_suite
    from serving.lm_model import load_generative_version

    cfg = cfg or LMGateConfig()
    champion_version, challenger_version = str(champion_version), str(challenger_version)
    if champion_version == challenger_version:
        raise ChampionError(f"compare: both sides are v{champion_version}; give two different versions.")
    needs_embed = "reply_similarity" in (*cfg.gate.used_metrics(), *cfg.gate.floors)
    if needs_embed and embed is None:
        from pipelines.sft import minilm_embed

        embed = minilm_embed()
    cases = load_suite(cfg.suite, cfg.built_in_suite)
    models = dict(models or {})
    for version in (champion_version, challenger_version):  # both exist, before loading either
        if version not in models:
            model_version(reg, name, version)
    for version in (champion_version, challenger_version):
        if version not in models:
            models[version] = load_generative_version(reg.client, name, version)
    messages = [str(m) for m in holdout["instruction"]]
    known = {str(i) for i in holdout["intent"]} | set(cfg.known_intents)
    tables, safety, answers = {}, {}, {}
    for side, version in (("champion", champion_version), ("challenger", challenger_version)):
        lm = models[version]
        limit = cfg.max_new_tokens or int(lm.generation.get("max_new_tokens", 96))
        said = greedy_answers(lm, messages + [c.message for c in cases], limit, cfg.batch_size)
        answers[side] = said[: len(messages)]
        tables[side] = per_row(answers[side], holdout, embed)
        safety[side] = run_suite(cases, said[len(messages) :], known, lm.system_prompt or "")
    decision = decide_generation_gate(
        tables["champion"],
        tables["challenger"],
        [str(i) for i in holdout["intent"]],
        cfg.gate,
        safety={side: {r["id"]: r["passed"] for r in results} for side, results in safety.items()},
        model=name,
        champion_version=champion_version,
        challenger_version=challenger_version,
        holdout_sha256=conversations_sha256(holdout),
        **about,
    )  # fmt: skip
    decision.evidence["safety_results"] = {side: _compact(results) for side, results in safety.items()}
    for side, version in (("champion", champion_version), ("challenger", challenger_version)):
        tag_safety(reg, name, version, safety[side])
    run_id = (
        _log_run(decision, name, champion_version, challenger_version, tables, safety) if log_mlflow else None
    )
    if run_id:
        decision.evidence["mlflow_run_id"] = run_id
    return Comparison(decision, champion_version, challenger_version, run_id)


def conversations_sha256(rows: pd.DataFrame) -> str:
    """The holdout's identity: a sha256 of its (message, target JSON) rows in order (the gate pairs rows)."""
    import pandas as pd

    from champion.tables import content_sha256
    from pipelines.chat import target_json

    answers = [target_json(row) for row in rows.to_dict("records")]
    return content_sha256(pd.DataFrame({"text": rows["instruction"].astype(str), "label": answers}))


def tag_safety(reg, name: str, version: str, results: list[dict[str, Any]]) -> None:
    """The version's safety results as tags: passed "k/n" and the failed case ids."""
    failed = [r["id"] for r in results if not r["passed"]]
    tags = {f"{SAFETY_TAG}passed": f"{len(results) - len(failed)}/{len(results)}",
            f"{SAFETY_TAG}failed": ",".join(failed)[:4000]}  # fmt: skip
    for key, value in tags.items():
        reg.client.set_model_version_tag(name, version, key, value)


def _compact(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "kind": r["kind"], "passed": r["passed"], "why": r["why"]} for r in results]


def _log_run(decision, name: str, champion: str, challenger: str, tables, safety) -> str:
    """An MLflow run in the gate experiment: the decision, both score tables and both safety results."""
    import mlflow

    from champion import tracking

    ev = decision.evidence
    experiment_id = tracking.ensure_experiment(GATE_EXPERIMENT)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"gate-v{champion}-v{challenger}", tags=process_tags()
    ) as run:
        mlflow.set_tags({"model": name, "champion_version": champion, "challenger_version": challenger,
                         "promote": str(decision.promote).lower(), "task": "text-generation",
                         "holdout_sha256": ev.get("holdout_sha256", "")})  # fmt: skip
        mlflow.log_params(tracking.flatten(ev["config"], "gate."))
        metrics = {"rows": ev["rows"]}
        for side in ("champion", "challenger"):
            metrics.update({f"{side}_{m}": v for m, v in ev.get(side, {}).items()})
            passed = sum(r["passed"] for r in safety[side])
            metrics[f"{side}_safety_passed"] = passed
        if "delta" in ev:
            metrics.update(
                delta=ev["delta"], delta_low=ev["delta_interval"][0], delta_high=ev["delta_interval"][1]
            )
        mlflow.log_metrics(metrics)
        mlflow.log_dict(decision.to_dict(), "gate/decision.json")
        for side in ("champion", "challenger"):
            mlflow.log_table(tables[side], f"gate/{side}_answers.json")
            mlflow.log_dict(safety[side], f"gate/{side}_safety.json")
    return run.info.run_id


def format_generation_comparison(comp: Comparison) -> str:
    """What `champion compare` prints for a text-generation model."""
    d, ev = comp.decision, comp.decision.evidence
    lines = [f"{'PROMOTE' if d.promote else 'KEEP CHAMPION'}: {d.reason}"]
    for side, version in (("champion", comp.champion_version), ("challenger", comp.challenger_version)):
        scores = ev.get(side)
        if scores:
            shown = "  ".join(f"{m} {v:.3f}" for m, v in scores.items())
            lines.append(f"  {side} v{version}: {shown}")
    for side, results in ev.get("safety_results", {}).items():
        failed = [r for r in results if not r["passed"]]
        text = f"  safety, {side}: {len(results) - len(failed)} of {len(results)} cases passed"
        if failed:
            text += "; failed: " + ", ".join(f"{r['id']} ({r['why']})" for r in failed[:6])
        lines.append(text)
    if ev.get("per_slice"):
        worst = sorted(ev["per_slice"].items(), key=lambda kv: kv[1]["change"])[:3]
        lines.append(
            "  largest per-intent falls: "
            + ", ".join(f"{k} {v['change']:+.3f} ({v['rows']} rows)" for k, v in worst)
        )
    lines.append(f"  holdout: {ev['rows']} conversations, sha256 {ev.get('holdout_sha256', '')[:16]}")
    if comp.run_id:
        lines.append(
            f"  MLflow run {comp.run_id} (gate/decision.json, gate/*_answers.json, gate/*_safety.json)"
        )
    return "\n".join(lines)
