"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations


def make_versions(
    reg, name: str, scores: list[float | None], source: str = "file:///tmp/champion-test-model"
) -> list[str]:
    """Register `name` with one version per score (tagged metric.val_macro_f1), without training anything."""
    reg.client.create_registered_model(name)
    versions = []
    for score in scores:
        tags = {"data_sha256": "d" * 64}
        if score is not None:
            tags["metric.val_macro_f1"] = str(score)
        versions.append(str(reg.client.create_model_version(name, source=source, tags=tags).version))
    return versions
