"""Prefect artifacts on the flow run: metrics, slices, hard examples, the Run, and comparisons."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from verifily_train.artifacts.tables import ArtifactSpec, comparison_artifact, run_artifacts
from verifily_train.pipeline.runner import Publisher


def create_artifact(spec: ArtifactSpec) -> None:
    """One artifact on the current flow run (what ``artifacts/tables.py`` describes)."""
    create = create_table_artifact if spec.kind == "table" else create_markdown_artifact
    create(spec.content, key=spec.key, description=spec.description)


class PrefectPublisher(Publisher):
    """A completed Run as Prefect artifacts on the flow run."""

    def run_artifacts(self, summary: dict) -> None:
        for spec in run_artifacts(summary):
            create_artifact(spec)

    def comparison(self, previous: Path, current: Path, text: str) -> None:
        create_artifact(comparison_artifact(previous, current, text))
