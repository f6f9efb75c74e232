"""Every notebook runs top to bottom; here on the tiny model, so it takes seconds."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import tiny_finetune_config

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _execute(path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()


def test_finetune_and_register_notebook(home, tiny_model_dir, tmp_path, monkeypatch):
    from champion.registry import connect, show_model

    cfg = tiny_finetune_config(Path("unused.csv"), tiny_model_dir)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.setenv("CHAMPION_NOTEBOOK_CONFIG", str(config))
    monkeypatch.setenv("CHAMPION_NOTEBOOK_ROWS", "320")

    _execute(NOTEBOOKS / "01-finetune-and-register.ipynb")

    reg = connect()
    assert show_model(reg, "tiny-intents")["aliases"] == {"challenger": "1", "champion": "1"}
    assert (home / "data" / "tickets.csv").exists()
    reg.close()


def test_notebooks_are_stored_without_outputs():
    import nbformat

    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
