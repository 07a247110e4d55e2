"""A stage's code version, derived: its manual version plus the sources of every project module it can run.

The modules a stage can run are the import closure of its own module, read from the sources (``ast``,
nothing is imported): every ``import`` and ``from ... import`` of a ``verifily_train`` module, at top
level or inside a function (not inside a module's PEP 562 ``__getattr__``: the package's lazy API
re-export), their parent packages, and modules named as strings such as the DDP worker
that ``torchrun -m`` starts. Editing any of them re-keys the stage; a renamed or new module is followed
because the closure is read again in every process. Computed once per process and stage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Set

PACKAGE = "verifily_train"
LIBRARY_ROOT = Path(__file__).resolve().parent.parent
MODULE_STRING = re.compile(r"^verifily_train(\.[A-Za-z_][A-Za-z0-9_]*)+$")


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
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    # a module-level ``__getattr__`` (PEP 562) imports only when code asks the module for a name it lacks: the
    # package's lazy re-export of the Python API, which no stage asks for; its imports are not the stage's code
    lazy = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.add(node.value)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


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

