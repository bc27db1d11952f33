"""Write a run's report: report.md (human), report.html (the same, to browse), report.json (machine) and PNG
figures.

    markdown.py  report.md's text, the headline table and the figures
    html.py      report.html: one self-contained page, features sortable, contexts highlighted

`write_report(run_dir, data)` takes the dict the pipeline assembles.  Every section is optional; what is missing
is left out (a figure whose data is absent is not drawn, and a figure that fails to draw is reported in the
markdown rather than losing the whole report at the end of a long run).  Keys read:

    config       dict                         run configuration (rendered as JSON)
    map          dict   r2, r2_per_dim (summary dict or list), cosine, lambda, n_pairs, source/target model ids and
                        layers (source_model/source_layer/... or source: {model, layer}), cv: {lambdas: [L],
                        cv_error: [L] or [L, folds]  (or cv_r2: same shapes), best_lambda?}
    sae          dict   fve, l0, dead_fraction, n_features, ..., top_contexts {feature_id: [context strings]}
    features     list   {id, source_explanation(s), target_explanation(s), matched, control_mean, lift,
                        contexts?: [{act, text, left, token, right}], round_trip?: {name: cos},
                        settings?: {washout key: {source_explanation, target_explanation, lift, round_trip}}}
    controls     list   {id?, explanation(s)}
    evaluation   dict   an `evaluate.evaluate_explanations` result
    context_overlap     an `evaluate.context_overlap` result, or a dict of them keyed by name
    washout      dict   e.g. {"on": evaluation-or-summary, "off": ...} or {"lift_on": x, "lift_off": y}
    round_trip   dict   {source_self|target_self|cross: an `evaluate.evaluate_round_trip` result}, configured washout
    round_trip_by_setting  {washout key: the same}; with `washout` keyed alike, the headline table
    primary_setting        the washout key of the configured setting
    verbalizers  dict   side -> what explained it (shown above the headline table)
    timings      dict   stage -> seconds (nesting allowed)

Figures go to run_dir/figures/ and are embedded in report.md by relative path.  report.json is `data` made
JSON-clean (numpy -> lists, NaN/inf -> null, paths -> strings) plus a "report_meta" entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crossmap.evaluate import summary_line

from .html import render_html
from .markdown import _plain, cross_model_table, draw_figures, lift_cell, md_escape, render_markdown

__all__ = ["write_report", "render_markdown", "render_html", "cross_model_table", "lift_cell", "md_escape"]

def write_report(run_dir: str | Path, data: Mapping[str, Any]) -> Path:
    """Write run_dir/report.md, report.html, report.json and figures/*.png; returns the report.md path."""
    if not isinstance(data, Mapping):
        raise TypeError(f"write_report: data must be a dict, got {type(data).__name__}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figures, notes = draw_figures(data, run_dir)
    markdown = render_markdown(data, figures, notes)
    md_path = run_dir / "report.md"
    md_path.write_text(markdown, encoding="utf-8")
    (run_dir / "report.html").write_text(render_html(data, figures, run_dir, notes), encoding="utf-8")
    evaluation = data.get("evaluation") or {}
    payload = dict(_plain(data))
    payload["report_meta"] = {
        "summary_line": summary_line(evaluation) if evaluation.get("summary") else None,
        "figures": figures,
        "notes": list(notes),
    }
    (run_dir / "report.json").write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    return md_path
