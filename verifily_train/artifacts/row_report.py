"""The HTML section of a row attribution (``report.html`` in its folder): the most harmful and most helpful rows
with their text, the per-tag-value summary with bootstrap intervals, the cost, and the check by retraining."""

from __future__ import annotations

import html
from typing import List

from verifily_train.artifacts.report import html_page, html_table


def _num(x) -> str:
    return "-" if x is None else (f"{x:+.4g}" if isinstance(x, float) else str(x))


def _ci(ci) -> str:
    return f"[{ci[0]:+.4g}, {ci[1]:+.4g}]" if ci else ""


def _tags(tags: dict) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(tags.items()))


def _rows_table(rows: List[dict], methods: List[str]) -> str:
    header = ["rank", "score", "row", "tags", "text", "reference"] + [f"rank {m}" for m in methods]
    body = [[r["rank"], _num(r["score"]), f"{r['example_id']} ({r['file'] or '?'}:{r['line']})", _tags(r["tags"]),
             r["text"], r["reference"]] + [r["ranks"].get(m, "") for m in methods] for r in rows]
    return html_table(header, body)


def render_rows_section(result: dict) -> str:
    """``<section id="row-attribution">`` for ``attribution.json`` of a ``--rows`` call."""
    method = result["default_method"]
    others = [m for m in result["methods"] if m != method]
    cost = result["cost"]
    parts = [f"<section id='row-attribution'><h2>Row-level attribution: {html.escape(result['target'])} loss</h2>",
             f"<p>Run <code>{html.escape(result['parent_run'])}</code>; {result['train_rows']} train rows scored by "
             f"<b>{html.escape(method)}</b> (default; also {html.escape(', '.join(others) or 'none')}) over "
             f"{result['checkpoints']} adapter snapshot(s), projection {result['projection_dim'] or 'none'}, "
             f"{result['shards']} shard(s). {html.escape(result['orientation'])}: "
             f"<code>score_{html.escape(method)}</code> is the {html.escape(result.get('meaning', ''))}.</p>"]
    if cost.get("ratio") is not None:
        parts.append(f"<p>Cost: {cost['seconds']:.1f} s, {cost['ratio']:.2f} x the run's own train stage "
                     f"({cost['train_stage_seconds']:.1f} s, {html.escape(cost['train_stage_source'])}).</p>")
    for note in result.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h3>Most harmful rows</h3><p class='note'>Highest score; their rank by every other method "
                 "beside it.</p>" + _rows_table(result["most_harmful"], others))
    parts.append("<h3>Most helpful rows</h3><p class='note'>Lowest score.</p>" + _rows_table(result["most_helpful"], others))
    for tag, values in result["by_tag"].items():
        body = [[html.escape(str(v["value"])), v["rows"], f"{_num(v['sum'])} {_ci(v.get('sum_ci95'))}",
                 f"{_num(v['mean'])} {_ci(v.get('mean_ci95'))}", f"{_num(v['excess'])} {_ci(v.get('excess_ci95'))}"]
                for v in values]
        parts.append(f"<h3>By {html.escape(tag)}</h3><p class='note'>Excess: the sum of (score - the mean score of "
                     "all train rows) over the value's rows; above zero, the value's rows are worse than average "
                     "rows (the direction of a tag-level 'hurts').</p>"
                     + html_table(["value", "rows", f"sum of {method} [95% bootstrap]", "mean [95% bootstrap]",
                                   "excess [95% bootstrap]"], body))
    verification = result.get("verify")
    if verification:
        parts.append("<h3>Check by retraining</h3>"
                     f"<p><b>{html.escape(verification['summary'])}</b></p>"
                     + html_table(["arm minus control", "effect", "one-draw 95% CI", "per seed", f"p ({verification['correction']})"],
                              [[f"without top {verification['k']} - without {verification['k']} random",
                                _num(verification["effect"]), _ci(verification["ci95"]),
                                ", ".join(f"{d:+.4f}" for d in verification["per_seed"]),
                                _num(verification["p_adjusted"])]])
                     + f"<p class='note'>{html.escape(verification['method'])}</p>")
    parts.append("<p class='note'>Scores estimate each row's effect from gradients; <code>--verify K</code> "
                 "checks the top K by retraining. <code>verifily dataset derive RUN --drop-top K</code> stores the "
                 "data without them.</p></section>")
    return "".join(parts)


def render_rows_report(result: dict) -> str:
    return html_page(f"Row attribution of {result['parent_run']}", render_rows_section(result))
