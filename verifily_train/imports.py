"""The one reader of import statements from sources (``ast``, nothing imported): the import contract and code versions.

Every ``import`` and ``from ... import`` (relative ones resolved against the module's own name), at top level or
inside a function, every ``importlib.import_module(...)`` whose name is a string or starts with one, and every
string that is a whole project module name (a module started by name, ``python -m verifily_train...``).
``tests/layering.py`` checks the layers from these records; ``pipeline/codeversion.py`` follows them to a stage's
import closure. Each reader chooses the kinds it needs; none of them re-reads the syntax.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

PACKAGE = "verifily_train"
MODULE_STRING = re.compile(r"^verifily_train(\.[A-Za-z_][A-Za-z0-9_]*)+$")

IMPORT, FROM, IMPORTLIB, STRING = "import", "from", "importlib", "string"


@dataclass(frozen=True)
class ImportRecord:
    """One imported name: ``module`` is absolute; ``names`` are a ``from`` import's names (``*`` kept)."""

    line: int
    kind: str  # IMPORT, FROM, IMPORTLIB (importlib.import_module / __import__), STRING (a module named as a string)
    module: str
    names: Tuple[str, ...] = ()
    in_function: bool = False  # runs when the function is called, not when the module is imported
    lazy_getattr: bool = False  # inside a module-level ``__getattr__`` (PEP 562): runs only for a name the module lacks
    relative: bool = False


def package_of(module: str, path: Path) -> str:
    """The package a relative import in ``module`` (source ``path``) is anchored at."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def resolve_relative(package: str, level: int, name: Optional[str]) -> str:
    """``from <level dots><name> import ...`` in ``package``, as an absolute module name."""
    anchor = package.split(".")
    anchor = anchor[:len(anchor) - level + 1]
    return ".".join(anchor + ([name] if name else []))


def _dynamic_name(node: ast.expr, module: str) -> Optional[str]:
    """The module an ``import_module`` argument names: a string, or the known prefix of an f-string (up to a dot)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        return None
    text = ""
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            text += value.value
        elif (isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name)
              and value.value.id == "__name__" and value.conversion == -1 and value.format_spec is None):
            text += module
        else:
            text += "\0"  # unknown from here on
            break
    known = text.split("\0")[0]
    if "\0" in text:
        known = known.rpartition(".")[0] if not known.endswith(".") else known[:-1]
    return known or None


def _is_import_call(node: ast.Call) -> bool:
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "import_module":
        return isinstance(func.value, ast.Name) and func.value.id == "importlib"
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    return False


def read_imports(path: Path, module: str) -> List[ImportRecord]:
    """Every import ``path`` (module ``module``, e.g. ``verifily_train.model.loading``) makes, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = package_of(module, path)
    in_function = {id(node) for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(func) if node is not func}
    lazy = {id(node) for func in tree.body if isinstance(func, ast.FunctionDef) and func.name == "__getattr__"
            for node in ast.walk(func)}
    found: List[ImportRecord] = []
    for node in ast.walk(tree):
        where = dict(in_function=id(node) in in_function, lazy_getattr=id(node) in lazy)
        if isinstance(node, ast.Import):
            found.extend(ImportRecord(node.lineno, IMPORT, alias.name, **where) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(package, node.level, node.module) if node.level else (node.module or "")
            found.append(ImportRecord(node.lineno, FROM, base, tuple(a.name for a in node.names),
                                      relative=bool(node.level), **where))
        elif isinstance(node, ast.Call) and node.args and _is_import_call(node):
            name = _dynamic_name(node.args[0], module)
            if name:
                found.append(ImportRecord(node.lineno, IMPORTLIB, name, **where))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            found.append(ImportRecord(node.lineno, STRING, node.value, **where))
    return sorted(found, key=lambda r: r.line)


def imported_modules(record: ImportRecord) -> Tuple[str, ...]:
    """The module names a record can load: the module, and for ``from pkg import x`` also ``pkg.x`` (a submodule)."""
    if record.kind == FROM:
        return (record.module,) + tuple(f"{record.module}.{name}" for name in record.names if name != "*")
    return (record.module,)


def is_project(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")
