"""The tiny config as the pipeline tests use it: a run directory and overrides, and a run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

from crossmap.pipeline import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


def tiny_config(run_dir, *overrides):
    c = load_config(TINY)
    apply_overrides(c, [f"--config.run_dir={run_dir}", *overrides])
    return c


def run_numbers(run_dir: Path) -> dict:
    """Everything a run computed that a resumed or rerun run must reproduce exactly."""
    def read(stage: str, name: str) -> dict:
        return json.loads((Path(run_dir) / stage / name).read_text())

    ev = read("evaluate", "evaluation.json")
    return {"summary": {k: r["summary"] for k, r in ev["results"].items()},
            "src": read("verbalize_source", "explanations.json")["settings"],
            "tgt": read("verbalize_target", "explanations.json")["settings"],
            "fit": read("map", "summary.json")["fit"], "sae": read("sae", "summary.json")["heldout"]}
