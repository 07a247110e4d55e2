"""``verifily dataset create|list|show|verify``: the local dataset store ($VERIFILY_HOME/datasets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from verifily_train import jsonsafe
from verifily_train.cli.console import print_table
from verifily_train.cli.runtime import quiet_libraries, use_prefect_server
from verifily_train.dataset import create_version, list_versions, resolve
from verifily_train.dataset.columns import parse_columns_flag
from verifily_train.flows.events import DATASET_CREATED, emit_dataset_created


def cmd_dataset_create(args) -> int:
    columns = parse_columns_flag(args.columns) if getattr(args, "columns", None) else None
    dv = create_version(args.dataset_id, args.version, args.task, args.train, args.val, args.test, columns=columns)
    print(f"created {dv.ref}  {dv.num_rows} rows  {dv.content_hash}")
    print(f"  {dv.manifest_path}")
    api_url = use_prefect_server()
    if api_url:  # a configured Prefect server: its retraining trigger reacts to this event
        quiet_libraries()
        try:
            emit_dataset_created(dict(dv.summary(), ref=dv.ref))
            print(f"  event {DATASET_CREATED} sent to {api_url}")
        except Exception as err:  # the version exists either way; say the event did not go out
            print(f"  warning: could not send {DATASET_CREATED} to {api_url}: {err}", file=sys.stderr)
    return 0


def cmd_dataset_list(args) -> int:
    unreadable: List[dict] = []
    versions = list_versions(unreadable=unreadable)
    for bad in unreadable:  # one bad folder is reported, and the good versions are still listed
        print(f"warning: {bad['ref']} left out: {bad['problem']}", file=sys.stderr)
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    if not versions:
        print("no datasets yet: verifily dataset create --id ds_x --version v1 --task sft --train train.jsonl")
        return 0
    print_table([[v["ref"], v["task"], v["num_rows"], ",".join(v["tag_keys"]), v["content_hash"][:19], v["created_at"]]
                 for v in versions], ["REF", "TASK", "ROWS", "TAGS", "CONTENT_HASH", "CREATED"])
    return 0


def cmd_dataset_show(args) -> int:
    dv = resolve(args.ref)
    summary = dv.summary()
    derived_from = derived_from_manifest(dv.manifest_path)
    if derived_from is not None:  # a derived version names its parent and the rule (dataset derive, attribute)
        summary["derived_from"] = derived_from
    print(json.dumps(summary, indent=2))
    return 0


def derived_from_manifest(manifest_path) -> Optional[dict]:
    """The ``derived_from`` record of a (verified) manifest, or None for a version made from files."""
    if not manifest_path:
        return None
    value = jsonsafe.loads(Path(manifest_path).read_text(encoding="utf-8")).get("derived_from")
    return value if isinstance(value, dict) else None


def cmd_dataset_verify(args) -> int:
    dv = resolve(args.ref)
    print(f"ok {dv.ref}: {len(dv.files)} files, {dv.num_rows} rows, every hash and row checked ({dv.content_hash})")
    return 0
