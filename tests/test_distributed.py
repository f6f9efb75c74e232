"""finetune and distil under torchrun: 2 CPU processes (gloo) train in step; rank 0 alone logs, registers."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from conftest import tiny_finetune_config


def test_finetune_and_distil_under_torchrun_with_two_cpu_processes_register_once(
    tmp_path, home, tiny_model_dir, tickets_csv
):
    import mlflow

    from champion.registry import connect, promote

    cfg = tiny_finetune_config(
        tickets_csv,
        tiny_model_dir,
        method="full",
        train={"epochs": 4, "learning_rate": 3e-3, "batch_size": 16},
    )
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "CHAMPION_HOME": str(home), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    done = subprocess.run(
        [*torchrun, "champion_cli", "finetune", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
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

    # The same for distil: v1 as the teacher, one student registered, one run.
    promote(reg, "tiny-intents", "1", reason="teacher")
    distil_config = tmp_path / "distil.yaml"
    distil_config.write_text(
        yaml.safe_dump(
            {
                "model_name": "tiny-intents",
                "train": {"epochs": 2, "learning_rate": 3e-3, "batch_size": 16, "progress": False},
                "budget": {"min_rows": 20, "min_f1_ratio": 0.5},
                "cost": {"rows": 64, "repeats": 1},
            }
        )
    )
    done = subprocess.run(
        [*torchrun, "champion_cli", "distil", str(distil_config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: registered, outside its budget
    assert done.stdout.count("registered tiny-intents v2 (student of v1)") == 1, done.stdout[-2000:]
    assert sorted(str(v.version) for v in reg.client.search_model_versions("name='tiny-intents'")) == [
        "1",
        "2",
    ]
    runs = mlflow.search_runs(experiment_names=["champion-distil"])
    assert len(runs) == 1 and runs.iloc[0]["params.distributed.world_size"] == "2"
    reg.close()
