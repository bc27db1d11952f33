"""Two or more finished runs side by side (`crossmap compare`): their headline tables in one, and, when they
explained the same features (configs/demo.py and configs/demo_self.py do), each feature's explanations and
scores from every run in one row.  Reads only each run's report/report.json."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .markdown import _samples, _table, cross_model_table, md_escape, score_text

MAX_CHARS = 240


def read_report(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(run name, report.json) of a run directory, its report/ directory or the file itself."""
    path = Path(path)
    for candidate in (path / "report" / "report.json", path / "report.json", path):
        if candidate.is_file():
            data = json.loads(candidate.read_text(encoding="utf-8"))
            name = (data.get("config") or {}).get("name") or candidate.parent.parent.name
            return str(name), data
    raise FileNotFoundError(f"{path}: no report/report.json (has the run's report stage finished?)")


def compare_markdown(paths: Sequence[str | os.PathLike]) -> str:
    """The comparison's markdown text (raises if fewer than two runs or a report is missing)."""
    if len(paths) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(paths)}")
    runs = [read_report(p) for p in paths]
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):
        names = [f"{name} ({Path(p)})" for name, p in zip(names, paths, strict=True)]
    lines = ["# crossmap runs side by side", "", *[f"- {md_escape(n)}: {md_escape(Path(p))}"
                                                  for n, p in zip(names, paths, strict=True)], ""]
    tables = []  # per run: (its settings, {measure: cells})
    for _, data in runs:
        run_header, rows = cross_model_table(data)
        tables.append((run_header[2:], {row[0]: row[2:] for row in rows}))
    measures = list(dict.fromkeys(m for _, cells in tables for m in cells))
    header = ["measure"] + [f"{name}: {s}" for name, (settings, _) in zip(names, tables, strict=True)
                            for s in settings]
    merged = {m: [c for settings, cells in tables for c in cells.get(m, ["not run"] * len(settings))]
              for m in measures}
    lines += ["## Cross-model result", "", "Each cell: mean lift [95% bootstrap interval], permutation p-value.", ""]
    lines += _table(header, [[md_escape(m)] + [md_escape(c) for c in cells] for m, cells in merged.items()]) + [""]
    for name, (_, data) in zip(names, runs, strict=True):
        for side, label in (data.get("verbalizers") or {}).items():
            lines.append(f"- {md_escape(name)}, {side} verbalizer: {md_escape(label)}")
    lines.append("")

    ids = [[f.get("id") for f in data.get("features") or []] for _, data in runs]
    if any(i != ids[0] for i in ids[1:]) or not ids[0]:
        lines += ["The runs explained different features, so there is no per-feature table.", ""]
        return "\n".join(lines)
    header = ["feature"]
    for name in names:
        header += [f"{name}: source explanation", f"{name}: foreign explanation", f"{name}: lift",
                   f"{name}: round trip cross"]
    rows = []
    for i, fid in enumerate(ids[0]):
        row = [md_escape(fid)]
        for _, data in runs:
            f = data["features"][i]
            row += [md_escape(" / ".join(_samples(f, "source_explanation")), MAX_CHARS),
                    md_escape(" / ".join(_samples(f, "target_explanation")), MAX_CHARS),
                    score_text(f.get("lift"), signed=True), score_text((f.get("round_trip") or {}).get("cross"))]
        rows.append(row)
    lines += ["## Features", "", "The configured washout setting of each run.", ""] + _table(header, rows) + [""]
    return "\n".join(lines)


def write_comparison(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(compare_markdown(paths), encoding="utf-8")
    return out
