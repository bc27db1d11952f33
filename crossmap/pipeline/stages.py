"""The work of each stage.  Each reads its inputs from earlier stages' directories and writes its
own; arrays go to .npy/.npz or orbax, tables to JSON (written atomically)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from .. import activations, ridge
from .. import sae as sae_lib
from ..models import make_hidden_fn
from ..sharding import to_host
from .run import _load_json, _log, _save_json

if TYPE_CHECKING:
    from .run import Run


# --------------------------------------------------------------------------------------------- map
class _CappedPairs:
    """Keeps at most `cap_per_fold` paired activations of each fold on the host (for the SAE and
    the evaluation), in the order they arrive; the ridge statistics see every pair."""

    def __init__(self, n_folds: int, cap_per_fold: int):
        self.cap = cap_per_fold
        self.kept = np.zeros(n_folds, np.int64)
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "doc", "fold", "source_pos")}

    def add(self, x, y, mask, fold, info) -> None:
        keep = np.flatnonzero(to_host(mask))
        room = self.cap - self.kept[fold]
        if room <= 0 or keep.size == 0:
            return
        keep = keep[:room]
        self.kept[fold] += keep.size
        self.parts["x"].append(to_host(x)[keep].astype(np.float32))
        self.parts["y"].append(to_host(y)[keep].astype(np.float32))
        self.parts["doc"].append(info["pair_doc"][keep].astype(np.int32))
        self.parts["fold"].append(info["pair_fold"][keep].astype(np.int32))
        self.parts["source_pos"].append(info["pair_source_pos"][keep].astype(np.int32))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}


def run_map(run: Run) -> None:
    c = run.config
    out = run.stage_dir("map")
    src, tgt = run.model("source"), run.model("target")
    docs = run.documents()
    folds = activations.assign_folds(len(docs), c.ridge.folds, seed=c.seed)
    stats = ridge.init_stats(src.config.d_model, tgt.config.d_model, n_folds=c.ridge.folds)
    keeper = _CappedPairs(c.ridge.folds, max(1, c.ridge.keep_pairs // c.ridge.folds))
    holder = {"stats": stats}

    def consume(x, y, mask, fold, info):
        holder["stats"] = ridge.accumulate(holder["stats"], x, y, fold=int(fold), weights=mask,
                                           on_nonfinite=c.ridge.on_nonfinite)
        keeper.add(x, y, mask, int(fold), info)

    summary = activations.collect_pairs(
        make_hidden_fn(src.model, c.models.source.layer, mesh=run.mesh),
        make_hidden_fn(tgt.model, c.models.target.layer, mesh=run.mesh), src.tokenizer, tgt.tokenizer, docs,
        consumer=consume, pairing=c.pairing.method, skip_first=c.pairing.skip_first,
        batch_size=c.corpus.batch_size, buckets=tuple(c.corpus.buckets), max_length=c.corpus.max_length,
        chat_source=c.models.source.chat, chat_target=c.models.target.chat, fold_of_doc=folds, mesh=run.mesh)
    stats = holder["stats"]
    t0 = time.perf_counter()
    ridge_map, fit = ridge.solve(stats, tuple(c.ridge.lambdas), standardize=c.ridge.standardize,
                                 per_target=c.ridge.per_target, compute_dtype=c.ridge.compute_dtype)
    solve_s = time.perf_counter() - t0
    pairs = keeper.arrays()
    cos = ridge.heldout_cosine(stats, fit.lam if not c.ridge.per_target else fit.lam_per_target,
                               _chunks(pairs, 8192), standardize=c.ridge.standardize,
                               compute_dtype=c.ridge.compute_dtype)
    fit.mean_cosine = cos["mean_cosine"]
    meta = {
        "source_model": src.model_id, "target_model": tgt.model_id,
        "source_layer": int(c.models.source.layer), "target_layer": int(c.models.target.layer),
        "corpus_hash": run.corpus_hash(), "pairing": c.pairing.to_dict(), "n_pairs": int(summary["n_pairs"]),
        "n_documents": int(summary["n_documents"]), "fit": fit.to_metadata(per_target=c.ridge.per_target),
        "heldout_mean_cosine_pairs": int(cos["count"]),
    }
    ridge.save_map(out / "ridge_map", ridge_map, meta, overwrite=True)
    save_pairs(out / "pairs", pairs)
    norms = {"source_median_norm": float(np.median(np.linalg.norm(pairs["x"], axis=1))),
             "target_median_norm": float(np.median(np.linalg.norm(pairs["y"], axis=1))),
             "target_mean": pairs["y"].mean(0).tolist()}
    kept = np.asarray(summary["kept_per_document"])
    _save_json(out / "kept_per_document.json", {"pairing": c.pairing.to_dict(), "kept": kept.tolist()})
    _save_json(out / "summary.json", {
        **meta, "norms": norms, "solve_seconds": solve_s, "collect": {
            k: v for k, v in summary.items() if k != "kept_per_document"},
        "kept_per_document": {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max()),
                              "zero": int((kept == 0).sum())},
        "kept_pairs_for_sae_and_evaluation": int(len(pairs["x"]))})
    _log(f"map: {summary['n_pairs']} pairs from {summary['n_documents']} documents; lambda={fit.lam:.3g}, "
         f"held-out R^2={fit.r2:.3f}, mean cosine={fit.mean_cosine:.3f}")


def _chunks(pairs: dict[str, np.ndarray], size: int):
    for i in range(0, len(pairs["x"]), size):
        yield pairs["x"][i:i + size], pairs["y"][i:i + size], pairs["fold"][i:i + size]


def save_pairs(directory: Path, pairs: dict[str, np.ndarray]) -> None:
    """One .npy per field, so later stages memory-map them (at the paper's 200k pairs x and y are 7 GB,
    and the verbalise stages need only a few background rows of them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in pairs.items():
        np.save(directory / f"{name}.npy", array)


def load_pairs(run: Run) -> dict[str, np.ndarray]:
    """The kept pairs of the map stage, memory-mapped read-only (runs written before: pairs.npz)."""
    directory = run.stage_dir("map") / "pairs"
    if directory.is_dir():
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(directory.glob("*.npy"))}
    with np.load(run.stage_dir("map") / "pairs.npz") as f:
        return {k: f[k] for k in f.files}


def load_ridge_map(run: Run):
    src, tgt = run.config.models.source, run.config.models.target
    return ridge.load_map(run.stage_dir("map") / "ridge_map",
                          expect={"source_layer": int(src.layer), "target_layer": int(tgt.layer)})


# --------------------------------------------------------------------------------------------- sae
def run_sae(run: Run) -> None:
    c = run.config
    out = run.stage_dir("sae")
    pairs = load_pairs(run)
    x = pairs["x"]
    d_model = x.shape[1]
    if c.sae.path:
        sae = sae_lib.load_sae(c.sae.path, d_model=d_model, layer=int(c.models.source.layer),
                               allow_layer_mismatch=c.sae.allow_layer_mismatch, format=c.sae.format or None)
        train_metrics = {"loaded_from": c.sae.path}
        held = x
    else:
        # Train on folds 1..K-1; fold 0 (whole documents) is held out for the reported quality.
        source_model_id = _load_json(run.stage_dir("map") / "summary.json")["source_model"]  # no weights needed
        train_rows = pairs["fold"] != 0
        held = x[~train_rows] if (~train_rows).any() else x
        sae, train_metrics = sae_lib.train_sae(
            x[train_rows], d_model, c.sae.n_features, c.sae.k, c.sae.steps, lr=c.sae.lr or None,
            batch_size=min(c.sae.batch_size, int(train_rows.sum())), seed=c.seed, ckpt_dir=out / "train",
            mesh=run.mesh, layer=int(c.models.source.layer), model_id=source_model_id,
            hook_name=f"blocks.{int(c.models.source.layer)}.hook_resid_post")
        sae_lib.save_sae_lens(sae, out / "sae_lens")
    quality = sae_lib.evaluate_sae(sae, held)
    stats = sae_lib.feature_stats(sae, ((x[i:i + 4096], pairs["doc"][i:i + 4096], pairs["source_pos"][i:i + 4096])
                                        for i in range(0, len(x), 4096)), top_k=c.sae.n_contexts)
    np.savez(out / "feature_stats.npz", n_tokens=stats.n_tokens, count=stats.count, max_act=stats.max_act,
             sum_act=stats.sum_act, top_acts=stats.top_acts, top_doc=stats.top_doc, top_pos=stats.top_pos)
    if c.sae.path:
        sae_lib.save_sae_lens(sae, out / "sae_lens")
    train_metrics = {k: v for k, v in train_metrics.items() if k != "history"}
    _save_json(out / "summary.json", {"heldout": quality, "heldout_rows": int(len(held)), "train": train_metrics,
                                      "alive_on_corpus": float(stats.alive.mean()), "n_features": sae.n_features})
    _log(f"sae: held-out FVE={quality['fve']:.3f}, L0={quality['l0']:.1f}, dead={quality['dead_frac']:.3f}")


def load_feature_stats(run: Run) -> sae_lib.FeatureStats:
    with np.load(run.stage_dir("sae") / "feature_stats.npz") as f:
        return sae_lib.FeatureStats(**{k: (int(f[k]) if k == "n_tokens" else f[k]) for k in f.files})


def load_run_sae(run: Run) -> sae_lib.SAE:
    return sae_lib.load_sae(run.stage_dir("sae") / "sae_lens", allow_layer_mismatch=True)


# ---------------------------------------------------------------------------------------- features
def _token_lookup(run: Run):
    tokenizer = run.tokenizer("source")
    docs = run.documents()
    cache: dict[int, list[str]] = {}
    c = run.config

    def lookup(doc: int) -> list[str]:
        if doc not in cache:
            tok = activations.tokenize_document(tokenizer, docs[doc], chat=c.models.source.chat,
                                                max_length=c.corpus.max_length)
            cache[doc] = [tokenizer.decode([int(t)]) for t in tok.ids]
        return cache[doc]

    return lookup


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def run_features(run: Run) -> None:
    from ..evaluate import context_overlap

    c = run.config
    out = run.stage_dir("features")
    sae = load_run_sae(run)
    stats = load_feature_stats(run)
    ridge_map, meta = load_ridge_map(run)
    W = np.asarray(ridge_map.W, np.float64)
    norms = _load_json(run.stage_dir("map") / "summary.json")["norms"]
    target_norm = norms["target_median_norm"] if c.mapping.scale == "target_norm" else None
    idx = sae_lib.select_features(stats, c.features.method, None if c.features.method == "explicit" else c.features.n,
                                  seed=c.seed, indices=tuple(c.features.indices) or None,
                                  min_freq=c.features.min_freq, max_freq=c.features.max_freq)
    directions = np.asarray(sae_lib.decoder_directions(sae, unit=True))[idx]
    mapped, map_record = sae_lib.map_directions(directions, W, c.mapping.scale, target_norm)
    controls, ctrl_record = sae_lib.control_directions(c.controls.n, c.controls.mode, W, seed=c.seed + 1,
                                                       scale_policy=c.mapping.scale, target_norm=target_norm)
    # Verbaliser-free check: do the mapped directions pick out, in the target model, the same
    # tokens the source feature fires on?  Same paired-token index space for both sides.
    pairs = load_pairs(run)
    chosen = jnp.asarray(idx)
    src_acts = np.concatenate([np.asarray(sae_lib.encode_selected(sae, pairs["x"][i:i + 4096], chosen))
                               for i in range(0, len(pairs["x"]), 4096)])
    y_centred = pairs["y"] - pairs["y"].mean(0)
    overlap = context_overlap(src_acts, y_centred @ _unit(mapped).T, y_centred @ _unit(controls).T,
                              k=c.evaluate.context_k, src_threshold=0.0)
    lookup = _token_lookup(run)
    contexts = {int(f): sae_lib.feature_contexts(stats, int(f), lookup, n=min(5, c.sae.n_contexts)) for f in idx}
    np.savez(out / "directions.npz", features=idx, source=directions.astype(np.float32), mapped=mapped,
             controls=controls)
    _save_json(out / "features.json", {
        "features": idx.tolist(), "freq": stats.freq[idx].tolist(), "max_act": stats.max_act[idx].tolist(),
        "mapping": map_record, "controls": ctrl_record, "context_overlap": overlap, "contexts": contexts,
        "target_norm": target_norm})
    _log(f"features: {len(idx)} selected; context overlap matched {overlap['mean_matched']:.3f} vs "
         f"control {overlap['mean_control']:.3f}")


def load_directions(run: Run) -> dict[str, np.ndarray]:
    with np.load(run.stage_dir("features") / "directions.npz") as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------ verbalisers
def washout_settings(run: Run) -> list[float]:
    """The washout alphas this run explains with: the configured one first, then the comparison."""
    w = run.config.washout
    alphas = [float(w.alpha)]
    if w.compare:
        other = 0.0 if w.alpha > 0 else float(w.compare_alpha)
        if other not in alphas:
            alphas.append(other)
    return alphas


def alpha_key(alpha: float) -> str:
    return f"alpha={alpha:g}"


def build_verbaliser(run: Run, side: str):
    """The configured verbaliser of one side: the model itself (self) or a released NLA checkpoint."""
    from ..models import load_model
    from ..verbalize import Verbaliser, load_verbaliser_spec, self_verbaliser_spec

    v = run.config.verbalizers[side]
    overrides = dict(v.spec)
    if v.kind == "self":
        lm = run.model(side)
        spec = self_verbaliser_spec(v.prompt, lm.tokenizer, **overrides)
    else:
        lm = load_model(v.checkpoint, dtype=v.dtype or run.config.models[side].dtype, mesh=run.mesh)
        spec = load_verbaliser_spec(v.checkpoint, overrides)
    if v.injection_layer >= 0:
        spec = spec.replace(injection_layer=int(v.injection_layer))
    if v.injection_mode:
        spec = spec.replace(injection_mode=v.injection_mode)
    if v.scale:
        changes = {"scale_policy": v.scale}
        if v.scale == "activation":  # the typical residual norm at this side's layer, measured in `map`
            norms = _load_json(run.stage_dir("map") / "summary.json")["norms"]
            changes["injection_scale"] = norms[f"{side}_median_norm"]
        spec = spec.replace(**changes)
    return Verbaliser(lm.model, lm.tokenizer, spec, mesh=run.mesh), lm


def run_verbalize(run: Run, side: str) -> None:
    """Explain this side's vectors under each washout setting, a chunk at a time.

    Source: the SAE features' own decoder directions.  Target: the mapped directions, then the
    controls.  Washout alpha 0 means bare directions (as in the reference experiment); alpha > 0
    explains direction + real background activations and subtracts the backgrounds' logits.
    Finished chunks are kept in partial.json, so a killed stage resumes where it stopped.
    """
    from ..verbalize import WashoutConfig

    c = run.config
    v = c.verbalizers[side]
    out = run.stage_dir(f"verbalize_{side}")
    dirs = load_directions(run)
    groups = {"features": dirs["source"]} if side == "source" else {"features": dirs["mapped"],
                                                                     "controls": dirs["controls"]}
    pairs = load_pairs(run)
    acts = pairs["x" if side == "source" else "y"]
    rng = np.random.default_rng(c.seed + (11 if side == "source" else 13))
    backgrounds = acts[rng.choice(len(acts), size=c.washout.n_backgrounds, replace=False)]
    t_load = time.perf_counter()
    verbaliser, lm = build_verbaliser(run, side)
    _log(f"verbalize_{side}: verbaliser {lm.model_id} ready in {time.perf_counter() - t_load:.1f}s")
    partial_path = out / "partial.json"
    partial = _load_json(partial_path) if partial_path.exists() else {}
    chunk = max(1, v.batch_size // max(1, v.n_samples))
    t0 = time.perf_counter()
    for alpha in washout_settings(run):
        key = alpha_key(alpha)
        washout = None if alpha == 0 else WashoutConfig(alpha=alpha, n_backgrounds=c.washout.n_backgrounds,
                                                        direction_scale=c.washout.background_scale)
        if washout is not None:  # 2 x n_backgrounds rows per vector and sample
            chunk = max(1, v.batch_size // (v.n_samples * 2 * c.washout.n_backgrounds))
        for name, vectors in groups.items():
            for start in range(0, len(vectors), chunk):
                slot = f"{key}/{name}/{start}"
                if slot in partial:
                    continue
                t_chunk = time.perf_counter()
                explanations = verbaliser.explain(
                    vectors[start:start + chunk], n_samples=v.n_samples, max_new_tokens=v.max_new_tokens,
                    temperature=v.temperature, top_p=v.top_p, seed=c.seed * 100_003 + start,
                    washout=washout, backgrounds=None if washout is None else backgrounds,
                    batch_size=v.batch_size, progress=False)
                partial[slot] = {"parsed": [e.parsed for e in explanations], "raw": [e.raw for e in explanations]}
                _save_json(partial_path, partial)
                _log(f"verbalize_{side}: {key} {name} {start + len(explanations)}/{len(vectors)} "
                     f"({time.perf_counter() - t_chunk:.1f}s)")
    settings = {}
    for alpha in washout_settings(run):
        key = alpha_key(alpha)
        settings[key] = {}
        for name in groups:
            parsed, raw = [], []
            for slot in sorted((s for s in partial if s.startswith(f"{key}/{name}/")),
                               key=lambda s: int(s.rsplit("/", 1)[1])):
                parsed += partial[slot]["parsed"]
                raw += partial[slot]["raw"]
            settings[key][name] = parsed
            settings[key][f"{name}_raw"] = raw
    _save_json(out / "explanations.json", {
        "side": side, "model": lm.model_id, "spec": verbaliser.spec.__dict__ | {"extra": dict(verbaliser.spec.extra)},
        "prompt": verbaliser.prompt.text, "settings": settings, "seconds": time.perf_counter() - t0})
    first = settings[alpha_key(washout_settings(run)[0])]["features"][:3]
    _log(f"verbalize_{side}: e.g. {[s[0] for s in first]}")


# ---------------------------------------------------------------------------------------- evaluate
def run_evaluate(run: Run) -> None:
    from .. import evaluate as ev

    c = run.config
    out = run.stage_dir("evaluate")
    src = _load_json(run.stage_dir("verbalize_source") / "explanations.json")
    tgt = _load_json(run.stage_dir("verbalize_target") / "explanations.json")
    embedder = ev.load_embedder(c.evaluate.embedder or None)
    results = {}
    for key in src["settings"]:
        s, t = src["settings"][key], tgt["settings"][key]
        result = ev.evaluate_explanations(
            ev.embed_groups(embedder, s["features"]), ev.embed_groups(embedder, t["features"]),
            ev.embed_groups(embedder, t["controls"]), aggregate=c.evaluate.aggregate,
            n_permutations=c.evaluate.n_permutations, n_bootstrap=c.evaluate.n_bootstrap, seed=c.seed)
        result["summary_line"] = ev.summary_line(result)
        results[key] = result
    primary = alpha_key(float(c.washout.alpha))
    features = _load_json(run.stage_dir("features") / "features.json")
    overlap = features["context_overlap"]
    _save_json(out / "evaluation.json", {"primary": primary, "results": results, "context_overlap": overlap})
    lines = [f"{results[primary]['summary_line']}  [washout {primary}]"]
    for key, result in results.items():
        if key != primary:
            lines.append(f"  comparison, washout {key}: {result['summary_line']}")
    lines.append(f"  verbaliser-free: {ev.context_overlap_line(overlap)}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    _log(lines[0])


# ------------------------------------------------------------------------------------------ report
def run_report(run: Run) -> None:
    from ..report import write_report
    from .config import to_dict

    c = run.config
    map_summary = _load_json(run.stage_dir("map") / "summary.json")
    fit = map_summary["fit"]
    sae_summary = _load_json(run.stage_dir("sae") / "summary.json")
    features = _load_json(run.stage_dir("features") / "features.json")
    evaluation = _load_json(run.stage_dir("evaluate") / "evaluation.json")
    src = _load_json(run.stage_dir("verbalize_source") / "explanations.json")
    tgt = _load_json(run.stage_dir("verbalize_target") / "explanations.json")
    primary = evaluation["primary"]
    result = evaluation["results"][primary]
    per = result["per_feature"]
    feature_rows = []
    for i, f in enumerate(features["features"]):
        feature_rows.append({
            "id": f, "freq": features["freq"][i],
            "source_explanation": src["settings"][primary]["features"][i],
            "target_explanation": tgt["settings"][primary]["features"][i],
            "matched": per["matched"][i], "control_mean": per["control_mean"][i], "lift": per["lift"][i],
            "retrieval_rank": per["retrieval_rank"][i]})
    # held-out squared error per element: fold SSE [lambdas, folds] / (fold rows x target width)
    d_out = len(map_summary["norms"]["target_mean"])
    cv_mse = np.asarray(fit["cv_sse"]) / (np.asarray(fit["fold_counts"])[None, :] * d_out)
    timings = {stage: _load_json(run.stage_dir(stage) / "done.json")["seconds"]
               for stage in ("map", "sae", "features", "verbalize_source", "verbalize_target", "evaluate")}
    data = {
        "config": to_dict(c),
        "map": {"source_model": map_summary["source_model"], "target_model": map_summary["target_model"],
                "source_layer": map_summary["source_layer"], "target_layer": map_summary["target_layer"],
                "r2": fit["heldout_r2"], "r2_mean": fit["heldout_r2_mean"], "cosine": fit["heldout_mean_cosine"],
                "pooled_cosine": fit["heldout_pooled_cosine"], "lambda": fit["lambda"], "n_pairs": map_summary["n_pairs"],
                "n_documents": map_summary["n_documents"],
                "cv": {"lambdas": fit["lambdas"], "cv_r2": fit["cv_r2"], "cv_error": cv_mse.tolist()}},
        "sae": {**sae_summary["heldout"], "n_features": sae_summary["n_features"],
                "top_contexts": {str(k): [ctx["text"] for ctx in v] for k, v in features["contexts"].items()}},
        "features": feature_rows,
        "controls": [{"explanation": e} for e in tgt["settings"][primary]["controls"]],
        "evaluation": result,
        "context_overlap": evaluation["context_overlap"],
        "washout": {key: r for key, r in evaluation["results"].items()},
        "timings": timings,
    }
    path = write_report(run.stage_dir("report"), data)
    _log(f"report: {path}")
