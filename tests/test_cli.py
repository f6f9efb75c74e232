"""The `champion` command: fast help, the operator verbs, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import http_process, make_versions

from champion_cli.cli import main


def test_help_imports_nothing_heavy():
    code = (
        "import sys, champion_cli.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'transformers', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "finetune" in out and "rollback" in out and out.strip().endswith("[]")


def test_operator_verbs(registry, capsys):
    v1, v2, v3 = make_versions(registry, "clf", [0.8, 0.9, 0.7])
    assert main(["promote", "clf", v1, "--reason", "first"]) == 0
    assert main(["promote", "clf", v2, "--reason", "better"]) == 0
    assert "promote: version 2 val_macro_f1=0.9000 >= champion v1" in capsys.readouterr().out

    assert main(["promote", "clf", v3, "--reason", "worse"]) == 1
    assert "promote refused: version 3 val_macro_f1=0.7000 is worse" in capsys.readouterr().err
    assert main(["rollback", "clf", "--reason", "incident 42"]) == 0
    assert "returns from v2 to the previous champion v1" in capsys.readouterr().out

    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["NAME", "CHAMPION", "CHALLENGER", "LATEST", "UPDATED"]
    assert listing[1].split()[:4] == ["clf", "1", "-", "3"]

    assert main(["models", "show", "clf", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"] == {"champion": "1"} and [v["version"] for v in shown["versions"]] == [
        "3",
        "2",
        "1",
    ]

    assert main(["history", "clf"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4 and "incident 42" in rows[-1] and "rollback" in rows[-1] and "pytest" in rows[-1]
    assert main(["history", "clf", "--json"]) == 0
    assert [e["action"] for e in json.loads(capsys.readouterr().out)] == ["promote", "promote", "rollback"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["promote", "nope", "1", "--reason", "x"], "error: model 'nope' is not in the registry"),
        (["models", "show", "nope"], "error: model 'nope' is not in the registry"),
        (["finetune", "/no/config.yaml"], "error: config file '/no/config.yaml' does not exist"),
        (["data", "out.txt"], r"error: .*cannot write .out.txt. with .\.txt.; use a path ending in .csv"),
    ],
)
def test_errors_are_one_line_and_exit_2(registry, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err


def test_promote_requires_a_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["promote", "clf", "1"])
    assert exc.value.code == 2 and "--reason" in capsys.readouterr().err


def test_data_verb_writes_tickets(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["data", str(out), "--rows", "50", "--intents", "track_order,refund_request"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 50 and {json.loads(x)["label"] for x in lines} == {"track_order", "refund_request"}


def test_ui_serves_the_projects_store(home, tmp_path):
    command = lambda port: [sys.executable, "-m", "champion_cli", "ui", "--port", str(port)]  # noqa: E731
    with http_process(command, tmp_path / "ui.log", timeout=90):
        assert (home / "mlflow.db").exists()  # the UI opened the project's store, not ./mlruns
