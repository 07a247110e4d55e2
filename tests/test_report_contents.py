"""report.html as a team reads it: the hard examples' own row fields (not the rendered chat template), a base-vs-tuned
chart per slice when the base model was evaluated, the run's configuration and the base model's exact match."""

from __future__ import annotations

import json
from pathlib import Path

from verifily_train.artifacts.report import render_run_report
from verifily_train.dataset.rows import shown_fields
from verifily_train.fixtures.data import write_jsonl


def _fake_run(folder: Path, baseline: bool = True) -> Path:
    folder.mkdir()
    config = {"seed": 7, "training": {"learning_rate": 2e-5, "num_epochs": 3, "batch_size": 8},
              "lora": {"r": 16, "alpha": 32}}
    record = {"run_id": "run_x", "reproducibility_hash": "abc",
              "job": {"task": "sft", "base_model": "org/base", "config": config, "config_hash": "c0ffee",
                      "dataset_version": {"ref": "ds_x@v1", "content_hash": "sha256:" + "d" * 64}},
              "evaluation": {"note": "evaluated on the test split"},
              "hard_examples_headline": None}
    metrics = {"eval": {"exact_match": 0.84, "loss": 0.5}, "eval_ci95": {"exact_match": [0.8, 0.88]},
               "baseline": {"exact_match": 0.04, "loss": 2.5} if baseline else {}, "train": {"train_loss": 0.4}}
    values = [{"value": v, "n": 40, "metrics": {"exact_match": em, "loss": 0.5},
               "ci95": {"exact_match": [em - 0.1, em + 0.05]}, "low_confidence": False,
               **({"baseline": {"exact_match": 0.05, "loss": 2.4}} if baseline else {})}
              for v, em in (("human", 0.9), ("synthetic", 0.7))]
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "slices.json").write_text(json.dumps({"slices": {"source": {"values": values, "untagged": 0}}}))
    (folder / "trainer_log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    hard = [{"rank": 1, "tags": {"source": "human"}, "reference": "cat cat", "prediction": "dog", "loss": 3.0,
             "input": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nWrite it",
             "fields": {"instruction": "Write the animal twice.", "input": "cat"}},
            {"rank": 2, "tags": {}, "reference": "r", "prediction": "p", "loss": 2.0, "input": "old <b>run</b>"}]
    (folder / "hard_examples.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hard))
    return folder


def test_hard_examples_show_the_rows_fields_and_the_report_shows_config_and_base_exact_match(tmp_path):
    text = render_run_report(_fake_run(tmp_path / "run"))
    assert "<b>instruction</b>: Write the animal twice.<br><b>input</b>: cat" in text
    assert "im_start" not in text  # the rendered template is not shown where the row's fields are known
    assert "old &lt;b&gt;run&lt;/b&gt;" in text  # an older run without fields: its input, escaped
    assert "<th>base model</th><th>tuned</th>" in text
    assert "<tr><td>exact_match</td><td>0.0400</td><td>0.8400</td>" in text
    assert "<h2>Configuration</h2>" in text and "sha256:" + "d" * 64 in text
    assert "<td>training.learning_rate</td><td>2e-05</td>" in text and "<td>lora.r</td><td>16</td>" in text
    assert 'alt="source: base vs tuned"' in text


def test_no_base_vs_tuned_chart_without_baseline_metrics(tmp_path):
    text = render_run_report(_fake_run(tmp_path / "run", baseline=False))
    assert "base vs tuned" not in text and "<tr><td>exact_match</td><td>-</td><td>0.8400</td>" in text


def test_shown_fields_are_the_rows_own_for_every_format():
    conversation = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                                 {"role": "assistant", "content": "a"}, {"role": "user", "content": "last"},
                                 {"role": "assistant", "content": "b"}]}
    assert shown_fields(conversation) == {"user": "last"}
    assert shown_fields({"instruction": "i", "input": " ", "output": "o"}) == {"instruction": "i"}
    assert shown_fields({"prompt": "p", "completion": "c"}) == {"prompt": "p"}
    assert shown_fields({"text": "x" * 500})["text"].endswith("...")


def test_the_hard_examples_stage_attaches_fields_by_row_hash(tmp_path):
    from verifily_train.dataset.manifest import dataset_from_paths
    from verifily_train.model.tokenize import row_hash
    from verifily_train.pipeline.hard_examples import attach_fields

    rows = [{"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
            {"prompt": "The sky is", "completion": " blue"}]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    dv = dataset_from_paths("sft", str(write_jsonl(tmp_path / "train.jsonl", rows)), None, str(path))
    examples = [{"row_hash": row_hash(rows[1])}, {"row_hash": row_hash(rows[0])}, {"row_hash": "gone"}]
    attach_fields(examples, dv, "test")
    assert examples[0]["fields"] == {"prompt": "The sky is"}
    assert examples[1]["fields"] == {"instruction": "Give the opposite.", "input": "hot"}
    assert "fields" not in examples[2]


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


def _screenshot(html_text: str, folder: Path, name: str):
    """``html_text`` as a page, screenshotted by headless Chromium; its pixels (RGB floats)."""
    import subprocess

    import matplotlib.image

    page = folder / f"{name}.html"
    page.write_text(html_text, encoding="utf-8")
    out = folder / f"{name}.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={folder / ('chrome-' + name)}", f"--screenshot={out}",
                    "--window-size=1000,700", "--virtual-time-budget=5000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return matplotlib.image.imread(out)[..., :3]


def _share_near(pixels, rgb_hex: str, tol: float = 0.06) -> float:
    import numpy as np

    rgb = np.array([int(rgb_hex[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels - rgb).max(axis=-1) < tol).mean())


@__import__("pytest").mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_base_vs_tuned_chart_and_hard_examples_render_in_headless_chromium(tmp_path):
    """The two sections a team reads first, as Chromium draws them from the real report: the base-vs-tuned chart
    shows both bars (the base model's grey and the tuned model's blue, each a visible share of the picture), and
    the hard-examples table draws the row's own fields as text (dark pixels), not a blank or broken section."""
    import re

    text = render_run_report(_fake_run(tmp_path / "run"))
    [chart] = re.findall(r'<img [^>]*alt="source: base vs tuned"[^>]*>', text)
    pixels = _screenshot(f"<html><body style='margin:0;background:#fff'>{chart}</body></html>", tmp_path, "chart")
    assert _share_near(pixels, "#9aa5b1") > 0.001, "no base-model bars drawn"  # short: the base scores 0.05
    assert _share_near(pixels, "#1f5fbf") > 0.01, "no tuned-model bars drawn"
    start = text.index("<h2>Hard examples</h2>")
    section = text[start:text.index("</table>", start) + len("</table>")]
    assert "<b>instruction</b>: Write the animal twice." in section and "im_start" not in section
    pixels = _screenshot(f"<html><body style='margin:8px;background:#fff'>{section}</body></html>", tmp_path, "hard")
    dark = float((pixels.max(axis=-1) < 0.4).mean())
    assert dark > 0.003, f"the hard-examples table drew no text ({dark:.3%} dark pixels)"
    # and the whole report, as a page, is not blank
    whole = _screenshot(text, tmp_path, "report")
    assert float((whole < 0.9).any(axis=-1).mean()) > 0.02
