"""The floors hold: each package imports only the floors below it (imports inside functions included), no two
modules of a package import each other, and no module imports another module's `_private` name.

`make test` runs `lint-imports` (the contracts in pyproject.toml) before pytest; these tests show the
contracts are kept on this tree and that they break when a lower floor reaches up or two modules import
each other.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["champion_cli", "pipelines", "monitoring", "serving", "champion"]  # top to bottom
LINT = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=cwd, capture_output=True, text=True, timeout=120)


def _tree_copy(tmp_path: Path) -> Path:
    """The five packages and pyproject.toml, copied: a place to break the floors without touching ours."""
    copy = tmp_path / "tree"
    for package in FLOORS:
        shutil.copytree(
            ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "*.html")
        )
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_the_contracts_are_kept_here():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_lower_floor_importing_a_higher_one_breaks_the_contract(tmp_path):
    tree = _tree_copy(tmp_path)
    assert _lint(tree).returncode == 0  # the copy is as clean as the original
    # Hidden inside a function, as the old upward imports were.
    _append(
        tree / "champion" / "errors.py",
        "def _face():\n    from champion_cli.cli import main\n\n    return main",
    )
    result = _lint(tree)
    assert result.returncode == 1
    assert "champion is not allowed to import champion_cli" in result.stdout
    assert "champion.errors -> champion_cli.cli" in result.stdout


def test_two_modules_importing_each_other_break_the_contract(tmp_path):
    tree = _tree_copy(tmp_path)
    _append(
        tree / "serving" / "spool.py",
        "def _config():\n    from serving import inference_log\n\n    return inference_log",
    )
    result = _lint(tree)
    assert result.returncode == 1
    assert "No cycles are allowed in serving" in result.stdout and "spool" in result.stdout


def private_imports(root: Path, packages: list[str]) -> list[str]:
    """`file:line module._name` for each import of another module's private name (dunders are public)."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            own = ".".join(path.relative_to(root).with_suffix("").parts)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ImportFrom) or node.level or node.module in (None, own):
                    continue
                for alias in node.names:
                    name = alias.name
                    if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.module}.{name}")
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports(ROOT, [*FLOORS, "benchmarks"]) == []


def test_the_private_name_check_finds_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def _helper():\n    return 1\n")
    (tmp_path / "pkg" / "b.py").write_text(
        "from pkg import __version__\n\n\ndef f():\n    from pkg.a import _helper\n\n    return _helper()\n"
    )
    assert private_imports(tmp_path, ["pkg"]) == ["pkg/b.py:5 pkg.a._helper"]


@pytest.mark.parametrize("package", FLOORS)
def test_every_module_is_named_in_the_readme_file_map(package):
    tree = (ROOT / "README.md").read_text().split("## Files", 1)[1].split("```")[1]
    lines = tree.split(f"\n{package}/", 1)[1].splitlines()[1:]
    block = lines[
        : next((i for i, line in enumerate(lines) if line and not line.startswith(" ")), len(lines))
    ]
    named = {line.split()[0] for line in block if line.startswith("  ") and line.split()}
    modules = {p.name for p in (ROOT / package).glob("*.py") if p.name not in {"__init__.py", "__main__.py"}}
    assert modules <= named, f"{package}/: not in the README's file map: {sorted(modules - named)}"
