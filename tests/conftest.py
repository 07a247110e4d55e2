"""Shared fixtures: offline tiny models, tagged datasets, an isolated VERIFILY_HOME, and a Prefect server."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DO_NOT_TRACK", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (pyproject's addopts: two workers) each worker and every process it starts computes on one
    # torch thread: two workers at two threads each on two cores would spin in each other's way. A thread count a
    # test sets itself (the DDP launcher's OMP_NUM_THREADS) still wins.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
# Prefect's temporary server and in-process flows keep their database under PREFECT_HOME: one per test process
# (an xdist worker), never the user's ~/.prefect, so two workers never share one SQLite file.
_PREFECT_HOME = tempfile.mkdtemp(prefix="verifily-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
atexit.register(shutil.rmtree, _PREFECT_HOME, True)

from verifily_train.procs import die_with_parent, free_port, stop, wait_healthy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the crash tests' fault injection (tests/faults/sitecustomize.py) reaches every subprocess a test starts
FAULTS = Path(__file__).resolve().parent / "faults"
os.environ["PYTHONPATH"] = os.pathsep.join([str(FAULTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


# The fast tier (`python -m pytest -m "not slow"`, under ~3 minutes on 2 cores) leaves out every test marked slow:
# whole modules that train end to end mark themselves; these, in modules that are otherwise quick, are marked here
# (node id, or its prefix for every parameter): each trains through the CLI, starts a Prefect server or a
# wheel build, or compiles. The full `python -m pytest` (CI) runs them all.
SLOW_TESTS = (
    "tests/test_api.py::test_the_docs_walkthrough_trains_reads_compares_and_plans_from_python",
    "tests/test_bench.py::test_bench_quick_writes_every_suite_result",
    "tests/test_bench.py::test_gpu_suite_plumbing_runs_on_the_cpu",
    "tests/test_bench.py::test_each_contender_trains_in_a_fresh_process",
    "tests/test_causal_attribution.py::test_attribute_finds_the_noisy_source_hurts_and_a_clean_one_does_not",
    "tests/test_cli.py::test_in_process_flow_runs_send_no_heartbeats_unless_configured",
    "tests/test_compare_groups.py::test_a_group_record_is_verified_and_compared_by_id_from_the_cli",
    "tests/test_compare_groups.py::test_train_seeds_writes_a_group_and_compare_tests_a_change_end_to_end",
    "tests/test_first_use.py::test_the_demo_writes_nothing_in_the_working_folder_and_draws_no_bars_into_a_log",
    "tests/test_packaging.py::test_wheel_maps_flows_and_tasks_under_the_verifily_namespace",
    "tests/test_prefect_ops.py::test_deployments_trigger_watch_and_ui_end_to_end",
    "tests/test_row_attribution_cli.py::test_rows_on_classification_scores_every_row_caches_shards_and_derives",
    "tests/test_row_attribution_cli.py::test_rows_user_errors_are_one_line_and_write_nothing",
    "tests/test_row_attribution_cli.py::test_rows_without_snapshots_refuses_more_checkpoints",
    "tests/test_row_attribution_cli.py::test_rows_on_sft_targets_a_slice_and_derives_named_rows",
    "tests/test_row_attribution_cli.py::test_random_control_of_a_data_paths_run_is_a_store_version",
    "tests/test_scaling.py::test_pools_are_created_from_the_templates_and_take_the_pool_deployments",
    "tests/test_trackers.py::test_a_run_logs_its_identity_loss_curve_and_slice_metrics_to_mlflow",
    "tests/test_training_speed.py::test_compiled_blocks_compute_the_eager_forward_and_gradients_in_one_graph",
    "tests/test_training_speed.py::test_training_compile_trains_through_compiled_blocks",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def verifily_home(tmp_path, monkeypatch):
    """Every test gets its own dataset store, cache and work folders."""
    home = tmp_path / "verifily-home"
    monkeypatch.setenv("VERIFILY_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny llama / t5 / bert folders, saved with save_pretrained and read back through from_pretrained."""
    from verifily_train.fixtures.models import build_all

    return build_all(tmp_path_factory.mktemp("models"))


def write_sft_splits(folder: Path) -> dict:
    """The tagged SFT fixture splits most pipeline tests train on, written under ``folder/sft-data``."""
    from verifily_train.fixtures.data import write_splits

    return write_splits(folder / "sft-data", "sft", {"train": 48, "val": 16, "test": 40}, seed=1)


@pytest.fixture
def sft_splits(tmp_path):
    return write_sft_splits(tmp_path)


@pytest.fixture
def cls_splits(tmp_path):
    from verifily_train.fixtures.data import write_splits

    return write_splits(tmp_path / "cls-data", "classification", {"train": 60, "val": 16, "test": 40}, seed=2)


def _free_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect server on 127.0.0.1 for the whole session (a flow run then skips the ephemeral start-up)."""
    port = _free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_API_URL="")
    env.pop("PREFECT_API_URL")
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=die_with_parent)  # no server outlives a killed pytest
    url = f"http://127.0.0.1:{port}/api"
    if not wait_healthy(url, lambda: proc.poll() is None, 90, interval=0.5):
        if proc.poll() is not None:
            raise RuntimeError((home / "server.log").read_text())
        proc.kill()
        raise RuntimeError("Prefect server did not become healthy in 90 s")
    yield url
    stop(proc, timeout=20)
    log.close()


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(extra or {})
    return env


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``verifily ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "verifily_train.cli.main", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and exactly one error line (progress bars aside) naming what is wrong."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    segments = [seg.strip() for line in result.stderr.splitlines() for seg in line.split("\r")]
    errors = [seg for seg in segments if seg.startswith("error: ") or "error: " in seg and "[A" in seg]
    assert len(errors) == 1, result.stderr
    line = errors[0][errors[0].index("error: "):]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


FAST = {"training": {"num_epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                     "max_seq_length": 64, "logging_steps": 2, "eval_steps": 4, "save_steps": 4}}


def write_config(folder: Path, task: str, model: Path, splits: dict | None = None, **sections) -> Path:
    cfg = {"task": task, "base_model": str(model), **json.loads(json.dumps(FAST))}
    if splits:
        cfg["data_paths"] = {k: str(v) for k, v in splits.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RUN_LINE = re.compile(r"^  run: (\S.*)$", re.MULTILINE)  # the summary's line naming the Run it wrote


def printed_run(result: subprocess.CompletedProcess, cwd: Path) -> Path | None:
    """The Run a command wrote, from the ``run: <path>`` line of the summary it printed (None: it printed none)."""
    found = RUN_LINE.findall(result.stdout)
    if not found:
        return None
    path = Path(found[-1].strip())
    return path if path.is_absolute() else cwd / path


def train(folder: Path, prefect_api: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path | None]:
    """``verifily train -c train.yaml EXTRA`` in ``folder``, and the Run it wrote: the one its summary names, else
    (a failed run prints no summary) the one Run folder that appeared in ``folder/runs`` while it ran."""
    runs = folder / "runs"
    before = set(runs.glob("run_*")) if runs.exists() else set()
    result = run_cli("train", "-c", "train.yaml", *extra, cwd=folder, env=cli_env({"PREFECT_API_URL": prefect_api}))
    run = printed_run(result, folder)
    if run is None:
        new = sorted(set(runs.glob("run_*")) - before) if runs.exists() else []
        run = new[0] if len(new) == 1 else None
    return result, run


def edit_config(folder: Path, **changes) -> None:
    """Set keys of ``folder/train.yaml``; a double underscore separates sections: ``lora__dropout=0.1``."""
    cfg = yaml.safe_load((folder / "train.yaml").read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (folder / "train.yaml").write_text(yaml.safe_dump(cfg))
