"""report.html: one self-contained page (no network: styles, script and figures inlined) for browsing a run's
features: both verbalizers' explanations side by side, the embedding and round-trip scores, the top contexts
with the activating token highlighted, every column sortable.

The page opens sorted by the embedding lift, best first; `report.html#sort=KEY` (or `#sort=KEY-asc`) opens it
sorted by another column (KEY is a column's `data-key`: id, lift, matched, round_trip_cross, ...).  The script
marks what it did on <body> (data-sorted-by, data-images-loaded), which the tests read back from headless
Chromium.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crossmap.evaluate import ROUND_TRIPS, summary_line

from .markdown import _model_side, _samples, cross_model_table, feature_rows, score_text

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.headline { font-weight: 600; background: #f4f6fa; padding: .6em .8em; border-left: 4px solid #3d6bd6; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #ddd; padding: .35em .5em; vertical-align: top; text-align: left; }
th { background: #f0f0f0; position: sticky; top: 0; }
th.sortable { cursor: pointer; user-select: none; width: 1%; min-width: 4.5em; }
th.sortable::after { content: " \\2195"; color: #999; }
th.sorted-desc::after { content: " \\2193"; color: #222; } th.sorted-asc::after { content: " \\2191"; color: #222; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; width: 1%; }
td.text { min-width: 16em; } td.ctx { min-width: 24em; }
td.pos { color: #16702b; } td.neg { color: #b3261e; }
.explanation { white-space: pre-wrap; }
ol.contexts { margin: 0; padding-left: 1.4em; font-family: ui-monospace, monospace; font-size: 12px; }
ol.contexts li { white-space: pre-wrap; word-break: break-word; }
mark { background: #ffd54d; padding: 0 1px; border-radius: 2px; }
.act { color: #777; font-size: 11px; margin-right: .4em; }
details { margin-top: .3em; color: #555; } img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; }
"""

SCRIPT = """
(function () {
  const table = document.getElementById("features");
  function sortBy(key, ascending) {
    if (!table) return;
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const value = r => { const v = r.dataset[key]; const x = parseFloat(v); return isNaN(x) ? -Infinity : x; };
    rows.sort((a, b) => ascending ? value(a) - value(b) : value(b) - value(a));
    rows.forEach(r => body.appendChild(r));
    table.querySelectorAll("th.sortable").forEach(th => {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.dataset.key === key) th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
    });
    document.body.dataset.sortedBy = key + (ascending ? "-asc" : "");
  }
  if (table) {
    table.querySelectorAll("th.sortable").forEach(th => th.addEventListener("click", () => {
      const again = document.body.dataset.sortedBy === th.dataset.key;
      sortBy(th.dataset.key, again);
    }));
    const wanted = /sort=([A-Za-z0-9_]+?)(-asc)?$/.exec(decodeURIComponent(location.hash));
    sortBy(wanted ? wanted[1] : "lift", wanted ? !!wanted[2] : false);
  }
  window.addEventListener("load", () => {
    const images = Array.from(document.images);
    document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length + "/" +
      images.length;
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num_cell(value: Any, signed: bool = False) -> str:
    sign = "" if not signed or not isinstance(value, (int, float)) else (" pos" if value > 0 else " neg")
    return f'<td class="num{sign}">{score_text(value, signed)}</td>'


def _data_attr(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _explanation(samples: Any) -> str:
    texts = [str(s) for s in samples] if isinstance(samples, (list, tuple)) else [str(samples or "")]
    return "<br>".join(f'<div class="explanation">{_e(t)}</div>' for t in texts)


def _contexts(contexts: Sequence[Mapping[str, Any]]) -> str:
    items = []
    for c in contexts:
        act = f'<span class="act">{c["act"]:.2f}</span>' if isinstance(c.get("act"), (int, float)) else ""
        if "token" in c:
            body = (_e(c["left"]).replace("\n", "\u21b5") + "<mark>" + _e(c["token"]).replace("\n", "\u21b5")
                    + "</mark>" + _e(c["right"]).replace("\n", "\u21b5"))
        else:
            body = _e(c.get("text"))
        items.append(f"<li>{act}{body}</li>")
    return '<ol class="contexts">' + "".join(items) + "</ol>" if items else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _feature_table(data: Mapping[str, Any]) -> str:
    features = feature_rows(data)
    if not features:
        return '<p class="note">No features in this run.</p>'
    trips = [name for name in ROUND_TRIPS if any(name in (f.get("round_trip") or {}) for f in features)]
    primary = data.get("primary_setting")
    columns = [("id", "feature", "SAE feature index"),
               ("lift", "lift", "embedding lift: matched similarity minus control similarity"),
               ("matched", "matched", "sentence-embedding cosine of the two explanations"),
               ("control_mean", "control", "mean cosine of the source explanation with the controls' explanations")]
    columns += [(f"round_trip_{name}", f"{name.replace('_', ' ')} cos", f"round trip {ROUND_TRIPS[name]}: cosine")
                for name in trips]
    head = "".join(f'<th class="sortable" data-key="{key}" title="{_e(title)}">{_e(label)}</th>'
                   for key, label, title in columns)
    head += "<th>source explanation</th><th>foreign explanation (target verbalizer)</th><th>top contexts</th>"
    rows = []
    for f in features:
        trip = f.get("round_trip") or {}
        values = {"id": f.get("id"), "lift": f.get("lift"), "matched": f.get("matched"),
                  "control_mean": f.get("control_mean"), **{f"round_trip_{n}": trip.get(n) for n in trips}}
        attrs = " ".join(f'data-{key}="{_data_attr(v)}"' for key, v in values.items())  # dataset[key] in the script
        cells = f'<td class="num">{_e(f.get("id"))}</td>' + _num_cell(f.get("lift"), signed=True)
        cells += _num_cell(f.get("matched")) + _num_cell(f.get("control_mean"))
        cells += "".join(_num_cell(trip.get(n)) for n in trips)
        other = ""
        for key, setting in (f.get("settings") or {}).items():
            if key == primary:
                continue
            scores = ", ".join([f"embedding lift {score_text(setting.get('lift'), True)}"]
                               + [f"{n.replace('_', ' ')} cos {score_text(v)}"
                                  for n, v in (setting.get("round_trip") or {}).items()])
            other += (f"<details><summary>washout {_e(key)}: {_e(scores)}</summary>"
                      f"<b>source</b>{_explanation(setting.get('source_explanation'))}"
                      f"<b>foreign</b>{_explanation(setting.get('target_explanation'))}</details>")
        cells += (f'<td class="text">{_explanation(_samples(f, "source_explanation"))}</td>'
                  f'<td class="text">{_explanation(_samples(f, "target_explanation"))}{other}</td>'
                  f'<td class="ctx">{_contexts(f.get("contexts") or [])}</td>')
        rows.append(f'<tr class="feature" {attrs}>{cells}</tr>')
    return f'<table id="features"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _inline_image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(data: Mapping[str, Any], figures: Mapping[str, str], run_dir: str | Path,
                notes: Sequence[str] = ()) -> str:
    """The page's text; `figures` maps names to PNG paths relative to `run_dir`, inlined as data URIs."""
    run_dir = Path(run_dir)
    evaluation = data.get("evaluation") or {}
    source, target = _model_side(data, "source"), _model_side(data, "target")
    title = "crossmap report" + (f": {source} \u2192 {target}" if source and target else "")
    headline = summary_line(evaluation) if evaluation.get("summary") else "no explanation evaluation in this run"
    parts = [f"<h1>{_e(title)}</h1>", f'<p class="headline" id="headline">{_e(headline)}</p>']
    parts += [f'<p class="note">note: {_e(n)}</p>' for n in notes]
    header, rows = cross_model_table(data)
    if rows:
        verbalizers = data.get("verbalizers") or {}
        parts += ["<h2>Cross-model result</h2>",
                  '<p class="note">Each cell: mean lift over the features [95% bootstrap interval], permutation '
                  "p-value.</p>"]
        parts += [f'<p class="note">{_e(side)} verbalizer: {_e(label)}</p>' for side, label in verbalizers.items()]
        parts.append(_table(header, rows, "cross-model"))
    parts += ["<h2>Features</h2>",
              '<p class="note">Click a column heading to sort (again to reverse). Explanations are those of the '
              f"configured washout setting ({_e(data.get('primary_setting'))}); the other setting's are under each "
              "foreign explanation. In the contexts the activating token is highlighted, with the SAE activation "
              "before each.</p>", _feature_table(data)]
    controls = data.get("controls") or []
    if controls:
        items = "".join(f"<li>{_explanation(_samples(c, 'explanation') if isinstance(c, Mapping) else c)}</li>"
                        for c in controls)
        parts += [f"<h2>Control directions ({len(controls)})</h2>",
                  f'<details><summary>the target verbalizer\'s explanations of the mapped random directions'
                  f'</summary><ol id="controls">{items}</ol></details>']
    images = [(name, run_dir / rel) for name, rel in figures.items() if (run_dir / rel).is_file()]
    if images:
        parts.append("<h2>Figures</h2>")
        parts += [f'<figure><img alt="{_e(name)}" src="{_inline_image(path)}"><figcaption>{_e(name)}'
                  "</figcaption></figure>" for name, path in images]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
