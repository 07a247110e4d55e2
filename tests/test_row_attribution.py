"""Row-level attribution (``verifily_train.attribution.rows``): exact gradient scores, seeded projection,
sharding, cache-key inputs, and the train stage's snapshots. Tiny fixture models, a few seconds each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from verifily_train.attribution import rows
from verifily_train.errors import ConfigError, RunError


def _train(tmp: Path, models: dict, kind: str, lora: dict | None = None, **training) -> tuple:
    from verifily_train.fixtures.data import write_splits
    from verifily_train.fixtures.runs import train_run

    task = "classification" if kind == "bert" else "sft"
    splits = write_splits(tmp / "data", task, {"train": 12, "val": 4, "test": 4}, seed=3)
    cfg = {"task": task, "base_model": str(models[kind]), "data_paths": {k: str(v) for k, v in splits.items()},
           "training": {"num_epochs": 2, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                        "max_seq_length": 48, "save_steps": 1000, "eval_steps": 1000, **training},
           "eval": {"enabled": False},  # attribution reads the train stage's entry, not the evaluation
           "lora": lora or {}, "runtime": {"progress": False}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg))
    return train_run(tmp / "train.yaml", tmp / "cache", tmp / "runs"), tmp / "cache"


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """One trained Run per model kind (classification on BERT, SFT on Llama and T5), built once."""
    out = {}
    for kind in ("bert", "llama", "t5"):
        out[kind] = _train(tmp_path_factory.mktemp(f"rows-{kind}"), models, kind)
    return out


def _attribute(plan, out: Path, shards: int = 1) -> pd.DataFrame:
    merged = rows.attribute_rows(plan, out, shards)
    return pd.read_parquet(Path(merged["dir"]) / merged["file"])


def _reference_loss(scoring, batch):
    """(summed token loss, token count) of one row from the model's plain forward (full logits)."""
    import torch.nn.functional as F

    from verifily_train.model.loading import KIND_CAUSAL, KIND_SEQ_CLS

    if scoring.kind == KIND_SEQ_CLS:
        logits = scoring.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), 1
    logits = scoring.model(**batch).logits.float()
    labels = batch["labels"]
    if scoring.kind == KIND_CAUSAL:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], reduction="sum"), int(keep.sum())


def _adam_step_size(scoring, snapshot):
    """1 / (sqrt(v / (1 - beta2^t)) + eps) per trainable weight, from the snapshot's saved AdamW moments."""
    import torch
    from safetensors.torch import load_file

    opt = snapshot["optimizer"]
    moments = load_file(opt["file"])
    beta2 = opt["betas"][1]
    steps = [1.0 / ((moments[f"exp_avg_sq.{n}"].double() / (1 - beta2 ** opt["step"])).sqrt() + opt["eps"])
             for n in scoring.names]
    return torch.cat([x.reshape(-1) for x in steps])


def _direct_scores(plan, adam: bool = False) -> tuple:
    """TracIn and self-influence by plain autograd, one row at a time (no batching, hooks or projection); with
    ``adam``, TracIn with each row's gradient scaled by AdamW's step size as well (the third value)."""
    import torch

    from verifily_train.attribution.rows.gradients import summed_gradient
    from verifily_train.attribution.rows.runtime import SplitRows, apply_snapshot, load_scoring_model, supervised_tokens

    scoring = load_scoring_model(plan)
    train = SplitRows(Path(plan.tokenized_dir), "train", plan.task, scoring)
    test = SplitRows(Path(plan.tokenized_dir), plan.target_split, plan.task, scoring)
    normalizer = float(np.mean(supervised_tokens(train, scoring.kind)))
    tracin, self_influence, tracin_adam = np.zeros(len(train)), np.zeros(len(train)), np.zeros(len(train))
    for snapshot in plan.snapshots:
        apply_snapshot(scoring, snapshot)
        step_size = _adam_step_size(scoring, snapshot) if adam else None
        target = torch.zeros(sum(p.numel() for p in scoring.params), dtype=torch.float64)
        for i in range(len(test)):
            loss_sum, count = _reference_loss(scoring, test.collate([test.data[i]]))
            target += summed_gradient(scoring, loss_sum / count).double() / len(test)
        for j in range(len(train)):
            loss_sum, _ = _reference_loss(scoring, train.collate([train.data[j]]))
            g = summed_gradient(scoring, loss_sum / normalizer).double()
            tracin[j] -= snapshot["weight"] * float(g @ target)
            self_influence[j] += snapshot["weight"] * float(g @ g)
            if adam:
                tracin_adam[j] -= snapshot["weight"] * float((g * step_size) @ target)
    return (tracin, self_influence, tracin_adam) if adam else (tracin, self_influence)


@pytest.mark.parametrize("kind,checkpoints", [("bert", 2), ("llama", 2)])
def test_adam_preconditioned_scores_equal_a_direct_per_row_computation(runs, kind, checkpoints, tmp_path):
    """tracin_adam: each row's plain autograd gradient, scaled by the saved AdamW step size of the snapshot,
    against the target's gradient; and it is not plain TracIn rescaled (the preconditioner changes the order)."""
    run, cache = runs[kind]
    plan = rows.plan_row_attribution(run, cache_root=cache, projection_dim=0, checkpoints=checkpoints,
                                     methods=["tracin", "tracin_adam"])
    assert all(s["optimizer"]["betas"] == [0.9, 0.999] and s["optimizer"]["step"] == s["step"] for s in plan.snapshots)
    table = _attribute(plan, tmp_path)
    tracin, _, tracin_adam = _direct_scores(plan, adam=True)
    assert np.abs(tracin_adam).max() > 0
    np.testing.assert_allclose(table["score_tracin_adam"], tracin_adam, rtol=1e-4,
                               atol=1e-6 * np.abs(tracin_adam).max())
    np.testing.assert_allclose(table["score_tracin"], tracin, rtol=1e-4, atol=1e-6 * np.abs(tracin).max())
    assert abs(np.corrcoef(tracin, tracin_adam)[0, 1]) < 0.999


def test_saved_adam_moments_are_the_steps_training_took(models, tmp_path):
    """A snapshot at every step: each step's weight change is exactly -lr x m^ / (sqrt(v^) + eps) from the moments
    saved with it, so the preconditioner tracin_adam reads is the run's own AdamW state."""
    import torch
    from safetensors.torch import load_file

    from verifily_train.training.snapshots import read_snapshots

    run, cache = _train(tmp_path, models, "llama", attribution_snapshots=6, weight_decay=0.0, num_epochs=2)
    key = json.loads((run / "run.json").read_text())["stages"]["train"]["key"]
    saved = read_snapshots(cache / "train" / key)
    assert [s["step"] for s in saved] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(saved, saved[1:]):
        opt = after["optimizer"]
        (beta1, beta2), t = opt["betas"], opt["step"]
        moments, old, new = load_file(opt["file"]), load_file(before["file"]), load_file(after["file"])
        for name in new:
            m = moments[f"exp_avg.{name}"].double() / (1 - beta1 ** t)
            v = moments[f"exp_avg_sq.{name}"].double() / (1 - beta2 ** t)
            step = -after["lr"] * m / (v.sqrt() + opt["eps"])
            torch.testing.assert_close(new[name].double() - old[name].double(), step, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("kind,checkpoints", [("bert", 2), ("llama", 1), ("t5", 1)])
def test_gradient_scores_equal_a_direct_per_row_computation(runs, kind, checkpoints, tmp_path):
    run, cache = runs[kind]
    plan = rows.plan_row_attribution(run, cache_root=cache, projection_dim=0, checkpoints=checkpoints)
    table = _attribute(plan, tmp_path)
    tracin, self_influence = _direct_scores(plan)
    assert np.abs(tracin).max() > 0
    np.testing.assert_allclose(table["score_tracin"], tracin, rtol=1e-4, atol=1e-6 * np.abs(tracin).max())
    np.testing.assert_allclose(table["score_self_influence"], self_influence, rtol=1e-4)


def test_qlora_gradient_scores_equal_a_direct_computation(tmp_path):
    pytest.importorskip("bitsandbytes")
    from verifily_train.fixtures.models import build_model

    # hidden 64: the smallest fixture where 4-bit layers train on this CPU (tests/test_qlora.py)
    models = {"llama": build_model("llama", tmp_path / "llama64", hidden=64)}
    run, cache = _train(tmp_path / "run", models, "llama", lora={"quantization": "4bit",
                                                                 "bnb_4bit_compute_dtype": "float32"})
    plan = rows.plan_row_attribution(run, cache_root=cache, projection_dim=0, checkpoints=1)
    table = _attribute(plan, tmp_path / "out")
    tracin, _ = _direct_scores(plan)
    np.testing.assert_allclose(table["score_tracin"], tracin, rtol=1e-4, atol=1e-6 * np.abs(tracin).max())


def test_looped_gradients_equal_batched_hooks(runs):
    from verifily_train.attribution.rows.gradients import PerRowGradients
    from verifily_train.attribution.rows.runtime import SplitRows, load_scoring_model

    run, cache = runs["llama"]
    plan = rows.plan_row_attribution(run, cache_root=cache, projection_dim=0, checkpoints=1)
    scoring = load_scoring_model(plan)
    train = SplitRows(Path(plan.tokenized_dir), "train", plan.task, scoring)
    _, batch = next(train.batches(range(len(train)), size=6))
    hooks = PerRowGradients(scoring)
    assert hooks.uses_hooks
    fast = hooks(batch, 3.0)
    hooks.uses_hooks = False
    slow = hooks(batch, 3.0)
    np.testing.assert_allclose(fast[0].numpy(), slow[0].numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast[1].numpy(), slow[1].numpy(), rtol=1e-5)


def test_projection_is_seeded_and_keeps_the_ranking(runs, tmp_path):
    run, cache = runs["bert"]
    scores = {}
    for name, seed, dim in (("a", 0, 256), ("again", 0, 256), ("other", 1, 256), ("exact", 0, 0)):
        plan = rows.plan_row_attribution(run, cache_root=cache, projection_dim=dim, seed=seed, checkpoints=1)
        scores[name] = _attribute(plan, tmp_path / name)["score_tracin"].to_numpy()
    assert np.array_equal(scores["a"], scores["again"])
    assert not np.allclose(scores["a"], scores["other"])
    # a 256-dimensional projection of a few thousand LoRA + head weights keeps the scores' order
    assert np.corrcoef(scores["a"], scores["exact"])[0, 1] > 0.9


@pytest.mark.parametrize("cache_bytes,kind", [(1 << 30, "rademacher"), (0, "sparse-sign")])
def test_both_projections_are_seeded_and_keep_inner_products(cache_bytes, kind):
    import torch

    from verifily_train.attribution.rows.gradients import Projection

    torch.manual_seed(0)
    common = torch.randn(1, 3000)
    grads = common * torch.randn(40, 1) + 0.5 * torch.randn(40, 3000)  # gradients sharing a direction, as rows' do
    exact = (grads.double() @ grads[0].double())
    make = lambda seed: Projection(["a", "b"], [1000, 2000], 512, seed, cache_bytes=cache_bytes)  # noqa: E731
    first, again, other = make(0), make(0), make(1)
    assert first.kind == kind
    projected = first(grads) @ first(grads[:1])[0]
    assert torch.equal(projected, again(grads) @ again(grads[:1])[0])
    assert not torch.allclose(projected, other(grads) @ other(grads[:1])[0])
    assert torch.corrcoef(torch.stack([projected[1:], exact[1:]]))[0, 1] > 0.95


def test_sharded_scores_equal_unsharded(runs, tmp_path):
    run, cache = runs["llama"]
    plan = rows.plan_row_attribution(run, cache_root=cache, projection_dim=128, checkpoints=2)
    whole, sharded = _attribute(plan, tmp_path / "one", 1), _attribute(plan, tmp_path / "three", 3)
    for column in ("score_tracin", "score_self_influence", "score_loss", "score_loss_mean"):
        assert np.array_equal(sharded[column].to_numpy(), whole[column].to_numpy()), column
    assert list(sharded["example_id"]) == list(whole["example_id"])
    assert sorted(whole["rank_tracin"]) == list(range(1, len(whole) + 1))


def test_key_inputs_follow_content_not_paths(runs, tmp_path):
    run, cache = runs["bert"]
    plan = rows.plan_row_attribution(run, cache_root=cache, checkpoints=2)
    assert rows.RowAttributionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # a task parameter
    moved_run, moved_cache = tmp_path / "elsewhere" / run.name, tmp_path / "cache-copy"
    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(run, moved_run)
    shutil.copytree(cache, moved_cache)
    moved = rows.plan_row_attribution(moved_run, cache_root=moved_cache, checkpoints=2)
    assert moved.run_path != plan.run_path and rows.key_inputs(moved) == rows.key_inputs(plan)
    assert rows.key_inputs(rows.plan_row_attribution(run, cache_root=cache, checkpoints=2, seed=1)) != rows.key_inputs(plan)
    assert rows.key_inputs(rows.plan_row_attribution(run, cache_root=cache, checkpoints=2, target="val")) != rows.key_inputs(plan)
    assert rows.key_inputs(rows.plan_row_attribution(run, cache_root=cache, checkpoints=2, projection_dim=64)) != rows.key_inputs(plan)
    snapshot = Path(moved.snapshots[-1]["file"])
    snapshot.chmod(0o644)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(snapshot))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, str(snapshot))
    assert rows.key_inputs(rows.plan_row_attribution(moved_run, cache_root=moved_cache, checkpoints=2)) != rows.key_inputs(plan)


def test_train_stage_keeps_snapshots_in_its_cache_entry_not_in_the_run(runs):
    run, cache = runs["bert"]
    record = json.loads((run / "run.json").read_text())
    entry = cache / "train" / record["stages"]["train"]["key"] / "attribution_snapshots"
    index = json.loads((entry / "index.json").read_text())["snapshots"]
    assert [s["step"] for s in index] == [2, 3, 5, 6]  # 6 steps, 4 snapshots evenly spaced, the last the final step
    assert sum(s["interval_steps"] for s in index) == 6 and all(s["weight"] > 0 for s in index)
    assert not any(p.name == "attribution_snapshots" for p in run.rglob("*"))
    plan = rows.plan_row_attribution(run, cache_root=cache, checkpoints=2)
    # two of four kept: each covers the steps (and summed learning rates) of those dropped before it
    assert [s["step"] for s in plan.snapshots] == [3, 6]
    assert sum(s["weight"] for s in plan.snapshots) == pytest.approx(sum(s["weight"] for s in index))


def test_without_snapshots_the_final_adapter_is_used_with_a_note(runs, tmp_path):
    run, cache = runs["bert"]
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("attribution_snapshots"))
    plan = rows.plan_row_attribution(run, cache_root=copy)
    assert len(plan.snapshots) == 1 and plan.snapshots[0]["file"] == "" and "final adapter alone" in plan.notes[0]
    table = _attribute(plan, tmp_path / "out")
    assert table["score_tracin"].abs().max() > 0 and "score_label_issue" in table
    # no snapshots, no AdamW moments: every method leaves tracin_adam out with a note; asking for it is an error
    assert "tracin_adam" not in plan.methods and any("tracin_adam" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="--methods: tracin_adam needs the AdamW moments"):
        rows.plan_row_attribution(run, cache_root=copy, methods=["tracin_adam"])


def test_parquet_and_manifest_name_each_scores_family(runs, tmp_path):
    """Suspect rows (no target) and attribution (target-aware) are told apart in the file itself, and the
    label-issue score says it is in-sample."""
    run, cache = runs["bert"]
    plan = rows.plan_row_attribution(run, cache_root=cache, checkpoints=1, projection_dim=16,
                                     methods=["tracin", "loss", "label_issue"])
    merged = rows.attribute_rows(plan, tmp_path)
    meta = rows.read_families(Path(merged["dir"]) / merged["file"])
    assert meta["families"] == merged["families"]
    assert meta["method_family"] == {"tracin": "attribution", "loss": "suspect rows", "label_issue": "suspect rows"}
    suspect, attribution = merged["families"]["suspect rows"], merged["families"]["attribution"]
    assert suspect["default"] == "loss" and suspect["target"] is None and suspect["label_issue"] == "in-sample"
    assert attribution == {"methods": ["tracin"], "default": "tracin", "target": "test", "target_split": "test"}


def test_verify_never_selects_with_the_rows_it_confirms_on(runs):
    """--verify: a target-aware ranking against the rows it is confirmed on is refused unless --same-rows;
    val against test, or disjoint slices, pass; a suspect-row score reads no target and always passes."""
    from verifily_train.attribution.row_verify import check_selection, verify_method

    run, cache = runs["llama"]

    def plan(target):
        return rows.plan_row_attribution(run, cache_root=cache, target=target, methods=["loss", "tracin"])

    assert verify_method(["loss", "tracin"], None) == "tracin" and verify_method(["loss"], None) == "loss"
    on_val = check_selection(plan("val"), "test", "tracin", same_rows=False)
    assert on_val["shared_rows"] == 0 and on_val["verified_split"] == "test" and "no row used to select" in on_val["note"]
    with pytest.raises(ConfigError, match="--select: --verify would rank by tracin .* 4 rows are both"):
        check_selection(plan("test"), "test", "tracin", same_rows=False)
    same = check_selection(plan("test"), "test", "tracin", same_rows=True)
    assert same["shared_rows"] == 4 and "optimistic" in same["note"]
    assert check_selection(plan("test"), "test", "loss", same_rows=False)["reads_target"] is False
    sliced = check_selection(plan("slice:source=human"), "slice:source!=human", "tracin", same_rows=False)
    assert sliced["shared_rows"] == 0 and sliced["selection_split"] == "test"


def test_user_errors_name_the_option(runs, tmp_path):
    run, cache = runs["llama"]
    with pytest.raises(ConfigError, match="--target"):
        rows.plan_row_attribution(run, cache_root=cache, target="slice:source=nobody")
    with pytest.raises(ConfigError, match="--target"):
        rows.plan_row_attribution(run, cache_root=cache, target="train")
    for malformed in ("slice:source", "slice:=human", "slice:source!="):
        with pytest.raises(ConfigError, match="slice:<tag>!=<value>"):
            rows.plan_row_attribution(run, cache_root=cache, target=malformed)
    with pytest.raises(ConfigError, match="label_issue"):
        rows.plan_row_attribution(run, cache_root=cache, methods=["label_issue"])
    with pytest.raises(RunError, match="verifily train"):
        rows.plan_row_attribution(run, cache_root=tmp_path / "empty-cache")


def test_slice_target_and_tag_summary(runs, tmp_path):
    run, cache = runs["llama"]
    plan = rows.plan_row_attribution(run, cache_root=cache, target="slice:source=human", projection_dim=64,
                                     checkpoints=1)
    table = _attribute(plan, tmp_path)
    summary = rows.summarize_by_tag(table, "tracin", "source")
    assert sum(s["rows"] for s in summary) == len(table)
    for entry in summary:
        assert entry["sum"] == pytest.approx(entry["mean"] * entry["rows"])
        # point values: a row bootstrap of one trained model carries no training variance, so no interval
        assert not any(k.endswith("ci95") for k in entry)
    # the excess over average rows: sums to zero over the values, and is n (1 - n/N) (mean - mean of the rest)
    assert sum(s["excess"] for s in summary) == pytest.approx(0, abs=1e-9 * sum(abs(s["sum"]) for s in summary))
    scores = table["score_tracin"].to_numpy()
    for entry in summary:
        n, total = entry["rows"], len(table)
        rest = (scores.sum() - entry["sum"]) / (total - n)
        assert entry["excess"] == pytest.approx(n * (1 - n / total) * (entry["mean"] - rest))


def test_a_not_equal_slice_targets_the_other_rows(runs, tmp_path):
    """``slice:<tag>!=<value>``, a tag-level verdict's own slice: exactly the target rows ``=`` leaves out, and
    (the target being the mean loss of its rows) its TracIn scores are the size-weighted rest of the whole split's."""
    run, cache = runs["llama"]
    settings = dict(cache_root=cache, projection_dim=0, checkpoints=1, methods=["tracin"])
    whole, human, others = (rows.plan_row_attribution(run, target=t, **settings)
                            for t in ("test", "slice:source=human", "slice:source!=human"))
    every, tagged, rest = (rows.plan.target_rows(p) for p in (whole, human, others))
    assert sorted(tagged + rest) == every and not set(tagged) & set(rest) and tagged and rest
    scores = {name: _attribute(p, tmp_path / name)["score_tracin"].to_numpy()
              for name, p in (("test", whole), ("human", human), ("others", others))}
    n, k = len(every), len(tagged)
    np.testing.assert_allclose(scores["test"] * n, scores["human"] * k + scores["others"] * (n - k),
                               rtol=1e-4, atol=1e-6 * np.abs(scores["test"] * n).max())


def test_loss_only_scores_skip_the_gradients_and_match(runs, tmp_path):
    run, cache = runs["bert"]
    every = _attribute(rows.plan_row_attribution(run, cache_root=cache, projection_dim=32, checkpoints=2), tmp_path / "all")
    plan = rows.plan_row_attribution(run, cache_root=cache, checkpoints=2, methods=["loss", "label_issue"])
    target = rows.target_gradients(plan, tmp_path / "target")
    assert target["parameters"] == 0  # no model was loaded for a target nobody reads
    only = _attribute(plan, tmp_path / "only")
    assert "score_tracin" not in only
    np.testing.assert_allclose(only["score_loss"], every["score_loss"], rtol=1e-5)
    np.testing.assert_allclose(only["score_label_issue"], every["score_label_issue"], rtol=1e-5)


def test_snapshot_steps_are_evenly_spaced_and_end_at_the_last_step():
    from verifily_train.training.snapshots import snapshot_steps

    assert snapshot_steps(100, 4) == [25, 50, 75, 100]
    assert snapshot_steps(3, 8) == [1, 2, 3]
    assert snapshot_steps(10, 0) == []
