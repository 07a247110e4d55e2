"""Hostile and odd input (issue 25), grouped by class. Every case ends in one clear line naming the place
(exit 2, no traceback), claims nothing under runs/, and leaves the dataset store as it was; none of them
trains. Runs and their integrity: test_run_integrity.py; Ctrl-C and resource edges: test_interrupts.py.

Classes: 1 input that reached the JSON parser or the filesystem unguarded; 2 values that validated but
broke later; 3 the model's own limits; 4 one bad manifest breaking the store; 6 debris and half-states;
8 resource edges (YAML alias bombs, huge rows).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import assert_user_error, cli_env, edit_config, run_cli, write_config
from verifily_train.hashing import hash_tree

pytestmark = pytest.mark.slow
SURROGATE_ROW = b'{"instruction": "say \\ud800", "output": "y"}\n'  # valid JSON text, invalid Unicode once parsed


def _home() -> Path:
    return Path(os.environ["VERIFILY_HOME"])


def _sft(folder: Path, models, **sections) -> dict:
    from verifily_train.fixtures.data import write_splits

    splits = write_splits(folder / "data", "sft", {"train": 24, "val": 8, "test": 8}, seed=3)
    write_config(folder, "sft", models["llama"], splits, **sections)
    return splits


def _append(path: Path, data: bytes) -> None:
    path.write_bytes(path.read_bytes() + data)


_edit = edit_config


def _version(folder: Path, models, dataset_id: str = "ds_bad", mutate=None, raw: str | None = None) -> Path:
    """A hand-written (platform-style) version in the store; ``mutate(manifest, folder)`` breaks it, or ``raw``
    replaces manifest.json's text."""
    splits = _sft(folder, models)
    version = _home() / "datasets" / dataset_id / "v1"
    version.mkdir(parents=True)
    data = splits["train"].read_bytes()
    (version / "train.jsonl").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    manifest = {"dataset_id": dataset_id, "version": "v1", "format": "jsonl", "task": "sft",
                "content_hash": "sha256:" + digest, "created_at": "2026-01-01T00:00:00Z",
                "files": [{"path": "train.jsonl", "split": "train", "sha256": digest}]}
    if mutate:
        mutate(manifest, version)
    (version / "manifest.json").write_text(raw if raw is not None else json.dumps(manifest))
    return version


def _gold(folder: Path, text: bytes) -> None:
    (folder / "gold.jsonl").write_bytes(text)
    _edit(folder, eval__gold_set="gold.jsonl")


def _train(*extra: str):
    return ["train", "-c", "train.yaml", *extra]


LONG_ID = "run_" + "x" * 5000


def _case_table() -> dict:
    """name -> (make(folder, models) -> CLI args, fragments, extra env). Grouped by the issue's classes."""
    c = {}
    # 1. input that reached the JSON parser or the filesystem unguarded
    c["1: lone surrogate in a row"] = (
        lambda f, m: (_append(_sft(f, m)["train"], SURROGATE_ROW), _train())[1], ("train.jsonl:25", "lone surrogate"))
    c["1: lone surrogate in a tag (dataset create)"] = (
        lambda f, m: ((f / "t.jsonl").write_bytes(b'{"instruction": "a", "output": "b", "tags": {"source": "\\udc00"}}\n'),
                      ["dataset", "create", "--id", "ds_s", "--version", "v1", "--task", "sft", "--train", str(f / "t.jsonl")])[1],
        ("t.jsonl:1", "tags.source", "lone surrogate"))
    c["1: lone surrogate in a manifest field (dataset verify)"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: mf.update(created_at="\ud800")), ["dataset", "verify", "ds_bad@v1"])[1],
        ("manifest.json", "created_at", "lone surrogate"))
    c["1: a row nested 100,000 deep"] = (
        lambda f, m: (_append(_sft(f, m)["train"], b'{"instruction": "a", "output": "b", "x": ' + b"[" * 100_000 + b"}\n"), _train())[1],
        ("train.jsonl:25", "nested too deeply"))
    c["1: an integer too long for Python's int parser"] = (
        lambda f, m: (_append(_sft(f, m)["train"], b'{"instruction": "a", "output": "b", "n": ' + b"7" * 5000 + b"}\n"), _train())[1],
        ("train.jsonl:25", "integer string conversion"))
    c["1: a NUL byte in a manifest path"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: mf["files"][0].update(path="train\x00.jsonl")), _train(dataset_version_ref()))[1],
        ("files[0].path", "NUL byte"))
    c["1: a 5,000-character path in a manifest"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: mf["files"][0].update(path="d/" * 2500 + "t.jsonl")), _train(dataset_version_ref()))[1],
        ("files[0].path", "too long"))
    for command in ("show", "verify"):
        c[f"1: an over-long run id (runs {command})"] = (lambda f, m, command=command: ["runs", command, LONG_ID],
                                                        ("not a run id or run folder",))
    c["1: an over-long run id (reproduce)"] = (lambda f, m: ["reproduce", LONG_ID], ("not a run id or run folder",))
    c["1: output.dir under /proc"] = (lambda f, m: (_sft(f, m, output={"dir": "/proc/verifily-runs"}), _train())[1],
                                      ("output.dir", "not writable"))
    c["1: cache.dir is /dev/null"] = (lambda f, m: (_sft(f, m, cache={"dir": "/dev/null"}), _train())[1],
                                      ("cache.dir", "exists and is not a folder"))
    c["1: VERIFILY_HOME is /dev/null (train)"] = (lambda f, m: (_sft(f, m), _train())[1], ("VERIFILY_HOME", "not a folder"),
                                                  {"VERIFILY_HOME": "/dev/null"})
    c["1: VERIFILY_HOME is /dev/null (dataset create)"] = (
        lambda f, m: ["dataset", "create", "--id", "ds_x", "--version", "v1", "--task", "sft", "--train", str(_sft(f, m)["train"])],
        ("VERIFILY_HOME", "not a folder"), {"VERIFILY_HOME": "/dev/null"})
    # 1, designed here: the same parsers reached by other doors
    c["1+: a manifest nested 100,000 deep (dataset verify)"] = (
        lambda f, m: (_version(f, m, raw="[" * 100_000), ["dataset", "verify", "ds_bad@v1"])[1], ("manifest.json", "nested too deeply"))
    c["1+: a 5,000-digit integer in train.yaml"] = (
        lambda f, m: (_sft(f, m), (f / "train.yaml").write_text((f / "train.yaml").read_text() + "seed: " + "9" * 5000 + "\n"), _train())[2],
        ("train.yaml", "integer string conversion"))
    c["1+: a gold set row nested 100,000 deep"] = (
        lambda f, m: (_sft(f, m), _gold(f, b'{"instruction": "a", "output": ' + b"[" * 100_000 + b"\n"), _train())[2],
        ("gold.jsonl:1", "nested too deeply"))
    c["1+: a lone surrogate escape in train.yaml (config show)"] = (
        lambda f, m: (_sft(f, m), (f / "train.yaml").write_text((f / "train.yaml").read_text() + 'seed_note: "\\ud800"\n'),
                      ["config", "show", "-c", "train.yaml"])[2], ("train.yaml", "seed_note", "not valid Unicode"))
    c["1+: an argument whose bytes are not UTF-8"] = (
        lambda f, m: (_sft(f, m), _train("prompt.system=\udcff"))[1], ("command line: prompt.system", "not valid Unicode"))
    c["1+: a run id longer than a file name may be (300 bytes)"] = (
        lambda f, m: ["runs", "show", "r" * 300], ("not a run id or run folder",))

    # 2. values that validate but break later (all caught before any model loads)
    for override, key in (("seed=-1", "seed"), ("seed=100000000000000000000", "seed"),
                          ("training.learning_rate=.inf", "training.learning_rate"),
                          ("training.max_grad_norm=.inf", "training.max_grad_norm"),
                          ("training.weight_decay=.nan", "training.weight_decay")):
        c[f"2: {override}"] = (lambda f, m, o=override: (_sft(f, m), _train(o))[1], (f"command line: {key}",))
    c["2: config show with a non-finite learning rate"] = (
        lambda f, m: (_sft(f, m), ["config", "show", "-c", "train.yaml", "training.learning_rate=.inf"])[1],
        ("training.learning_rate", "finite"))
    for tracker in ("wandb", "tensorboard", "mlflow"):
        c[f"2: training.report_to={tracker} without the package"] = (
            lambda f, m, t=tracker: (_sft(f, m), _train(f"training.report_to={t}"))[1],
            ("training.report_to", f"{tracker} needs the"), None, tracker)
    c["2: a malformed gold set"] = (lambda f, m: (_sft(f, m), _gold(f, b'{"instruction": 7, "output": "x"}\n'), _train())[2],
                                    ("gold.jsonl:1", "instruction", "must be a string"))
    c["2: an empty gold set"] = (lambda f, m: (_sft(f, m), _gold(f, b""), _train())[2], ("eval.gold_set", "has no rows"))
    c["2+: lora.dropout: .nan in train.yaml names the file"] = (
        lambda f, m: (_sft(f, m), _edit(f, lora__dropout=float("nan")), _train())[2], ("train.yaml: lora.dropout",))
    c["2+: -inf on the command line is one line, not two"] = (
        lambda f, m: (_sft(f, m), _train("training.warmup_ratio=-.inf"))[1], ("command line: training.warmup_ratio", "finite"))
    c["2+: a gold set line that is not JSON"] = (
        lambda f, m: (_sft(f, m), _gold(f, b'{"instruction": "a", "output": "b"}\n{oops\n'), _train())[2], ("gold.jsonl:2", "malformed JSON"))

    # 6. half-states and checks that contradicted themselves (the data side; runs: test_run_integrity.py)
    c["6: dataset create row errors name the user's file"] = (
        lambda f, m: (_append(_sft(f, m)["train"], b'{"instruction": 5, "output": "y"}\n'),
                      ["dataset", "create", "--id", "ds_r", "--version", "v1", "--task", "sft", "--train", str(f / "data/train.jsonl")])[1],
        ("data/train.jsonl:25", "instruction"))
    c["6: an id with a trailing newline"] = (
        lambda f, m: ["dataset", "create", "--id", "ds_n\n", "--version", "v1", "--task", "sft", "--train", str(_sft(f, m)["train"])],
        ("--id", "is not a valid name"))
    c["6: the same file as train.jsonl and ./train.jsonl"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: mf["files"].append(dict(mf["files"][0], path="./train.jsonl"))),
                      _train(dataset_version_ref()))[1], ("files[1].path", "listed twice"))
    c["6: num_rows given as a string"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: mf["files"][0].update(num_rows="24")), _train(dataset_version_ref()))[1],
        ("files[0].num_rows", "must be a non-negative integer, got str"))
    c["6: an override error names the command line"] = (lambda f, m: (_sft(f, m), _train("lora.r=0"))[1], ("command line: lora.r",))
    c["6+: a symlink naming a listed file again"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: (os.symlink("train.jsonl", v / "alias.jsonl"),
                                                             mf["files"].append(dict(mf["files"][0], path="alias.jsonl")))),
                      _train(dataset_version_ref()))[1], ("files[1].path", "listed twice"))
    c["6+: a top-level num_rows that is not a number"] = (
        lambda f, m: (_version(f, m, mutate=lambda mf, v: mf.update(num_rows="many")), _train(dataset_version_ref()))[1],
        ("num_rows", "must be a non-negative integer"))

    # 8. resource edges: an alias bomb is refused before anything is built, a huge row before it is parsed
    c["8: a YAML alias bomb in lora.target_modules (config show)"] = (
        lambda f, m: (_sft(f, m), _bomb(f), ["config", "show", "-c", "train.yaml"])[2], ("train.yaml", "aliases expand to more than"))
    c["8: a YAML alias bomb in lora.target_modules (train)"] = (
        lambda f, m: (_sft(f, m), _bomb(f), _train())[2], ("train.yaml", "aliases expand to more than"))
    c["8+: an alias bomb on the command line"] = (
        lambda f, m: (_sft(f, m), _train("lora.target_modules=" + _bomb_text(8)))[1], ("command line", "lora.target_modules", "aliases expand"))
    c["8+: an alias that refers to itself"] = (
        lambda f, m: (_sft(f, m), (f / "train.yaml").write_text((f / "train.yaml").read_text() + "extra: &a [*a]\n"), _train())[2],
        ("train.yaml", "refers to itself"))
    c["8+: a 5 MiB line with no newline"] = (
        lambda f, m: (_append(_sft(f, m)["train"], b'{"instruction": "' + b"w" * (5 * 2 ** 20)), _train())[1],
        ("train.jsonl:25", "longer than 4 MiB"))
    return c


def dataset_version_ref() -> str:
    return "dataset_version=ds_bad@v1"


def _bomb_text(levels: int = 9) -> str:
    """640-ish bytes that expand to 9**levels strings."""
    text = '&a0 ["q","q","q","q","q","q","q","q","q"]'
    for i in range(1, levels):
        text = f"&a{i} [{text}" + f",*a{i - 1}" * 8 + "]"
    return text


def _bomb(folder: Path) -> None:
    text = (folder / "train.yaml").read_text()
    assert "lora:" not in text
    (folder / "train.yaml").write_text(text + f"lora:\n  target_modules: {_bomb_text()}\n")


CASES = _case_table()


def _completed(folder: Path) -> list:
    runs = folder / "runs"
    return [p for p in runs.rglob("checksums.sha256")] if runs.is_dir() else []


def _store() -> str | None:
    root = _home() / "datasets"
    return hash_tree(root) if root.is_dir() else None


def test_each_class_has_its_examples_and_more():
    per_class = {}
    for name in CASES:
        per_class.setdefault(name.split(":")[0].rstrip("+"), []).append(name)
    assert all(len(per_class[k]) >= 5 for k in ("1", "2", "6", "8")), {k: len(v) for k, v in per_class.items()}
    assert all(any(n.startswith(f"{k}+") for n in CASES) for k in ("1", "2", "6", "8"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_clear_line(name, tmp_path, models):
    make, fragments, *rest = CASES[name]
    env_extra = rest[0] if rest and rest[0] else {}
    if len(rest) > 1 and importlib.util.find_spec(rest[1]) is not None:
        pytest.skip(f"{rest[1]} is installed here")
    args = make(tmp_path, models)
    if args[:1] == ["train"] and any(a.startswith("dataset_version=") for a in args):
        cfg = yaml.safe_load((tmp_path / "train.yaml").read_text())
        cfg.pop("data_paths", None)
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    before = _store()
    result = run_cli(*args, cwd=tmp_path, env=cli_env(env_extra), timeout=300)
    assert_user_error(result, *fragments)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no warnings or retries around it
    assert _completed(tmp_path) == []
    assert _store() == before, "the dataset store changed"
    if args[:2] == ["dataset", "create"]:  # a failed create leaves no empty datasets/<id>/ and no staging copy
        assert not any((_home() / "datasets").glob("*/.staging-*")) if (_home() / "datasets").is_dir() else True
        assert not (_home() / "datasets" / args[3].strip()).exists()


# 3. the model's own limits -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["classification", "sft"])
def test_a_row_past_the_models_positions_is_cut_at_them_and_said_once(task, tmp_path, models):
    """800 tokens, the default max_seq_length 2048, a model with 512 positions: cut at 512, one warning, and the
    forward pass of the longest row runs (it crashed on BERT's position embeddings)."""
    import torch

    from verifily_train.pipeline import runner as stages

    from verifily_train.pipeline.fingerprint import fingerprint_stage
    from verifily_train.config import load_config
    from verifily_train.fixtures.data import write_splits
    from verifily_train.model.loading import ModelSpec, load_model, load_tokenizer
    from verifily_train.model.tokenize import TokenizedSplit

    model = models["bert" if task == "classification" else "llama"]
    splits = write_splits(tmp_path / "data", task, {"train": 24, "test": 8}, seed=4)
    long_row = ({"text": "the movie was " + "great " * 800, "label": "positive"} if task == "classification" else
                {"instruction": "Repeat the colors exactly.", "input": "red " * 800, "output": "red red"})
    _append(splits["train"], (json.dumps(long_row) + "\n").encode())
    write_config(tmp_path, task, model, splits, training={"max_seq_length": 2048})
    cfg = load_config(tmp_path / "train.yaml")
    fp = fingerprint_stage(cfg, tmp_path / "cache")
    assert fp.max_positions == 512
    (tmp_path / "tok").mkdir()
    tokenized = stages.run_uncached("tokenize", cfg, fp, tmp_path / "tok", tmp_path)
    assert tokenized["max_seq_length"] == 512 and tokenized["splits"]["train"]["truncated"] == 1
    said = [w for w in tokenized["warnings"] if "512 positions" in w]
    assert len(said) == 1 and "training.max_seq_length=2048" in said[0]
    train = TokenizedSplit(tmp_path / "tok" / tokenized["splits"]["train"]["file"], task)
    longest = max(range(len(train)), key=lambda i: len(train[i]["input_ids"]))
    assert len(train[longest]["input_ids"]) == 512
    spec = ModelSpec(**fp.model)
    tok = load_tokenizer(spec)
    net = load_model(spec, labels=tokenized["labels"] or None, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = net(input_ids=torch.tensor([train[longest]["input_ids"]]))
    assert torch.isfinite(out.logits).all()


def _broken_model(folder: Path, models, how: str) -> Path:
    import shutil

    target = folder / f"model-{how}"
    shutil.copytree(models["llama"], target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "damaged header":
        weights.write_bytes(b"\xff" * 8 + data[8:])
    else:  # a pickle checkpoint that torch.load(weights_only=True) refuses
        import torch
        from safetensors.torch import load_file

        state = load_file(weights)
        weights.unlink()
        state["extra"] = Path("not a tensor")  # any non-tensor object: weights_only refuses to unpickle it
        torch.save(state, target / "pytorch_model.bin")
    return target


@pytest.mark.parametrize("how, fragments", [
    ("truncated", ("model.safetensors", "truncated")),
    ("pickle-only", ("pytorch_model.bin", "cannot be loaded safely")),
    ("damaged header", ("model.safetensors", "not a readable safetensors file")),  # designed here
])
def test_damaged_or_unsafe_weights_are_one_line_before_training(how, fragments, tmp_path, models, prefect_api):
    _sft(tmp_path, models)
    _edit(tmp_path, base_model=str(_broken_model(tmp_path, models, how)))
    result = run_cli(*_train(), cwd=tmp_path, env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert_user_error(result, "base_model", *fragments)
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_with_no_network_fails_at_once_in_one_line(tmp_path, models, prefect_api):
    """HF_HUB_OFFLINE unset and the network gone: one line, not 30 s of retries (the CLI sees the Hub is
    unreachable and reads only the local Hub cache)."""
    from reliability.test_integrity import BLOCK_NETWORK

    guard = tmp_path / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(BLOCK_NETWORK)
    _sft(tmp_path, models, base_model="someorg/no-such-model")
    env = cli_env({"PYTHONPATH": str(guard), "PREFECT_API_URL": prefect_api, "HF_HOME": str(tmp_path / "hf")})
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)
    result = run_cli(*_train(), cwd=tmp_path, env=env)
    assert_user_error(result, "someorg/no-such-model", "Hub is unreachable")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# 4. one bad manifest must not break the store ----------------------------------------------------------------

def _plant(dataset_id: str, version: str, text: str) -> None:
    folder = _home() / "datasets" / dataset_id / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(text)


def test_one_bad_manifest_leaves_the_good_versions_usable(tmp_path, models):
    splits = _sft(tmp_path, models)
    created = run_cli("dataset", "create", "--id", "ds_good", "--version", "v1", "--task", "sft", "--train",
                      str(splits["train"]), "--test", str(splits["test"]), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    _plant("ds_array", "v1", "[1, 2, 3]")
    _plant("ds_deep", "v1", "[" * 100_000)
    _plant("ds_int", "v1", json.dumps({"dataset_id": "ds_int", "version": "v1", "task": "sft", "content_hash": 7,
                                       "files": []}))
    _plant("ds_good", "v2", json.dumps({"dataset_id": "ds_good", "version": "v2", "task": "sft",  # designed here
                                        "created_at": "\ud800", "content_hash": "sha256:0", "files": []}))

    listed = run_cli("dataset", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "ds_good@v1" in listed.stdout and "ds_array" not in listed.stdout
    warnings = listed.stderr.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: ") and "left out" in w for w in warnings), warnings
    as_json = run_cli("dataset", "list", "--json", cwd=tmp_path)
    assert [v["ref"] for v in json.loads(as_json.stdout)] == ["ds_good@v1"]

    verified = run_cli("dataset", "verify", "ds_good@v1", cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("ok ds_good@v1"), verified.stderr
    write_config(tmp_path, "sft", models["llama"], dataset_version="ds_good@v1")
    # the dataset resolves (a crash or a second line would show): the only problem reported is the config's
    assert_user_error(run_cli(*_train("lora.r=0"), cwd=tmp_path), "command line: lora.r")
    assert_user_error(run_cli("dataset", "verify", "ds_array@v1", cwd=tmp_path), "must be a JSON object")
    assert_user_error(run_cli("dataset", "verify", "ds_int@v1", cwd=tmp_path), "content_hash", "must be a str")
    # designed here: "latest" cannot be told while a version of the dataset is unreadable, and says which
    assert_user_error(run_cli("dataset", "verify", "ds_good@latest", cwd=tmp_path), "ds_good@v2", "latest")
    assert_user_error(run_cli("dataset", "verify", "ds_deep@sha256:0123456789ab", cwd=tmp_path), "no readable version")


# 6. debris the data side leaves --------------------------------------------------------------------------------

HOLD_LOCK = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"


def test_a_killed_dataset_create_leaves_debris_the_next_one_removes(tmp_path, models):
    """A staging copy whose owner died is deleted by the next create of that dataset; one whose owner is alive
    (it holds the lock beside it) is left alone."""
    splits = _sft(tmp_path, models)
    parent = _home() / "datasets" / "ds_k"
    dead = parent / ".staging-v1-0badc0de"  # what kill -9 during a copy leaves: a half copy, no live owner
    dead.mkdir(parents=True)
    (dead / "train.jsonl").write_bytes(splits["train"].read_bytes()[:100])
    (parent / ".staging-v1-0badc0de.lock").write_text("")
    alive = parent / ".staging-v2-00c0ffee"
    alive.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{alive}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        created = run_cli("dataset", "create", "--id", "ds_k", "--version", "v3", "--task", "sft", "--train",
                          str(splits["train"]), cwd=tmp_path)
        assert created.returncode == 0, created.stderr
        assert not dead.exists() and not Path(f"{dead}.lock").exists()
        assert alive.is_dir()
        listed = run_cli("dataset", "list", "--json", cwd=tmp_path)
        assert [v["ref"] for v in json.loads(listed.stdout)] == ["ds_k@v3"]
    finally:
        holder.kill()
        holder.wait()


# 8. a huge row is refused while it is read, in bounded memory --------------------------------------------------

MEASURE = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); " \
          "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"


def test_a_50_mb_row_is_refused_in_bounded_memory(tmp_path, models):
    splits = _sft(tmp_path, models)
    _append(splits["train"], b'{"instruction": "' + b"word " * (10 * 2 ** 20) + b'", "output": "y"}\n')
    result = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "verifily_train.cli.main", *_train()],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert_user_error(result, "train.jsonl:25", "longer than 4 MiB")
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 1024 * 1024, f"peak memory {peak_kib / 1024:.0f} MiB for a refused 50 MB row"
