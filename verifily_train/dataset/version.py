"""DatasetVersion (spec §7.1): an immutable, pinned snapshot of tagged JSONL splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataFile:
    path: str  # relative to the version folder, "/"-separated
    split: str
    num_rows: int
    sha256: str
    abs_path: str  # where the bytes are on this machine (not part of the identity)


@dataclass(frozen=True)
class DatasetVersion:
    dataset_id: str
    version: str
    format: str
    task: str
    num_rows: int
    tags: List[str]
    manifest_path: Optional[str]
    data_path: str
    content_hash: str
    created_at: str
    files: Tuple[DataFile, ...] = ()
    tag_schema: Dict[str, dict] = field(default_factory=dict)
    row_schema: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``dataset_id@version``."""
        return f"{self.dataset_id}@{self.version}"

    def split_files(self, split: str) -> List[DataFile]:
        """The files of one split, in manifest order."""
        return [f for f in self.files if f.split == split]

    def has_split(self, split: str) -> bool:
        return any(f.split == split for f in self.files)

    def summary(self) -> dict:
        """JSON-ready description (what `dataset show` prints and a Run records)."""
        return {
            "dataset_id": self.dataset_id,
            "version": self.version,
            "format": self.format,
            "task": self.task,
            "num_rows": self.num_rows,
            "tags": list(self.tags),
            "manifest_path": self.manifest_path,
            "data_path": self.data_path,
            "content_hash": self.content_hash,
            "created_at": self.created_at,
            "files": [
                {"path": f.path, "split": f.split, "num_rows": f.num_rows, "sha256": f.sha256} for f in self.files
            ],
            "tag_schema": self.tag_schema,
        }
