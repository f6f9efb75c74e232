"""`champion demo` end to end on the real packaged all-MiniLM-L6-v2: the loop as `make demo` runs it.

In a file of its own: the suite's slowest test (4-5 minutes), which `--dist loadfile` can then hand to one
worker while the other MiniLM tests run on the other, instead of queueing it behind them in one file.
"""

from __future__ import annotations

import re

import pytest

from champion_cli.cli import main

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end(home, capsys):
    """The whole loop on a small, weak model (400 tickets, 1 epoch): serve, drift, the alarm, a retrain in
    its own process, the gate's verdict with its numbers, the story. Whether the gate passes such a weak
    model's challenger is up to the numbers; the notebook 04 test covers a pass through the canary."""
    assert main(["demo", "--rows", "400", "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    # Not a terminal: no progress bar redrawn in place (tqdm's, MLflow's or Hugging Face's), a line at most.
    assert "\r" not in out and "\r" not in err, [line for line in err.split("\n") if "\r" in line][:3]
    assert "Downloading artifacts" not in err and "Loading weights" not in err
    assert "1/12 generated 400 support tickets across 15 intents" in out and "4/12 promoted" in out
    assert "5/12 serving support-intents@champion with BentoML (serve_demo.yaml" in out
    assert "serves v1 (canary policy)" in out and "champion ui" in out
    # The normal window is judged ok, both drifted ones (held-out intents, new vocabulary) drift: the alarm.
    normal, drifted = out.split("6/12 drift check")[1].split("7/12 sending 2 x 400 drifted tickets")
    assert "support-intents v1: OK on 400 rows" in normal, normal
    drifted = drifted.split("8/12")[0]
    assert drifted.count("support-intents v1: DRIFT on 400 rows") == 2, drifted
    assert "alarm: 2 of the last 3 judged windows drifted" in drifted
    # The scheduler's job retrained in a child process, and the gate decided with its numbers.
    retrained = out.split("8/12")[1].split("9/12")[0]
    assert "v2 passed" in retrained or "v2 refused" in retrained, retrained
    assert "fresh holdout rows (difference" in retrained and "95% paired interval" in retrained
    story = out.split("12/12 the story of this loop")[1]
    assert re.search(r"review queue: \d+ of \d+ new predictions queued for review", story), story
    for step in ("loop       drift", "retrain_started", "candidate  assign", "gate", "retrain_finished"):
        assert step in story, story
    # 3 sample tickets + 1,200 of traffic (+ the canary's and the new version's answers); the review queue's
    # random 80% of the traffic and the rows its rules picked were labelled by the demo's reviewer.
    logged = int(out.split("the inference log holds ")[1].split(" predictions")[0])
    labelled = int(re.search(r"(\d+) with a reviewer's label", out).group(1))
    assert logged >= 1207 and 850 < labelled <= 1200, labelled
    from champion.registry import connect

    reg = connect()
    tags = reg.client.get_model_version("support-intents", "2").tags
    assert tags["retrain.trigger"] == "drift" and tags["gate.promote"] in ("true", "false")
    assert tags["retrain.drift_check_id"] and int(tags["gate.rows"]) >= 200
    reg.close()
