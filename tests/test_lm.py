"""Causal LM bases: local folders, the packaged SmolLM2 (converted once per CHAMPION_HOME), hub ids offline,
checked loading and LoRA on a tiny random Llama."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from champion.errors import ChampionError
from pipelines.lm import PACKAGED_SMOLLM2, load_causal_lm, lora_for_causal_lm, resolve_base


def test_the_tiny_llama_loads_in_fp32_on_the_cpu_padding_left(tiny_llama_dir):
    import torch

    model, tokenizer = load_causal_lm(tiny_llama_dir)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "where is my order"}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    batch = tokenizer(["hi", "where is my order please"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_a_missing_pad_token_becomes_eos(tiny_llama_dir, tmp_path):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "no-pad")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    _, tokenizer = load_causal_lm(folder, dtype="bf16")
    assert tokenizer.pad_token == "<|im_end|>"


def test_lora_marks_only_the_lora_parameters_trainable(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir)
    peft_model = lora_for_causal_lm(model, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {  # all-linear: the seven projections, not the head
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    model, _ = load_causal_lm(tiny_llama_dir)
    only_qv = lora_for_causal_lm(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert {n.split(".")[-4] for n, p in only_qv.named_parameters() if p.requires_grad} == {
        "q_proj",
        "v_proj",
    }
    with pytest.raises(ChampionError, match=r"lora\.target_modules: \['query'\] are not modules"):
        lora_for_causal_lm(load_causal_lm(tiny_llama_dir)[0], 4, 8, 0.0, target_modules=["query"])


def test_resolve_base_takes_a_local_folder_and_refuses_one_without_a_config(tiny_llama_dir, tmp_path):
    assert resolve_base(str(tiny_llama_dir)) == tiny_llama_dir.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChampionError, match=r"^model\.base: the folder '.*empty' has no config\.json"):
        resolve_base(str(empty))
    with pytest.raises(ChampionError, match=r"^model\.base: '\./nowhere' is not a folder here"):
        resolve_base("./nowhere")


def test_a_hub_id_offline_fails_with_one_sentence(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ChampionError) as err:
        resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(err.value)
    assert message.startswith("model.base: 'HuggingFaceTB/SmolLM2-135M-Instruct' could not be fetched")
    assert "pass a local model folder or 'smollm2-135m-instruct'" in message and "\n" not in message
    assert not any((home / "bases").iterdir())  # nothing half-written left behind


def test_a_pickle_in_a_base_folder_is_refused_before_loading(tiny_llama_dir, tmp_path):
    from champion.safety import UnsafeModelError

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "evil")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeModelError, match=r"'pytorch_model\.bin' is not a safe model file"):
        load_causal_lm(folder)


@pytest.mark.integration
def test_the_packaged_smollm2_is_converted_once_into_allowlisted_safetensors(home, capsys):
    from champion.safety import check_files

    pytest.importorskip("gguf", reason="the packaged SmolLM2 needs gguf (pip install gguf==0.19.0)")
    started = time.monotonic()
    folder = resolve_base(PACKAGED_SMOLLM2)
    seconds = time.monotonic() - started
    assert folder.parent == home.resolve() / "bases"
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert "quantization_config" not in config
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    check_files(folder, "causal-lm", "the converted base")  # only allowlisted files, nothing naming code
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    assert "converting the packaged SmolLM2" in capsys.readouterr().err
    again = time.monotonic()
    assert resolve_base(PACKAGED_SMOLLM2) == folder
    assert time.monotonic() - again < 1 and "converting" not in capsys.readouterr().err  # reused
    print(f"packaged SmolLM2 converted in {seconds:.1f} s")


def test_a_hub_id_is_downloaded_once_into_the_bases_cache(home, tiny_llama_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns):  # the hub, as an online user would reach it
        calls.append((repo_id, allow_patterns))
        shutil.copytree(tiny_llama_dir, local_dir, dirs_exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        (Path(local_dir) / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("x")
        if repo_id == "org/no-weights":
            (Path(local_dir) / "model.safetensors").unlink()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = resolve_base("org/tiny-llama")
    assert folder == home.resolve() / "bases" / "hub--org--tiny-llama"
    assert resolve_base("org/tiny-llama") == folder and len(calls) == 1  # reused, not downloaded again
    assert "*.safetensors" in calls[0][1] and not any("bin" in p for p in calls[0][1])
    model, _ = load_causal_lm(folder)
    assert model.config.num_hidden_layers == 2
    with pytest.raises(
        ChampionError, match=r"^model\.base: the hub repository 'org/no-weights' has no config"
    ):
        resolve_base("org/no-weights")
    assert sorted(p.name for p in (home / "bases").iterdir()) == ["hub--org--tiny-llama"]
