"""The import contract (tests/layering.py): imports run one way, within a layer along its table, Prefect only in
cli/flows/tasks, project modules never imported inside a function, bench/ through the public API; one reader."""

from __future__ import annotations

import shutil
from pathlib import Path

from layering import (BENCH_TODAY, CYCLE_BREAKS, DEFERS, IN_FUNCTION_TODAY, LAYERS, WITHIN_LAYER, check, layer_of,
                      stale_exceptions)

from verifily_train.imports import IMPORTLIB, read_imports
from verifily_train.pipeline import codeversion

REPO = Path(__file__).resolve().parents[1]


def test_the_project_imports_run_down_the_layers_only():
    problems = check(REPO)
    assert problems == [], "\n".join(map(str, problems))
    stale = stale_exceptions(REPO)
    print(f"imports of a project module inside a function still allowed (IN_FUNCTION_TODAY): "
          f"{sum(map(len, IN_FUNCTION_TODAY.values()))} in {len(IN_FUNCTION_TODAY)} files; documented cycle breaks: "
          f"{len(CYCLE_BREAKS)}; deferring a heavy package (DEFERS): {len(DEFERS)}; bench/ reaches past the public "
          f"API: {sum(map(len, BENCH_TODAY.values()))}")
    if stale:
        print("fixed, delete from tests/layering.py:\n" + "\n".join(stale))


def _new_problems(repo: Path, edit) -> list:
    """The violations an edit adds to a copy of the tree."""
    before = set(check(repo))
    edit()
    return [p for p in check(repo) if p not in before]


def _copy(tmp_path: Path) -> Path:
    for part in ("verifily_train", "flows", "tasks", "bench"):
        shutil.copytree(REPO / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__", "examples", "results"))
    return tmp_path


def test_an_upward_import_inside_a_function_is_caught(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "model" / "loading.py"
    problems = _new_problems(repo, lambda: target.write_text(
        target.read_text() + "\n\ndef _late():\n    from verifily_train.pipeline.runner import STAGES\n"))
    assert [(p.file, p.imported) for p in problems] == [("verifily_train/model/loading.py",
                                                          "verifily_train.pipeline.runner")]
    assert "model (layer" in problems[0].why


def test_prefect_outside_cli_flows_and_tasks_is_caught(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "evaluation" / "slices.py"
    problems = _new_problems(repo, lambda: target.write_text(target.read_text() + "\nfrom prefect import task  # noqa\n"))
    assert [p.imported for p in problems] == ["prefect"] and "may import Prefect" in problems[0].why


def test_a_new_top_level_module_must_be_placed_in_a_layer(tmp_path):
    repo = _copy(tmp_path)
    problems = _new_problems(repo, lambda: (repo / "verifily_train" / "misc.py").write_text("import os\n"))
    assert [p.imported for p in problems] == ["misc"]


def test_every_package_of_the_library_is_in_a_layer():
    placed = {name for names in LAYERS for name in names}
    packages = {p.name for p in (REPO / "verifily_train").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= placed, packages - placed


def test_the_package_top_may_reach_the_python_api_only_lazily(tmp_path):
    repo = _copy(tmp_path)
    init = repo / "verifily_train" / "__init__.py"
    assert not [p for p in check(repo) if p.file == "verifily_train/__init__.py"]  # the lazy re-export is allowed
    problems = _new_problems(repo, lambda: init.write_text(init.read_text() + "\nfrom verifily_train import api  # noqa\n"))
    assert [(p.file, p.imported) for p in problems] == [("verifily_train/__init__.py", "verifily_train.api")]


def test_the_python_api_may_run_flows_but_the_library_may_not_reach_it(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "artifacts" / "run.py"
    problems = _new_problems(repo, lambda: target.write_text(target.read_text() + "\nfrom verifily_train.api import Run  # noqa\n"))
    assert [p.imported for p in problems] == ["verifily_train.api"] and "artifacts (layer" in problems[0].why


def _append(path: Path, text: str):
    return lambda: path.write_text(path.read_text() + text)


def test_a_relative_upward_import_is_caught(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "model" / "loading.py"
    problems = _new_problems(repo, _append(target, "\nfrom ..pipeline import runner  # noqa\n"))
    assert [(p.file, p.imported) for p in problems] == [("verifily_train/model/loading.py", "verifily_train.pipeline")]
    assert "model (layer" in problems[0].why


def test_an_importlib_import_by_name_is_caught(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "dataset" / "store.py"
    late = "\nimport importlib\nRUNNER = importlib.import_module('verifily_train.pipeline.runner')\n"
    assert [p.imported for p in _new_problems(repo, _append(target, late))] == ["verifily_train.pipeline.runner"]
    prefixed = "\ndef _stage(name):\n    return importlib.import_module(f'verifily_train.training.{name}')\n"
    problems = _new_problems(repo, _append(target, prefixed))
    assert [p.imported for p in problems] == ["verifily_train.training"] and "dataset (layer" in problems[0].why


def test_a_package_may_not_use_a_peer_of_its_layer_off_the_table(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "evaluation" / "slices.py"
    problems = _new_problems(repo, _append(target, "\nfrom verifily_train.attribution import stats  # noqa\n"))
    assert [p.imported for p in problems] == ["verifily_train.attribution"]
    assert "both sit in layer" in problems[0].why and "WITHIN_LAYER" in problems[0].why
    dataset = repo / "verifily_train" / "dataset" / "store.py"
    problems = _new_problems(repo, _append(dataset, "\nimport verifily_train.model.loading  # noqa\n"))
    assert [p.imported for p in problems] == ["verifily_train.model.loading"]


def test_attribution_may_use_evaluation_through_the_table(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "attribution" / "stats.py"
    assert _new_problems(repo, _append(target, "\nfrom verifily_train.evaluation import metrics  # noqa\n")) == []


def test_the_within_layer_table_runs_one_way_inside_one_layer():
    for source, target in WITHIN_LAYER:
        assert layer_of(source) == layer_of(target) is not None, (source, target)
    edges = set(WITHIN_LAYER)
    order, todo = [], {name for edge in edges for name in edge}
    while todo:  # Kahn: an edge set with a cycle leaves names no order can place
        free = {name for name in todo if not any(s in todo and t == name for s, t in edges)}
        assert free, f"WITHIN_LAYER has a cycle among {sorted(todo)}"
        order.extend(sorted(free))
        todo -= free


def test_a_project_import_inside_a_function_is_caught_and_a_third_party_one_is_not(tmp_path):
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "evaluation" / "slices.py"
    late = ("\n\ndef _late_config(path):\n    import numpy  # noqa\n"
            "    from verifily_train.config import load_config\n    return load_config(path)\n")
    problems = _new_problems(repo, _append(target, late))
    assert [(p.file, p.imported) for p in problems] == [("verifily_train/evaluation/slices.py",
                                                          "verifily_train.config")]
    assert "inside a function" in problems[0].why


def test_a_deferred_import_holds_only_while_the_module_reaches_the_heavy_package(tmp_path, monkeypatch):
    """A DEFERS entry allows a late project import only while that module's top-level imports reach the package."""
    repo = _copy(tmp_path)
    target = repo / "verifily_train" / "pipeline" / "validate.py"
    key = ("verifily_train/pipeline/validate.py", "verifily_train.training.trainer")
    late = "\n\ndef _late():\n    from verifily_train.training.trainer import train_adapter  # noqa\n"
    monkeypatch.setitem(DEFERS, key, "torch")  # true: the trainer imports torch at its top
    assert _new_problems(repo, _append(target, late)) == []
    monkeypatch.setitem(DEFERS, key, "prefect")  # false: nothing the trainer imports at its top reaches Prefect
    problems = [p for p in check(repo) if (p.file, p.imported) == key]
    assert len(problems) == 1 and "never reach prefect" in problems[0].why
    light = ("verifily_train/cli/runs.py", "verifily_train.artifacts.compare")
    monkeypatch.setitem(DEFERS, light, "torch")  # false: compare loads numpy, never torch
    assert [p.imported for p in check(repo) if p.file == light[0] and "DEFERS" in p.why] == [light[1]]


def test_the_in_function_allowlist_names_files_and_modules_of_the_project():
    files = {path.relative_to(REPO).as_posix() for path in REPO.glob("**/*.py")}
    for file, modules in {**IN_FUNCTION_TODAY, **BENCH_TODAY}.items():
        assert modules and all(name.startswith("verifily_train.") for name in modules), file
    assert set(CYCLE_BREAKS) == {key for key, why in CYCLE_BREAKS.items() if why.strip()}  # every exemption says why
    assert all(file in files and module.startswith("verifily_train.") and package.strip()
               for (file, module), package in DEFERS.items())
    print(f"in-function project imports allowed today: {sum(map(len, IN_FUNCTION_TODAY.values()))}, "
          f"unknown files: {sorted(set(IN_FUNCTION_TODAY) - files)}")


def test_bench_reaching_past_the_public_api_is_caught(tmp_path):
    repo = _copy(tmp_path)
    new = repo / "bench" / "new_suite.py"
    problems = _new_problems(repo, lambda: new.write_text(
        "from verifily_train import api  # noqa\nfrom verifily_train.attribution.stats import adjust  # noqa\n"
        "from verifily_train.training.trainer import train_adapter  # noqa\nfrom verifily_train.flows import train\n"))
    assert [(p.file, p.imported) for p in problems] == [("bench/new_suite.py", "verifily_train.training.trainer"),
                                                        ("bench/new_suite.py", "verifily_train.flows")]
    assert "public API" in problems[0].why


def test_one_reader_serves_the_contract_and_the_code_version(tmp_path):
    """A relative import, a -m string and a lazy __getattr__ read the same way for both."""
    module = tmp_path / "probe.py"
    module.write_text("from ..model import loading  # noqa\nWORKER = 'verifily_train.training.ddp_worker'\n\n\n"
                      "def __getattr__(name):\n    import importlib\n"
                      "    return importlib.import_module('verifily_train.api')\n")
    records = read_imports(module, "verifily_train.evaluation.probe")
    assert [(r.module, r.relative) for r in records if r.kind == "from"] == [("verifily_train.model", True)]
    assert [r.lazy_getattr for r in records if r.kind == IMPORTLIB] == [True]
    assert codeversion._imported_names(module, "verifily_train.evaluation.probe") == {
        "verifily_train.model", "verifily_train.model.loading", "verifily_train.training.ddp_worker"}
