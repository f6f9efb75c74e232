"""`champion demo --slm` end to end on the tiny random Llama: generate, score the base, LoRA SFT, register,
promote, a real `champion serve` streaming through the OpenAI API, feedback, the inference log."""

from __future__ import annotations

import json

import yaml

NAME = "tiny-slm-demo"
TINY = [
    "data.validation_size=0.2",
    "data.test_size=0.2",
    "model.max_length=176",
    "lora.r=8",
    "lora.alpha=16",
    "lora.dropout=0.0",
    "lora.target_modules=[q_proj, v_proj]",
    "train.learning_rate=0.05",
    "train.device=cpu",
    "train.progress=false",
    "generation.max_new_tokens=4",
    "eval.reply_similarity=false",
    "eval.samples=1",
    f"registry.model_name={NAME}",
]


def test_slm_demo_trains_promotes_serves_streams_and_logs_feedback(
    home, tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    from champion.registry import connect, history, show_model
    from champion_cli.demo import run_slm_demo

    monkeypatch.delenv("CHAMPION_INFERENCE_LOG_URL", raising=False)
    serve = tmp_path / "serve.yaml"
    serve.write_text(
        yaml.safe_dump({"threads": 1, "follow": {"poll_seconds": 0.2}, "log": {"flush_seconds": 0.2}})
    )

    summary = run_slm_demo(
        rows=65, epochs=1, base=str(tiny_llama_dir), eval_rows=4, serve_config=serve, overrides=TINY
    )

    out = capsys.readouterr().out
    steps = ["1/8 generated 65 support messages", "2/8 the base", "3/8 LoRA SFT", "4/8 promoted",
             "5/8 serving", "6/8 3 held-out messages", "7/8 feedback", "8/8 the inference log"]  # fmt: skip
    assert all(step in out for step in steps), out
    assert f"registered {NAME} v1 as 'challenger'" in out and "the whole loop took" in out
    assert {"valid_json", "intent_accuracy", "entity_f1"} <= set(summary["zero_shot"]) & set(summary["tuned"])

    reg = connect()
    assert show_model(reg, NAME)["aliases"] == {"challenger": "1", "champion": "1"}
    promoted = [e for e in history(reg, NAME) if e.alias == "champion"]
    assert [(e.action, e.to_version) for e in promoted] == [("promote", "1")]
    assert reg.client.get_model_version(NAME, "1").tags["task"] == "text-generation"
    reg.close()

    answers = summary["answers"]
    assert len(answers) == 3 and {a["version"] for a in answers} == {"1"}
    assert all(a["request_id"] and a["ttft_ms"] > 0 for a in answers)
    assert out.count("[v1, first token after") == 3

    logged = summary["logged"].set_index("request_id")
    assert set(logged.index) == {a["request_id"] for a in answers}, "every streamed answer is logged once"
    assert set(logged.model_version) == {"1"}
    for answer in answers:
        assert logged.loc[answer["request_id"], "output"] == answer["text"]
    good, bad = logged.loc[answers[0]["request_id"]], logged.loc[answers[-1]["request_id"]]
    assert good.rating == 1 and good.correction is None
    assert bad.rating == -1
    correction = json.loads(bad.correction)  # the held-out row's target: the answer it should have given
    assert correction["intent"] and correction["reply"]


def test_demo_flag_picks_the_slm_loop_with_its_own_defaults(monkeypatch):
    import champion_cli.demo as demo
    from champion_cli.cli import main

    calls = []
    monkeypatch.setattr(demo, "run_slm_demo", lambda **kw: calls.append(("slm", kw)))
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(("classifier", kw)))

    assert main(["demo", "--slm"]) == 0
    assert main(["demo", "--slm", "--rows", "120", "--epochs", "1"]) == 0
    assert main(["demo"]) == 0
    assert calls == [
        ("slm", {"base": None}),
        ("slm", {"rows": 120, "epochs": 1, "base": None}),
        ("classifier", {"rows": 2400, "epochs": 3, "base": None}),
    ]
