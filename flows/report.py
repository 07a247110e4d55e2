"""Prefect artifacts on the flow run: metrics, slices, hard examples, the Run, and comparisons."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from verifily_train.artifacts import tables


def publish_run_artifacts(summary: dict) -> None:
    """What the UI shows on the flow run once the Run artifact is written."""
    create_table_artifact(tables.metrics_table(summary), key="metrics",
                          description="Overall metrics with 95% bootstrap intervals")
    create_table_artifact(tables.slice_table(summary), key="slices",
                          description="Metrics by tag value (95% bootstrap intervals; delta vs overall). "
                                      "Correlation, not causation.")
    create_markdown_artifact(tables.hard_examples_markdown(summary), key="hard-examples",
                             description="Hardest test examples and the tags they concentrate in")
    create_markdown_artifact(tables.run_markdown(summary), key="run",
                             description="The Run artifact's path and reproducibility hash")


def publish_comparison(previous: Path, current: Path) -> str:
    """``verifily compare`` of the previous version's run against this one, as a markdown artifact."""
    from verifily_train.artifacts.compare import compare_runs, render_comparison

    text = render_comparison(compare_runs(previous, current), markdown=True)
    create_markdown_artifact(f"## Compared with the previous version's run\n\n{text}", key="comparison",
                             description=f"verifily compare {previous.name} {current.name}")
    return str(previous)
