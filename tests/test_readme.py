"""The README's commands exist and parse, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from champion_cli.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMMANDS = [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S)
    for line in block.splitlines()
    if line.strip()
]


def test_two_commands_and_ci():
    assert COMMANDS[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "torch==2.13.0" in makefile and "-c constraints.txt" in makefile
    ci = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert ci[-1] == "make test"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("champion ")])
def test_readme_champion_commands_parse(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)


def test_readme_file_tree_names_real_paths():
    tree = re.search(r"## Files\n.*?```\n(.*?)```", README, re.S).group(1)
    for folder in re.findall(r"^(\w+)/", tree, re.M):
        assert (ROOT / folder).is_dir(), folder
    for module in re.findall(r"^  (\w+\.py)", tree, re.M):
        assert list(ROOT.glob(f"*/{module}")), module
