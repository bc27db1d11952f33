"""crossmap.report on synthetic run data: files written, summary first, valid PNGs, JSON round trip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from crossmap import evaluate as ev
from crossmap import report
from crossmap.jsonio import to_jsonable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_data(n: int = 6, m: int = 4, samples: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    src = rng.normal(size=(n, samples, 16))
    tgt = src + 0.8 * rng.normal(size=src.shape)
    ctrl = rng.normal(size=(m, samples, 16))
    evaluation = ev.evaluate_explanations(src, tgt, ctrl, n_permutations=200, n_bootstrap=200, seed=1)
    per = evaluation["per_feature"]
    features = [{
        "id": 100 + i,
        "source_explanations": [f"source {i} sample {s}" for s in range(samples)],
        "target_explanations": [f"target {i} sample {s}" for s in range(samples)],
        "matched": per["matched"][i], "control_mean": per["control_mean"][i], "lift": per["lift"][i],
    } for i in range(n)]
    features[0]["source_explanations"][0] = "pipes a|b and\nnewline and <|im_end|> token"
    token_acts = rng.uniform(size=(200, n))
    overlap = ev.context_overlap(token_acts, token_acts + 0.1 * rng.uniform(size=(200, n)),
                                 rng.uniform(size=(200, m)), k=10)
    lambdas = np.logspace(-2, 3, 6)
    cv_error = (np.log10(lambdas)[:, None] - 1.0) ** 2 + 1.0 + 0.1 * rng.uniform(size=(6, 3))  # [L, folds]
    return {
        "config": {"seed": 0, "source": {"model": "qwen-tiny", "layer": 3}, "dims": np.array([1, 2]),
                   "out": Path("/tmp/run")},
        "map": {"r2": 0.61, "r2_per_dim": rng.uniform(size=32), "cosine": np.float32(0.82), "lambda": 10.0,
                "n_pairs": 4096, "source_model": "qwen-tiny", "source_layer": 3, "target_model": "gemma-tiny",
                "target_layer": 5, "cv": {"lambdas": lambdas.tolist(), "cv_error": cv_error}},
        "sae": {"fve": 0.83, "l0": 31.5, "dead_fraction": 0.02, "n_features": 512,
                "top_contexts": {100 + i: [f"ctx {i}.{j} with «token» marked" for j in range(7)] for i in range(n)}},
        "features": features,
        "controls": [{"id": f"ctrl{c}", "explanations": [f"control {c}"] * samples} for c in range(m)],
        "evaluation": evaluation,
        "context_overlap": overlap,
        "washout": {"lift_on": 0.21, "lift_off": 0.05},
        "timings": {"collect": 12.5, "fit": {"stats": 1.0, "solve": np.float64(0.25)}},
    }


def assert_valid_png(path: Path) -> None:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, path
    assert len(raw) > 1000, path
    image = matplotlib.image.imread(path)  # decodes the whole file: a truncated PNG fails here
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_full_report_files_summary_and_figures(tmp_path):
    data = synthetic_data()
    md_path = report.write_report(tmp_path / "run", data)
    assert md_path == tmp_path / "run" / "report.md"
    text = md_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# crossmap report: qwen-tiny (layer 3) → gemma-tiny (layer 5)"
    # the first content after the title is the summary line
    first_content = next(line for line in lines[1:] if line.strip())
    assert first_content == f"**{ev.summary_line(data['evaluation'])}**"
    assert first_content.startswith("**mean lift ")

    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(figures) == ["figures/lift_distribution.png", "figures/ridge_cv.png",
                               "figures/similarity_heatmap.png"]
    for rel in figures:
        assert not Path(rel).is_absolute()
        assert_valid_png(md_path.parent / rel)

    # sections that exist are reported
    for heading in ("## Explanation evaluation", "## Features", "## Control directions", "## Ridge map", "## SAE",
                    "### Top activating contexts", "## Timings", "## Configuration"):
        assert heading in text, heading
    assert "context overlap (token top-10, fraction)" in text
    assert "washout lift_on: +0.210" in text
    assert "fit.solve" in text  # nested timings flattened


def test_feature_table_escapes_and_has_consistent_columns(tmp_path):
    data = synthetic_data()
    text = report.write_report(tmp_path, data).read_text(encoding="utf-8")
    table = text.split("## Features")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(data["features"])  # header, separator, one row per feature
    unescaped_pipes = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
    assert len(set(unescaped_pipes)) == 1, unescaped_pipes  # escaping kept every row at the same column count
    assert "pipes a\\|b and<br>newline and &lt;\\|im_end\\|&gt; token" in table
    first = rows[2]
    assert first.startswith("| 100 |")
    lift0 = data["features"][0]["lift"]
    assert f"{lift0:+.3f}" in first


def test_report_json_round_trips(tmp_path):
    data = synthetic_data()
    report.write_report(tmp_path, data)
    loaded = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    meta = loaded.pop("report_meta")
    assert loaded == to_jsonable(data)
    assert meta["summary_line"] == ev.summary_line(data["evaluation"])
    assert set(meta["figures"]) == {"similarity_heatmap", "lift_distribution", "ridge_cv"}
    # the clean copy is itself a fixed point and keeps the numbers
    assert to_jsonable(loaded) == loaded
    assert loaded["map"]["cosine"] == pytest.approx(0.82)
    assert loaded["config"]["dims"] == [1, 2] and loaded["config"]["out"] == "/tmp/run"
    assert loaded["sae"]["top_contexts"]["100"][0].startswith("ctx 0.0")


def test_to_jsonable_cleans_numpy_and_nonfinite():
    out = to_jsonable({1: np.float32(np.nan), "a": (np.int64(3), np.bool_(True)), "b": np.array([[1.5, np.inf]]),
                              "c": {np.inf}})
    assert out == {"1": None, "a": [3, True], "b": [[1.5, None]], "c": [None]}
    json.dumps(out, allow_nan=False)


def test_empty_data_still_writes_a_report(tmp_path):
    md_path = report.write_report(tmp_path, {})
    text = md_path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# crossmap report"
    assert "no explanation evaluation in this run" in text
    assert not (tmp_path / "figures").exists()
    assert json.loads((tmp_path / "report.json").read_text())["report_meta"]["figures"] == {}


@pytest.mark.parametrize("section", ["map", "evaluation"])
def test_partial_data_draws_only_what_exists(tmp_path, section):
    data = {section: synthetic_data()[section]}
    text = report.write_report(tmp_path, data).read_text(encoding="utf-8")
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    if section == "map":
        assert pngs == ["ridge_cv.png"]
        assert "ridge map held-out R² 0.61" in text and "## Features" not in text
    else:
        # features table comes from evaluation.per_feature when no feature list was given
        assert pngs == ["lift_distribution.png", "similarity_heatmap.png"]
        assert "## Features" in text and "## Ridge map" not in text
    for name in pngs:
        assert_valid_png(tmp_path / "figures" / name)


def test_cv_shapes_and_bad_cv_is_reported_not_fatal(tmp_path):
    lambdas = [0.1, 1.0, 10.0, 100.0]
    for i, cv in enumerate([{"lambdas": lambdas, "cv_r2": [0.1, 0.4, 0.5, 0.3]},  # 1-D R^2
                            {"lambdas": lambdas, "cv_error": np.ones((3, 4))}]):  # [folds, lambdas]
        report.write_report(tmp_path / str(i), {"map": {"lambda": 10.0, "cv": cv}})
        assert_valid_png(tmp_path / str(i) / "figures" / "ridge_cv.png")
    with pytest.warns(UserWarning, match="ridge_cv"):
        md = report.write_report(tmp_path / "bad", {"map": {"lambda": 1.0, "cv": {"lambdas": lambdas,
                                                                                   "cv_error": [1.0, 2.0]}}})
    text = md.read_text(encoding="utf-8")
    assert "figure ridge_cv could not be drawn" in text and "does not match 4 lambdas" in text
    assert not (tmp_path / "bad" / "figures" / "ridge_cv.png").exists()


def test_washout_with_evaluation_results_and_keyed_overlaps(tmp_path):
    data = synthetic_data()
    data["washout"] = {"on": data["evaluation"], "off": {"summary": {"mean_lift": 0.01}}}
    overlap = data.pop("context_overlap")
    data["context_overlap"] = {"token": overlap, "document": {**overlap, "level": "document"}}
    text = report.write_report(tmp_path, data).read_text(encoding="utf-8")
    assert f"- washout on: {ev.summary_line(data['evaluation'])}" in text
    assert "- washout off: mean lift +0.010" in text
    assert "- token: context overlap (token" in text and "- document: context overlap (document" in text


def test_write_report_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="data must be a dict"):
        report.write_report(tmp_path, [1, 2])


# ---------------------------------------------------------------------------------------------------------------
# the cross-model headline and report.html
# ---------------------------------------------------------------------------------------------------------------

SETTINGS = ("alpha=0", "alpha=0.5")


def cross_model_data(n: int = 6, m: int = 4) -> dict:
    """synthetic_data with what a run with NLAs adds: two washout settings, round trips, contexts."""
    data = synthetic_data(n, m, samples=1)
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(n, 12))
    washout, by_setting = {}, {}
    for k, key in enumerate(SETTINGS):
        src = rng.normal(size=(n, 1, 16))
        washout[key] = ev.evaluate_explanations(src, src + 0.5 * rng.normal(size=src.shape),
                                                rng.normal(size=(m, 1, 16)), n_permutations=200, n_bootstrap=200,
                                                seed=k)
        by_setting[key] = {name: ev.evaluate_round_trip(ref, ref[:, None] + (1 + j) * rng.normal(size=(n, 1, 12)),
                                                        rng.normal(size=(m, 1, 12)), n_permutations=200,
                                                        n_bootstrap=200, seed=k)
                           for j, name in enumerate(("cross", "source_self", "target_self"))}
    data.update(washout=washout, round_trip_by_setting=by_setting, round_trip=by_setting["alpha=0"],
                primary_setting="alpha=0", evaluation=washout["alpha=0"],
                verbalizers={"source": "NLA AV qwen-av; AR qwen-ar", "target": "NLA AV gemma-av; AR gemma-ar"})
    per = washout["alpha=0"]["per_feature"]
    for i, f in enumerate(data["features"]):
        f.update(matched=per["matched"][i], control_mean=per["control_mean"][i], lift=per["lift"][i],
                 round_trip={name: r["per_feature"]["matched"][i] for name, r in by_setting["alpha=0"].items()},
                 contexts=[{"act": 3.0 - j, "doc": j, "pos": 4, "text": "", "left": f"...ctx {i}.{j} the",
                            "token": f" tok{i}x{j}", "right": " <after>\n"} for j in range(3)],
                 settings={key: {"source_explanation": [f"{key} source {i}"],
                                 "target_explanation": [f"{key} foreign {i}"],
                                 "lift": washout[key]["per_feature"]["lift"][i],
                                 "round_trip": {name: r["per_feature"]["matched"][i]
                                                for name, r in by_setting[key].items()}}
                           for key in SETTINGS})
    return data


def test_report_leads_with_the_cross_model_table(tmp_path):
    data = cross_model_data()
    text = report.write_report(tmp_path, data).read_text(encoding="utf-8")
    assert text.index("## Cross-model result") < text.index("## Explanation evaluation")
    table = text.split("## Cross-model result")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| measure | what it compares | washout alpha=0 (configured) | washout alpha=0.5 |"
    labels = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert labels == ["embedding lift", "round trip cross", "round trip source self", "round trip target self"]
    s = data["round_trip_by_setting"]["alpha=0.5"]["cross"]["summary"]
    ci, p = s["lift_ci"], s["p_value"]
    assert rows[2].endswith(f"| {s['mean_lift']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], p={ev.format_p_value(p)} |")
    assert "- target verbalizer: NLA AV gemma-av; AR gemma-ar" in table
    assert_valid_png(tmp_path / "figures" / "round_trip_lifts.png")
    # the feature table has the top context with its activating token in bold
    assert "...ctx 0.0 the** tok0x0** &lt;after&gt;<br>" in text.split("## Features")[1]


class _Page(HTMLParser):
    """What a rendered page shows: feature rows (data attributes, cell text), highlighted tokens, <body> marks."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.body: dict = {}
        self.marks: list[str] = []
        self.cross_model: list[str] = []
        self._in: list[str] = []
        self._table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if tag == "table":
            self._table = attrs.get("id")
        if tag == "tr" and attrs.get("class") == "feature":
            self.rows.append({**attrs, "text": ""})
        self._in.append(tag)

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._in and self._in[-1] == "mark":
            self.marks.append(data)
        if self._table == "features" and self.rows:
            self.rows[-1]["text"] += data
        if self._table == "cross-model" and self._in and self._in[-1] == "td":
            self.cross_model.append(data)


def _render_in_chromium(page: Path, fragment: str = "") -> _Page:
    profile = page.parent / f"chromium-profile{len(fragment)}"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + fragment],
        capture_output=True, text=True, timeout=120, check=True)
    parsed = _Page()
    parsed.feed(out.stdout)
    return parsed


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CROSSMAP_REQUIRE_CHROMIUM"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_html_shows_the_features_in_headless_chromium(tmp_path):
    assert CHROMIUM, "CROSSMAP_REQUIRE_CHROMIUM is set but chromium is not on PATH"
    data = cross_model_data()
    report.write_report(tmp_path, data)
    page = tmp_path / "report.html"
    raw = page.read_text(encoding="utf-8")
    assert not re.findall(r'(?:src|href)="(?!data:|#)', raw), "the page must load nothing from outside itself"

    shown = _render_in_chromium(page)
    # opened sorted by embedding lift, best first; every inlined figure decoded
    by_lift = sorted(data["features"], key=lambda f: -f["lift"])
    assert [int(float(r["data-id"])) for r in shown.rows] == [f["id"] for f in by_lift]
    assert shown.body.get("data-sorted-by") == "lift"
    loaded, total = shown.body.get("data-images-loaded", "0/0").split("/")
    assert loaded == total and int(total) == 4  # heatmap, lift distribution, round-trip lifts, ridge CV
    for row, f in zip(shown.rows, by_lift, strict=True):
        for text in (f["source_explanations"][0], f["target_explanations"][0], "alpha=0.5 foreign",
                     f"...ctx {f['id'] - 100}.0 the"):
            assert text in row["text"], (text, row["text"][:200])
        assert f"{f['round_trip']['cross']:.3f}" in row["text"]
    assert sorted(shown.marks) == sorted(f" tok{i}x{j}" for i in range(6) for j in range(3))
    cells = " ".join(shown.cross_model)
    assert report.lift_cell(data["round_trip_by_setting"]["alpha=0"]["target_self"]["summary"]) in cells

    # another column, ascending, from the address
    shown = _render_in_chromium(page, "#sort=round_trip_cross-asc")
    by_cross = sorted(data["features"], key=lambda f: f["round_trip"]["cross"])
    assert [int(float(r["data-id"])) for r in shown.rows] == [f["id"] for f in by_cross]
    assert shown.body.get("data-sorted-by") == "round_trip_cross-asc"


def test_compare_puts_two_runs_side_by_side(tmp_path, capsys):
    from crossmap.cli import main

    first, second = cross_model_data(), cross_model_data()
    second["config"] = {**second["config"], "name": "self"}
    second["features"][2]["source_explanations"] = ["the self run's own words"]
    report.write_report(tmp_path / "nla" / "report", first)
    report.write_report(tmp_path / "self" / "report", second)
    out = tmp_path / "side.md"
    assert main(["compare", str(tmp_path / "nla"), str(tmp_path / "self"), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| measure"))
    assert header.count("alpha=0.5") == 2 and "self: washout alpha=0 (configured)" in header
    cell = report.lift_cell(first["round_trip_by_setting"]["alpha=0.5"]["cross"]["summary"])
    assert f"| round trip cross | {report.lift_cell(first['round_trip_by_setting']['alpha=0']['cross']['summary'])} " \
           f"| {cell} |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 102 |"))
    assert "the self run's own words" in row and "source 2 sample 0" in row
    assert "comparison: " in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nla"), str(tmp_path / "missing")]) == 2
    assert "no report/report.json" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nla")]) == 2
    assert "compare needs at least two runs, got 1" in capsys.readouterr().err
