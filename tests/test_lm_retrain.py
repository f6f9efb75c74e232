"""`champion retrain` for a text-generation model, on registered tiny causal LMs: corrected answers from the
inference log and a labelled file become fresh conversations, the champion's adapter goes on training on its
rows plus theirs, the generative gate decides on the file's holdout side, and a retrain of a retrain
rebuilds the rows its champion learnt from."""

from __future__ import annotations

import json

import pytest
from lm_world import INTENTS, sft_tiny, write_tiny_replies

NAME = "tiny-replies"
NEW_INTENT = "change_address"


@pytest.fixture
def world(tmp_path, tiny_llama_dir):
    """v1 champion; 24 answers served and logged, each corrected by a person (a new intent among them); a
    labelled file of 40 conversations; a safety case every model passes (the tiny models answer noise)."""
    from champion.registry import connect, promote
    from pipelines.replygen import write_replies
    from serving.config import ServeConfig
    from serving.inference_log import InferenceLog
    from serving.lm_server import ChatParams, LMServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_HOME", str(tmp_path / "home"))
        mp.setenv("CHAMPION_ACTOR", "pytest")
        log_url = f"sqlite:///{tmp_path / 'log.db'}"
        mp.setenv("CHAMPION_INFERENCE_LOG_URL", log_url)
        for shared_store in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL"):
            mp.delenv(shared_store, raising=False)
        reg = connect()
        v1 = sft_tiny(reg, write_tiny_replies(tmp_path), tiny_llama_dir, 0).version
        promote(reg, NAME, v1, reason="first champion")
        cfg = ServeConfig.model_validate({"model": NAME, "task": "text-generation", "threads": 1,
                                          "generation": {"max_tokens": 8}})  # fmt: skip
        server = LMServer(
            cfg, registry=reg, inference_log=InferenceLog(log_url, spool_dir=tmp_path / "spool")
        )
        server.start()
        try:
            for i in range(24):
                intent = NEW_INTENT if i % 3 == 0 else INTENTS[i % len(INTENTS)]
                message = f"please help with request number {i} about {intent.replace('_', ' ')}"
                call = server.chat(ChatParams(messages=[{"role": "user", "content": message}], max_tokens=4))
                call.stream.result(30)
                corrected = {"intent": intent, "category": "ORDER", "entities": {}, "reply": "Done."}
                server.feedback_answer(call.request_id, None, json.dumps(corrected))
                if i == 0:  # the latest feedback counts: this correction is no JSON answer, so no row
                    server.feedback_answer(call.request_id, -1, "this was wrong")
            server.log.flush()
        finally:
            server.close()
        conversations = write_replies(tmp_path / "fresh.csv", 40, seed=7, intents=INTENTS)
        suite = tmp_path / "suite.yaml"
        never = "{valid_json: false, intent_in: null, answer_excludes: [ZZ-9-ZZ]}"
        suite.write_text(f"cases:\n  - id: never-says-zz\n    message: hello\n    expect: {never}\n")
        yield reg, v1, conversations, suite
        reg.close()


def config(conversations, suite, **changes):
    from pipelines.lm_retrain import LMRetrainConfig

    return LMRetrainConfig.model_validate(
        {
            "model_name": NAME,
            "overrides": ["train.learning_rate=1e-12"],  # the adapter must come out as it went in
            "fresh": {"files": [str(conversations)], "seed": 3, "holdout_share": 0.5, "min_train_rows": 10},
            "gate": {
                "gate": {"min_rows": 10, "resamples": 200, "margin": -1.0},
                "suite": [str(suite)],
                "built_in_suite": False,
            },
            **changes,
        }
    )


def _adapter(reg, version: str):
    from safetensors.numpy import load_file

    from champion.registry import TEXT_GENERATION
    from serving.model import checked_folder

    folder, _, _ = checked_folder(reg.client, NAME, version, task=TEXT_GENERATION)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_retrain_goes_on_from_the_champion_on_fresh_conversations_and_its_retrain_rebuilds_them(world):
    import numpy as np

    from pipelines.lm_retrain import EXTRA_REPLIES_ARTIFACT, retrain_lm

    reg, v1, conversations, suite = world
    result = retrain_lm(config(conversations, suite), reg)
    assert result.outcome == "promoted", result.reason  # margin -1: any challenger that breaks no case
    v2 = result.challenger_version
    c = result.counts
    assert c["fresh_feedback_rows"] == 23 and c["fresh_holdout_rows"] >= 10
    assert c["fresh_train_rows"] == 23 + c["fresh_file_train_rows"] and c["challenger_intents_new"] == [
        NEW_INTENT
    ]
    tags = reg.client.get_model_version(NAME, v2).tags
    assert tags["retrain.parent_version"] == v1 and tags["retrain.init"] == "champion"
    assert tags["gate.promote"] == "true" and tags["safety.passed"] == "1/1"
    # Gone on from v1's adapter: at a learning rate of 1e-12 it comes out as v1's (a new one starts at zero).
    before, after = _adapter(reg, v1), _adapter(reg, v2)
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and all(np.abs(before[k]).max() > 0 for k in lora_b)
    assert all(np.allclose(before[k], after[k], atol=1e-6) for k in before)
    rows = reg.client.download_artifacts(tags["run_id"], EXTRA_REPLIES_ARTIFACT)
    with open(rows, encoding="utf-8") as lines:
        added = [json.loads(line) for line in lines]
    assert sum(r[1] == NEW_INTENT for r in added) == 7  # every third corrected answer but the first
    history = [e.kind for e in reg.audit.loop_events(NAME)]
    assert {"retrain_started", "gate", "retrain_finished"} <= set(history)

    # v2 is the champion: a retrain of it rebuilds v1's file split plus what v2 learnt, checked by its hash.
    again = retrain_lm(config(conversations, suite, promotion="none"), reg)
    assert again.outcome == "not_promoted", again.reason
    assert again.counts["champion_fresh_rows_kept"] > 0
    assert reg.client.get_model_version(NAME, again.challenger_version).tags["retrain.parent_version"] == v2


def test_too_few_fresh_conversations_train_nothing_and_the_cli_dispatches(world, capsys):
    from champion_cli.cli import main

    reg, v1, conversations, _ = world
    args = [
        "retrain",
        NAME,
        "--set",
        "fresh.feedback=false",
        "--set",
        "fresh.min_train_rows=1000",
        "--set",
        "gate.gate.min_rows=10",
        "--data",
        str(conversations),
        "--json",
    ]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 1, captured
    out = json.loads(captured.out)
    assert out["outcome"] == "skipped" and "fewer than fresh.min_train_rows (1000)" in out["reason"]
    assert [str(v.version) for v in reg.client.search_model_versions(f"name = '{NAME}'")] == [v1]
    # Corrected answers alone teach but never judge: without labelled files there is no holdout.
    assert main(["retrain", NAME, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["outcome"] == "skipped" and "the fresh holdout has 0 labelled conversations" in out["reason"]
    assert main(["retrain", NAME, "--set", "fresh.files=['missing.csv']"]) == 2
    assert "fresh.files[0]: 'missing.csv' does not exist" in capsys.readouterr().err
