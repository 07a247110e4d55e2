"""``verifily cache list|prune|clear``: the stage cache ($VERIFILY_HOME/cache)."""

from __future__ import annotations

import time
from typing import List

from verifily_train.cli.console import human_bytes, print_table
from verifily_train.errors import VerifilyError
from verifily_train.pipeline.cache import cache_root, list_entries, prune


def cmd_cache_list(args) -> int:
    entries = list_entries(cache_root(args.dir))
    if not entries:
        print(f"cache is empty ({cache_root(args.dir)})")
        return 0
    now = time.time()
    print_table([[e["stage"], e["key"][:16], human_bytes(e["bytes"]), f"{(now - e['modified']) / 86400:.1f}d"]
                 for e in entries], ["STAGE", "KEY", "SIZE", "AGE"])
    print(f"{len(entries)} entries, {human_bytes(sum(e['bytes'] for e in entries))} in {cache_root(args.dir)}")
    return 0


def cmd_cache_prune(args) -> int:
    if args.older_than < 0:
        raise VerifilyError(None, "--older-than", "must be >= 0 days")
    kept: List[str] = []
    print(f"removed {prune(cache_root(args.dir), args.older_than, kept)} entries older than {args.older_than:g} days"
          + _kept_note(kept))
    return 0


def cmd_cache_clear(args) -> int:
    kept: List[str] = []
    print(f"removed {prune(cache_root(args.dir), None, kept)} entries from {cache_root(args.dir)}" + _kept_note(kept))
    return 0


def _kept_note(kept: List[str]) -> str:
    return f"; kept {len(kept)} in use by a running verifily command (train, attribute)" if kept else ""
