"""Progress in a log that is not a terminal: a few plain lines, no tqdm redraws; a terminal keeps its bars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_finetune_config

from champion import progress

ROOT = Path(__file__).resolve().parent.parent


def test_a_log_gets_a_line_per_tenth_and_none_for_a_short_loop(capsys):
    bar = progress.progress_bar(range(50), "epoch 1/2", min_seconds=0)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss="0.4100")
    lines = capsys.readouterr().err.splitlines()
    assert seen == list(range(50)) and len(bar) == 50
    assert len(lines) == 10 and lines[0].startswith("epoch 1/2: step 5/50 (10%), loss 0.4100, ")
    assert lines[-1].startswith("epoch 1/2: step 50/50 (100%)")

    assert list(progress.progress_bar(range(50), "fast")) == list(range(50))  # done within min_seconds
    assert list(progress.progress_bar(range(50), "off", disable=True, min_seconds=0)) == list(range(50))
    assert capsys.readouterr().err == ""


def test_a_terminal_keeps_its_bar(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert isinstance(progress.progress_bar(range(3), "epoch 1/1"), tqdm)


def test_third_party_bars_go_off_in_a_log_unless_the_user_said_otherwise(monkeypatch):
    for key in progress.THIRD_PARTY_OFF:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(progress, "interactive", lambda: True)
    progress.quiet_third_party_bars()
    assert not any(key in os.environ for key in progress.THIRD_PARTY_OFF)

    monkeypatch.setattr(progress, "interactive", lambda: False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    progress.quiet_third_party_bars()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_finetune_into_a_pipe_logs_one_line_per_epoch_and_no_redraws(
    home, tickets_csv, tiny_model_dir, tmp_path
):
    cfg = tiny_finetune_config(tickets_csv, tiny_model_dir, train={"progress": True})  # two epochs
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in progress.THIRD_PARTY_OFF}
    proc = subprocess.run(
        [sys.executable, "-m", "champion_cli", "finetune", str(config)],
        capture_output=True,  # bytes: text mode would turn a redraw's "\r" into a newline
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "\r" not in err and "\r" not in out  # no tqdm redraw, ours or a library's
    assert "Loading weights" not in err and "Downloading artifacts" not in err
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "registered tiny-intents v1" in out
