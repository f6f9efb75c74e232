"""LoRA SFT of a tiny random Llama: it learns on the answer tokens only, changes only LoRA weights, and
registers an adapter that reloads onto its base (logged once per digest) with the same logits."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from champion.errors import ChampionError
from champion.safety import DIGEST_TAG, files_digest
from pipelines.sft import SFTConfig, sft

INTENTS = ["track_order", "cancel_order", "get_refund", "reset_password"]


@pytest.fixture
def replies_csv(tmp_path) -> Path:
    from pipelines.replygen import write_replies

    return write_replies(tmp_path / "replies.csv", 24, seed=1, intents=INTENTS)  # 6 rows per intent


def tiny_sft_config(data: Path, base: Path, /, **sections) -> SFTConfig:
    """An SFTConfig that trains the tiny Llama in a few seconds; keyword sections override defaults."""
    cfg = {
        "data": {"source": str(data), "validation_size": 0.2, "test_size": 0.2, "seed": 0},
        "model": {"base": str(base), "max_length": 176},
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
        },
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "device": "cpu", "progress": False},
        "generation": {"max_new_tokens": 6},
        "eval": {"samples": 2},
        "registry": {"model_name": "tiny-replies", "experiment": "tests-sft"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value}
    return SFTConfig.model_validate(cfg)


def _tiny_model(base: Path, cfg: SFTConfig):
    from pipelines.lm import load_causal_lm, lora_for_causal_lm

    model, tokenizer = load_causal_lm(base, device="cpu", dtype="fp32")
    lora = cfg.lora
    return lora_for_causal_lm(model, lora.r, lora.alpha, lora.dropout, list(lora.target_modules)), tokenizer


def test_batch_labels_are_the_answer_tokens_only(replies_csv, tiny_llama_dir):
    from pipelines.chat import prompt_text
    from pipelines.sft import collate, encode_rows, load_reply_splits

    cfg = tiny_sft_config(replies_csv, tiny_llama_dir)
    splits = load_reply_splits(cfg.data)
    _, tokenizer = _tiny_model(tiny_llama_dir, cfg)
    rows = encode_rows(splits.train.head(4), tokenizer, 256)  # room for whole answers: rows differ in length
    batch = collate(rows, tokenizer.pad_token_id)

    for i, message in enumerate(splits.train.head(4)["instruction"]):
        prompt = len(tokenizer(prompt_text(tokenizer, message), add_special_tokens=False)["input_ids"])
        length = int(batch["attention_mask"][i].sum())
        labels, ids = batch["labels"][i].tolist(), batch["input_ids"][i].tolist()
        masked = [j for j, label in enumerate(labels) if label == -100]
        assert masked == list(range(prompt)) + list(range(length, len(labels)))  # prompt and padding
        assert labels[prompt:length] == ids[prompt:length]  # every answer token (and the end token) counts
        assert length == 256 or ids[length - 1] == tokenizer.eos_token_id  # the end token, unless cut
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # the batch was padded


def test_loop_lowers_the_loss_and_changes_only_lora_weights(replies_csv, tiny_llama_dir):
    import torch

    from pipelines.finetune import build_optimizer
    from pipelines.model import Device
    from pipelines.sft import _train_epoch, encode_rows, load_reply_splits, sft_loader, validation_loss

    cfg = tiny_sft_config(replies_csv, tiny_llama_dir)
    splits = load_reply_splits(cfg.data)
    torch.manual_seed(0)  # LoRA's A matrices start random
    model, tokenizer = _tiny_model(tiny_llama_dir, cfg)
    # The random base's final RMSNorm keeps its logits near uniform whatever LoRA does to the hidden states;
    # a sharper norm (frozen, part of the base) gives the adapters a loss they can move.
    with torch.no_grad():
        model.get_base_model().model.norm.weight.mul_(10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = encode_rows(splits.train.head(8), tokenizer, cfg.model.max_length)
    loader = sft_loader(rows, tokenizer, 4, shuffle=True, seed=0)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    device = Device("cpu", None)

    start = validation_loss(model, loader, device)
    losses = [start]
    for epoch in range(3):  # 6 steps
        _train_epoch(model, loader, optimizer, scheduler, device, cfg, epoch)
        losses.append(validation_loss(model, loader, device))

    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < 0.9 * losses[0], losses
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == ("lora_" in name), name  # every LoRA weight moved, no base weight did


def test_sft_registers_an_adapter_on_a_base_logged_once(registry, replies_csv, tiny_llama_dir):
    import mlflow
    import pandas as pd
    import torch
    from peft import PeftModel

    from pipelines.lm import load_causal_lm

    cfg = tiny_sft_config(replies_csv, tiny_llama_dir, train={"epochs": 2})
    result = sft(cfg, registry=registry)

    mv = registry.client.get_model_version("tiny-replies", result.version)
    tags = dict(mv.tags)
    assert tags["task"] == "text-generation" and tags["format"] == "lora"
    assert tags["base_model"] == str(tiny_llama_dir) and tags["base_run_id"] == result.base_run_id
    assert tags["generation.max_new_tokens"] == "6" and tags["generation.do_sample"] == "false"
    assert {"metric.val_valid_json", "metric.test_intent_accuracy", "metric.val_loss"} <= set(tags)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-replies/{result.version}"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    assert tags[DIGEST_TAG] == files_digest(model_dir)
    base_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.base_run_id}/base"))
    assert tags["base_sha256"] == files_digest(base_dir) and list(base_dir.glob("*.safetensors"))

    run = mlflow.get_run(result.run_id)
    losses = mlflow.MlflowClient().get_metric_history(result.run_id, "train_loss")
    assert len(losses) == 2 and run.data.tags["base_sha256"] == tags["base_sha256"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "chat_template.jinja", "generation.json", "samples", "reference"} <= artifacts
    table = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/reference/held_out.json")
    reference = pd.DataFrame(table["data"], columns=table["columns"])
    assert len(reference) == 8 and {"prompt", "answer", "reference", "valid_json", "split"} <= set(reference)

    # The registered adapter on the base a server would fetch gives the trained model's logits.
    base, tokenizer = load_causal_lm(base_dir)
    reloaded = PeftModel.from_pretrained(base, str(model_dir)).eval()
    ids = tokenizer(["where is my order 123"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**ids).logits, result.model(**ids).logits, atol=1e-5)

    # A second run on the same base refers to the same base run instead of logging the base again.
    again = sft(cfg, registry=registry)
    assert again.base_run_id == result.base_run_id
    bases = mlflow.search_runs(experiment_names=["champion-bases"], output_format="list")
    assert len(bases) == 1


def test_config_errors_are_one_sentence(replies_csv, tiny_llama_dir, tmp_path):
    from champion.config import load_config

    path = tmp_path / "sft.yaml"
    good = tiny_sft_config(replies_csv, tiny_llama_dir).model_dump(mode="json")
    cases = {
        "unknown key 'train.learnig_rate'": {"train": {**good["train"], "learnig_rate": 1e-3}},
        "'train.learning_rate' input should be greater than 0": {
            "train": {**good["train"], "learning_rate": 0}
        },
        "exactly one of data.source": {"data": {**good["data"], "generate": 100}},
        "'registry.alias' value error": {"registry": {**good["registry"], "alias": "champion"}},
    }
    for expected, change in cases.items():
        path.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(ChampionError) as err:
            load_config(SFTConfig, path)
        message = str(err.value)
        assert expected in message and "\n" not in message and message.endswith("."), message


def test_champion_sft_command_registers_a_merged_model(home, replies_csv, tiny_llama_dir, tmp_path, capsys):
    import mlflow

    from champion_cli.cli import main

    cfg = tiny_sft_config(replies_csv, tiny_llama_dir).model_dump(mode="json")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["sft", str(path), "registry.merge=true", "data.max_eval_rows=2"]) == 0
    out = capsys.readouterr().out
    assert "registered tiny-replies v1 as 'challenger'" in out and "valid JSON" in out
    mv = mlflow.MlflowClient().get_model_version("tiny-replies", "1")
    assert mv.tags["task"] == "text-generation" and mv.tags["format"] == "causal-lm"
    assert "base_run_id" not in mv.tags and mv.tags["base_sha256"]
    assert not mlflow.search_runs(experiment_names=["champion-bases"], output_format="list")


def test_shipped_config_validates_and_names_its_command():
    from champion.config import load_config
    from pipelines.lm import PACKAGED_SMOLLM2

    path = Path(__file__).resolve().parent.parent / "configs" / "smollm2_sft_cpu.yaml"
    cfg = load_config(SFTConfig, path)
    assert path.read_text().splitlines()[0] == "# champion sft configs/smollm2_sft_cpu.yaml"
    assert cfg.model.base == PACKAGED_SMOLLM2 and cfg.model.max_length == 192
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.learning_rate) == (16, 32, 3e-4)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.data.generate) == (8, 2, 400)
