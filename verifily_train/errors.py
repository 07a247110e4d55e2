"""Every error a user can cause, grouped by what the user can do about it.

The CLI prints ``str(err)`` of a ``VerifilyError`` as one line and exits with code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from typing import List, Optional


class VerifilyError(Exception):
    """Base class for all errors a user can cause and fix."""

    exit_code = 2

    def __init__(self, where: Optional[object] = None, key: Optional[str] = None, problem: str = ""):
        self.where = os.fspath(where) if where is not None else None
        self.key = key
        self.problem = problem
        super().__init__(self._render())

    def lines(self) -> List[str]:
        """What the CLI prints, one ``error:`` line each (one, unless several problems were found at once)."""
        return [str(self)]

    def _render(self) -> str:
        parts = [p for p in (self.where, self.key) if p]
        prefix = ": ".join(parts)
        text = f"{prefix}: {self.problem}" if prefix else self.problem
        return " ".join(text.split("\n"))


class ConfigError(VerifilyError):
    """The train.yaml or a dotted override is invalid."""


class ManifestError(VerifilyError):
    """A dataset manifest is malformed or does not match its files."""


class DataError(VerifilyError):
    """A data row is malformed or does not match the manifest's schemas."""


class DatasetNotFoundError(VerifilyError):
    """A dataset reference does not resolve in the local store."""


class DatasetExistsError(VerifilyError):
    """A dataset version already exists; versions are immutable."""


class ModelError(VerifilyError):
    """The base model is missing or of the wrong kind for the task."""


class EnvironmentProblem(VerifilyError):
    """An optional extra, device or credential the config needs is missing."""


class DiskFullError(EnvironmentProblem):
    """A write failed for lack of space (or a file size limit); finished stages stay cached."""


SHORT_WRITE_MARKERS = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space left")


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # full disk, quota, file size limit (RLIMIT_FSIZE)
NO_SPACE = "no space left on the device (or file size limit reached)"


# safetensors' Rust writer reports the OS error in its message ("I/O error: File too large (os error 27)")
SAFETENSORS_NO_SPACE = ("No space left on device (os error", "File too large (os error", "Disk quota exceeded (os error")


def is_short_write(err: BaseException) -> bool:
    """A write failed for lack of space; torch reports a full disk during ``torch.save`` as a RuntimeError,
    safetensors as a ``SafetensorError`` naming the OS error."""
    if isinstance(err, OSError):
        return err.errno in NO_SPACE_ERRNOS
    if type(err).__name__ == "SafetensorError":
        return any(m in str(err) for m in SAFETENSORS_NO_SPACE)
    return isinstance(err, RuntimeError) and any(m in str(err) for m in SHORT_WRITE_MARKERS)


def translate_os_error(err: BaseException, where: Optional[object] = None,
                       while_doing: str = "") -> Optional["DiskFullError"]:
    """The user error an OS-level failure stands for, or None (a bug: keep its traceback).

    The one place that reads ENOSPC, EDQUOT and EFBIG: a full disk or a file size limit is the user's to fix,
    and what finished is cached. ``where`` defaults to the file the error names.
    """
    if not is_short_write(err):
        return None
    where = where if where is not None else getattr(err, "filename", None)
    where = None if where is None else str(os.fsdecode(where) if isinstance(where, bytes) else where)
    during = f" {while_doing}" if while_doing else ""
    return DiskFullError(where, None, f"{NO_SPACE}{during}: free space and re-run; finished stages are cached")


class PreflightError(VerifilyError):
    """One or more problems found before any work; each is one line."""

    def __init__(self, problems: List[VerifilyError]):
        self.problems = problems
        super().__init__(None, None, f"{len(problems)} problem(s) found before training: " +
                         "; ".join(str(p) for p in problems))

    def lines(self) -> List[str]:
        return [str(p) for p in self.problems]


class RunError(VerifilyError):
    """A run artifact is missing, incomplete, or fails its checksums."""


def only_transient(exc: BaseException) -> bool:
    """True when retrying could help: user errors never get better on retry."""
    return not isinstance(exc, VerifilyError)
