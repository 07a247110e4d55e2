"""Scale-out: data-parallel training on N processes (torchrun, gloo on CPU) and the container work pools."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_user_error, cli_env, run_cli, train, write_config

FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: fault injection by env

POOLS = REPO / "deployments" / "pools"
# dropout 0: LoRA dropout draws per-rank random masks, which would make the curves differ by design
DDP = {"training": {"num_epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1,
                    "eval_steps": 100, "save_steps": 2},
       "lora": {"dropout": 0.0}, "compute": {"bf16": False, "num_processes": 2},
       "eval": {"enabled": False}}
# Tolerance of the 2-process loss curve against 1 process with the same global batch (8). Both see the
# same rows at every step: the sampler draws one seeded order and Accelerate hands rank r every r-th
# batch of 4 of it, which together are the single process's batch of 8; with dropout off no randomness
# differs, and the loss is normalised by the global token count in both (average_tokens_across_devices).
# What remains is float32 rounding: each rank pads to its own longest row and sums its own half before
# gloo adds the halves. That moved losses (~4.7) by < 1e-6 here; a wrong shard, batch or normalisation
# moves them by > 1e-3 within two steps. 1e-4 sits between the two.
LOSS_TOLERANCE = 1e-4


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _processes_mentioning(text: str) -> list:
    """Live processes whose command line contains ``text`` (a job file path: the ranks of one launch)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(proc.name))
    return found


@pytest.mark.parametrize("value", [0, -2, "abc", 1.5, True])
def test_bad_num_processes_is_a_config_error_naming_the_key(tmp_path, value):
    from verifily_train.config import load_config
    from verifily_train.errors import ConfigError

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"task": "sft", "base_model": "m", "data_paths": {"train": "t.jsonl"},
                                    "compute": {"num_processes": value}}))
    with pytest.raises(ConfigError, match=r"compute\.num_processes: must be auto or an integer >= 1"):
        load_config(path)


def test_bad_num_processes_on_the_command_line_prints_one_line(tmp_path):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"task": "sft", "base_model": "m",
                                                        "data_paths": {"train": "t.jsonl"}}))
    result = run_cli("config", "show", "-c", "train.yaml", "compute.num_processes=abc", cwd=tmp_path)
    assert_user_error(result, "compute.num_processes", "'abc'")


def test_auto_processes_are_the_visible_gpus_and_cuda_cannot_ask_for_more():
    import torch

    from verifily_train.errors import EnvironmentProblem
    from verifily_train.model.device import resolve_num_processes

    assert resolve_num_processes("auto", "cpu") == 1  # no GPU to count: one process
    assert resolve_num_processes(2, "cpu") == 2  # gloo ranks on CPU cores
    assert resolve_num_processes("auto", "cuda") == max(1, torch.cuda.device_count())
    with pytest.raises(EnvironmentProblem, match="compute.num_processes: 9 processes need 9 CUDA GPUs"):
        resolve_num_processes(9, "cuda")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_resumes_after_a_rank_fails(tmp_path, models, sft_splits,
                                                                           prefect_api, verifily_home):
    """2 gloo ranks x batch 4 against 1 process x batch 8: a rank's failure stops both with one error,
    the re-run resumes from the last complete checkpoint, and the loss curve matches."""
    single = tmp_path / "single"
    single.mkdir()
    write_config(single, "sft", models["llama"], sft_splits, **dict(
        DDP, training=dict(DDP["training"], batch_size=8), compute=dict(DDP["compute"], num_processes=1)))
    result, single_run = train(single, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    write_config(ddp, "sft", models["llama"], sft_splits, **DDP)
    failed = run_cli("train", "-c", "train.yaml", cwd=ddp,
                     env=cli_env({"PREFECT_API_URL": prefect_api, "VERIFILY_TEST_FAIL_RANK": "1:3",
                                  "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS),
                                                                              os.environ.get("PYTHONPATH")]))}))
    assert failed.returncode != 0
    assert re.search(r"RuntimeError: rank 1 of 2 failed, so torchrun stopped the others: RuntimeError: "
                     r"injected failure after step 3", failed.stderr), failed.stderr[-3000:]
    (work,) = (verifily_home / "cache" / "train").glob(".work-*")
    assert (work / "checkpoints" / "checkpoint-2" / ".verifily-complete").is_file()
    assert sorted(p.name for p in (work / "checkpoints" / "checkpoint-2").glob("rng_state_*.pth")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    assert _processes_mentioning(str(work / "ddp" / "job.json")) == []  # no rank outlived the failure

    result, ddp_run = train(ddp, prefect_api)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["train"]["resumed_from_step"] == 2
    assert metrics["train"]["global_step"] == 6  # 48 rows / global batch 8

    one, two = _losses(single_run), _losses(ddp_run)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert max(abs(one[s] - two[s]) for s in one) < LOSS_TOLERANCE, (one, two)
    assert two[6] < two[1]  # it learned

    # the adapter rank 0 wrote loads and scores a batch
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), ddp_run / "adapter")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    a = load_file(single_run / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp_run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < LOSS_TOLERANCE

    # same data and tokenizer: tokenize is shared; the process count and global batch re-key training
    record = json.loads((ddp_run / "run.json").read_text())
    stages_one = json.loads((single_run / "run.json").read_text())["stages"]
    assert record["stages"]["tokenize"]["key"] == stages_one["tokenize"]["key"]
    assert record["stages"]["tokenize"]["cache_hit"]
    assert record["stages"]["train"]["key"] != stages_one["train"]["key"]


def _template(name: str) -> dict:
    return json.loads((POOLS / f"{name}.json").read_text())


def _rendered(name: str):
    """The pool's job configuration with its defaults filled in, as the worker builds it."""
    from prefect.utilities.templating import apply_values

    if name == "docker":
        from prefect_docker.worker import DockerWorkerJobConfiguration as cls
    else:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as cls
    template = _template(name)
    defaults = cls._get_base_config_defaults(template["variables"]["properties"])
    return cls(**apply_values(template["job_configuration"], defaults))


@pytest.mark.parametrize("name", ["docker", "kubernetes"])
def test_pool_template_passes_prefect_and_worker_validation(name):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools.validation import validate

    template = _template(name)
    validate_base_job_template(template)  # every {{ placeholder }} is a declared variable
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    validate(defaults, template["variables"], raise_on_error=True, ignore_required=True)
    broken = json.loads(json.dumps(template))
    broken["job_configuration"]["image"] = "{{ undeclared_image }}"
    with pytest.raises(ValueError, match="undeclared_image"):
        validate_base_job_template(broken)
    config = _rendered(name)
    image = config.image if name == "docker" else config.job_manifest["spec"]["template"]["spec"]["containers"][0]["image"]
    assert config.env["VERIFILY_HOME"] == "/verifily" and image == "verifily-train:gpu"


def test_docker_pool_asks_for_the_gpus_and_mounts_verifily_home():
    from docker.models.containers import _create_container_args

    config = _rendered("docker")
    kwargs = dict(image=config.image, volumes=config.volumes, version="1.44", **config.container_create_kwargs)
    host = _create_container_args(kwargs)["host_config"]  # what docker-py sends to the daemon
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]] and host["DeviceRequests"][0]["Count"] == -1
    assert any(bind.endswith(":/verifily") for bind in host["Binds"])


def test_kubernetes_pool_asks_for_a_gpu_and_mounts_the_claim():
    pod = _rendered("kubernetes").job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/verifily"]]["persistentVolumeClaim"]["claimName"] == "verifily-home"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_pools_are_created_from_the_templates_and_take_the_pool_deployments(prefect_api):
    """Against a real Prefect server, which validates the templates, their defaults and the job variables."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = yaml.safe_load((REPO / "deployments" / "prefect-pools.yaml").read_text())
    pools = {"docker": "gpu-docker", "kubernetes": "gpu-k8s"}
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == set(pools.values())

    async def create_pools():  # what `prefect work-pool create NAME --type KIND --base-job-template FILE` sends
        async with get_client() as client:
            for kind, pool in pools.items():
                await client.create_work_pool(WorkPoolCreate(name=pool, type=kind, base_job_template=_template(kind)),
                                              overwrite=True)
            return {kind: (await client.read_work_pool(pool)).base_job_template for kind, pool in pools.items()}

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        stored = asyncio.run(create_pools())
    assert all(stored[kind] == _template(kind) for kind in pools)
    env = cli_env({"PREFECT_API_URL": prefect_api})
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                               "deployments/prefect-pools.yaml"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    for name in ("train/sft-docker", "train/sft-kubernetes"):
        assert f"Deployment '{name}' successfully created" in " ".join(deployed.stdout.split())


def test_dockerfile_installs_the_project_with_extras_that_exist():
    import tomllib

    dockerfile = (REPO / "deployments" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installs = re.findall(r"pip install ([^\n&\\]+)", dockerfile)
    (project_install,) = [i for i in installs if re.search(r'"\.\[', i)]
    extras = re.search(r'"\.\[([^\]]+)\]"', project_install).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and "qlora" in extras  # GPU extra: bitsandbytes
    torch_requirement = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert f'pip install "{torch_requirement}"' in dockerfile  # CUDA torch within the project's range
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M):
        for item in source.split():
            assert (REPO / item).exists(), item
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, flags=re.M).group(1)
    pools_yaml = yaml.safe_load((REPO / "deployments" / "prefect-pools.yaml").read_text())
    assert pools_yaml["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == workdir
    assert "VERIFILY_HOME=/verifily" in dockerfile
    assert all((REPO / d["entrypoint"].split(":")[0]).is_file() for d in pools_yaml["deployments"])
