"""The import contract, checked from the sources by the one import reader (``verifily_train/imports.py``).

Every import is read: ``import`` and ``from ... import`` at top level or inside a function, relative ones
(``from ..model import x``) resolved, ``importlib.import_module("verifily_train...")`` (a string, or an f-string's
known prefix) and module names started as strings (``python -m verifily_train...``). Four rules:

1. **Layers.** Top to bottom; a module may import its own layer and those below it, never one above:
   ``{cli, api} -> flows -> tasks -> {pipeline, fixtures} -> {training, evaluation, artifacts, attribution}
   -> {model, dataset} -> config -> base (errors, fsio, hashing, checksums, jsonsafe, procs, quiet, imports)``.
   Only ``cli``, ``flows`` and ``tasks`` may import Prefect. ``flows/`` and ``tasks/`` sit beside the package in
   a checkout and install as ``verifily_train.flows`` / ``verifily_train.tasks``.
2. **Within a layer**, a package may import another of its layer only along ``WITHIN_LAYER`` (and what those
   edges reach): the edges today's code has, an acyclic table, so ``attribution`` may use ``evaluation``
   (through ``artifacts``) and ``evaluation`` never ``attribution``.
3. **An import inside a function is for a third-party package** (start-up time). A project module imported
   in a function is a violation, except ``LAZY_FACADE``, a documented ``CYCLE_BREAKS`` entry, a ``DEFERS`` entry
   (the module is imported late to keep a heavy third-party package it imports at its top, such as Prefect or
   torch, off a light path; checked: its top-level imports must reach that package). ``IN_FUNCTION_TODAY``, the
   violations of 2026-12-08 by file and module, is paid off: empty, and it stays so.
   ``importlib`` loads by name (the CLI's command handlers, ``attribution``'s lazy exports) are the documented
   lazy mechanisms: the layer rules read them, this rule does not.
4. **bench/ uses the public API**: ``BENCH_PUBLIC`` (the Python API, attribution, the config, the offline
   fixtures, the errors, the ``verifily`` command). What else it reaches into today is ``BENCH_TODAY``, by file
   and module; a new reach into the library is a violation. bench/ never imports ``flows``/``tasks``/Prefect
   directly (rule 1 places it above ``cli``).

``api`` (the Python API) is the CLI's peer: it runs the same flows through ``cli``'s Prefect runtime and never
imports Prefect itself. The package top (``__init__``) re-exports it: ``LAZY_FACADE`` is the one upward import
allowed, and only inside a function (its module ``__getattr__``), so ``import verifily_train`` imports neither
``api`` nor Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

from verifily_train.imports import FROM, IMPORT, STRING, ImportRecord, imported_modules, is_project, read_imports

LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("cli", "api"),
    ("flows",),
    ("tasks",),
    ("pipeline", "fixtures"),
    ("training", "evaluation", "artifacts", "attribution"),
    ("model", "dataset"),
    ("config",),
    ("errors", "fsio", "hashing", "checksums", "jsonsafe", "procs", "quiet", "imports", "__init__"),
)
PREFECT_ALLOWED = ("cli", "flows", "tasks")
LAZY_FACADE = {("__init__", "api")}  # (importer, imported): allowed upward, inside a function only

# (importer, imported) between two packages of one layer, top to bottom; what an edge's target may use, its
# source may use too. Drawn from the code of 2026-12-08; a new edge is a design decision: add it here, acyclic.
WITHIN_LAYER: Tuple[Tuple[str, str], ...] = (
    ("api", "cli"),                 # 1: the Python API runs the CLI's unprinted cores and its Prefect runtime
    ("fixtures", "pipeline"),       # 4: run fixtures drive stages
    ("attribution", "artifacts"),   # 5: attribution reads Runs and writes its report beside them
    ("attribution", "training"),    # 5: row attribution reloads the trained adapter's snapshots
    ("artifacts", "evaluation"),    # 5: a Run's comparison and reports use the metrics and slices
    ("model", "dataset"),           # 6: tokenization reads dataset rows
    ("checksums", "fsio"),          # 8: the base modules: checksums over atomic writes ...
    ("checksums", "hashing"),
    ("checksums", "errors"),
    ("fsio", "errors"),             # 8: ... and every OS error translated by errors
)

# Imports of a project module inside a function that would otherwise form an import cycle: (file, module): why.
CYCLE_BREAKS: Dict[Tuple[str, str], str] = {}

# Imports of a project module inside a function that keep a heavy third-party package, which that module needs at
# its top (Prefect's decorators, torch subclasses, numpy's array types), off a lighter path: (file, module): the
# package deferred, each with its reason. Checked: the module's top-level imports must really reach the package.
DEFERS: Dict[Tuple[str, str], str] = {
    # the worker filters warnings and starts watching its parent before the flow imports Prefect
    ("flows/ablation_worker.py", "verifily_train.flows.train"): "prefect",
    # the plan's user errors come first, and the temporary server boots while the flow imports Prefect
    ("verifily_train/cli/attribute.py", "verifily_train.flows.attribute"): "prefect",
    ("verifily_train/cli/rows.py", "verifily_train.flows.attribute_rows"): "prefect",
    ("verifily_train/cli/train.py", "verifily_train.flows.train"): "prefect",
    # a bad train.yaml fails at once, without the pipeline's modules and numpy (a replay loads them)
    ("verifily_train/cli/train.py", "verifily_train.cli.prefect_rest"): "numpy",
    ("verifily_train/cli/train.py", "verifily_train.pipeline.runner"): "numpy",
    # load_run and a Run's files need no numpy; compare, run groups and attribute load it
    ("verifily_train/api.py", "verifily_train.artifacts.compare"): "numpy",
    ("verifily_train/api.py", "verifily_train.artifacts.groups"): "numpy",
    ("verifily_train/api.py", "verifily_train.cli.attribute"): "numpy",
    # runs list/show/verify read Runs without the statistics' numpy; compare and group lookups load it
    ("verifily_train/cli/runs.py", "verifily_train.artifacts.compare"): "numpy",
    ("verifily_train/cli/runs.py", "verifily_train.artifacts.groups"): "numpy",
    ("verifily_train/cli/runs.py", "verifily_train.artifacts.report"): "numpy",
    # replay and the runner read the train stage's declaration (its key) without torch and transformers
    ("verifily_train/pipeline/train.py", "verifily_train.training.trainer"): "torch",
}

BENCH_PUBLIC = ("verifily_train.api", "verifily_train.attribution", "verifily_train.config",
                "verifily_train.fixtures", "verifily_train.errors", "verifily_train.cli.main")

# Rule 3's debt: (file -> project modules) imported inside a function on 2026-12-08, paid off (each import moved to
# the top, or kept with its reason in DEFERS). Empty, and it stays so: nothing is ever added.
IN_FUNCTION_TODAY: Dict[str, Tuple[str, ...]] = {}

# Rule 4's exceptions: bench/ files that reach past BENCH_PUBLIC today (they measure the stages and levers inside).
BENCH_TODAY: Dict[str, Tuple[str, ...]] = {
    "bench/aa.py": (
        "verifily_train.artifacts.compare", "verifily_train.artifacts.groups", "verifily_train.artifacts.record",
        "verifily_train.artifacts.run", "verifily_train.fsio", "verifily_train.pipeline.fingerprint",
        "verifily_train.pipeline.runner",
    ),
    "bench/attribution.py": (
        "verifily_train.dataset.store", "verifily_train.pipeline", "verifily_train.pipeline.fingerprint",
    ),
    "bench/by_hand.py": (
        "verifily_train.artifacts.record", "verifily_train.artifacts.run", "verifily_train.pipeline.fingerprint",
        "verifily_train.pipeline.runner",
    ),
    "bench/common.py": ("verifily_train.model.device",),
    "bench/evaluation.py": (
        "verifily_train.evaluation.generate", "verifily_train.model.attention", "verifily_train.model.device",
        "verifily_train.model.loading", "verifily_train.model.tokenize",
    ),
    "bench/gpu.py": ("verifily_train.model.tokenize",),
    "bench/hard_headline.py": ("verifily_train.evaluation.hard",),
    "bench/limit.py": ("verifily_train.model.tokenize",),
    "bench/models.py": ("verifily_train.model.identity", "verifily_train.model.registry"),
    "bench/ours.py": (
        "verifily_train.model.device", "verifily_train.model.loading", "verifily_train.model.tokenize",
        "verifily_train.pipeline.fingerprint", "verifily_train.pipeline.runner", "verifily_train.training",
        "verifily_train.training.speed", "verifily_train.training.trainer",
    ),
    "bench/pipeline.py": ("verifily_train.procs",),
    "bench/row_agreement.py": ("verifily_train.cli.demo",),
    "bench/row_lds.py": ("verifily_train.dataset.store", "verifily_train.model.tokenize"),
    "bench/throughput.py": ("verifily_train.training",),
}


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


def layer_table() -> Dict[str, int]:
    return {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(repo: Path, path: Path) -> str:
    """The dotted name a file imports as: ``flows/x.py`` is ``verifily_train.flows.x``, ``bench/x.py`` ``bench.x``."""
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[0] in ("flows", "tasks"):
        parts.insert(0, "verifily_train")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(repo: Path) -> Iterator[Tuple[str, Path]]:
    """(top-level part, file) for every module of the package, flows/ and tasks/."""
    package = repo / "verifily_train"
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        top = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"
        yield top, path
    for sub in ("flows", "tasks"):
        for path in sorted((repo / sub).rglob("*.py")):
            yield sub, path


def bench_files(repo: Path) -> Iterator[Path]:
    yield from sorted((repo / "bench").rglob("*.py")) if (repo / "bench").is_dir() else ()


def targets(record: ImportRecord) -> List[str]:
    """The project modules a record names (``from verifily_train import api`` names ``verifily_train.api``)."""
    if record.kind == FROM and record.module == "verifily_train":
        return [f"verifily_train.{name}" for name in record.names]
    return [record.module] if is_project(record.module) and record.module != "verifily_train" else []


def within_layer_allowed(importer: str, imported: str) -> bool:
    """Whether ``WITHIN_LAYER`` leads from ``importer`` to ``imported`` (directly or through other edges)."""
    todo, seen = [importer], set()
    while todo:
        here = todo.pop()
        for source, target in WITHIN_LAYER:
            if source == here and target not in seen:
                if target == imported:
                    return True
                seen.add(target)
                todo.append(target)
    return False


def _is_prefect(name: str) -> bool:
    return name == "prefect" or name.startswith("prefect.")


def _layer_problems(part: str, record: ImportRecord, name: str) -> Optional[str]:
    own, target = layer_of(part), name.split(".")[1]
    theirs = layer_of(target)
    if (part, target) in LAZY_FACADE and record.in_function:
        return None
    if theirs is not None and theirs < own:
        return f"{part} (layer {own}) may not import {target} (layer {theirs}), which sits above it"
    if theirs == own and target != part and not within_layer_allowed(part, target):
        return (f"{part} may not import {target}: both sit in layer {own}, and WITHIN_LAYER (tests/layering.py) "
                f"has no edge from {part} to {target}")
    return None


def _late_problem(rel: str, record: ImportRecord, name: str, part: str) -> Optional[str]:
    if not record.in_function or record.kind not in (IMPORT, FROM):
        return None
    if (part, name.split(".")[1]) in LAZY_FACADE or (rel, name) in CYCLE_BREAKS or (rel, name) in DEFERS:
        return None
    if name in IN_FUNCTION_TODAY.get(rel, ()):
        return None
    return ("a project module imported inside a function: only third-party packages are imported late "
            "(import it at the top; a true import cycle goes to CYCLE_BREAKS with its reason)")


def check(repo: Path) -> List[Violation]:
    """Every import that breaks the contract: up the layers, across a layer off its table, Prefect outside
    cli/flows/tasks, a project import inside a function, bench/ past the public API."""
    found: List[Violation] = []
    for part, path in project_files(repo):
        rel = path.relative_to(repo).as_posix()
        if layer_of(part) is None:
            found.append(Violation(rel, 0, part, "a top-level module no layer names (add it to tests/layering.py)"))
            continue
        for record in read_imports(path, module_name(repo, path)):
            if _is_prefect(record.module) and part not in PREFECT_ALLOWED:
                found.append(Violation(rel, record.line, record.module,
                                       f"only {', '.join(PREFECT_ALLOWED)} may import Prefect"))
            for name in targets(record):
                for why in (_layer_problems(part, record, name), _late_problem(rel, record, name, part)):
                    if why:
                        found.append(Violation(rel, record.line, name, why))
    found.extend(check_defers(repo))
    found.extend(check_bench(repo))
    return _one_per_import(found)


def module_path(repo: Path, module: str) -> Optional[Path]:
    """The source of a project module in ``repo`` (``verifily_train.flows.x`` is ``flows/x.py``), or None."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("flows", "tasks"):
        parts = parts[1:]
    base = repo.joinpath(*parts)
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def top_level_reach(repo: Path, module: str) -> Set[str]:
    """Every name importing ``module`` imports: its top-level imports (not those inside a function), followed
    through the project's modules and their parent packages; a third-party name as written."""
    reached: Set[str] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for name in (".".join(parts[:end]) for end in range(1, len(parts) + 1)):
            if name in reached:
                continue
            reached.add(name)
            path = module_path(repo, name) if is_project(name) else None
            if path is not None:
                todo.extend(alias for record in read_imports(path, name) if not record.in_function
                            and record.kind != STRING for alias in imported_modules(record))
    return reached


def check_defers(repo: Path) -> List[Violation]:
    """A ``DEFERS`` entry is true: the module imported late reaches the package it claims to defer at its top."""
    found: List[Violation] = []
    for (rel, module), package in sorted(DEFERS.items()):
        reach = top_level_reach(repo, module)
        if not any(name == package or name.startswith(package + ".") for name in reach):
            found.append(Violation(rel, 0, module, f"DEFERS says importing {module} inside a function defers "
                                                   f"{package}, but its top-level imports never reach {package}: "
                                                   f"import it at the top"))
    return found


def _one_per_import(found: List[Violation]) -> List[Violation]:
    """One violation per (file, line, imported), its reasons joined: an importlib call names its module twice."""
    merged: Dict[Tuple[str, int, str], List[str]] = {}
    for problem in found:
        whys = merged.setdefault((problem.file, problem.line, problem.imported), [])
        if problem.why not in whys:
            whys.append(problem.why)
    return [Violation(file, line, imported, "; ".join(whys)) for (file, line, imported), whys in merged.items()]


def _bench_public(name: str) -> bool:
    return any(name == api or name.startswith(api + ".") for api in BENCH_PUBLIC)


def check_bench(repo: Path) -> List[Violation]:
    """bench/ reaches the library through ``BENCH_PUBLIC`` only (today's other reaches: ``BENCH_TODAY``)."""
    found: List[Violation] = []
    for path in bench_files(repo):
        rel = path.relative_to(repo).as_posix()
        for record in read_imports(path, module_name(repo, path)):
            if _is_prefect(record.module) or record.module.split(".")[0] in ("flows", "tasks"):
                found.append(Violation(rel, record.line, record.module, "bench/ runs flows through the public API"
                                                                        " or the verifily command, never directly"))
            for name in targets(record):
                if name.split(".")[1] in ("flows", "tasks"):
                    found.append(Violation(rel, record.line, name, "bench/ never imports flows/tasks directly"))
                elif not _bench_public(name) and name not in BENCH_TODAY.get(rel, ()):
                    found.append(Violation(rel, record.line, name, "bench/ may use the public API only (BENCH_PUBLIC in"
                                                                   " tests/layering.py): " + ", ".join(BENCH_PUBLIC)))
    return found


def stale_exceptions(repo: Path) -> List[str]:
    """``IN_FUNCTION_TODAY``, ``DEFERS`` and ``BENCH_TODAY`` entries the code no longer has (fixed: delete them)."""
    late: Set[Tuple[str, str]] = set()
    for _, path in project_files(repo):
        rel = path.relative_to(repo).as_posix()
        late.update((rel, name) for record in read_imports(path, module_name(repo, path)) if record.in_function
                    for name in targets(record))
    reach: Set[Tuple[str, str]] = set()
    for path in bench_files(repo):
        rel = path.relative_to(repo).as_posix()
        reach.update((rel, name) for record in read_imports(path, module_name(repo, path)) for name in targets(record))
    return ([f"IN_FUNCTION_TODAY {f}: {m}" for f, mods in IN_FUNCTION_TODAY.items() for m in mods if (f, m) not in late]
            + [f"DEFERS {f}: {m}" for f, m in DEFERS if (f, m) not in late]
            + [f"BENCH_TODAY {f}: {m}" for f, mods in BENCH_TODAY.items() for m in mods if (f, m) not in reach])
