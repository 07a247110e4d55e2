"""Prefect events the product emits (a deployment trigger in prefect.yaml reacts to them)."""

from __future__ import annotations

DATASET_CREATED = "verifily.dataset.version.created"


def emit_dataset_created(summary: dict) -> None:
    """``verifily.dataset.version.created`` for a new store version; waits until the event is sent."""
    import logging

    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    dataset_id, version = summary["dataset_id"], summary["version"]
    emit_event(event=DATASET_CREATED,
               resource={"prefect.resource.id": f"verifily.dataset.{dataset_id}.{version}",
                         "prefect.resource.name": f"{dataset_id}@{version}",
                         "verifily.dataset.id": dataset_id, "verifily.dataset.version": version,
                         "verifily.dataset.ref": f"{dataset_id}@{version}", "verifily.dataset.task": summary["task"],
                         "verifily.dataset.content_hash": summary["content_hash"]},
               payload={"num_rows": summary["num_rows"], "tags": summary["tags"]})
    logging.getLogger("prefect.events.clients").setLevel(logging.ERROR)
    EventsWorker.drain_all()
