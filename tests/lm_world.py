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


def two_versions(mp, root: Path, base: Path):
    """In a CHAMPION_HOME of its own under `root` (set on the MonkeyPatch `mp`, shared stores cleared):
    v1 and v2 of tiny-replies, two adapters of one tiny base, v1 promoted champion. Returns (registry, v1,
    v2); the caller closes the registry."""
    from champion.registry import connect, promote

    mp.setenv("CHAMPION_HOME", str(root / "home"))
    mp.setenv("CHAMPION_ACTOR", "pytest")
    for shared_store in ("MLFLOW_TRACKING_URI", "CHAMPION_AUDIT_URL", "CHAMPION_INFERENCE_LOG_URL"):
        mp.delenv(shared_store, raising=False)
    reg = connect()
    data = write_tiny_replies(root)
    first, second = sft_tiny(reg, data, base, 0), sft_tiny(reg, data, base, 1)
    promote(reg, first.model_name, first.version, reason="first champion")
    return reg, first.version, second.version
