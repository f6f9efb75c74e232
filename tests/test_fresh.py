"""The fresh holdout's split: keyed by a secret of CHAMPION_HOME, so no text can be aimed at a side; a
configured seed still gives the old, reproducible split."""

from __future__ import annotations

import stat

import pandas as pd

from pipelines.fresh import FreshConfig, fresh_data, holdout_side

SECRET_FILE = "holdout.secret"  # in CHAMPION_HOME


def _labels_file(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"text": [f"ticket number {i}" for i in range(400)], "label": "a"}).to_csv(path, index=False)
    return path


def test_the_split_is_keyed_by_a_secret_of_the_home(tmp_path, monkeypatch):
    cfg = FreshConfig(from_log=False, files=[str(_labels_file(tmp_path))], holdout_share=0.5)
    holdouts = {}
    for name in ("a", "b"):
        monkeypatch.setenv("CHAMPION_HOME", str(tmp_path / name))
        holdouts[name] = fresh_data("m", cfg)
        again = fresh_data("m", cfg)  # the same home deals the same holdout
        assert again.holdout_sha256 == holdouts[name].holdout_sha256
    a, b = (set(holdouts[n].holdout["text"]) for n in ("a", "b"))
    assert a != b  # two homes, two splits: not predictable from the text alone
    texts = [f"ticket number {i}" for i in range(400)]
    public = {t for t, side in zip(texts, holdout_side(texts, "m", 0.5, 0), strict=True) if side}
    assert a != public and b != public  # nor from the public hash
    assert 120 < len(a) < 280 and 120 < len(b) < 280  # still about half
    for name in ("a", "b"):  # the key: a 0600 file, never in what a retrain records
        secret = tmp_path / name / SECRET_FILE
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert holdouts[name].counts["seed"] == "secret"
        assert secret.read_text().strip() not in repr(holdouts[name].counts)
    # A configured seed gives the public split of before, in every home, and makes no key.
    seeded = FreshConfig(from_log=False, files=cfg.files, holdout_share=0.5, seed=0)
    for name in ("c", "d"):
        monkeypatch.setenv("CHAMPION_HOME", str(tmp_path / name))
        data = fresh_data("m", seeded)
        assert set(data.holdout["text"]) == public and data.counts["seed"] == 0
        assert not (tmp_path / name / SECRET_FILE).exists()
