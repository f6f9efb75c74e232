"""`champion compress` of a text-generation version (tiny random Llama, LoRA SFT): a GGUF that the gguf
reader and transformers read back to the same greedy answers, an int8 copy that loads and answers as a
served version, a copy outside its quality budget refused by promote, a tampered GGUF refused before a byte of
it is parsed."""

from __future__ import annotations

import pytest
from lm_world import sft_tiny, write_tiny_replies

from champion.errors import ChampionError
from champion_cli.cli import main

NAME = "tiny-replies"
SAMPLE = ["where is my order 123", "please reset my password", "I want my money back", "cancel order 77"]
FAST = ["--set", "budget.min_rows=4", "--set", "max_rows=6"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir):
    """One CHAMPION_HOME for the module: tiny-replies v1 (a LoRA adapter on the tiny Llama), the champion."""
    from champion.registry import connect, promote
    from serving.lm_model import forget_bases

    root = tmp_path_factory.mktemp("lm-compress")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAMPION_HOME", str(root / "home"))
        mp.setenv("CHAMPION_ACTOR", "pytest")
        for shared_store in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL", "CHAMPION_INFERENCE_LOG_URL"):
            mp.delenv(shared_store, raising=False)
        data = write_tiny_replies(root)
        reg = connect()
        source = sft_tiny(reg, data, tiny_llama_dir, 0, name=NAME)
        promote(reg, NAME, source.version, reason="first champion")
        forget_bases()
        yield {"reg": reg, "data": data, "version": source.version, "root": root}
        forget_bases()
        reg.close()


def _greedy(model, tokenizer, messages: list[str], tokens: int = 8) -> list[str]:
    import torch

    from pipelines.chat import prompt_text

    tokenizer.padding_side = "left"
    enc = tokenizer([prompt_text(tokenizer, m) for m in messages], return_tensors="pt", padding=True,
                    add_special_tokens=False)  # fmt: skip
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)


def test_the_gguf_export_reads_back_to_the_same_greedy_answers(world, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.lm_compress import merged_causal_lm, write_gguf

    reg, version = world["reg"], world["version"]
    tags = dict(reg.client.get_model_version(NAME, version).tags)
    merged, tokenizer = merged_causal_lm(reg.client, NAME, version, tags)
    expected = _greedy(merged, tokenizer, SAMPLE)
    for quantization in ("F32", "Q8_0"):
        folder = tmp_path / quantization
        folder.mkdir()
        assert write_gguf(merged, tokenizer, folder / "model.gguf", quantization, "tiny") == "default"

        # What llama.cpp reads: the llama hyper-parameters and a complete byte-level BPE vocabulary.
        reader = gguf.GGUFReader(str(folder / "model.gguf"))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        assert fields["general.architecture"] == "llama"
        assert fields["llama.block_count"] == merged.config.num_hidden_layers
        assert fields["llama.attention.head_count_kv"] == merged.config.num_key_value_heads
        assert fields["tokenizer.chat_template"] == tokenizer.chat_template
        assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert len(reader.fields["tokenizer.ggml.tokens"].data) == merged.config.vocab_size
        assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert "output.weight" not in kinds  # tied to token_embd, as SmolLM2
        assert kinds["blk.0.attn_q.weight"] == quantization and kinds["blk.0.attn_norm.weight"] == "F32"

        # transformers reads model and tokenizer from the file alone, to the same greedy answers.
        source = {"pretrained_model_name_or_path": str(folder), "gguf_file": "model.gguf"}
        reloaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
        reread = AutoTokenizer.from_pretrained(**source)
        assert reread("where is my order 123")["input_ids"] == tokenizer("where is my order 123")["input_ids"]
        reread.pad_token = reread.pad_token or tokenizer.pad_token
        assert _greedy(reloaded, reread, SAMPLE) == expected, quantization
        if quantization == "F32":  # the permutation of q and k undone exactly: the same network
            enc = tokenizer(SAMPLE[:1], return_tensors="pt")
            with torch.inference_mode():
                assert torch.allclose(reloaded(**enc).logits, merged(**enc).logits, atol=1e-5)


def test_int8_and_gguf_copies_are_measured_registered_and_served(world, capsys):
    from champion.registry import model_version
    from pipelines.lm_compress import greedy_answers
    from serving.lm_model import load_generative_version

    reg, version, data = world["reg"], world["version"], str(world["data"])
    for to, fmt in (("int8", "int8"), ("gguf-q8_0", "gguf")):
        code = main(
            ["compress", NAME, version, "--to", to, "--data", data, *FAST, "--set", "cost.batch_size=3"]
        )
        printed = capsys.readouterr().out
        assert code == 0, printed
        assert "intent agreement" in printed and "tokens/s" in printed
        new = printed.split(f"registered {NAME} v", 1)[1].split(" ", 1)[0]
        tags = dict(model_version(reg, NAME, new).tags)
        assert (tags["format"], tags["variant"], tags["source_version"]) == (fmt, to, version)
        assert tags["task"] == "text-generation" and tags["gate.within_budget"] == "true"
        assert tags["heldout_rows"] == "6" and 0 <= float(tags["agreement"]) <= 1
        assert float(tags["cost.cpu_seconds_per_1k_tokens"]) > 0 and float(tags["cost.tokens_per_s"]) > 0
        assert tags["generation.max_new_tokens"] == "4" and tags["generation.reference"].startswith("runs:/")
        assert int(tags["memory.variant_file_bytes"]) > 0
        if fmt == "int8":  # int8 layers hold a quarter of their fp32 bytes
            assert int(tags["memory.variant_parameter_bytes"]) < int(tags["memory.source_parameter_bytes"])
        assert set(reg.client.get_registered_model(NAME).aliases) >= {"champion", "candidate"}
        # Served as the service loads it: an int8 copy on torch's int8 Linear layers, the GGUF dequantized.
        lm = load_generative_version(reg.client, NAME, new, device="cpu")
        assert lm.format == fmt
        if fmt == "int8":
            from torch.ao.nn.quantized.dynamic import Linear as QLinear

            assert any(isinstance(m, QLinear) for m in lm.model.modules())
        answers, tokens = greedy_answers(lm, SAMPLE[:2], 4)
        assert len(answers) == 2 and 2 <= tokens <= 8
    source_tags = dict(model_version(reg, NAME, version).tags)
    assert float(source_tags["cost.cpu_seconds_per_1k_tokens"]) > 0  # measured beside each copy


def test_a_copy_outside_its_budget_is_registered_but_promote_refuses_it(world, capsys):
    from champion.registry import model_version, promote

    reg, version = world["reg"], world["version"]
    args = ["compress", NAME, version, "--to", "int8", "--data", str(world["data"]), "--set", "max_rows=4"]
    assert main(args) == 1  # 4 rows scored, fewer than the 200 the default budget needs
    printed = capsys.readouterr().out
    new = printed.split(f"registered {NAME} v", 1)[1].split(" ", 1)[0]
    assert "REFUSED" in printed
    assert model_version(reg, NAME, new).tags["gate.within_budget"] == "false"
    decision = promote(reg, NAME, new, reason="cheaper")
    assert not decision.allowed and "outside its quality budget" in decision.reason


def test_a_gguf_whose_files_changed_is_refused_before_it_is_parsed(world, monkeypatch, capsys):
    import gguf

    from champion.config import champion_home
    from champion.safety import UnsafeModelError
    from serving.lm_model import load_generative_version

    reg, version = world["reg"], world["version"]
    assert main(["compress", NAME, version, "--to", "gguf-q8_0", "--data", str(world["data"]), *FAST]) == 0
    new = capsys.readouterr().out.split(f"registered {NAME} v", 1)[1].split(" ", 1)[0]
    load_generative_version(reg.client, NAME, new)  # cached once, checked
    cached = [p for p in (champion_home() / "cache" / "models" / NAME).glob(f"{new}-*/model.gguf")]
    assert len(cached) == 1
    blob = bytearray(cached[0].read_bytes())
    blob[-1] ^= 0xFF  # one byte of the last tensor
    cached[0].write_bytes(bytes(blob))

    parsed = []
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: parsed.append(a))
    with pytest.raises(UnsafeModelError, match="sha256 no longer matches"):
        load_generative_version(reg.client, NAME, new)
    assert parsed == []  # refused on its digest; the GGUF reader never opened it
    assert not cached[0].exists()  # and the tampered copy left the cache


def test_the_default_rows_are_the_versions_held_out_test_rows(world):
    from lm_world import INTENTS

    from pipelines.lm_compress import held_out_reply_rows

    reg, version = world["reg"], world["version"]
    tags = dict(reg.client.get_model_version(NAME, version).tags)
    rows = held_out_reply_rows(NAME, version, tags, None, None)
    assert len(rows) == 2 and set(rows["intent"]) <= set(INTENTS)  # sft_tiny keeps 2 test rows
    assert rows["instruction"].str.len().min() > 0 and rows["response"].str.len().min() > 0
    with pytest.raises(ChampionError, match="pass --data FILE"):
        held_out_reply_rows(NAME, version, {}, None, None)


def test_a_gguf_is_for_llama_models_and_a_classifier_cannot_take_it(world):
    from pipelines.lm_compress import gguf_tensor_name, permute_rotary

    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.bias") is None
    import numpy as np

    w = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows: halves -> interleaved pairs
    assert permute_rotary(w, 2, 2)[:4, 0].tolist() == [0, 4, 2, 6]
    with pytest.raises(ChampionError, match="is a text-generation version"):
        from pipelines.compress import CompressConfig, compress

        compress(NAME, world["version"], CompressConfig(to="onnx"), registry=world["reg"])
