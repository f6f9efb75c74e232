"""Loading registered text-generation versions the way a server will: an adapter on its checked base (one base
in memory for two adapters, each with its own logits), a merged model, a tampered base refused before it is
parsed, and a version of the other task refused in one sentence."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lm_world import sft_tiny, write_tiny_replies

from champion.errors import ChampionError
from serving.lm_model import forget_bases, load_generative_version, shared_bases

TEXTS = ["where is my order 123", "please reset my password"]


def _one_sentence(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith("."), message
    return message


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_llama_dir):
    """One CHAMPION_HOME for the module: tiny-replies v1 and v2 (two adapters on one base, trained with
    different seeds), tiny-merged v1 (a merged model) and clf v1 (a version without a task tag)."""
    from champion.registry import connect

    home = tmp_path_factory.mktemp("lm-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_HOME", str(home / "home"))
        mp.setenv("CHAMPION_ACTOR", "pytest")
        for shared_store in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL"):  # the module's own sqlite stores
            mp.delenv(shared_store, raising=False)
        data = write_tiny_replies(home)
        reg = connect()

        def run(seed: int, **registry):
            return sft_tiny(reg, data, tiny_llama_dir, seed, **registry)

        first, second = run(0), run(1)
        merged = run(0, model_name="tiny-merged", merge=True)
        mv = reg.client.get_model_version("tiny-replies", first.version)
        reg.client.create_registered_model("clf")
        reg.client.create_model_version("clf", mv.source, run_id=mv.run_id)  # no task tag: a classifier
        forget_bases()
        yield {"home": home / "home", "reg": reg, "first": first, "second": second, "merged": merged}
        forget_bases()
        reg.close()


def _logits(model, tokenizer):
    import torch

    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits.float()


def test_two_adapters_share_one_base_and_each_gives_its_own_logits(lm, monkeypatch):
    import torch

    import champion.formats

    client, first, second = lm["reg"].client, lm["first"], lm["second"]
    loads = []
    real = champion.formats.load_causal_lm_files
    monkeypatch.setattr(
        champion.formats, "load_causal_lm_files", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    forget_bases()

    a = load_generative_version(client, "tiny-replies", first.version)
    b = load_generative_version(client, "tiny-replies", second.version)

    assert len(loads) == 1 and shared_bases() == [a.base_sha256] and a.model is b.model  # one base in memory
    assert (a.format, a.adapter_name != b.adapter_name) == ("lora", True)
    assert a.generation == {"max_new_tokens": 4, "do_sample": False}
    assert a.chat_template == first.tokenizer.chat_template and a.tokenizer.padding_side == "left"
    want_a, want_b = _logits(first.model, a.tokenizer), _logits(second.model, a.tokenizer)
    assert not torch.allclose(want_a, want_b, atol=1e-3)  # the two adapters differ
    for _ in range(2):  # switching back and forth: each version keeps its own adapter
        assert torch.allclose(a.logits(TEXTS), want_a, atol=1e-5)
        assert torch.allclose(b.logits(TEXTS), want_b, atol=1e-5)
    bases = [p.name for p in (lm["home"] / "cache" / "bases").iterdir() if p.is_dir()]
    assert bases == [a.base_sha256]


def test_a_merged_version_loads_as_its_own_model(lm):
    import torch

    merged = lm["merged"]
    loaded = load_generative_version(lm["reg"].client, "tiny-merged", merged.version)
    assert loaded.format == "causal-lm" and loaded.adapter_name is None
    assert torch.allclose(loaded.logits(TEXTS), _logits(merged.model, loaded.tokenizer), atol=1e-5)


def test_a_tampered_base_is_refused_before_it_is_parsed_and_not_cached(lm, monkeypatch):
    import mlflow

    import champion.formats

    reg, first = lm["reg"], lm["first"]
    parsed = []
    monkeypatch.setattr(champion.formats, "load_causal_lm_files", lambda *a, **k: parsed.append(a))
    cache = lm["home"] / "cache" / "bases"
    forget_bases()
    shutil.rmtree(cache)  # a fresh server: nothing in memory or in the cache

    # A wrong base_sha256 tag on a copy of v1.
    mv = reg.client.get_model_version("tiny-replies", first.version)
    wrong = reg.client.create_model_version(
        "tiny-replies", mv.source, run_id=mv.run_id, tags={**mv.tags, "base_sha256": "0" * 64}
    )
    with pytest.raises(ChampionError) as err:
        load_generative_version(reg.client, "tiny-replies", wrong.version)
    message = _one_sentence(err)
    assert f"version {wrong.version} of 'tiny-replies'" in message and "sha256" in message
    assert not parsed and not [p for p in cache.iterdir() if p.is_dir()]

    # A byte changed in the base run's artifacts.
    base_dir = Path(mlflow.get_run(first.base_run_id).info.artifact_uri.removeprefix("file://")) / "base"
    weights = next(base_dir.glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(ChampionError) as err:
            load_generative_version(reg.client, "tiny-replies", first.version)
    finally:
        weights.write_bytes(original)
    message = _one_sentence(err)
    assert f"version {first.version} of 'tiny-replies'" in message and "changed after registration" in message
    assert not parsed and not [p for p in cache.iterdir() if p.is_dir()]

    # A base run that is gone.
    missing = reg.client.create_model_version(
        "tiny-replies", mv.source, run_id=mv.run_id, tags={**mv.tags, "base_run_id": "0" * 32}
    )
    with pytest.raises(ChampionError) as err:
        load_generative_version(reg.client, "tiny-replies", missing.version)
    assert "base run" in _one_sentence(err) and not parsed


def test_each_loader_refuses_the_other_task_in_one_sentence(lm):
    from serving.model import load_version

    client = lm["reg"].client
    with pytest.raises(ChampionError) as err:
        load_version(client, "tiny-replies", lm["first"].version)
    assert "is a text-generation version" in _one_sentence(err)
    with pytest.raises(ChampionError) as err:
        load_generative_version(client, "clf", "1")
    assert "is a text-classification version" in _one_sentence(err)


def test_models_show_prints_each_version_task(lm, capsys, monkeypatch):
    from champion_cli.cli import main

    monkeypatch.setenv("CHAMPION_HOME", str(lm["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, task in (("tiny-replies", "text-generation"), ("clf", "text-classification")):
        assert main(["models", "show", name]) == 0
        lines = capsys.readouterr().out.splitlines()
        column = lines[1].split().index("TASK") - 1  # "CPU-S/1K (COST/1M)" is two words
        assert all(line.split()[column] == task for line in lines[2:] if line.split()), lines
