"""The HTML section of a row attribution (``report.html`` in its folder): per family (suspect rows, attribution)
the top rows with their text and the per-tag-value point sums, the cost, and the check by retraining."""

from __future__ import annotations

import html
from typing import List

from verifily_train.artifacts.report import html_page, html_table


def _num(x) -> str:
    return "-" if x is None else (f"{x:+.4g}" if isinstance(x, float) else str(x))


def _ci(ci) -> str:  # the verification's interval over seeds
    return f"[{ci[0]:+.4g}, {ci[1]:+.4g}]" if ci else ""


def _tags(tags: dict) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(tags.items()))


def _rows_table(rows: List[dict], methods: List[str]) -> str:
    header = ["rank", "score", "row", "tags", "text", "reference"] + [f"rank {m}" for m in methods]
    body = [[r["rank"], _num(r["score"]), f"{r['example_id']} ({r['file'] or '?'}:{r['line']})", _tags(r["tags"]),
             r["text"], r["reference"]] + [r["ranks"].get(m, "") for m in methods] for r in rows]
    return html_table(header, body)


def _family_section(family: str, entry: dict, result: dict) -> str:
    """One family: what it answers, its default score's top rows, and per tag value its point sums."""
    method = entry["default"]
    others = [m for m in result["methods"] if m != method]
    attribution = family == "attribution"
    target = (f" on the {html.escape(str(entry['target']))} loss ({result.get('target_rows')} "
              f"{html.escape(str(entry.get('target_split')))} rows)" if entry.get("target") else " (no target)")
    parts = [f"<h3 class='family'>{html.escape(family.capitalize())}{target}: ranked by {html.escape(method)}</h3>",
             f"<p>Answers: {html.escape(entry.get('question', ''))}. <code>score_{html.escape(method)}</code>: "
             f"{html.escape(entry.get('meaning', ''))}. Methods of this family in the file: "
             f"{html.escape(', '.join(entry.get('methods', [method])))}.</p>"]
    if entry.get("label_issue"):
        parts.append(f"<p class='note'>label_issue is {html.escape(entry['label_issue'])}: cleanlab intends "
                     "out-of-fold probabilities.</p>")
    title = "Most harmful to the target" if attribution else "Most suspect rows"
    parts.append(f"<h4>{title}</h4><p class='note'>Highest score; their rank by every other method beside it."
                 "</p>" + _rows_table(entry["most_harmful"], others))
    if attribution:
        parts.append("<h4>Most helpful to the target</h4><p class='note'>Lowest score.</p>"
                     + _rows_table(entry["most_helpful"], others))
    reading = ("to first order, the direction of a tag-level 'hurts'" if attribution else
               "the value's rows are more suspect than average; this says nothing about what removing them does")
    for tag, values in entry["by_tag"].items():
        body = [[html.escape(str(v["value"])), v["rows"], _num(v["sum"]), _num(v["mean"]), _num(v["excess"])]
                for v in values]
        parts.append(f"<h4>By {html.escape(tag)}</h4><p class='note'>Excess: the sum of (score - the mean score of "
                     f"all train rows) over the value's rows; above zero: {reading}. Point values from one trained "
                     "model, without an interval: resampling its rows carries no training variance.</p>"
                     + html_table(["value", "rows", f"sum of {method}", "mean", "excess"], body))
    return "".join(parts)


def render_rows_section(result: dict) -> str:
    """``<section id="row-attribution">`` for ``attribution.json`` of a ``--rows`` call: one part per family."""
    cost = result["cost"]
    parts = ["<section id='row-attribution'><h2>Row scores: suspect rows and attribution</h2>",
             f"<p>Run <code>{html.escape(result['parent_run'])}</code>; {result['train_rows']} train rows scored by "
             f"{html.escape(', '.join(result['methods']))} over {result['checkpoints']} adapter snapshot(s), "
             f"projection {result['projection_dim'] or 'none'}, {result['shards']} shard(s). "
             f"{html.escape(result['orientation'])}.</p>"]
    if cost.get("ratio") is not None:
        parts.append(f"<p>Cost: {cost['seconds']:.1f} s, {cost['ratio']:.2f} x the run's own train stage "
                     f"({cost['train_stage_seconds']:.1f} s, {html.escape(cost['train_stage_source'])}).</p>")
    for note in result.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    families = result.get("families") or {"scores": {"default": result["default_method"],
                                                     "meaning": result.get("meaning", ""), "question": "",
                                                     **{k: result[k] for k in ("most_harmful", "most_helpful", "by_tag")}}}
    for family, entry in families.items():
        parts.append(_family_section(family, entry, result))
    verification = result.get("verify")
    if verification:
        selection = verification.get("selection") or {}
        parts.append("<h3>Check by retraining</h3>"
                     + (f"<p>{html.escape(selection['note'])}</p>" if selection else "")
                     + f"<p><b>{html.escape(verification['summary'])}</b></p>"
                     + html_table(["arm minus control", "effect", "one-draw 95% CI", "per seed", f"p ({verification['correction']})"],
                              [[f"without top {verification['k']} - without {verification['k']} random",
                                _num(verification["effect"]), _ci(verification["ci95"]),
                                ", ".join(f"{d:+.4f}" for d in verification["per_seed"]),
                                _num(verification["p_adjusted"])]])
                     + f"<p class='note'>{html.escape(verification['method'])}</p>")
    parts.append("<p class='note'>Attribution scores estimate each row's effect from gradients; suspect-row scores "
                 "estimate none; <code>--verify K</code> "
                 "checks the top K by retraining. <code>verifily dataset derive RUN --drop-top K</code> stores the "
                 "data without them.</p></section>")
    return "".join(parts)


def render_rows_report(result: dict) -> str:
    return html_page(f"Row attribution of {result['parent_run']}", render_rows_section(result))
