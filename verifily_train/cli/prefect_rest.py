"""A replayed Run's Prefect artifacts, posted to the configured server's REST API (``POST /artifacts/``).

A replay makes no flow run and imports no Prefect (it answers in a fraction of a second); it still publishes
what a flow run publishes (``artifacts/tables.py``), as artifacts with the same keys, so the UI's
``metrics``/``slices``/``run`` history and the comparison with the previous dataset version are complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from verifily_train.artifacts.tables import ArtifactSpec, comparison_artifact, run_artifacts
from verifily_train.pipeline.runner import Publisher


def _sanitized(item):
    """NaN as null, as Prefect's ``TableArtifact`` stores a table."""
    if isinstance(item, list):
        return [_sanitized(x) for x in item]
    if isinstance(item, dict):
        return {k: _sanitized(v) for k, v in item.items()}
    return None if isinstance(item, float) and math.isnan(item) else item


def artifact_request(spec: ArtifactSpec) -> dict:
    """The body Prefect's client sends for ``create_table_artifact`` / ``create_markdown_artifact``."""
    data = json.dumps(_sanitized(spec.content)) if spec.kind == "table" else spec.content
    return {"key": spec.key, "type": spec.kind, "description": spec.description, "data": data}


class RestPublisher(Publisher):
    """Artifacts for a Run that has no flow run, sent straight to ``api_url``; a failure is a warning, never fatal."""

    def __init__(self, api_url: str):
        self.api_url = api_url.rstrip("/")
        self.failed: Optional[str] = None

    def _post(self, spec: ArtifactSpec) -> None:
        import httpx

        headers = {}
        if os.environ.get("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        try:
            response = httpx.post(f"{self.api_url}/artifacts/", json=artifact_request(spec), headers=headers,
                                  auth=tuple(auth.split(":", 1)) if auth and ":" in auth else None, timeout=10)
            response.raise_for_status()
        except httpx.HTTPError as err:  # the Run is complete and verifiable: only the UI's copy is missing
            self.failed = self.failed or f"{spec.key}: {str(err).splitlines()[0][:160]}"

    def run_artifacts(self, summary: dict) -> None:
        for spec in run_artifacts(summary):
            self._post(spec)

    def comparison(self, previous: Path, current: Path, text: str) -> None:
        self._post(comparison_artifact(previous, current, text))
