"""A stage's code version, derived: its manual version plus the sources of every project module it can run.

The modules a stage can run are the import closure of its own module, read from the sources by the one import
reader (``verifily_train/imports.py``, nothing is imported): every ``import`` and ``from ... import`` of a
``verifily_train`` module, at top level or inside a function (not inside a module's PEP 562 ``__getattr__``:
the package's lazy API re-export), their parent packages, and modules named as strings such as the DDP
worker that ``torchrun -m`` starts. Editing any of them re-keys the stage; a renamed or new module is followed
because the closure is read again in every process. Computed once per process and stage.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Set

from verifily_train.imports import FROM, IMPORT, PACKAGE, STRING, imported_modules, is_project, read_imports

LIBRARY_ROOT = Path(__file__).resolve().parent.parent


def module_file(name: str, root: Path = LIBRARY_ROOT) -> Optional[Path]:
    """The source file of project module ``name`` under ``root`` (None for ``flows``/``tasks`` or a missing one)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> Set[str]:
    """Project modules that ``path`` (module ``module``) imports or names as a ``-m`` string."""
    # a module-level ``__getattr__`` (PEP 562) imports only when code asks the module for a name it lacks: the
    # package's lazy re-export of the Python API, which no stage asks for; its imports are not the stage's code
    found = {name for record in read_imports(path, module) if record.kind in (IMPORT, FROM, STRING)
             and not record.lazy_getattr for name in imported_modules(record)}
    return {name for name in found if is_project(name)}


def import_closure(module: str, root: Path = LIBRARY_ROOT) -> Dict[str, Path]:
    """Every project module ``module`` can run, with its parent packages: name -> source file."""
    seen: Dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a module runs its packages
        todo.extend(_imported_names(path, name))
    return seen


def closure_digest(module: str, root: Path = LIBRARY_ROOT) -> str:
    """SHA-256 over the closure's module names and source bytes, in name order."""
    digest = hashlib.sha256()
    for name, path in sorted(import_closure(module, root).items()):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def code_version(manual: str, module: str) -> str:
    """``<manual version>:<digest of the module's import closure>``, once per process."""
    return f"{manual}:{closure_digest(module)[:16]}"


def closure_modules(module: str) -> FrozenSet[str]:
    """The closure's module names (what ``verifily cache`` and the docs can show)."""
    return frozenset(import_closure(module))

