"""Installing the project must not put generic top-level `flows`/`tasks` modules into site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_maps_flows_and_tasks_under_the_verifily_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("verifily_train-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"verifily_train"}, top_level
    assert "verifily_train/flows/train.py" in names
    assert "verifily_train/tasks/common.py" in names
    assert "verifily_train/cli/main.py" in names
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "verifily_train").rglob("*.py")
               if "__pycache__" not in p.parts}
    missing = sorted(s for s in sources if s not in names)
    assert not missing, f"modules the wheel leaves out (pyproject's packages list): {missing[:5]}"


def test_installed_flows_resolve_to_the_repository_folders():
    import importlib.util

    flows = importlib.util.find_spec("verifily_train.flows")
    tasks = importlib.util.find_spec("verifily_train.tasks")
    assert Path(flows.origin).parent.name == "flows"
    assert Path(tasks.origin).parent.name == "tasks"
