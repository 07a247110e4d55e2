"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Union

from verifily_train.errors import VerifilyError, translate_os_error

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, value: object) -> None:
    """Atomically write indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_output_file(path: PathLike, key: str) -> Path:
    """A file the user named for a command to write (``compare --html OUT``): absent, or a regular file to
    replace. A link, FIFO, device (``/dev/null``, which root may replace) or folder is refused, as is a place
    whose folder is not one; one line naming ``key``, before any work."""
    text = os.fspath(path)
    if not text or "\x00" in text:
        raise VerifilyError(None, key, "not a usable file name (empty, or a NUL byte)")
    path = Path(text)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:  # ENAMETOOLONG, ENOTDIR (a parent is a file), ELOOP, EACCES
        raise VerifilyError(path, key, f"cannot write here: {err.strerror or err}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise VerifilyError(path, key, f"is {kind}; only a regular file (or a new name) is written over")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise VerifilyError(path, key, f"cannot write here: {parent} is not a folder")
    return path


def write_output_file(path: PathLike, data: bytes, key: str) -> Path:
    """Write a file the user named, atomically (temp file and rename, so an old file is whole until the new one
    is), after :func:`check_output_file`; an OS refusal (read-only, no permission, full disk) is one line."""
    path = check_output_file(path, key)
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        full = translate_os_error(err, path)
        if full is not None:
            raise full from None
        raise VerifilyError(path, key, f"cannot write: {err.strerror or err}") from None
    return path


def read_user_file(path: PathLike, key: str, limit: int, error: type = VerifilyError) -> bytes:
    """The bounded reader of a file named on the command line: at most ``limit`` bytes are read (``/dev/zero``
    or an endless FIFO is refused once past it, not read to the end); a folder or an unreadable file is one
    line ``error(path, key, problem)``."""
    text = os.fspath(path)
    try:
        with open(text, "rb") as handle:
            data = handle.read(limit + 1)
    except IsADirectoryError:
        raise error(text, key, "is a folder, not a file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        raise error(text, key, f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > limit:
        raise error(text, key, f"longer than {limit // 2 ** 20} MiB, the most this file may hold")
    return data


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_read_only(root: PathLike) -> None:
    """Drop write permission on every file and folder under ``root`` (immutability by mode bits)."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(p, stat.S_IMODE(mode) & ~0o222)
        os.chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) & ~0o222)


def make_writable(root: PathLike) -> None:
    """Restore owner write permission under ``root`` (used only to delete staging folders)."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, stat.S_IMODE(os.stat(dirpath).st_mode) | 0o700)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o600)


def verifily_home() -> Path:
    """``$VERIFILY_HOME``, default ``~/.verifily``."""
    return Path(os.environ.get("VERIFILY_HOME") or Path.home() / ".verifily").expanduser()


def check_writable_folder(folder: os.PathLike | str, key: str) -> None:
    """``folder`` is a folder, or can be made one, where files can be written: tried, not read off mode bits
    (root passes every ``os.access`` test, yet cannot write under /proc). Leaves nothing behind."""
    import errno
    import tempfile


    path = Path(os.path.expanduser(os.fspath(folder)))
    try:
        if path.exists() and not path.is_dir():
            raise VerifilyError(path, key, "exists and is not a folder")
        probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
        if not probe.is_dir():
            raise VerifilyError(path, key, f"cannot be created: {probe} is not a folder")
        tempfile.TemporaryDirectory(prefix=".verifily-probe-", dir=probe).cleanup()
    except VerifilyError:
        raise
    except ValueError as err:  # an embedded NUL byte
        raise VerifilyError(None, key, f"not a usable path ({err})") from None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise VerifilyError(None, key, f"path too long ({len(os.fspath(folder)):,} characters)") from None
        raise VerifilyError(path, key, f"not writable: {err.strerror or err}") from None


# Staging folders (a dataset version or a Run being assembled) are owned by the process building them: it
# holds an exclusive lock on ``<folder>.lock`` beside it for as long as it works, and the kernel drops the lock
# when the process dies. A staging folder whose lock nobody holds was left by a killed process: debris.
_OWNED: dict = {}


def _is_current(fd: int, path: str) -> bool:
    """Whether the open lock file ``fd`` is still the file at ``path`` (a releaser unlinks the file it held:
    a waiter that then gets the lock on the unlinked file must not count it, or a third process locking a
    fresh file at ``path`` would hold the "same" lock beside it)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def claim_staging(folder: PathLike) -> Path:
    """Lock ``<folder>.lock`` (held until :func:`release_staging` or this process ends), then create ``folder``.

    The lock counts only while its file is the one at the path: after :func:`release_staging` unlinks it, a
    waiter that got the old file's lock opens the new one and waits again."""
    import fcntl

    folder = Path(folder)
    lock = f"{folder}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _is_current(fd, lock):
            break
        os.close(fd)
    _OWNED[str(folder)] = fd
    folder.mkdir()
    return folder


def release_staging(folder: PathLike) -> None:
    """Drop the ownership lock of ``folder`` and delete the lock file (the folder is renamed or gone by now)."""
    fd = _OWNED.pop(str(Path(folder)), None)
    if fd is None:
        return
    try:
        os.unlink(f"{folder}.lock")
    except FileNotFoundError:
        pass
    os.close(fd)


def sweep_abandoned(parent: PathLike, prefixes: tuple) -> int:
    """Delete folders in ``parent`` named ``<prefix>...`` whose owner died (no live lock); returns how many."""
    import fcntl
    import shutil

    parent = Path(parent)
    removed = 0
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefixes) and not p.name.endswith(".lock")]
    except OSError:
        return 0
    for folder in candidates:
        lock = f"{folder}.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # no lock file: left by a version of this tool that did not lock, or killed before locking
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its owner is alive
                if not _is_current(fd, lock):
                    continue  # released and claimed again meanwhile: the folder has a live owner
            if not folder.exists():
                continue
            if folder.is_dir():
                make_writable(folder)
                shutil.rmtree(folder, ignore_errors=True)
            removed += 1
            if fd is not None:
                os.unlink(lock)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


@contextlib.contextmanager
def key_lock(root: Path, stage: str, key: str) -> Iterator[None]:
    """Exclusive lock on one key: a second run computing the same key waits, then finds the entry."""
    lock_dir = root / stage / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released by the kernel if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
