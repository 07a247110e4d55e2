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
   in a function is a violation, except ``LAZY_FACADE``, a documented ``CYCLE_BREAKS`` entry, and
   ``IN_FUNCTION_TODAY``: the violations of 2026-12-08, listed by file and module, to be fixed and deleted
   (the list only shrinks). ``importlib`` loads by name (the CLI's command handlers, ``attribution``'s lazy
   exports) are the documented lazy mechanisms: the layer rules read them, this rule does not.
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

from verifily_train.imports import FROM, IMPORT, ImportRecord, is_project, read_imports

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

BENCH_PUBLIC = ("verifily_train.api", "verifily_train.attribution", "verifily_train.config",
                "verifily_train.fixtures", "verifily_train.errors", "verifily_train.cli.main")

# Rule 3's debt: (file -> project modules) imported inside a function on 2026-12-08. Fix one by importing it at the
# top (or, for a true cycle, by a CYCLE_BREAKS entry with its reason) and delete it here; nothing is ever added.
IN_FUNCTION_TODAY: Dict[str, Tuple[str, ...]] = {
    "flows/ablation_worker.py": ("verifily_train.flows.train",),
    "verifily_train/api.py": (
        "verifily_train.artifacts.compare", "verifily_train.artifacts.groups", "verifily_train.artifacts.results",
        "verifily_train.artifacts.run", "verifily_train.artifacts.trackers", "verifily_train.attribution.plan",
        "verifily_train.attribution.render", "verifily_train.attribution.stats", "verifily_train.cli.attribute",
        "verifily_train.cli.train", "verifily_train.config", "verifily_train.config.schema", "verifily_train.errors",
    ),
    "verifily_train/artifacts/report.py": ("verifily_train.artifacts.groups",),
    "verifily_train/artifacts/trackers.py": ("verifily_train.artifacts.results", "verifily_train.errors"),
    "verifily_train/attribution/analysis.py": ("verifily_train.artifacts.run",),
    "verifily_train/attribution/derive_rows.py": (
        "verifily_train.dataset.rows", "verifily_train.fsio", "verifily_train.jsonsafe",
        "verifily_train.model.tokenize",
    ),
    "verifily_train/attribution/plan.py": (
        "verifily_train.artifacts.run", "verifily_train.attribution.derive", "verifily_train.attribution.stats",
        "verifily_train.config", "verifily_train.dataset.store",
    ),
    "verifily_train/attribution/rows/merge.py": ("verifily_train.attribution.rows.scores",),
    "verifily_train/attribution/rows/plan.py": (
        "verifily_train.artifacts.run", "verifily_train.attribution.target", "verifily_train.fsio",
        "verifily_train.hashing", "verifily_train.model.loading", "verifily_train.training.snapshots",
    ),
    "verifily_train/attribution/rows/runtime.py": (
        "verifily_train.config", "verifily_train.model.loading", "verifily_train.model.quantization",
        "verifily_train.model.tokenize", "verifily_train.training.loss", "verifily_train.training.trainer",
    ),
    "verifily_train/attribution/rows/scores.py": (
        "verifily_train.attribution.rows.gradients", "verifily_train.attribution.rows.runtime",
    ),
    "verifily_train/attribution/target.py": ("verifily_train.dataset.rows",),
    "verifily_train/cli/attribute.py": (
        "verifily_train.artifacts.run", "verifily_train.artifacts.trackers", "verifily_train.attribution",
        "verifily_train.attribution.plan", "verifily_train.attribution.stats", "verifily_train.flows.attribute",
    ),
    "verifily_train/cli/dataset.py": ("verifily_train.flows.events", "verifily_train.jsonsafe"),
    "verifily_train/cli/demo.py": (
        "verifily_train.dataset", "verifily_train.fixtures.models", "verifily_train.model.registry",
    ),
    "verifily_train/cli/inspection.py": ("verifily_train.model.registry",),
    "verifily_train/cli/rows.py": (
        "verifily_train.artifacts.run", "verifily_train.attribution.derive_rows",
        "verifily_train.attribution.row_verify", "verifily_train.attribution.rows", "verifily_train.config",
        "verifily_train.dataset.store", "verifily_train.flows.attribute_rows",
        "verifily_train.pipeline.row_attribution", "verifily_train.pipeline.row_output",
    ),
    "verifily_train/cli/runs.py": (
        "verifily_train.artifacts.compare", "verifily_train.artifacts.groups", "verifily_train.artifacts.report",
        "verifily_train.artifacts.trackers", "verifily_train.cli.summary", "verifily_train.errors",
        "verifily_train.fsio",
    ),
    "verifily_train/cli/stack.py": ("verifily_train.jsonsafe", "verifily_train.procs"),
    "verifily_train/cli/summary.py": ("verifily_train.artifacts.run",),
    "verifily_train/cli/train.py": (
        "verifily_train.artifacts.reproduce", "verifily_train.artifacts.run", "verifily_train.cli.prefect_rest",
        "verifily_train.errors", "verifily_train.flows.submit", "verifily_train.flows.train",
        "verifily_train.pipeline.runner",
    ),
    "verifily_train/evaluation/predict.py": (
        "verifily_train.dataset.rows", "verifily_train.model.attention", "verifily_train.model.quantization",
        "verifily_train.model.render", "verifily_train.model.tokenize",
    ),
    "verifily_train/fixtures/models.py": ("verifily_train.fixtures.data",),
    "verifily_train/fixtures/runs.py": ("verifily_train.artifacts.run", "verifily_train.checksums"),
    "verifily_train/fsio.py": ("verifily_train.errors",),
    "verifily_train/pipeline/preflight.py": (
        "verifily_train.artifacts.hub", "verifily_train.dataset.manifest", "verifily_train.dataset.rows",
        "verifily_train.dataset.store", "verifily_train.errors", "verifily_train.fsio", "verifily_train.model.device",
        "verifily_train.model.loading", "verifily_train.model.quantization", "verifily_train.model.registry",
        "verifily_train.pipeline.cache", "verifily_train.training.compiled",
    ),
    "verifily_train/pipeline/row_attribution.py": (
        "verifily_train.artifacts.run", "verifily_train.attribution.row_verify",
    ),
    "verifily_train/pipeline/row_output.py": (
        "verifily_train.artifacts.row_report", "verifily_train.artifacts.run", "verifily_train.config",
        "verifily_train.dataset.rows", "verifily_train.dataset.store", "verifily_train.errors", "verifily_train.fsio",
        "verifily_train.model.render", "verifily_train.model.tokenize",
    ),
    "verifily_train/pipeline/runner.py": ("verifily_train.artifacts.groups", "verifily_train.config"),
    "verifily_train/pipeline/train.py": ("verifily_train.training.trainer",),
}

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
    if (part, name.split(".")[1]) in LAZY_FACADE or (rel, name) in CYCLE_BREAKS:
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
    found.extend(check_bench(repo))
    return _one_per_import(found)


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
    """``IN_FUNCTION_TODAY`` and ``BENCH_TODAY`` entries the code no longer has (fixed: delete them)."""
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
            + [f"BENCH_TODAY {f}: {m}" for f, mods in BENCH_TODAY.items() for m in mods if (f, m) not in reach])
