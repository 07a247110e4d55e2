"""A stage's code version is derived from the modules it can run: no edit can leave a stale cache entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from verifily_train.pipeline.codeversion import LIBRARY_ROOT, closure_digest, closure_modules
from verifily_train.pipeline.runner import STAGES

BY_NAME = {stage.name: stage for stage in STAGES}


@pytest.fixture
def package_copy(tmp_path) -> Path:
    copy = tmp_path / "verifily_train"
    shutil.copytree(LIBRARY_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "examples"))
    return copy


def _digests(root: Path) -> dict:
    return {name: closure_digest(stage.module, root) for name, stage in BY_NAME.items()}


def test_editing_a_module_only_evaluate_runs_rekeys_evaluate_and_not_train(package_copy):
    before = _digests(package_copy)
    generate = package_copy / "evaluation" / "generate.py"
    generate.write_text(generate.read_text() + "\n# an edit\n")
    after = _digests(package_copy)
    assert after["evaluate"] != before["evaluate"] and after["baseline"] != before["baseline"]
    assert {name for name in before if before[name] == after[name]} >= {"validate", "tokenize", "train"}


def test_the_collator_and_row_tokenizer_evaluate_runs_are_in_its_code():
    """The drift that made the hand-kept list stale: evaluate runs the collator and the row tokenizer."""
    modules = closure_modules(BY_NAME["evaluate"].module)
    assert "verifily_train.model.tokenize" in modules and "verifily_train.evaluation.predict" in modules
    assert any(name.endswith("collate") or name.endswith("trainer") for name in modules), sorted(modules)


def test_a_module_moved_under_a_new_name_is_followed(package_copy):
    before = _digests(package_copy)
    old, new = package_copy / "evaluation" / "generate.py", package_copy / "evaluation" / "generation.py"
    old.rename(new)
    predict = package_copy / "evaluation" / "predict.py"
    predict.write_text(predict.read_text().replace("verifily_train.evaluation.generate ", "verifily_train.evaluation.generation "))
    after = _digests(package_copy)
    assert after["evaluate"] != before["evaluate"]
    assert "verifily_train.evaluation.generation" in closure_modules_at(package_copy, BY_NAME["evaluate"].module)


def closure_modules_at(root: Path, module: str) -> set:
    from verifily_train.pipeline.codeversion import import_closure

    return set(import_closure(module, root))


def test_a_module_started_by_name_is_part_of_the_train_code():
    """``torchrun -m verifily_train.training.ddp_worker`` is a string, not an import: it still counts."""
    assert "verifily_train.training.ddp_worker" in closure_modules(BY_NAME["train"].module)


def test_every_stage_declares_its_key_inputs_beside_its_run_function():
    for stage in STAGES:
        assert stage.key_inputs.__module__ == stage.run.__module__ == stage.module, stage.name
