"""Imports run one way (tests/layering.py), and nothing under verifily_train/ but cli/ imports Prefect."""

from __future__ import annotations

import shutil
from pathlib import Path

from layering import LAYERS, check

REPO = Path(__file__).resolve().parents[1]


def test_the_project_imports_run_down_the_layers_only():
    problems = check(REPO)
    assert problems == [], "\n".join(map(str, problems))


def _new_problems(repo: Path, edit) -> list:
    """The violations an edit adds to a copy of the tree."""
    before = set(check(repo))
    edit()
    return [p for p in check(repo) if p not in before]


def _copy(tmp_path: Path) -> Path:
    for part in ("verifily_train", "flows", "tasks"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "examples"))
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
