"""Self-contained HTML reports (no network; plots are inlined PNGs made with matplotlib)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import List, Optional

from verifily_train.artifacts.compare import SEED_NOTE, legend, model_level_title
from verifily_train.artifacts.groups import group_legend, side_line
from verifily_train.config.metricspec import lead_metric
from verifily_train.fsio import atomic_write_text, write_output_file
from verifily_train.hashing import content_hash

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f3f7}
.low{color:#a15c00}.note{color:#555;font-size:13px}img{max-width:100%;border:1px solid #eee}
.sig{font-weight:bold;color:#0b6b2e}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def html_table(header: List[str], rows: List[List[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def loss_curve(log_rows: List[dict]) -> Optional[str]:
    train = [(r["step"], r["loss"]) for r in log_rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_rows if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f5fbf")
    if evals:
        ax.plot(*zip(*evals), "o-", label="val loss", color="#c2571a")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def slice_chart(key: str, block: dict, metric: str) -> Optional[str]:
    values = [e for e in block["values"] if metric in e["metrics"]]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(values)))
    names = [f"{e['value']} (n={e['n']})" for e in values]
    points = [e["metrics"][metric] for e in values]
    lows = [p - e.get("ci95", {}).get(metric, [p, p])[0] for p, e in zip(points, values)]
    highs = [e.get("ci95", {}).get(metric, [p, p])[1] - p for p, e in zip(points, values)]
    colors = ["#c98a2b" if e["low_confidence"] else "#1f5fbf" for e in values]
    ax.barh(names, points, xerr=[lows, highs], color=colors, capsize=4)
    ax.set_xlabel(f"{metric} (95% bootstrap interval; amber: n < 30)")
    ax.set_title(f"{metric} by {key}")
    ax.invert_yaxis()
    return _png(fig)


def base_vs_tuned_chart(key: str, block: dict, metric: str) -> Optional[str]:
    """Per slice value: the base model's figure beside the tuned model's (with its 95% interval)."""
    values = [e for e in block["values"] if metric in e["metrics"] and metric in (e.get("baseline") or {})]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.7 + 0.6 * len(values)))
    names = [f"{e['value']} (n={e['n']})" for e in values]
    y = list(range(len(values)))
    tuned = [e["metrics"][metric] for e in values]
    base = [e["baseline"][metric] for e in values]
    lows = [p - e.get("ci95", {}).get(metric, [p, p])[0] for p, e in zip(tuned, values)]
    highs = [e.get("ci95", {}).get(metric, [p, p])[1] - p for p, e in zip(tuned, values)]
    ax.barh([i - 0.2 for i in y], base, height=0.38, color="#9aa5b1", label="base model")
    ax.barh([i + 0.2 for i in y], tuned, height=0.38, xerr=[lows, highs], color="#1f5fbf", capsize=3,
            label="tuned (95% bootstrap interval)")
    ax.set_yticks(y, names)
    ax.set_xlabel(metric)
    ax.set_title(f"base vs tuned: {metric} by {key}")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _base_vs_tuned_metric(block: dict, lead: Optional[str]) -> Optional[str]:
    """The metric to draw base vs tuned with: exact match when both have it (what a team asks first), else ``lead``."""
    for metric in ("exact_match", "accuracy", lead):
        if metric and any(metric in e["metrics"] and metric in (e.get("baseline") or {}) for e in block["values"]):
            return metric
    return None


def _config_rows(record: dict) -> List[List[str]]:
    """The hyper-parameters a reader asks for, and the data's identity."""
    job = record.get("job") or {}
    config, dataset = job.get("config") or {}, job.get("dataset_version") or {}
    training, lora = config.get("training") or {}, config.get("lora") or {}
    components = (record.get("reproducibility") or {}).get("components") or {}
    rows = [["base model", str(job.get("base_model"))], ["dataset", str(dataset.get("ref"))],
            ["dataset content hash", str(dataset.get("content_hash") or components.get("data_hash") or "-")],
            ["seed", str(config.get("seed", "-"))]]
    rows += [[f"training.{k}", str(training[k])] for k in ("num_epochs", "max_steps", "learning_rate", "lr_scheduler",
                                                             "batch_size", "gradient_accumulation_steps",
                                                             "max_seq_length", "weight_decay") if k in training]
    rows += [[f"lora.{k}", str(lora[k])] for k in ("r", "alpha", "dropout", "target_modules") if k in lora]
    rows += [["config hash", str(job.get("config_hash", "-"))]]
    return rows


def _row_cell(h: dict) -> str:
    """A hard example's own fields (instruction / input, the last user turn, the prompt), else its input text."""
    fields = h.get("fields")
    if not fields:
        return html.escape(str(h.get("input", ""))[:300])
    return "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(str(v)[:300])}" for k, v in fields.items())


def confusion_heatmap(report: dict) -> Optional[str]:
    if not report:
        return None
    plt = _pyplot()
    matrix, labels = report["confusion_matrix"], report["labels"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.5 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=9)
    return _png(fig)


class ChartMemo:
    """Rendered charts by the SHA-256 of their data and matplotlib's version, in ``<cache>/charts``: an
    identical re-run's report reuses them instead of importing matplotlib (~1 s). Each file records the
    hash of its image, so a damaged one is drawn again."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder

    def __call__(self, draw, *data) -> Optional[str]:
        if self.folder is None:
            return draw(*data)
        from importlib import metadata


        key = content_hash("chart/1", draw.__name__, metadata.version("matplotlib"), list(data))
        path = self.folder / f"{key}.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if content_hash(saved["uri"]) == saved["sha256"]:
                return saved["uri"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        uri = draw(*data)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"sha256": content_hash(uri), "uri": uri}))
        except OSError:
            pass  # an optimisation: the report already has its chart
        return uri


def _img(src: Optional[str], alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="{src}"></p>' if src else ""


def render_run_report(run_dir: Path, chart_cache: Optional[Path] = None) -> str:
    """report.html of one run, from the files already in its folder (charts reused from ``chart_cache``)."""
    chart = ChartMemo(chart_cache)
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    slices = json.loads((run_dir / "slices.json").read_text(encoding="utf-8"))
    hard = [json.loads(l) for l in (run_dir / "hard_examples.jsonl").read_text(encoding="utf-8").splitlines() if l]
    log = [json.loads(l) for l in (run_dir / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines() if l]
    ci = metrics.get("eval_ci95", {})
    parts = [f"<h1>Run {html.escape(record['run_id'])}</h1>",
             f"<p>{html.escape(record['job']['task'])} of <code>{html.escape(str(record['job']['base_model']))}</code> on "
             f"<code>{html.escape(str(record['job']['dataset_version'].get('ref')))}</code>; "
             f"{html.escape(record['evaluation']['note'])}. Reproducibility hash <code>{record['reproducibility_hash']}</code>.</p>"]
    base = {k: v for k, v in (metrics.get("baseline") or {}).items() if isinstance(v, (int, float))}
    rows = [[k, _fmt(base.get(k)) if k in base else "-", _fmt(v), f"[{_fmt(ci[k][0])}, {_fmt(ci[k][1])}]" if k in ci else ""]
            for k, v in metrics.get("eval", {}).items() if isinstance(v, (int, float))]
    rows += [[f"train {k}", "", _fmt(v), ""] for k, v in metrics.get("train", {}).items() if v is not None]
    parts.append("<h2>Metrics</h2>" + html_table(["metric", "base model", "tuned", "95% CI (tuned)"], rows))
    parts.append("<h2>Configuration</h2>" + html_table(["setting", "value"], _config_rows(record)))
    parts.append("<h2>Training loss</h2>" + _img(chart(loss_curve, log), "loss curve"))
    lead = lead_metric(metrics.get("eval", {}))
    for key, block in slices.get("slices", {}).items():
        header = ["value", "n"] + [m for m in block["values"][0]["metrics"] if m not in ("examples", "tokens")] \
            if block["values"] else ["value", "n"]
        table_rows = []
        for e in block["values"]:
            cells = [html.escape(str(e["value"])) + (' <span class="low">(low n)</span>' if e["low_confidence"] else ""),
                     str(e["n"])]
            for m in header[2:]:
                bounds = e.get("ci95", {}).get(m)
                cells.append(_fmt(e["metrics"].get(m)) + (f" [{_fmt(bounds[0])}, {_fmt(bounds[1])}]" if bounds else ""))
            table_rows.append(cells)
        compared = _base_vs_tuned_metric(block, lead)
        parts.append(f"<h2>Slices by {html.escape(key)}</h2>" + _img(chart(slice_chart, key, block, lead), f"{key} slices")
                     + (_img(chart(base_vs_tuned_chart, key, block, compared), f"{key}: base vs tuned")
                        if compared else "")
                     + html_table(header, table_rows, raw=True))
    if metrics.get("classification_report"):
        report = metrics["classification_report"]
        parts.append("<h2>Confusion matrix</h2>" + _img(chart(confusion_heatmap, report), "confusion matrix"))
        parts.append(html_table(["class", "precision", "recall", "f1", "support"],
                            [[c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"]]
                             for c, v in report["per_class"].items()]))
    headline = record.get("hard_examples_headline")
    parts.append("<h2>Hard examples</h2>" + (f"<p>{html.escape(headline)}</p>" if headline else ""))
    esc = html.escape
    parts.append(html_table(["#", "tags", "row", "reference", "prediction", "score"],
                        [[h["rank"], esc(", ".join(f"{k}:{v}" for k, v in h["tags"].items())), _row_cell(h),
                          esc(str(h["reference"])[:200]), esc(str(h.get("prediction") or "")[:200]),
                          _fmt(h.get("token_f1", h.get("loss", h.get("prob_true"))))] for h in hard], raw=True))
    parts.append('<p class="note">Correlation, not causation: slices describe the model on those test rows. '
                 "For causal attribution: <code>verifily attribute RUN --by &lt;tag&gt;</code>.</p>")
    return html_page(f"Verifily run {record['run_id']}", "".join(parts))


def html_page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def write_run_report(run_dir: Path, chart_cache: Optional[Path] = None) -> Path:
    target = run_dir / "report.html"
    atomic_write_text(target, render_run_report(run_dir, chart_cache))
    return target


def write_compare_report(result: dict, out: str) -> Path:
    """The comparison as one self-contained HTML file, with a paired-delta chart per slice key."""
    if result.get("kind") == "groups":
        return write_output_file(out, render_group_report(result).encode("utf-8"), "--html")
    parts = [f"<h1>{html.escape(result['run_b'])} vs {html.escape(result['run_a'])}</h1>",
             f"<p>{html.escape(model_level_title())}</p>",
             f"<p>A: {html.escape(str(result['dataset_a']))}; B: {html.escape(str(result['dataset_b']))}; "
             f"{result['paired']['shared_examples']} shared test rows.</p>"]
    deltas = result["paired"].get("deltas", {})
    rows = []
    for name, entry in result["overall"].items():
        d = deltas.get(name, {})
        ci = d.get("ci95")
        cell = _fmt(entry["delta"]) + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
        rows.append([name, _fmt(entry["a"]), _fmt(entry["b"]),
                     f'<span class="sig">{cell} *</span>' if d.get("significant") else html.escape(cell)])
    parts.append("<h2>Overall (B - A)</h2>" + html_table(["metric", "A", "B", "B - A [95% CI]"], rows, raw=True))
    plt = _pyplot()
    for key, values in result["slices"].items():
        metric = lead_metric(m for v in values.values() for m in v["deltas"])
        if metric is None:
            continue
        names = [str(v) for v in values]
        points = [values[v]["deltas"].get(metric, {}).get("delta") or 0.0 for v in values]
        cis = [values[v]["deltas"].get(metric, {}).get("ci95") or [p, p] for v, p in zip(values, points)]
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.45 * len(names)))
        ax.barh(names, points, xerr=[[p - c[0] for p, c in zip(points, cis)], [c[1] - p for p, c in zip(points, cis)]],
                color="#1f5fbf", capsize=4)
        ax.axvline(0, color="#333", lw=0.8)
        ax.set_xlabel(f"Δ {metric} (B - A), paired 95% interval")
        ax.invert_yaxis()
        table_rows = [[str(v), e["n"], html.escape("  ".join(f"{m}={_fmt(d.get('delta'))}" for m, d in e["deltas"].items())),
                       html.escape(f"{e['flips']['wrong_to_right']} up / {e['flips']['right_to_wrong']} down") if e.get("flips") else "-"]
                      for v, e in values.items()]
        parts.append(f"<h2>By {html.escape(key)}</h2>" + _img(_png(fig), key) +
                     html_table(["value", "n", "deltas", "flips"], table_rows, raw=True))
    diff = result.get("dataset_diff", {})
    if diff.get("available"):
        parts.append("<h2>Dataset diff (A → B)</h2>" + html_table(
            ["split", "rows A", "rows B", "added", "removed", "changed"],
            [[s, d["rows_a"], d["rows_b"], d["added"], d["removed"], d["changed"]] for s, d in diff["splits"].items()]))
    if result.get("config_diff"):
        parts.append("<h2>Config diff</h2>" + html_table(["key", "A", "B"],
                                                     [[d["key"], d["a"], d["b"]] for d in result["config_diff"]]))
    notes = [c["line"] for c in result.get("comparability", [])] + [legend(result.get("fdr", {})), SEED_NOTE,
                                                                    result["caveat"]]
    parts.append("".join(f'<p class="note">{html.escape(line)}</p>' for line in notes))
    # the user's file name: a link, FIFO, device or folder there is refused, never replaced
    return write_output_file(out, html_page("Verifily comparison", "".join(parts)).encode("utf-8"), "--html")


def group_delta_chart(result: dict, metric: Optional[str] = None) -> Optional[str]:
    """One horizontal bar per cell (overall, then each slice) of B - A with its 95% interval over seeds (PNG data URL)."""
    cells = [("overall", result["overall"])] + [(f"{k}={v}", e["deltas"]) for k, vs in result["slices"].items()
                                                for v, e in vs.items()]
    metric = metric or lead_metric(result["overall"])
    if metric is None:
        return None
    names, points, lows, highs, stars = [], [], [], [], []
    for name, deltas in cells:
        d = deltas.get(metric) or {}
        if d.get("delta") is None:
            continue
        ci = d.get("ci95") or [d["delta"], d["delta"]]
        names.append(name + (" *" if d.get("significant") else ""))
        points.append(d["delta"])
        lows.append(d["delta"] - ci[0])
        highs.append(ci[1] - d["delta"])
        stars.append(bool(d.get("significant")))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.7 + 0.42 * len(names)))
    ax.barh(names, points, xerr=[lows, highs], color=["#0b6b2e" if s else "#8aa4c8" for s in stars], capsize=4)
    ax.axvline(0, color="#333", lw=0.8)
    ax.set_xlabel(f"Δ {metric} (B - A), mean over seeds, 95% interval over seeds")
    ax.invert_yaxis()
    return _png(fig)


def render_group_report(result: dict) -> str:
    """A group comparison (``artifacts/groups.py``) as a self-contained page: the question, both sides, the
    per-slice deltas with their seed intervals as a picture and as tables."""
    parts = [f"<h1>Run group comparison</h1><p><b>Question:</b> {html.escape(result['question'])}</p>",
             "".join(f"<p>{html.escape(side_line(n, result[n.lower()]))}</p>" for n in ("A", "B")),
             f"<p>design: {html.escape(result['design'])}, {result['shared_examples']} shared test rows</p>"]
    if result.get("power_note"):
        parts.append(f'<p class="note">{html.escape(result["power_note"])}</p>')
    chart = group_delta_chart(result)
    if chart:
        parts.append("<h2>B - A by slice</h2>" + _img(chart, "group deltas"))
    cells = [("overall", result["overall"])] + [(f"{k}={v} (n={e['n']})", e["deltas"]) for k, vs in result["slices"].items()
                                                for v, e in vs.items()]
    rows = []
    for name, deltas in cells:
        for metric, d in deltas.items():
            ci = d.get("ci95")
            text = _fmt(d.get("delta")) + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
            rows.append([html.escape(name), metric, _fmt(d.get("a")), _fmt(d.get("b")),
                         f'<span class="sig">{text} *</span>' if d.get("significant") else html.escape(text),
                         "-" if d.get("p_adjusted") is None else f"{d['p_adjusted']:.3f}",
                         "-" if d.get("mde") is None else f"±{d['mde']:.4f}"])
    parts.append("<h2>Cells</h2>" + html_table(["cell", "metric", "A mean", "B mean", "B - A [95% CI over seeds]",
                                                "adj. p", "detectable"], rows, raw=True))
    if result.get("config_diff"):
        parts.append("<h2>Config diff (seed aside)</h2>" + html_table(
            ["key", "A", "B"], [[d["key"], d["a"], d["b"]] for d in result["config_diff"]]))
    parts.append(f'<p class="note">{html.escape(group_legend(result))}</p>')
    return html_page("Verifily run group comparison", "".join(parts))
