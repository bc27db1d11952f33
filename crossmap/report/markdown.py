"""report.md: the markdown text of a run's report, and the PNG figures it embeds (see `crossmap.report`)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from crossmap.evaluate import ROUND_TRIPS, context_overlap_line, format_p_value, summary_line
from crossmap.jsonio import to_jsonable

FIGURE_DIR = "figures"
MAX_CELL_CHARS = 400  # per explanation in the feature table; report.json keeps the full text
MAX_CONTEXTS_PER_FEATURE = 5
MAX_CONTROLS_LISTED = 50

# ---------------------------------------------------------------------------------------------------------------
# markdown helpers
# ---------------------------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    return to_jsonable(obj, strict=False)  # a report never fails on one odd value


def md_escape(text: Any, max_chars: int | None = None) -> str:
    """Make `text` safe inside a markdown table cell or list item: escape |, HTML-escape &, <, > (so tokens like
    <|im_end|> stay visible), turn newlines into <br>, and truncate to max_chars with an ellipsis."""
    text = "" if text is None else str(text)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _fmt(value: Any, signed: bool = False, digits: int | None = None) -> str:
    """Numbers to short text (fixed `digits` decimals if given, else 4 significant); others to escaped text."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):+d}" if signed else str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "n/a"
        if digits is not None:
            return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:+.3e}" if signed else f"{v:.3e}"
        return f"{v:+.3f}" if signed else f"{v:.4g}"
    return md_escape(value, MAX_CELL_CHARS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _number_list_summary(values: Sequence[Any]) -> str:
    arr = np.asarray([v for v in values if _is_number(v)], np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return "n/a"
    q10, q50, q90 = np.quantile(arr, [0.1, 0.5, 0.9])
    return (f"mean {arr.mean():.4g}, median {q50:.4g}, p10 {q10:.4g}, p90 {q90:.4g}, "
            f"min {arr.min():.4g}, max {arr.max():.4g} (n={arr.size})")


def _numeric_array(value: Any) -> np.ndarray | None:
    """`value` as a float array if it is a nonempty (nested) list/array of numbers, else None."""
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        return None
    try:
        arr = np.asarray(value, dtype=object)
    except ValueError:  # ragged
        return None
    if not all(_is_number(v) for v in arr.ravel()):
        return None
    return arr.astype(np.float64)


def _scalar_rows(section: Mapping[str, Any], skip: set[str] = frozenset()) -> list[list[str]]:
    """Key/value rows for the scalar (and summarisable) entries of a section dict."""
    rows = []
    for key, value in section.items():
        if key in skip:
            continue
        if _is_number(value) or isinstance(value, (str, bool)) or value is None:
            rows.append([md_escape(key), _fmt(value)])
        elif (numbers := _numeric_array(value)) is not None:
            rows.append([md_escape(key), _number_list_summary(numbers.ravel().tolist())])
        elif isinstance(value, Mapping) and value and all(_is_number(v) or v is None for v in value.values()):
            rows.append([md_escape(key), ", ".join(f"{md_escape(k)} {_fmt(v)}" for k, v in value.items())])
    return rows


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _samples(entry: Mapping[str, Any], stem: str) -> list[str]:
    """The explanation sample(s) of a feature/control entry under '<stem>s' (list) or '<stem>' (str or list)."""
    for key in (stem + "s", stem):
        value = entry.get(key)
        if value is None:
            continue
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return []


def _samples_cell(samples: list[str]) -> str:
    if not samples:
        return ""
    if len(samples) == 1:
        return md_escape(samples[0], MAX_CELL_CHARS)
    return "<br>".join(f"({i + 1}) {md_escape(s, MAX_CELL_CHARS)}" for i, s in enumerate(samples))


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg canvas attached explicitly: no pyplot, no global backend state
    fig.savefig(path, dpi=120)
    return path


def plot_similarity_heatmap(sim: np.ndarray, path: Path, feature_ids: Sequence[Any] | None = None) -> Path:
    """N x N heatmap of source (rows) vs target (columns) explanation similarity, matched pairs outlined."""
    sim = np.asarray(sim, np.float64)
    n = sim.shape[0]
    size = min(4.0 + 0.12 * n, 14.0)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    image = ax.imshow(sim, cmap="viridis", interpolation="nearest", aspect="equal")
    fig.colorbar(image, ax=ax, label="cosine similarity of explanations")
    outlines = [Rectangle((i - 0.5, i - 0.5), 1, 1) for i in range(n)]
    ax.add_collection(PatchCollection(outlines, facecolor="none", edgecolor="red",
                                      linewidth=max(0.3, min(1.5, 40.0 / max(n, 1)))))
    ax.set_xlabel("target explanation (mapped direction)")
    ax.set_ylabel("source explanation (original feature)")
    ax.set_title("source vs target explanation similarity (diagonal = matched)")
    if feature_ids is not None and len(feature_ids) == n and n <= 40:
        ax.set_xticks(range(n), [str(f) for f in feature_ids], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(f) for f in feature_ids], fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_lift_distribution(matched: Sequence[float], control: Sequence[float], lift: Sequence[float], path: Path,
                           lift_ci: Sequence[float] | None = None, control_label: str = "control",
                           ci_level: float = 0.95) -> Path:
    """Left: histograms of matched vs control similarities.  Right: per-feature lift (sorted) with mean and CI."""
    matched = np.asarray([v for v in matched if v is not None], np.float64)
    control = np.asarray([v for v in control if v is not None], np.float64)
    lift = np.asarray([v for v in lift if v is not None], np.float64)
    fig = Figure(figsize=(11, 4.2))
    ax_hist, ax_lift = fig.subplots(1, 2)
    values = np.concatenate([matched, control]) if matched.size + control.size else np.zeros(1)
    bins = np.linspace(values.min(), values.max() + 1e-9, 30)
    if control.size:
        ax_hist.hist(control, bins=bins, density=True, alpha=0.55, color="tab:gray", label=control_label)
        ax_hist.axvline(control.mean(), color="tab:gray", linestyle="--")
    if matched.size:
        ax_hist.hist(matched, bins=bins, density=True, alpha=0.55, color="tab:blue", label="matched (diagonal)")
        ax_hist.axvline(matched.mean(), color="tab:blue", linestyle="--")
    ax_hist.set_xlabel("cosine similarity to the source explanation")
    ax_hist.set_ylabel("density")
    ax_hist.set_title("matched vs control similarity")
    ax_hist.legend(fontsize=8)

    order = np.argsort(-lift)
    ax_lift.bar(np.arange(lift.size), lift[order], color=np.where(lift[order] >= 0, "tab:green", "tab:red"))
    ax_lift.axhline(0.0, color="black", linewidth=0.8)
    if lift.size:
        ax_lift.axhline(lift.mean(), color="tab:blue", label=f"mean lift {lift.mean():+.3f}")
    if lift_ci is not None and len(lift_ci) == 2 and None not in lift_ci:
        ax_lift.axhspan(lift_ci[0], lift_ci[1], color="tab:blue", alpha=0.15, label=f"{round(100 * ci_level)}% CI of mean")
    ax_lift.set_xlabel("feature (sorted by lift)")
    ax_lift.set_ylabel("lift = matched - mean control")
    ax_lift.set_title("per-feature lift")
    ax_lift.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_lift_intervals(rows: Sequence[tuple[str, float, Sequence[float] | None]], path: Path) -> Path:
    """Each measure's mean lift with its interval (one row per measure and washout setting), zero marked."""
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.4))
    ax = fig.add_subplot()
    for y, (_, mean, ci) in enumerate(rows):
        colour = "tab:green" if ci and ci[0] > 0 else ("tab:red" if ci and ci[1] < 0 else "tab:gray")
        if ci:
            ax.plot(ci, [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
        ax.plot([mean], [y], "o", color=colour)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean lift (matched - control) with 95% bootstrap interval")
    ax.set_title("cross-model result: embedding and round-trip lifts")
    fig.tight_layout()
    return _save(fig, path)


def _cv_curve(cv: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(lambdas [L], values [L, folds], y label) from a map's cv dict, or None if it holds no curve."""
    if "lambdas" not in cv:
        return None
    for key, label in (("cv_error", "held-out error (MSE)"), ("cv_r2", "held-out R²")):
        if key in cv and cv[key] is not None:
            lambdas = np.asarray(cv["lambdas"], np.float64).ravel()
            values = np.asarray(cv[key], np.float64)
            if values.ndim == 1:
                values = values[:, None]
            if values.ndim != 2:
                raise ValueError(f"map.cv.{key}: expected [lambdas] or [lambdas, folds], got shape {values.shape}")
            if values.shape[0] != lambdas.size and values.shape[1] == lambdas.size:
                values = values.T  # given as [folds, lambdas]
            if values.shape[0] != lambdas.size:
                raise ValueError(f"map.cv.{key}: shape {values.shape} does not match {lambdas.size} lambdas")
            return lambdas, values, label
    return None


def plot_ridge_cv(lambdas: np.ndarray, values: np.ndarray, path: Path, chosen: float | None = None,
                  ylabel: str = "held-out error") -> Path:
    """Cross-validation curve vs lambda (log x): mean over folds, per-fold lines, chosen lambda marked."""
    lambdas = np.asarray(lambdas, np.float64)
    values = np.asarray(values, np.float64).reshape(lambdas.size, -1)
    order = np.argsort(lambdas)
    lambdas, values = lambdas[order], values[order]
    mean = values.mean(axis=1)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    if values.shape[1] > 1:
        for fold in range(values.shape[1]):
            ax.plot(lambdas, values[:, fold], color="tab:gray", alpha=0.35, linewidth=0.8,
                    label="folds" if fold == 0 else None)
    ax.plot(lambdas, mean, marker="o", color="tab:blue", label=f"mean over {values.shape[1]} fold(s)")
    if chosen is not None and math.isfinite(chosen) and chosen > 0:
        ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen λ = {chosen:.3g}")
        hit = np.flatnonzero(np.isclose(lambdas, chosen, rtol=1e-6))
        if hit.size:
            ax.plot(lambdas[hit[0]], mean[hit[0]], marker="*", markersize=14, color="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel("ridge λ")
    ax.set_ylabel(ylabel)
    ax.set_title("ridge cross-validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# report assembly
# ---------------------------------------------------------------------------------------------------------------


def feature_rows(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Feature entries with metric fields filled from evaluation.per_feature where the entry lacks them."""
    features = [dict(f) for f in data.get("features") or []]
    per = (data.get("evaluation") or {}).get("per_feature") or {}
    n = len(next(iter(per.values()))) if per else 0
    if not features and n:
        features = [{"id": i} for i in range(n)]
    if per and len(features) == n:
        for i, feature in enumerate(features):
            for key in ("matched", "control_mean", "lift", "retrieval_rank"):
                if feature.get(key) is None and key in per:
                    feature[key] = per[key][i]
    overlap = data.get("context_overlap") or {}
    overlap_matched = (overlap.get("per_feature") or {}).get("matched") if isinstance(overlap, Mapping) else None
    if overlap_matched is not None and len(overlap_matched) == len(features):
        for feature, value in zip(features, overlap_matched, strict=True):
            feature.setdefault("context_overlap", value)
    return features


def _model_side(data: Mapping[str, Any], side: str) -> str | None:
    """'model-id (layer L)' for side 'source'/'target' from the map section (or config), if known."""
    for section in (data.get("map") or {}, data.get("config") or {}):
        if not isinstance(section, Mapping):
            continue
        nested = section.get(side) if isinstance(section.get(side), Mapping) else {}
        model = section.get(f"{side}_model") or section.get(f"{side}_model_id") or nested.get("model") \
            or nested.get("model_id")
        layer = section.get(f"{side}_layer", nested.get("layer"))
        if model is not None:
            return f"{model}" + (f" (layer {layer})" if layer is not None else "")
    return None


def _overlap_results(overlap: Any) -> list[tuple[str, Mapping[str, Any]]]:
    if not isinstance(overlap, Mapping):
        return []
    if "mean_matched" in overlap:
        return [("", overlap)]
    return [(str(name), r) for name, r in overlap.items() if isinstance(r, Mapping) and "mean_matched" in r]


def _washout_lines(washout: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, value in washout.items():
        if isinstance(value, Mapping) and ("summary" in value or "mean_lift" in value):
            lines.append(f"- washout {md_escape(key)}: {summary_line(value)}")
        elif _is_number(value):
            label = key if "washout" in str(key) else f"washout {key}"
            lines.append(f"- {md_escape(label)}: {_fmt(value, signed='lift' in str(key), digits=3)}")
        else:
            lines.append(f"- {md_escape(key)}: {md_escape(json.dumps(_plain(value)), MAX_CELL_CHARS)}")
    return lines


def draw_figures(data: Mapping[str, Any], run_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Draw every figure whose data exists; returns ({name: path relative to run_dir}, [failure notes])."""
    fig_dir = run_dir / FIGURE_DIR
    evaluation = data.get("evaluation") or {}
    features = feature_rows(data)
    jobs: dict[str, Callable[[Path], Path]] = {}

    if evaluation.get("similarity_matrix") is not None:
        ids = [f.get("id") for f in features] if features else None
        jobs["similarity_heatmap"] = lambda p: plot_similarity_heatmap(evaluation["similarity_matrix"], p, ids)

    matched = [f.get("matched") for f in features]
    lift = [f.get("lift") for f in features]
    if features and all(v is not None for v in matched + lift):
        if evaluation.get("control_similarity") is not None:
            control = np.asarray(evaluation["control_similarity"], np.float64).ravel().tolist()
            control_label = "control (every source x control pair)"
        else:
            control = [f.get("control_mean") for f in features]
            control_label = "control (per-feature mean)"
        summary = evaluation.get("summary") or {}
        jobs["lift_distribution"] = lambda p: plot_lift_distribution(
            matched, control, lift, p, summary.get("lift_ci"), control_label, summary.get("ci_level", 0.95))

    intervals = lift_intervals(data)
    if intervals:
        jobs["round_trip_lifts"] = lambda p: plot_lift_intervals(intervals, p)

    ridge_map = data.get("map") or {}
    cv = ridge_map.get("cv")
    if isinstance(cv, Mapping) and "lambdas" in cv:
        def draw_cv(p: Path) -> Path:
            curve = _cv_curve(cv)
            if curve is None:
                raise ValueError("map.cv has lambdas but neither cv_error nor cv_r2")
            chosen = ridge_map.get("lambda", cv.get("best_lambda", cv.get("chosen_lambda")))
            return plot_ridge_cv(curve[0], curve[1], p, None if chosen is None else float(chosen), curve[2])
        jobs["ridge_cv"] = draw_cv

    written: dict[str, str] = {}
    failures: list[str] = []
    if jobs:
        fig_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in jobs.items():
        try:
            draw(fig_dir / f"{name}.png")
            written[name] = f"{FIGURE_DIR}/{name}.png"
        except Exception as e:  # one bad figure must not cost the report of a finished run
            warnings.warn(f"report: figure {name} failed: {e!r}", stacklevel=2)
            failures.append(f"figure {name} could not be drawn: {type(e).__name__}: {e}")
    return written, failures


def _round_trip_lines(round_trip: Mapping[str, Any]) -> list[str]:
    """The round-trip section: per round trip, the reconstructor's cosine against the explained vector,
    against controls, and the lift's statistics."""
    if not round_trip:
        return []
    rows = []
    for name, result in round_trip.items():
        s = result.get("summary") or {}
        ci = s.get("lift_ci")
        rows.append([md_escape(name.replace("_", " ")), md_escape(ROUND_TRIPS.get(name, name)),
                     _fmt(s.get("mean_matched"), digits=3), _fmt(s.get("mean_control"), digits=3),
                     _fmt(s.get("mean_lift"), signed=True, digits=3),
                     f"[{_fmt(ci[0], True)}, {_fmt(ci[1], True)}]" if ci else "n/a",
                     "n/a" if s.get("p_value") is None else format_p_value(s["p_value"]),
                     _fmt(s.get("mean_mse_matched"), digits=3)])
    return (["## Round trip (reconstructor cosine, no sentence embedder)", "",
             "cos: mean cosine between the reconstructor's vector and the vector explained; control: the same "
             "for explanations of random control directions; lift, interval and p-value as for the embedding "
             "lift; MSE = 2(1 - cos), the release's reward scale.", ""]
            + _table(["round trip", "what", "cos", "control", "lift", "95% CI", "p", "MSE"], rows) + [""])


def score_text(value: Any, signed: bool = False) -> str:
    """A score to 3 decimals, 'n/a' for anything that is not a finite number (markdown, HTML and comparisons)."""
    return _fmt(float(value), signed=signed, digits=3) if _is_number(value) else "n/a"


def lift_cell(summary: Mapping[str, Any]) -> str:
    """'+0.123 [+0.050, +0.190], p=0.0012' from a lift summary (plain text: markdown and HTML both use it)."""
    ci = summary.get("lift_ci")
    p = summary.get("p_value")
    return (_fmt(summary.get("mean_lift"), signed=True, digits=3)
            + (f" [{_fmt(ci[0], True, 3)}, {_fmt(ci[1], True, 3)}]" if ci and None not in ci else "")
            + ("" if p is None else f", p={format_p_value(p)}"))


EMBEDDING_MEASURE = ("sentence-embedding cosine of the source AV's explanation of f and the target AV's explanation "
                     "of M f, minus the same against explanations of the controls")


def headline_measures(data: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str, list[Any]]]]:
    """(washout settings, [(measure, what it compares, [its result under each setting, or None])]): the embedding
    lift first, then the round trips the run has (cross first).  No settings when the run has no evaluation."""
    settings = {key: value for key, value in (data.get("washout") or {}).items()
                if isinstance(value, Mapping) and "summary" in value}
    by_setting = data.get("round_trip_by_setting") or {}
    measures = [("embedding lift", EMBEDDING_MEASURE, list(settings.values()))]
    for name in ("cross", "source_self", "target_self"):
        results = [(by_setting.get(key) or {}).get(name) for key in settings]
        if any(results):
            measures.append((f"round trip {name.replace('_', ' ')}", ROUND_TRIPS[name], results))
    return list(settings), measures


def cross_model_table(data: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the headline table: each measure's lift [CI], p under each washout setting.  Empty when
    the run has no evaluation."""
    settings, measures = headline_measures(data)
    if not settings:
        return [], []
    primary = data.get("primary_setting")
    header = ["measure", "what it compares"] + [f"washout {key}" + (" (configured)" if key == primary else "")
                                                 for key in settings]
    rows = [[label, what] + [lift_cell(r["summary"]) if r else "not run" for r in results]
            for label, what, results in measures]
    return header, rows


def lift_intervals(data: Mapping[str, Any]) -> list[tuple[str, float, list[float] | None]]:
    """(label, mean lift, interval) of every measure and washout setting in the headline table (drawn only when
    the run has round trips)."""
    if not data.get("round_trip_by_setting"):
        return []
    settings, measures = headline_measures(data)
    out = []
    for i, key in enumerate(settings):
        for label, _, results in measures:
            s = (results[i] or {}).get("summary") or {}
            if _is_number(s.get("mean_lift")):
                out.append((f"{label.removesuffix(' lift')}, washout {key}", float(s["mean_lift"]), s.get("lift_ci")))
    return out


def _cross_model_lines(data: Mapping[str, Any]) -> list[str]:
    header, rows = cross_model_table(data)
    if not rows:
        return []
    verbalizers = data.get("verbalizers") or {}
    lines = ["## Cross-model result", "",
             "Each cell: mean lift over the features [95% bootstrap interval], permutation p-value. The lift is how "
             "much closer the matched pair is than the same feature against random control directions; "
             "round-trip lifts use the reconstructors' cosine instead of a sentence embedder.", ""]
    lines += [f"- {side} verbalizer: {md_escape(label)}" for side, label in verbalizers.items()]
    lines += [""] if verbalizers else []
    return lines + _table(header, [[md_escape(c) for c in row] for row in rows]) + [""]


def _context_cell(contexts: Sequence[Mapping[str, Any]]) -> str:
    """The top context, its activating token in bold."""
    if not contexts:
        return ""
    c = contexts[0]
    if "token" not in c:
        return md_escape(c.get("text"), MAX_CELL_CHARS)
    return md_escape(c["left"]) + "**" + md_escape(c["token"]) + "**" + md_escape(c["right"])


def render_markdown(data: Mapping[str, Any], figures: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """The report.md text.  The headline (summary line) comes right after the title."""
    evaluation = data.get("evaluation") or {}
    ridge_map = data.get("map") or {}
    sae = data.get("sae") or {}
    source, target = _model_side(data, "source"), _model_side(data, "target")
    title = "# crossmap report" + (f": {source} → {target}" if source and target else "")
    headline = summary_line(evaluation) if evaluation.get("summary") else "no explanation evaluation in this run"
    lines = [title, "", f"**{headline}**", ""] + _cross_model_lines(data)

    bullets = []
    if evaluation.get("summary"):
        s = evaluation["summary"]
        bullets.append(f"- mean matched similarity {_fmt(s.get('mean_matched'), digits=3)} vs mean control "
                       f"{_fmt(s.get('mean_control'), digits=3)} over {evaluation.get('n_features')} features and "
                       f"{evaluation.get('n_controls')} random control directions "
                       f"(aggregate: {evaluation.get('aggregate')})")
    for name, result in _overlap_results(data.get("context_overlap")):
        bullets.append(f"- {md_escape(name) + ': ' if name else ''}{context_overlap_line(result)}")
    if isinstance(data.get("washout"), Mapping):
        bullets += _washout_lines(data["washout"])
    for result in (data.get("round_trip") or {}).values():
        if result.get("summary_line"):
            bullets.append(f"- round trip, {md_escape(result['summary_line'])}")
    if _is_number(ridge_map.get("r2")):
        bullets.append(f"- ridge map held-out R² {_fmt(ridge_map['r2'])}"
                       + (f", cosine {_fmt(ridge_map['cosine'])}" if _is_number(ridge_map.get("cosine")) else "")
                       + (f", λ = {_fmt(ridge_map['lambda'])}" if _is_number(ridge_map.get("lambda")) else ""))
    lines += bullets + ([""] if bullets else [])
    lines += [f"> note: {md_escape(n)}" for n in notes] + ([""] if notes else [])

    if evaluation.get("summary"):
        s = evaluation["summary"]
        perm = s.get("permutation") or {}
        retrieval = s.get("retrieval") or {}
        lines += ["## Explanation evaluation", ""]
        rows = [["aggregate over samples", md_escape(evaluation.get("aggregate"))],
                ["features / controls", f"{evaluation.get('n_features')} / {evaluation.get('n_controls')}"],
                ["samples (source / target / control)",
                 " / ".join(str(v) for v in (evaluation.get("n_samples") or {}).values())],
                ["mean matched similarity", _fmt(s.get("mean_matched"), digits=3)],
                ["mean control similarity", _fmt(s.get("mean_control"), digits=3)],
                ["mean lift", _fmt(s.get("mean_lift"), signed=True)]]
        if s.get("lift_ci"):
            rows.append([f"{round(100 * s.get('ci_level', 0.95))}% bootstrap CI of mean lift "
                         f"(n={s.get('n_bootstrap')})",
                         f"[{_fmt(s['lift_ci'][0], True)}, {_fmt(s['lift_ci'][1], True)}]"])
        p_text = "n/a" if s.get("p_value") is None else format_p_value(s["p_value"])
        rows.append(["permutation p-value", f"{p_text} (n={perm.get('n_permutations')}; null mean matched "
                     f"{_fmt(perm.get('null_mean'), digits=3)} ± {_fmt(perm.get('null_std'), digits=3)})"])
        for key in sorted((k for k in retrieval if k.startswith("top") and k[3:].isdigit()), key=lambda k: int(k[3:])):
            chance = (retrieval.get("chance") or {}).get(key)
            rows.append([f"retrieval {key[:3]}-{key[3:]}", f"{retrieval[key]}/{retrieval.get('n')}"
                         + (f" (chance {chance:.3f})" if chance is not None else "")])
        lines += _table(["metric", "value"], rows) + [""]
        if perm.get("null"):
            lines += [f"Permutation null: {md_escape(perm['null'])}; statistic: {md_escape(perm.get('statistic'))}.",
                      ""]
    for name in ("similarity_heatmap", "lift_distribution", "round_trip_lifts"):
        if name in figures:
            lines += [f"![{name}]({figures[name]})", ""]
    lines += _round_trip_lines(data.get("round_trip") or {})

    features = feature_rows(data)
    if features:
        has_overlap = any("context_overlap" in f for f in features)
        trips = [name for name in ROUND_TRIPS if any(name in (f.get("round_trip") or {}) for f in features)]
        has_contexts = any(f.get("contexts") for f in features)
        header = ["id", "source explanation", "target explanation", "matched", "control", "lift", "rank"]
        header += ["ctx overlap"] if has_overlap else []
        header += ["top context"] if has_contexts else []
        header += [f"round trip {name.replace('_', ' ')}" for name in trips]
        rows = []
        for f in features:
            rank = f.get("retrieval_rank")
            row = [md_escape(f.get("id")), _samples_cell(_samples(f, "source_explanation")),
                   _samples_cell(_samples(f, "target_explanation")), _fmt(f.get("matched"), digits=3),
                   _fmt(f.get("control_mean"), digits=3), _fmt(f.get("lift"), signed=True, digits=3),
                   "n/a" if rank is None else str(int(rank) + 1)]
            row += [_fmt(f.get("context_overlap"), digits=3)] if has_overlap else []
            row += [_context_cell(f.get("contexts") or [])] if has_contexts else []
            rows.append(row + [_fmt((f.get("round_trip") or {}).get(name), digits=3) for name in trips])
        lines += ["## Features", "", "rank: position of the feature's own source explanation when its target "
                  "explanation ranks all source explanations (1 = retrieved first).", ""]
        lines += _table(header, rows) + [""]

    controls = data.get("controls") or []
    if controls:
        lines += ["## Control directions", "", f"{len(controls)} random directions mapped and explained "
                  "by the target model" + (f" (first {MAX_CONTROLS_LISTED} listed)"
                                           if len(controls) > MAX_CONTROLS_LISTED else "") + ":", ""]
        for i, c in enumerate(controls[:MAX_CONTROLS_LISTED]):
            entry = c if isinstance(c, Mapping) else {"explanation": c}
            label = entry.get("id", i)
            lines.append(f"- {md_escape(label)}: "
                         + " / ".join(md_escape(t, MAX_CELL_CHARS) for t in _samples(entry, "explanation")))
        lines.append("")

    if ridge_map:
        lines += ["## Ridge map", ""]
        if source or target:
            lines += [f"source: {md_escape(source)}  ", f"target: {md_escape(target)}", ""]
        rows = _scalar_rows(ridge_map, skip={"cv"})
        cv = ridge_map.get("cv")
        if isinstance(cv, Mapping):
            rows += [[f"cv.{k}", v] for k, v in _scalar_rows(cv, skip={"lambdas", "cv_error", "cv_r2"})]
        lines += (_table(["quantity", "value"], rows) + [""]) if rows else []
        if "ridge_cv" in figures:
            lines += [f"![ridge_cv]({figures['ridge_cv']})", ""]

    if sae:
        lines += ["## SAE", ""]
        rows = _scalar_rows(sae, skip={"top_contexts"})
        lines += (_table(["quantity", "value"], rows) + [""]) if rows else []
        contexts = sae.get("top_contexts") or {}
        if isinstance(contexts, Mapping) and contexts:
            lines += ["### Top activating contexts", ""]
            order = [str(f.get("id")) for f in features if str(f.get("id")) in {str(k) for k in contexts}]
            order += [str(k) for k in contexts if str(k) not in order]
            by_id = {str(k): v for k, v in contexts.items()}
            for fid in order:
                texts = by_id[fid] if isinstance(by_id[fid], (list, tuple)) else [by_id[fid]]
                lines.append(f"- feature {md_escape(fid)}:")
                lines += [f"    - {md_escape(t, MAX_CELL_CHARS)}" for t in texts[:MAX_CONTEXTS_PER_FEATURE]]
            lines.append("")

    timings = data.get("timings")
    if isinstance(timings, Mapping) and timings:
        flat = _flatten(timings)
        lines += ["## Timings", ""]
        lines += _table(["stage", "seconds"], [[md_escape(k), _fmt(v)] for k, v in flat.items()]) + [""]

    if data.get("config") is not None:
        lines += ["## Configuration", "", "```json", json.dumps(_plain(data["config"]), indent=2), "```", ""]
    return "\n".join(lines)
