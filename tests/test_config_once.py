"""One ``verifily train`` parses and validates its config once, and validates the dataset's rows once, per process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import cli_env, edit_config, run_cli, write_config

# Installed in every process the test starts (the CLI, torchrun, each DDP rank): counts config parses (an
# OmegaConf schema built from TrainConfig), config validations and dataset row validations, written at exit.
COUNTER = '''
import atexit, json, os, sys

from omegaconf import OmegaConf

from verifily_train.config import validate
from verifily_train.config.schema import TrainConfig
from verifily_train.dataset import manifest

counts = {"parses": 0, "validations": 0, "rows": 0}
structured, check, validate_row = OmegaConf.structured, validate._validate, manifest.validate_row


def counting_structured(obj, *args, **kwargs):
    counts["parses"] += obj is TrainConfig
    return structured(obj, *args, **kwargs)


def counting_check(*args, **kwargs):
    counts["validations"] += 1
    return check(*args, **kwargs)


def counting_validate_row(*args, **kwargs):
    counts["rows"] += 1
    return validate_row(*args, **kwargs)


OmegaConf.structured, validate._validate = counting_structured, counting_check
manifest.validate_row = counting_validate_row


@atexit.register
def report():
    path = os.path.join(os.environ["VERIFILY_TEST_COUNTS"], f"{os.getpid()}.json")
    with open(path, "w") as out:
        json.dump(dict(counts, argv=sys.argv), out)
'''


def _counted(tmp_path: Path, prefect_api: str, *args: str) -> list:
    """Run ``verifily ARGS`` with the counter in every process; each process's counts and command line."""
    counter, counts = tmp_path / "counter", tmp_path / "counts"
    counter.mkdir()
    counts.mkdir()
    (counter / "sitecustomize.py").write_text(COUNTER)
    env = cli_env({"PREFECT_API_URL": prefect_api, "VERIFILY_TEST_COUNTS": str(counts),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(counter), os.environ.get("PYTHONPATH")]))})
    result = run_cli(*args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in counts.glob("*.json")]


def test_resolved_config_is_rebuilt_exactly_without_parsing_or_validating(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from verifily_train.config import config_hash, config_to_dict, from_resolved, load_config, validate

    cfg = load_config(None, ["task=sft", "base_model=m", f"data_paths.train={tmp_path / 't.jsonl'}",
                             "training.report_to=[tensorboard]", "lora.target_modules=[q_proj,v_proj]",
                             "data_paths.columns={output: answer}", "compute.num_processes=auto"])

    def forbidden(*args, **kwargs):
        raise AssertionError("a resolved config was parsed or validated again")

    monkeypatch.setattr(OmegaConf, "structured", forbidden)
    monkeypatch.setattr(validate, "_validate", forbidden)
    rebuilt = from_resolved(json.loads(json.dumps(config_to_dict(cfg))))  # as a DDP rank reads it from job.json
    assert rebuilt == cfg and config_hash(rebuilt) == config_hash(cfg)
    with pytest.raises(TypeError, match="not a resolved TrainConfig"):
        from_resolved({"task": "sft"})


@pytest.mark.slow
def test_train_parses_the_config_once_and_its_ranks_never(tmp_path, models, sft_splits, prefect_api):
    """The CLI parses and validates train.yaml once, the flow and both DDP ranks rebuild it; the dataset's rows
    are validated once (preflight), not again by the stages that read the same version in the same process."""
    write_config(tmp_path, "sft", models["llama"], sft_splits,
                 training={"num_epochs": 1, "max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1},
                 compute={"bf16": False, "num_processes": 2}, eval={"enabled": False})
    processes = _counted(tmp_path, prefect_api, "train", "-c", "train.yaml")
    cli = [p for p in processes if p["argv"][0].endswith(os.path.join("cli", "main.py"))]
    ranks = [p for p in processes if p["argv"][0].endswith("ddp_worker.py")]
    assert len(cli) == 1 and len(ranks) == 2, [p["argv"] for p in processes]
    rows = sum(1 for split in sft_splits.values() for line in Path(split).read_text().splitlines() if line.strip())
    assert (cli[0]["parses"], cli[0]["validations"], cli[0]["rows"]) == (1, 1, rows)
    assert all((p["parses"], p["validations"], p["rows"]) == (0, 0, 0) for p in processes if p not in cli)


def test_a_deployments_config_is_parsed_once_per_flow_run(tmp_path, monkeypatch, sft_splits):
    """A deployment passes a train.yaml path or an inline mapping: the flow run's name and its body share one parse,
    unless the file changed in between."""
    from types import SimpleNamespace

    import yaml
    from omegaconf import OmegaConf

    from verifily_train.config.schema import TrainConfig
    from verifily_train.flows import train as flow

    write_config(tmp_path, "sft", Path("m"), sft_splits)
    monkeypatch.chdir(tmp_path)
    parses, structured = [], OmegaConf.structured
    monkeypatch.setattr(OmegaConf, "structured", lambda obj, *a, **k: (parses.append(obj is TrainConfig),
                                                                         structured(obj, *a, **k))[1])
    overrides = ["training.num_epochs=1"]
    for config in ("train.yaml", yaml.safe_load((tmp_path / "train.yaml").read_text())):
        monkeypatch.setattr(flow, "flow_run", SimpleNamespace(parameters={"config": config, "overrides": overrides}))
        parses.clear()
        name = flow.run_name()
        cfg = flow._config(None, config, overrides, None)
        assert sum(parses) == 1 and name.startswith("sft-data_paths-") and cfg.training.num_epochs == 1
    parses.clear()
    flow.run_name()
    edit_config(tmp_path, training__learning_rate=0.5)
    assert flow._config(None, "train.yaml", overrides, None).training.learning_rate == 0.5 and sum(parses) == 2
