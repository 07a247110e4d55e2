"""What a new user tripped on (issue 39): help without arguments, a closed pipe, readable `runs show`,
`dataset show` naming the parent of a derived version, the comparison artifact's placeholders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, run_cli


def test_bare_verifily_prints_help_not_an_error(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: verifily") and "train" in result.stdout and "compare" in result.stdout


def test_top_level_help_says_attribute_can_score_rows(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    attribute = [line for line in result.stdout.splitlines() if line.strip().startswith("attribute")]
    assert result.returncode == 0 and "--rows" in result.stdout, result.stdout
    assert attribute, result.stdout


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "verifily_train.cli.main", "models", "list"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written: `verifily models list | head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_runs_show_prints_a_failed_runs_error_and_the_json_on_request(tmp_path):
    from verifily_train.artifacts.run import write_failed_run

    record = {"job": {"dataset_version": {"ref": "ds_x@v1"}}, "started_at": "2026-12-07T10:00:00Z"}
    run = write_failed_run(tmp_path / "runs", "run_20261207_100000_fa11ed", record, RuntimeError("out of memory"))
    shown = run_cli("runs", "show", str(run), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == [
        "Run run_20261207_100000_fa11ed: failed (ds_x@v1, started 2026-12-07T10:00:00Z)",
        "  error: RuntimeError: out of memory"]
    raw = run_cli("runs", "show", str(run), "--json", cwd=tmp_path)
    assert json.loads(raw.stdout)["status"] == "failed"


def test_dataset_show_names_the_version_a_derived_one_came_from(tmp_path, sft_splits):
    from verifily_train.dataset import create_version

    parent = create_version("ds_x", "v1", "sft", str(sft_splits["train"]))
    derived_from = {"ref": parent.ref, "content_hash": parent.content_hash, "rule": "without source=human"}
    create_version("ds_x", "v1-without-human", "sft", str(sft_splits["val"]), derived_from=derived_from)
    shown = json.loads(run_cli("dataset", "show", "ds_x@v1-without-human", cwd=tmp_path).stdout)
    assert shown["derived_from"] == derived_from
    assert "derived_from" not in json.loads(run_cli("dataset", "show", "ds_x@v1", cwd=tmp_path).stdout)


def test_the_comparison_artifact_keeps_placeholders_a_markdown_renderer_would_drop():
    from verifily_train.artifacts.tables import comparison_artifact, markdown_table

    spec = comparison_artifact(Path("runs/a"), Path("runs/b"), "For causal attribution: verifily attribute RUN --by <tag>.")
    assert "--by &lt;tag&gt;." in spec.content and "<tag>" not in spec.content
    assert "| &lt;\\|im_start\\|&gt;assistant |" in markdown_table([{"prediction": "<|im_start|>assistant"}])


def test_the_stages_line_says_a_baseline_that_did_not_run_was_skipped():
    from verifily_train.cli.summary import _stage_word

    stage = {"cache_hit": False, "seconds": 0.0}
    assert _stage_word("baseline", stage, {"accuracy": 0.9}) == "baseline skipped"  # classification: none
    assert _stage_word("baseline", dict(stage, seconds=0.4), {"baseline_loss": 4.7}) == "baseline ran 0.4s"


def test_the_demo_writes_nothing_in_the_working_folder_and_draws_no_bars_into_a_log(tmp_path, verifily_home,
                                                                                     prefect_api):
    """`verifily demo --tiny` from a checkout-like folder: its config and Run land under $VERIFILY_HOME, the folder
    stays empty; with stdout and stderr captured (not a terminal) no progress bar or per-log dict is written."""
    import pytest

    pytest.importorskip("transformers")
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    result = run_cli("demo", "--tiny", "training.num_epochs=1", cwd=cwd, env=cli_env({"PREFECT_API_URL": prefect_api}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    runs = list((verifily_home / "runs").glob("run_*"))
    assert len(runs) == 1 and (runs[0] / "run.json").is_file()
    assert f"run: {runs[0]}" in result.stdout
    for bar in ("%|", "it/s]", "batch/s]", "Loading weights"):
        assert bar not in result.stderr, (bar, result.stderr[-2000:])
    assert "{'loss'" not in result.stdout and "'grad_norm'" not in result.stdout


def test_progress_bars_are_drawn_on_a_terminal_only():
    """`runtime.progress` bars need stderr to be a terminal (a pseudo-terminal here); a pipe gets none, and then
    the datasets library's and tqdm's own bars are switched off for the process too."""
    import os

    probe = ("import os; from verifily_train.quiet import progress_bars, quiet_libraries; quiet_libraries(); "
             "print(progress_bars(True), progress_bars(False), os.environ.get('TQDM_DISABLE'))")
    env = {k: v for k, v in cli_env().items() if k not in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    piped = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert piped.stdout.split() == ["False", "False", "1"], piped.stderr
    leader, follower = os.openpty()
    try:
        on_tty = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=follower, text=True,
                                env=env, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert on_tty.stdout.split() == ["True", "False", "None"]


def test_rows_output_shows_the_rows_own_fields_and_answer_not_the_rendered_template(tmp_path, verifily_home):
    """`attribute --rows`: the text column of an SFT row is its instruction/input (or prompt), with its answer
    beside it, read from the Run's dataset by row hash; the tokenized rendering (chat markers, system turn) is
    what the merged table holds and what was shown before (#39)."""
    import io

    import pandas as pd

    from verifily_train.cli.rows import _print_family
    from verifily_train.fixtures.data import write_jsonl
    from verifily_train.model.tokenize import row_hash
    from verifily_train.pipeline import row_output

    rows = [{"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold",
             "tags": {"source": "human"}}]
    train = write_jsonl(tmp_path / "data" / "train.jsonl", rows + [
        {"instruction": f"Give the opposite of word {i}.", "output": f"w{i}", "tags": {"source": "human"}}
        for i in range(3)])
    run = tmp_path / "runs" / "run_x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"task: sft\nbase_model: org/model\ndata_paths:\n  train: {train}\n")
    written = [json.loads(line) for line in train.read_text().splitlines()]
    boilerplate = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>user\n"
    table = pd.DataFrame({
        "example_id": [f"train:{i + 1:04d}" for i in range(4)], "split": ["train"] * 4, "file": ["train.jsonl"] * 4,
        "line": [1, 2, 3, 4], "row_hash": [row_hash(r) for r in written],
        "tags": [json.dumps(r["tags"]) for r in written], "text": [boilerplate + r["instruction"] for r in written],
        "reference": [r["output"] for r in written], "score_loss": [4.0, 3.0, 2.0, 1.0], "rank_loss": [1, 2, 3, 4]})
    folder = tmp_path / "merged"
    folder.mkdir()
    table.to_parquet(folder / "rows.parquet", index=False)
    merged = {"dir": str(folder), "file": "rows.parquet", "default_method": "loss", "methods": ["loss"],
              "orientation": "higher score = more harmful", "families": {"suspect rows": {"methods": ["loss"],
                                                                                          "default": "loss"}}}
    result = row_output.summarize(merged, top=2, run=run)
    first = result["most_harmful"][0]
    assert first["text"] == "instruction: Give the opposite of the word. | input: hot" and first["answer"] == "cold"
    assert result["families"]["suspect rows"]["most_harmful"][1]["text"] == "Give the opposite of word 0."
    out = io.StringIO()
    _print_family(out.write, out, "suspect rows", result["families"]["suspect rows"], dict(result, target_rows=0), 2)
    printed = out.getvalue()
    assert "answer" in printed and "instruction: Give the opposite of the word. | input: hot" in printed
    assert "<|im_start|>" not in printed and "cold" in printed
    # without the Run (or a dataset that moved), the stored text stays
    assert row_output.summarize(merged, top=2)["most_harmful"][0]["text"].startswith("<|im_start|>")
