"""DatasetVersion: manifests, row validation, and the local dataset store."""

from verifily_train.dataset.manifest import check_slice_tags, dataset_from_paths, load_manifest
from verifily_train.dataset.store import create_version, list_versions, resolve
from verifily_train.dataset.version import DataFile, DatasetVersion

__all__ = [
    "DataFile", "DatasetVersion", "load_manifest", "dataset_from_paths", "check_slice_tags",
    "create_version", "list_versions", "resolve",
]
