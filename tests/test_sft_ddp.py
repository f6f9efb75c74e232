"""LoRA SFT under torchrun: 2 CPU processes (gloo) train in step; rank 0 alone logs and registers once."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from lm_world import write_tiny_replies


def test_sft_under_torchrun_with_two_cpu_processes_registers_one_adapter(tmp_path, home, tiny_llama_dir):
    import mlflow

    from champion.registry import connect

    data = write_tiny_replies(tmp_path)
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"source": str(data), "validation_size": 0.2, "test_size": 0.2, "max_eval_rows": 2},
                "model": {"base": str(tiny_llama_dir), "max_length": 176},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "device": "cpu"},
                "generation": {"max_new_tokens": 4},
                "eval": {"samples": 1, "reply_similarity": False},
                "registry": {"model_name": "tiny-replies", "experiment": "tests-sft-ddp"},
            }
        )
    )
    env = {**os.environ, "CHAMPION_HOME": str(home), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    done = subprocess.run(
        [*torchrun, "champion_cli", "sft", str(config)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reg = connect()
    versions = reg.client.search_model_versions("name='tiny-replies'")
    assert [str(v.version) for v in versions] == ["1"], done.stdout[-2000:]
    assert versions[0].tags["task"] == "text-generation" and versions[0].tags["format"] == "lora"
    runs = mlflow.search_runs(experiment_names=["tests-sft-ddp"])
    assert len(runs) == 1 and runs.iloc[0]["params.distributed.world_size"] == "2"
    assert runs.iloc[0]["metrics.train_samples_per_second"] > 0
    reg.close()
