"""Notebook 07 runs top to bottom on the tiny random Llama: SFT, promote, a real `champion serve`, the
official `openai` client (plain, streamed, JSON mode), a rating, the inference log."""

from __future__ import annotations

import yaml
from test_notebooks import NOTEBOOKS, _execute

NAME = "tiny-notebook-slm"


def test_slm_finetune_and_serve_notebook(home, tiny_llama_dir, tmp_path, monkeypatch):
    from champion.registry import connect, history, show_model
    from serving.inference_log import InferenceLog

    cfg = {
        "data": {"generate": 65, "validation_size": 0.2, "test_size": 0.2, "max_eval_rows": 2},
        "model": {"base": str(tiny_llama_dir), "max_length": 176},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-2, "device": "cpu", "progress": False},
        "generation": {"max_new_tokens": 4},
        "eval": {"samples": 1, "reply_similarity": False},
        "registry": {"model_name": NAME, "experiment": "tests-lm"},
    }  # fmt: skip
    config, serve = tmp_path / "tiny.yaml", tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    serve.write_text(
        yaml.safe_dump({"threads": 1, "follow": {"poll_seconds": 0.2}, "log": {"flush_seconds": 0.2}})
    )
    monkeypatch.delenv("CHAMPION_INFERENCE_LOG_URL", raising=False)
    monkeypatch.setenv("CHAMPION_NOTEBOOK_CONFIG", str(config))
    monkeypatch.setenv("CHAMPION_NOTEBOOK_SERVE_CONFIG", str(serve))
    monkeypatch.setenv("CHAMPION_NOTEBOOK_SFT_SET", "")  # the tiny config as it is

    _execute(NOTEBOOKS / "07-slm-finetune-and-serve.ipynb")

    reg = connect()
    assert show_model(reg, NAME)["aliases"] == {"challenger": "1", "champion": "1"}
    assert [(e.alias, e.action, e.to_version) for e in history(reg, NAME)][-1] == ("champion", "promote", "1")
    reg.close()
    log = InferenceLog(f"sqlite:///{home / 'inference.db'}")
    logged = log.read(NAME, generated=True)
    log.close()
    # The plain and the streamed answer (greedy: the same text), then JSON mode: the tiny model's answer is no
    # JSON object, so it is generated again up to json_retries (2) times, each attempt logged; all from v1.
    assert 3 <= len(logged) <= 5 and set(logged.model_version) == {"1"}
    assert logged.output.iloc[0] == logged.output.iloc[1]
    assert (logged.completion_tokens > 0).all() and (logged.ttft_ms > 0).all()
    assert logged.rating.tolist()[-1] == 1 and logged.rating.notna().sum() == 1  # the answer the client got
