"""The import contract, checked from the sources (every import statement, at top level or inside a function).

Layers, top to bottom; a module may import its own layer and those below it, never one above:
``{cli, api} -> flows -> tasks -> pipeline -> {training, evaluation, artifacts, attribution} -> {model, dataset}
-> config -> base (errors, fsio, hashing, checksums, jsonsafe, procs)``. Only ``cli``, ``flows`` and
``tasks`` may import Prefect. ``flows/`` and ``tasks/`` sit beside the package in a checkout and install
as ``verifily_train.flows`` / ``verifily_train.tasks``.

``api`` (the Python API) is the CLI's peer: it runs the same flows through ``cli``'s Prefect runtime and never
imports Prefect itself. The package top (``__init__``) re-exports it: ``LAZY_FACADE`` is the one upward import
allowed, and only inside a function (its module ``__getattr__``), so ``import verifily_train`` imports neither
``api`` nor Prefect.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("cli", "api"),
    ("flows",),
    ("tasks",),
    ("pipeline", "fixtures"),
    ("training", "evaluation", "artifacts", "attribution"),
    ("model", "dataset"),
    ("config",),
    ("errors", "fsio", "hashing", "checksums", "jsonsafe", "procs", "quiet", "__init__"),
)
PREFECT_ALLOWED = ("cli", "flows", "tasks")
LAZY_FACADE = {("__init__", "api")}  # (importer, imported): allowed upward, inside a function only


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.imported}: {self.why}"


def layer_of(part: str) -> Optional[int]:
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    return None


def project_files(repo: Path) -> Iterator[Tuple[str, Path]]:
    """(top-level part, file) for every module of the package, flows/ and tasks/."""
    package = repo / "verifily_train"
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        yield (rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"), path
    for sub in ("flows", "tasks"):
        for path in sorted((repo / sub).rglob("*.py")):
            yield sub, path


def _imports(path: Path) -> Iterator[Tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            if node.module == "verifily_train":
                for alias in node.names:
                    yield node.lineno, f"verifily_train.{alias.name}"


def _lines_inside_functions(path: Path) -> set:
    """The line numbers of import statements inside a function body (run on call, not on import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {node.lineno for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}


def check(repo: Path) -> List[Violation]:
    """Every import that runs up the layers, or that reaches Prefect from outside cli/flows/tasks."""
    found: List[Violation] = []
    for part, path in project_files(repo):
        own = layer_of(part)
        rel = path.relative_to(repo).as_posix()
        if own is None:
            found.append(Violation(rel, 0, part, "a top-level module no layer names (add it to tests/layering.py)"))
            continue
        for line, name in _imports(path):
            if (name == "prefect" or name.startswith("prefect.")) and part not in PREFECT_ALLOWED:
                found.append(Violation(rel, line, name, f"only {', '.join(PREFECT_ALLOWED)} may import Prefect"))
            if not name.startswith("verifily_train."):
                continue
            target = name.split(".")[1]
            theirs = layer_of(target)
            if (part, target) in LAZY_FACADE and line in _lines_inside_functions(path):
                continue
            if theirs is not None and theirs < own:
                found.append(Violation(rel, line, name, f"{part} (layer {own}) may not import {target} (layer {theirs}),"
                                                        " which sits above it"))
    return found


def layer_table() -> Dict[str, int]:
    return {name: index for index, names in enumerate(LAYERS) for name in names}
