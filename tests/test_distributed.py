"""finetune under torchrun: 2 CPU processes (gloo) train in step, and only rank 0 logs and registers."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from conftest import tiny_finetune_config


def test_finetune_under_torchrun_with_two_cpu_processes_trains_once_and_registers_once(
    tmp_path, home, tiny_model_dir, tickets_csv
):
    import mlflow

    from champion.registry import connect

    cfg = tiny_finetune_config(
        tickets_csv,
        tiny_model_dir,
        method="full",
        train={"epochs": 4, "learning_rate": 3e-3, "batch_size": 16},
    )
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "CHAMPION_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipelines.finetune", str(config)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("registered tiny-intents v1 as 'challenger'") == 1, done.stdout[-2000:]

    reg = connect()
    versions = reg.client.search_model_versions("name='tiny-intents'")
    assert [str(v.version) for v in versions] == ["1"]
    runs = mlflow.search_runs(experiment_names=["tests"])
    assert len(runs) == 1 and runs.iloc[0]["params.distributed.world_size"] == "2"
    assert runs.iloc[0]["metrics.val_accuracy"] > 0.4  # four intents: chance is 0.25
    # Each rank saw its half of the training rows per epoch; rank 0 counts the whole world's throughput.
    assert runs.iloc[0]["metrics.train_samples_per_second"] > 0
    reg.close()
