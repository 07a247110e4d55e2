"""Attribution results as a text/markdown table and a self-contained HTML section."""

from __future__ import annotations

from typing import List

from verifily_train.attribution.analysis import LOWER_IS_BETTER, fmt_ci


def render(result: dict, markdown: bool = False) -> str:
    """The verdict lines and table (one row per removed value, on the named target) and descriptive slice effects."""
    metric = result["primary_metric"]
    target = result["target"]
    lines = [f"Attribution by retraining: {result['by']} ({result['seeds']} seed(s) per arm, "
             f"budget: {result.get('budget', {}).get('description', 'parent config')})",
             f"Question: on {target['words']}, are a value's rows worse (or better) than as many random rows?"]
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    lines.append("")
    for value, entry in result["values"].items():
        lines.append(f"  {result['by']}={value}: {entry['why']}")
    lines.append("")
    header = ["removed", "rows", "verdict", f"Δ{metric} vs random removal [95% CI]", "x spread",
              f"p ({result['correction']})", "rank p", "detectable", "Δ vs full", "Δ random vs full", "row bootstrap 95%"]
    table = []
    for value, entry in result["values"].items():
        e = entry["slices"][entry["verdict_slice"]][metric]
        table.append([f"{result['by']}={value}", str(entry["removed_rows"]), entry["verdict"],
                      f"{e['effect']:+.4f} {fmt_ci(e['ci95'])}",
                      "n/a" if e.get("in_spreads") is None else f"{e['in_spreads']:+.1f}",
                      "n/a" if entry["p_adjusted"] is None else f"{entry['p_adjusted']:.3g}",
                      "n/a" if e.get("rank_p") is None else f"{e['rank_p']:.3g} ({e['control_runs']})",
                      "n/a" if e["mde"] is None else f"±{e['mde']:.4f}",
                      f"{e['removal_effect']:+.4f}", f"{e['random_removal_effect']:+.4f}", fmt_ci(e["bootstrap_ci95"])])
    lines += _table(header, table, markdown)
    lines.append("")
    lines.append(result["method"] + ".")
    lines.append("'x spread': the effect in standard deviations of removing a random subset of the same size; "
                 "'detectable': the smallest true effect these seeds detect with 80% power; 'rank p': "
                 "one-sided and distribution-free, from where the value falls among its (N) random-subset runs, never "
                 "below 1/(N+1), unadjusted; a \"helps\" is claimed from it alone.")
    lines.append(result["conditional"][0].upper() + result["conditional"][1:] + ".")
    slice_names = sorted({s for entry in result["values"].values() for s in entry["slices"]
                          if s != entry["verdict_slice"] and metric in entry["slices"][s]})
    if slice_names:
        lines.append("")
        lines.append(f"Descriptive, not verdicts: Δ{metric} vs random removal on other test slices "
                     f"({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better). A slice that excludes the "
                     f"removed value's own rows favours any value that differs from the rest, clean or not:")
        rows = []
        for value, entry in result["values"].items():
            cells = []
            for s in slice_names:
                cell = entry["slices"].get(s, {}).get(metric)
                cells.append("-" if cell is None else f"{cell['effect']:+.4f}")
            rows.append([f"{result['by']}={value}"] + cells)
        lines += _table(["removed"] + slice_names, rows, markdown)
    lines.append("")
    lines.append("Each arm retrains from the parent's config; see docs/attribution.md for the method and its limits.")
    return "\n".join(lines)


def _table(header: List[str], rows: List[List[str]], markdown: bool) -> List[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
               ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def render_html(result: dict) -> str:
    """A self-contained HTML section: the verdict table and a chart of the effects with their seed intervals."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["primary_metric"]
    values = list(result["values"])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(values)))
    for i, value in enumerate(values):
        entry = result["values"][value]
        e = entry["slices"][entry["verdict_slice"]][metric]
        color = {"hurts": "#c0392b", "helps": "#27ae60"}.get(entry["verdict"], "#7f8c8d")
        ax.plot([e["effect"]], [i], "o", color=color)
        if e["ci95"]:
            ax.plot(e["ci95"], [i, i], "-", color=color, lw=3)
        ax.plot([e["random_removal_effect"]], [i - 0.2], "x", color="#34495e")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(values)), [f"without {result['by']}={v}" for v in values])
    ax.set_xlabel(f"Δ{metric} on {result['target']['words']} vs as many random rows removed; bar: one-draw "
                  f"95% CI, x: random removal vs full")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    chart = base64.b64encode(buf.getvalue()).decode("ascii")
    text = html.escape(render(result))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Attribution by retraining</title>"
            "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}</style></head><body>"
            f"<section id='attribution'><h2>Causal attribution by retraining: {html.escape(result['by'])}</h2>"
            f"<img alt='effects' src='data:image/png;base64,{chart}'><pre>{text}</pre></section></body></html>")
