"""Registered tiny text-generation versions for the serving tests: LoRA SFT of the tiny random Llama
(conftest's `tiny_llama_dir`) on generated support replies, through the real `sft()` recipe."""

from __future__ import annotations

from pathlib import Path

INTENTS = ["track_order", "cancel_order", "get_refund", "reset_password"]


def sft_tiny(registry, data: Path, base: Path, seed: int, name: str = "tiny-replies", **registry_fields):
    """One `sft()` run of the tiny Llama on `data` (a second or two); returns its SFTResult."""
    from pipelines.sft import SFTConfig, sft

    cfg = {
        "data": {"source": str(data), "validation_size": 0.2, "test_size": 0.2, "max_eval_rows": 2},
        "model": {"base": str(base), "max_length": 176},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-2, "device": "cpu", "progress": False,
                  "seed": seed},
        "generation": {"max_new_tokens": 4},
        "eval": {"samples": 1, "reply_similarity": False},
        "registry": {"model_name": name, "experiment": "tests-lm", **registry_fields},
    }  # fmt: skip
    return sft(SFTConfig.model_validate(cfg), registry=registry)


def write_tiny_replies(folder: Path) -> Path:
    from pipelines.replygen import write_replies

    return write_replies(folder / "replies.csv", 24, seed=1, intents=INTENTS)
