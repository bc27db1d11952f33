"""The stages of an experiment, each declared once in `STAGES` at the end of this file.

A stage is a function of the run's context that reads its inputs from earlier stages' directories
(typed records from `outputs`, arrays from .npy/.npz or orbax) and writes its own.  Its
declaration says which config sections and which earlier stages its result depends on, which base
models it runs, and what it writes; the runner (`run.py`) only iterates over the table.

To add a stage: write its function here, declare it in `STAGES` in data-flow order, and give its
records a dataclass in `outputs.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from .. import activations, ridge
from .. import sae as sae_lib
from ..failpoints import failpoint
from ..integrity import path_identity
from ..jsonio import load_json, save_json
from ..models import make_hidden_fn
from ..models.fuse import fused
from ..models.layers import with_decode_attention, with_down_slices
from ..models.quantize import quantized
from ..models.scan import is_scanned, missing_gpu_xla_flags, scanned
from ..sharding import to_host
from .context import RunContext, log
from .outputs import (
    ActivationNorms,
    Evaluation,
    ExplanationSet,
    FeatureSet,
    MapSummary,
    RoundTrip,
    SaeSummary,
    StageDone,
    reconstruction_key,
)


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


def run_map(ctx: RunContext) -> None:
    c = ctx.config
    out = ctx.stage_dir("map")
    src, tgt = ctx.model("source"), ctx.model("target")
    docs = ctx.documents()
    folds = activations.assign_folds(len(docs), c.ridge.folds, seed=c.seed)
    stats = ridge.init_stats(src.config.d_model, tgt.config.d_model, n_folds=c.ridge.folds)
    keeper = _CappedPairs(c.ridge.folds, max(1, c.ridge.keep_pairs // c.ridge.folds))
    holder = {"stats": stats, "nonfinite": jnp.zeros((), jnp.int32)}

    def consume(x, y, mask, fold, info):
        if c.ridge.on_nonfinite != "ignore":  # a pair with a NaN/inf in either activation is left out
            mask, bad = _finite_pairs(x, y, mask)
            holder["nonfinite"] = holder["nonfinite"] + bad  # on the device: no wait per batch
            if c.ridge.on_nonfinite == "raise" and int(bad):
                raise RuntimeError(f"map: {int(bad)} paired activations of a batch are not finite (NaN/inf) and "
                                   "ridge.on_nonfinite='raise'; the stage is not marked done")
        holder["stats"] = ridge.accumulate(holder["stats"], x, y, fold=int(fold), weights=mask,
                                           on_nonfinite="ignore" if c.ridge.on_nonfinite == "ignore" else "skip")
        keeper.add(x, y, mask, int(fold), info)

    summary = activations.collect_pairs(
        make_hidden_fn(src.model, c.models.source.layer, mesh=ctx.mesh),
        make_hidden_fn(tgt.model, c.models.target.layer, mesh=ctx.mesh), src.tokenizer, tgt.tokenizer, docs,
        consumer=consume, pairing=c.pairing.method, skip_first=c.pairing.skip_first,
        batch_size=c.corpus.batch_size, buckets=tuple(c.corpus.buckets), max_length=c.corpus.max_length,
        chat_source=c.models.source.chat, chat_target=c.models.target.chat, fold_of_doc=folds, mesh=ctx.mesh)
    stats = holder["stats"]
    n_collected, n_nonfinite = int(summary["n_pairs"]), int(holder["nonfinite"])
    check_skipped("map", "paired activations", n_nonfinite, n_collected, c.ridge.max_nonfinite_fraction,
                  "ridge.max_nonfinite_fraction", "not finite (NaN/inf; an overflow or a broken checkpoint?)")
    t0 = time.perf_counter()
    ridge_map, fit = ridge.solve(stats, tuple(c.ridge.lambdas), standardize=c.ridge.standardize,
                                 per_target=c.ridge.per_target, compute_dtype=c.ridge.compute_dtype)
    solve_s = time.perf_counter() - t0
    pairs = keeper.arrays()
    cos = ridge.heldout_cosine(stats, fit.lam if not c.ridge.per_target else fit.lam_per_target,
                               _chunks(pairs, 8192), standardize=c.ridge.standardize,
                               compute_dtype=c.ridge.compute_dtype)
    fit.mean_cosine = cos["mean_cosine"]
    # (ridge.solve itself refuses a map that is not finite)
    check_finite("map", {"held-out R^2": fit.r2, "held-out mean cosine": fit.mean_cosine})
    meta = {
        "source_model": src.model_id, "target_model": tgt.model_id,
        "source_layer": int(c.models.source.layer), "target_layer": int(c.models.target.layer),
        "corpus_hash": ctx.corpus_hash(), "pairing": c.pairing.to_dict(), "n_pairs": n_collected - n_nonfinite,
        "n_documents": int(summary["n_documents"]), "fit": fit.to_metadata(per_target=c.ridge.per_target),
        "heldout_mean_cosine_pairs": int(cos["count"]),
    }
    failpoint("save_map")
    ridge.save_map(out / "ridge_map", ridge_map, meta, overwrite=True)
    save_pairs(out / "pairs", pairs)
    norms = ActivationNorms(source_median_norm=float(np.median(np.linalg.norm(pairs["x"], axis=1))),
                            target_median_norm=float(np.median(np.linalg.norm(pairs["y"], axis=1))),
                            target_mean=pairs["y"].mean(0).tolist())
    kept = np.asarray(summary["kept_per_document"])
    save_json(out / "kept_per_document.json", {"pairing": c.pairing.to_dict(), "kept": kept.tolist()})
    MapSummary(**meta, norms=norms, solve_seconds=solve_s, nonfinite_pairs=n_nonfinite,
               collect={k: v for k, v in summary.items() if k != "kept_per_document"},
               kept_per_document={"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max()),
                                  "zero": int((kept == 0).sum())},
               kept_pairs_for_sae_and_evaluation=int(len(pairs["x"]))).save(out)
    log(f"map: {n_collected - n_nonfinite} pairs from {summary['n_documents']} documents; lambda={fit.lam:.3g}, "
         f"held-out R^2={fit.r2:.3f}, mean cosine={fit.mean_cosine:.3f}")


@jax.jit
def _finite_pairs(x, y, mask):
    """(mask without the pairs holding a NaN/inf, how many valid pairs that removed)."""
    ok = mask & jnp.all(jnp.isfinite(x), axis=1) & jnp.all(jnp.isfinite(y), axis=1)
    return ok, jnp.sum(mask & ~ok).astype(jnp.int32)


def check_skipped(stage: str, what: str, skipped: int, total: int, max_fraction: float, field: str,
                  why: str) -> None:
    """Count what a stage left out; past `max_fraction` of `total` the stage fails (not marked done)."""
    if skipped == 0:
        return
    fraction = skipped / max(total, 1)
    message = f"{stage}: {skipped} of {total} {what} ({fraction:.2%}) were {why}"
    if fraction > max_fraction:
        raise RuntimeError(f"{message}: more than {field}={max_fraction:g}; the stage is not marked done")
    log(f"{message}; left out and counted in the summary (at most {field}={max_fraction:g} allowed)")


def check_finite(stage: str, quantities: dict) -> None:
    """A stage whose result is not finite fails, naming the stage, the quantity and how much of it."""
    for name, value in quantities.items():
        array = np.asarray(value if value is not None else np.nan, np.float64)
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            where = f"{bad} of {array.size} values" if array.size > 1 else repr(float(array))
            raise RuntimeError(f"{stage}: {name} is not finite ({where}); the stage is not marked done")


def _chunks(pairs: dict[str, np.ndarray], size: int):
    for i in range(0, len(pairs["x"]), size):
        yield pairs["x"][i:i + size], pairs["y"][i:i + size], pairs["fold"][i:i + size]


def save_pairs(directory: Path, pairs: dict[str, np.ndarray]) -> None:
    """One .npy per field, so later stages memory-map them (at the paper's 200k pairs x and y are 7 GB,
    and the verbalize stages need only a few background rows of them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in pairs.items():
        np.save(directory / f"{name}.npy", array)
        failpoint("save_pairs")


def load_pairs(ctx: RunContext) -> dict[str, np.ndarray]:
    """The kept pairs of the map stage, memory-mapped read-only (runs written before: pairs.npz)."""
    directory = ctx.stage_dir("map") / "pairs"
    if directory.is_dir():
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(directory.glob("*.npy"))}
    with np.load(ctx.stage_dir("map") / "pairs.npz") as f:
        return {k: f[k] for k in f.files}


def load_ridge_map(ctx: RunContext):
    src, tgt = ctx.config.models.source, ctx.config.models.target
    return ridge.load_map(ctx.stage_dir("map") / "ridge_map",
                          expect={"source_layer": int(src.layer), "target_layer": int(tgt.layer)})


# --------------------------------------------------------------------------------------------- sae
def run_sae(ctx: RunContext) -> None:
    c = ctx.config
    out = ctx.stage_dir("sae")
    pairs = load_pairs(ctx)
    x = pairs["x"]
    d_model = x.shape[1]
    if c.sae.path:
        sae = sae_lib.load_sae(c.sae.path, d_model=d_model, layer=int(c.models.source.layer),
                               allow_layer_mismatch=c.sae.allow_layer_mismatch, format=c.sae.format or None)
        train_metrics = {"loaded_from": c.sae.path}
        held = x
    else:
        # Train on folds 1..K-1; fold 0 (whole documents) is held out for the reported quality.
        source_model_id = MapSummary.load(ctx.stage_dir("map")).source_model  # no weights needed
        train_rows = pairs["fold"] != 0
        held = x[~train_rows] if (~train_rows).any() else x
        sae, train_metrics = sae_lib.train_sae(
            x[train_rows], d_model, c.sae.n_features, c.sae.k, c.sae.steps, lr=c.sae.lr or None,
            batch_size=min(c.sae.batch_size, int(train_rows.sum())), seed=c.seed, ckpt_dir=out / "train",
            mesh=ctx.mesh, layer=int(c.models.source.layer), model_id=source_model_id,
            hook_name=f"blocks.{int(c.models.source.layer)}.hook_resid_post")
        sae_lib.save_sae_lens(sae, out / "sae_lens")
    quality = sae_lib.evaluate_sae(sae, held)
    check_finite("sae", {"held-out FVE": quality["fve"], "decoder": np.asarray(sae.W_dec),
                         "encoder": np.asarray(sae.W_enc)})
    stats = sae_lib.feature_stats(sae, ((x[i:i + 4096], pairs["doc"][i:i + 4096], pairs["source_pos"][i:i + 4096])
                                        for i in range(0, len(x), 4096)), top_k=c.sae.n_contexts)
    np.savez(out / "feature_stats.npz", n_tokens=stats.n_tokens, count=stats.count, max_act=stats.max_act,
             sum_act=stats.sum_act, top_acts=stats.top_acts, top_doc=stats.top_doc, top_pos=stats.top_pos)
    if c.sae.path:
        sae_lib.save_sae_lens(sae, out / "sae_lens")
    train_metrics = {k: v for k, v in train_metrics.items() if k != "history"}
    SaeSummary(heldout=quality, heldout_rows=int(len(held)), train=train_metrics,
               alive_on_corpus=float(stats.alive.mean()), n_features=sae.n_features).save(out)
    log(f"sae: held-out FVE={quality['fve']:.3f}, L0={quality['l0']:.1f}, dead={quality['dead_frac']:.3f}")


def load_feature_stats(ctx: RunContext) -> sae_lib.FeatureStats:
    with np.load(ctx.stage_dir("sae") / "feature_stats.npz") as f:
        return sae_lib.FeatureStats(**{k: (int(f[k]) if k == "n_tokens" else f[k]) for k in f.files})


def load_run_sae(ctx: RunContext) -> sae_lib.SAE:
    return sae_lib.load_sae(ctx.stage_dir("sae") / "sae_lens", allow_layer_mismatch=True)


# ---------------------------------------------------------------------------------------- features
def _token_lookup(ctx: RunContext):
    tokenizer = ctx.tokenizer("source")
    docs = ctx.documents()
    cache: dict[int, list[str]] = {}
    c = ctx.config

    def lookup(doc: int) -> list[str]:
        if doc not in cache:
            tok = activations.tokenize_document(tokenizer, docs[doc], chat=c.models.source.chat,
                                                max_length=c.corpus.max_length)
            cache[doc] = [tokenizer.decode([int(t)]) for t in tok.ids]
        return cache[doc]

    return lookup


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def run_features(ctx: RunContext) -> None:
    from ..evaluate import context_overlap

    c = ctx.config
    out = ctx.stage_dir("features")
    sae = load_run_sae(ctx)
    stats = load_feature_stats(ctx)
    ridge_map, meta = load_ridge_map(ctx)
    W = np.asarray(ridge_map.W, np.float64)
    norms = MapSummary.load(ctx.stage_dir("map")).norms
    target_norm = norms.target_median_norm if c.mapping.scale == "target_norm" else None
    idx = sae_lib.select_features(stats, c.features.method, None if c.features.method == "explicit" else c.features.n,
                                  seed=c.seed, indices=tuple(c.features.indices) or None,
                                  min_freq=c.features.min_freq, max_freq=c.features.max_freq)
    directions = np.asarray(sae_lib.decoder_directions(sae, unit=True))[idx]
    mapped, map_record = sae_lib.map_directions(directions, W, c.mapping.scale, target_norm)
    controls, ctrl_record = sae_lib.control_directions(c.controls.n, c.controls.mode, W, seed=c.seed + 1,
                                                       scale_policy=c.mapping.scale, target_norm=target_norm)
    # Verbalizer-free check: do the mapped directions pick out, in the target model, the same
    # tokens the source feature fires on?  Same paired-token index space for both sides.
    pairs = load_pairs(ctx)
    chosen = jnp.asarray(idx)
    src_acts = np.concatenate([np.asarray(sae_lib.encode_selected(sae, pairs["x"][i:i + 4096], chosen))
                               for i in range(0, len(pairs["x"]), 4096)])
    y_centred = pairs["y"] - pairs["y"].mean(0)
    overlap = context_overlap(src_acts, y_centred @ _unit(mapped).T, y_centred @ _unit(controls).T,
                              k=c.evaluate.context_k, src_threshold=0.0)
    lookup = _token_lookup(ctx)
    contexts = {int(f): sae_lib.feature_contexts(stats, int(f), lookup, n=min(5, c.sae.n_contexts)) for f in idx}
    # Random directions of the source space for the source self round trip: with controls.mode 'source' the
    # very directions whose images are the target's controls (the same seed), else drawn the same way.
    source_controls = sae_lib.random_directions(c.controls.n, W.shape[0], seed=c.seed + 1)
    np.savez(out / "directions.npz", features=idx, source=directions.astype(np.float32), mapped=mapped,
             controls=controls, source_controls=source_controls)
    FeatureSet(features=idx.tolist(), freq=stats.freq[idx].tolist(), max_act=stats.max_act[idx].tolist(),
               mapping=map_record, controls=ctrl_record, context_overlap=overlap, contexts=contexts,
               target_norm=target_norm).save(out)
    log(f"features: {len(idx)} selected; context overlap matched {overlap['mean_matched']:.3f} vs "
         f"control {overlap['mean_control']:.3f}")


def load_directions(ctx: RunContext) -> dict[str, np.ndarray]:
    with np.load(ctx.stage_dir("features") / "directions.npz") as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------ verbalizers
def washout_settings(ctx: RunContext) -> list[float]:
    """The washout alphas this run explains with: the configured one first, then the comparison."""
    w = ctx.config.washout
    alphas = [float(w.alpha)]
    if w.compare:
        other = 0.0 if w.alpha > 0 else float(w.compare_alpha)
        if other not in alphas:
            alphas.append(other)
    return alphas


def alpha_key(alpha: float) -> str:
    return f"alpha={alpha:g}"


def build_verbalizer(ctx: RunContext, side: str):
    """The configured verbalizer of one side: the model itself (self) or a released NLA checkpoint."""
    from ..nla import load_nla_verbalizer
    from ..verbalize import Verbalizer, self_verbalizer_spec

    v = ctx.config.verbalizers[side]
    overrides = dict(v.spec)
    if v.kind == "self":
        lm = ctx.model(side)
        spec = self_verbalizer_spec(v.prompt, lm.tokenizer, **overrides)
    else:  # the sidecar's contract, checked against the live tokenizer and model before anything runs
        av = load_nla_verbalizer(v.checkpoint, dtype=v.dtype or ctx.config.models[side].dtype, mesh=ctx.mesh,
                                 spec_overrides=overrides)
        lm, spec = av.model, av.verbalizer.spec
    if v.injection_layer >= 0:
        spec = spec.replace(injection_layer=int(v.injection_layer))
    if v.injection_mode:
        spec = spec.replace(injection_mode=v.injection_mode)
    if v.scale:
        changes = {"scale_policy": v.scale}
        if v.scale == "activation":  # the typical residual norm at this side's layer, measured in `map`
            changes["injection_scale"] = MapSummary.load(ctx.stage_dir("map")).norms.median(side)
        spec = spec.replace(**changes)
    # the decode attention, down slices, fused projections, int8 kernels and stacked blocks each give a new module: a
    # self-verbalizer's model still serves the other stages, so only an NLA's own model is consumed (fusing, stacking)
    model = with_decode_attention(lm.model, v.decode_attention)
    try:  # whether the slices divide d_ff is known only now, with the model
        model = with_down_slices(model, v.down_slices)
    except ValueError as err:
        raise ValueError(f"verbalizers.{side}.down_slices: {err}") from None
    model = quantized(fused(model, v.projections, consume=v.kind == "nla"), v.weights)
    if v.layers == "scanned" and not is_scanned(model):  # "" and "unrolled" keep the model's layout (validate)
        model = scanned(model, consume=v.kind == "nla")
    missing = missing_gpu_xla_flags()
    if is_scanned(model) and missing and jax.default_backend() == "gpu":
        log(f"warning: the {side} verbalizer runs scanned blocks on GPU without XLA_FLAGS {' '.join(missing)}: each decode "
            "step copies every block's weights out of its stack (2-3x slower; BENCHMARKS.md, 'Scanned layers')")
    return Verbalizer(model, lm.tokenizer, spec, mesh=ctx.mesh), lm


def verbalize_chunk(batch_size: int, n_samples: int, n_backgrounds: int) -> int:
    """Vectors explained per chunk: a batch holds n_samples rows per vector, and with washout
    (n_backgrounds > 0) 2 x n_backgrounds rows per vector and sample."""
    rows_per_vector = n_samples * (2 * n_backgrounds if n_backgrounds else 1)
    return max(1, batch_size // max(1, rows_per_vector))


def special_tokens(tokenizer) -> tuple[str, ...]:
    specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    specials |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                 if getattr(t, "special", False)}
    return tuple(sorted(specials, key=len, reverse=True))


def is_blank(text: str, specials: tuple[str, ...]) -> bool:
    """Empty once the tokenizer's special tokens and white space are taken out ('<pad><pad>' is blank)."""
    for token in specials:
        text = text.replace(token, "")
    return not text.strip()


def verbalized_groups(ctx: RunContext, side: str) -> dict[str, np.ndarray]:
    """The vectors a side's verbalizer explains, by group name."""
    dirs = load_directions(ctx)
    if side == "target":
        return {"features": dirs["mapped"], "controls": dirs["controls"]}
    groups = {"features": dirs["source"]}
    if ctx.config.verbalizers.source.explain_controls:
        if "source_controls" not in dirs:
            raise RuntimeError("verbalize_source: the features stage's directions.npz has no source_controls (written "
                               "by an older crossmap): rerun it with --force --only features")
        groups["controls"] = dirs["source_controls"]
    return groups


def count_blank(settings: dict, specials: tuple[str, ...]) -> dict:
    """{setting: {group: [blank, all]}} over every sample of every explanation."""
    out = {}
    for key, groups in settings.items():
        out[key] = {}
        for name, items in groups.items():
            if name.endswith("_raw"):
                continue
            samples = [s for item in items for s in item]
            out[key][name] = [sum(is_blank(s, specials) for s in samples), len(samples)]
    return out


def run_verbalize(ctx: RunContext, side: str) -> None:
    """Explain this side's vectors under each washout setting, a chunk at a time.

    Source: the SAE features' own decoder directions.  Target: the mapped directions, then the
    controls.  Washout alpha 0 means bare directions (as in the reference experiment); alpha > 0
    explains direction + real background activations and subtracts the backgrounds' logits.
    Finished chunks are kept in partial.json, so a killed stage resumes where it stopped.
    """
    from ..verbalize import WashoutConfig

    c = ctx.config
    v = c.verbalizers[side]
    out = ctx.stage_dir(f"verbalize_{side}")
    groups = verbalized_groups(ctx, side)
    pairs = load_pairs(ctx)
    acts = pairs["x" if side == "source" else "y"]
    rng = np.random.default_rng(c.seed + (11 if side == "source" else 13))
    if c.washout.n_backgrounds > len(acts):
        raise ValueError(f"washout.n_backgrounds={c.washout.n_backgrounds} is more than the {len(acts)} paired "
                         "activations the map stage kept (ridge.keep_pairs): lower it")
    backgrounds = acts[rng.choice(len(acts), size=c.washout.n_backgrounds, replace=False)]
    t_load = time.perf_counter()
    verbalizer, lm = build_verbalizer(ctx, side)
    log(f"verbalize_{side}: verbalizer {lm.model_id} ready in {time.perf_counter() - t_load:.1f}s")
    partial_path = out / "partial.json"
    partial = load_json(partial_path) if partial_path.exists() else {}
    t0 = time.perf_counter()
    for alpha in washout_settings(ctx):
        key = alpha_key(alpha)
        washout = None if alpha == 0 else WashoutConfig(alpha=alpha, n_backgrounds=c.washout.n_backgrounds,
                                                        direction_scale=c.washout.background_scale)
        chunk = verbalize_chunk(v.batch_size, v.n_samples, 0 if washout is None else c.washout.n_backgrounds)
        for name, vectors in groups.items():
            for start in range(0, len(vectors), chunk):
                slot = f"{key}/{name}/{start}"
                if slot in partial:
                    continue
                t_chunk = time.perf_counter()
                explanations = verbalizer.explain(
                    vectors[start:start + chunk], n_samples=v.n_samples, max_new_tokens=v.max_new_tokens or None,
                    temperature=None if v.temperature < 0 else v.temperature, top_p=v.top_p,
                    seed=c.seed * 100_003 + start, washout=washout,
                    backgrounds=None if washout is None else backgrounds, batch_size=v.batch_size, progress=False)
                partial[slot] = {"parsed": [e.parsed for e in explanations], "raw": [e.raw for e in explanations],
                                 "truncated": [e.truncated for e in explanations]}
                save_json(partial_path, partial)
                log(f"verbalize_{side}: {key} {name} {start + len(explanations)}/{len(vectors)} "
                     f"({time.perf_counter() - t_chunk:.1f}s)")
    settings, truncated = {}, {}
    for alpha in washout_settings(ctx):
        key = alpha_key(alpha)
        settings[key], truncated[key] = {}, {}
        for name in groups:
            parsed, raw, cut = [], [], []
            for slot in sorted((s for s in partial if s.startswith(f"{key}/{name}/")),
                               key=lambda s: int(s.rsplit("/", 1)[1])):
                parsed += partial[slot]["parsed"]
                raw += partial[slot]["raw"]
                cut += [t for item in partial[slot]["truncated"] for t in item]
            settings[key][name] = parsed
            settings[key][f"{name}_raw"] = raw
            truncated[key][name] = [int(sum(cut)), len(cut)]
            if any(cut):
                log(f"verbalize_{side}: {key} {name}: {sum(cut)} of {len(cut)} explanations have no closing tag "
                    "(truncated at max_new_tokens); their raw text is kept as the explanation")
    blank = count_blank(settings, special_tokens(lm.tokenizer))
    for key, groups_blank in blank.items():
        for name, (n_blank, n_all) in groups_blank.items():
            if n_blank:
                log(f"verbalize_{side}: {key} {name}: {n_blank} of {n_all} explanations are empty or special "
                    "tokens only")
            if n_blank == n_all:
                raise RuntimeError(f"verbalize_{side}: all {n_all} explanations of the {name} ({key}) are empty or "
                                   f"special tokens only (e.g. {settings[key][f'{name}_raw'][0][0][:60]!r}): the "
                                   "verbalizer wrote no text; the stage is not marked done")
    ExplanationSet(side=side, model=lm.model_id,
                   spec=verbalizer.spec.__dict__ | {"extra": dict(verbalizer.spec.extra)},
                   prompt=verbalizer.prompt.text, settings=settings, seconds=time.perf_counter() - t0,
                   blank=blank, truncated=truncated).save(out)
    first = settings[alpha_key(washout_settings(ctx)[0])]["features"][:3]
    log(f"verbalize_{side}: e.g. {[s[0] for s in first]}")


# -------------------------------------------------------------------------------------- round trip
# Which explanations each side's reconstructor reads: its own verbalizer's (the self round trip) and,
# for the source, the target verbalizer's too (the foreign explanation carried back into the source).
ROUND_TRIP_READS = {"source": ("source", "target"), "target": ("target",)}


def run_round_trip(ctx: RunContext) -> None:
    """Each configured reconstructor (AR) turns explanations back into vectors; evaluate scores them."""
    from ..nla import Reconstructor

    c = ctx.config
    out = ctx.stage_dir("round_trip")
    explained = {side: ExplanationSet.load(ctx.stage_dir(f"verbalize_{side}")) for side in ("source", "target")}
    arrays, reconstructors, n_texts = {}, {}, 0
    t0 = time.perf_counter()
    for ar_side in ("source", "target"):
        r = c.reconstructors[ar_side]
        if not r.checkpoint:
            continue
        t_load = time.perf_counter()
        ar = Reconstructor(r.checkpoint, dtype=r.dtype or c.models[ar_side].dtype, mesh=ctx.mesh,
                           batch_size=r.batch_size, layers=r.layers)
        log(f"round_trip: reconstructor {ar.model_id} ready in {time.perf_counter() - t_load:.1f}s")
        reconstructors[ar_side] = {"model": ar.model_id, "checkpoint": r.checkpoint,
                                   "extraction_layer": ar.meta.extraction_layer}
        for av_side in ROUND_TRIP_READS[ar_side]:
            for setting, groups in explained[av_side].settings.items():
                for group in ("features", "controls"):
                    if group not in groups:
                        continue
                    items = groups[group]
                    flat = [sample for item in items for sample in item]
                    vectors = ar.reconstruct(flat)
                    n_texts += len(flat)
                    key = reconstruction_key(setting, ar_side, av_side, group)
                    arrays[key] = vectors.reshape(len(items), len(flat) // len(items), ar.d_model)
                    check_finite("round_trip", {key: arrays[key]})
        del ar
    seconds = time.perf_counter() - t0
    np.savez(out / "reconstructions.npz", **arrays)
    RoundTrip(reconstructors=reconstructors, keys=sorted(arrays), seconds=seconds,
              explanations_per_second=n_texts / seconds if n_texts else None).save(out)
    log(f"round_trip: {n_texts} explanations reconstructed by {', '.join(reconstructors) or 'no'} reconstructor(s)"
        + (f" ({n_texts / seconds:.1f}/s)" if n_texts else " (reconstructors.*.checkpoint not set)"))


def round_trip_results(ctx: RunContext, setting: str) -> dict:
    """The three round trips the configured reconstructors allow, scored like the lift."""
    from .. import evaluate as ev

    c = ctx.config
    record = RoundTrip.load(ctx.stage_dir("round_trip"))
    if not record.keys:
        return {}
    dirs = load_directions(ctx)
    with np.load(ctx.stage_dir("round_trip") / "reconstructions.npz") as f:
        arrays = {k: f[k] for k in f.files}
    trips = {"source_self": ("source", "source", dirs["source"]), "target_self": ("target", "target", dirs["mapped"]),
             "cross": ("source", "target", dirs["source"])}
    results = {}
    for name, (ar_side, av_side, reference) in trips.items():
        features = arrays.get(reconstruction_key(setting, ar_side, av_side, "features"))
        controls = arrays.get(reconstruction_key(setting, ar_side, av_side, "controls"))
        if features is None or controls is None:
            continue
        results[name] = ev.evaluate_round_trip(reference, features, controls, n_permutations=c.evaluate.n_permutations,
                                               n_bootstrap=c.evaluate.n_bootstrap, seed=c.seed)
        results[name]["summary_line"] = ev.round_trip_line(name, results[name])
    return results


# ---------------------------------------------------------------------------------------- evaluate
def run_evaluate(ctx: RunContext) -> None:
    from .. import evaluate as ev

    c = ctx.config
    out = ctx.stage_dir("evaluate")
    src = ExplanationSet.load(ctx.stage_dir("verbalize_source"))
    tgt = ExplanationSet.load(ctx.stage_dir("verbalize_target"))
    embedder = ev.load_embedder(c.evaluate.embedder or None)
    results = {}
    for key in src.settings:
        s, t = src.settings[key], tgt.settings[key]
        result = ev.evaluate_explanations(
            ev.embed_groups(embedder, s["features"]), ev.embed_groups(embedder, t["features"]),
            ev.embed_groups(embedder, t["controls"]), aggregate=c.evaluate.aggregate,
            n_permutations=c.evaluate.n_permutations, n_bootstrap=c.evaluate.n_bootstrap, seed=c.seed)
        result["summary_line"] = ev.summary_line(result)
        results[key] = result
    primary = alpha_key(float(c.washout.alpha))
    overlap = FeatureSet.load(ctx.stage_dir("features")).context_overlap
    round_trip = {key: round_trip_results(ctx, key) for key in src.settings}
    round_trip = {key: value for key, value in round_trip.items() if value}
    Evaluation(primary=primary, results=results, context_overlap=overlap, round_trip=round_trip).save(out)
    lines = [f"{results[primary]['summary_line']}  [washout {primary}]"]
    for result in round_trip.get(primary, {}).values():
        lines.append(f"  round trip, {result['summary_line']}")
    for key, result in results.items():
        if key != primary:
            lines.append(f"  comparison, washout {key}: {result['summary_line']}")
            for trip in round_trip.get(key, {}).values():
                lines.append(f"  comparison, washout {key}, round trip, {trip['summary_line']}")
    lines.append(f"  verbalizer-free: {ev.context_overlap_line(overlap)}")
    for what, attribute in (("blank explanations (empty or special tokens only)", "blank"),
                            ("truncated explanations (no closing tag)", "truncated")):
        counts = [f"{explanations.side} {key} {name} {n}/{total}" for explanations in (src, tgt)
                  for key, groups in getattr(explanations, attribute).items() for name, (n, total) in groups.items()
                  if n]
        if counts:
            lines.append(f"  {what}: {', '.join(counts)}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    log(lines[0])


# ------------------------------------------------------------------------------------------ report
def run_report(ctx: RunContext) -> None:
    from ..report import write_report
    from .config import to_dict

    c = ctx.config
    map_summary = MapSummary.load(ctx.stage_dir("map"))
    fit = map_summary.fit
    sae_summary = SaeSummary.load(ctx.stage_dir("sae"))
    features = FeatureSet.load(ctx.stage_dir("features"))
    evaluation = Evaluation.load(ctx.stage_dir("evaluate"))
    src = ExplanationSet.load(ctx.stage_dir("verbalize_source"))
    tgt = ExplanationSet.load(ctx.stage_dir("verbalize_target"))
    primary = evaluation.primary
    result = evaluation.results[primary]
    per = result["per_feature"]
    round_trip = evaluation.round_trip.get(primary, {})
    feature_rows = []
    for i, f in enumerate(features.features):
        feature_rows.append({
            "id": f, "freq": features.freq[i],
            "source_explanation": src.settings[primary]["features"][i],
            "target_explanation": tgt.settings[primary]["features"][i],
            "matched": per["matched"][i], "control_mean": per["control_mean"][i], "lift": per["lift"][i],
            "retrieval_rank": per["retrieval_rank"][i],
            "contexts": features.contexts.get(str(f), []),
            # every washout setting's explanations and scores, for the page that browses them
            "settings": {key: {"source_explanation": src.settings[key]["features"][i],
                               "target_explanation": tgt.settings[key]["features"][i],
                               "lift": evaluation.results[key]["per_feature"]["lift"][i],
                               "round_trip": {name: r["per_feature"]["matched"][i]
                                              for name, r in evaluation.round_trip.get(key, {}).items()}}
                         for key in evaluation.results},
            **({"round_trip": {name: r["per_feature"]["matched"][i] for name, r in round_trip.items()}}
               if round_trip else {})})
    # held-out squared error per element: fold SSE [lambdas, folds] / (fold rows x target width)
    d_out = len(map_summary.norms.target_mean)
    cv_mse = np.asarray(fit["cv_sse"]) / (np.asarray(fit["fold_counts"])[None, :] * d_out)
    timings = {stage.name: StageDone.load(ctx.stage_dir(stage.name)).seconds
               for stage in STAGES[:STAGES.index(stage_named("report"))]}
    data = {
        "config": to_dict(c),
        "map": {"source_model": map_summary.source_model, "target_model": map_summary.target_model,
                "source_layer": map_summary.source_layer, "target_layer": map_summary.target_layer,
                "r2": fit["heldout_r2"], "r2_mean": fit["heldout_r2_mean"], "cosine": fit["heldout_mean_cosine"],
                "pooled_cosine": fit["heldout_pooled_cosine"], "lambda": fit["lambda"], "n_pairs": map_summary.n_pairs,
                "n_documents": map_summary.n_documents,
                "cv": {"lambdas": fit["lambdas"], "cv_r2": fit["cv_r2"], "cv_error": cv_mse.tolist()}},
        "sae": {**sae_summary.heldout, "n_features": sae_summary.n_features,
                "top_contexts": {str(k): [ctx["text"] for ctx in v] for k, v in features.contexts.items()}},
        "features": feature_rows,
        "controls": [{"explanation": e} for e in tgt.settings[primary]["controls"]],
        "evaluation": result,
        "context_overlap": evaluation.context_overlap,
        "washout": dict(evaluation.results),
        "round_trip": round_trip,
        "round_trip_by_setting": dict(evaluation.round_trip),
        "primary_setting": primary,
        "verbalizers": {side: _verbalizer_label(c, side) for side in ("source", "target")},
        "timings": timings,
    }
    path = write_report(ctx.stage_dir("report"), data)
    log(f"report: {path}")


def _verbalizer_label(c: ml_collections.ConfigDict, side: str) -> str:
    v, r = c.verbalizers[side], c.reconstructors[side]
    label = f"NLA AV {Path(v.checkpoint).name}" if v.kind == "nla" else f"self-verbalizer ({v.prompt} prompt)"
    return label + (f"; AR {Path(r.checkpoint).name}" if r.checkpoint else "")


# ------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Stage:
    """One stage, declared once.

    sections: the config sections (dotted paths) its result depends on directly; its identity
        also covers the identities of its `inputs`.
    inputs: the earlier stages whose outputs it reads (they must be done first).
    models: which base models ("source", "target") it runs, given the config: the runner loads
        them lazily and releases those no later stage of the invocation needs.
    writes: what it leaves in its directory, for the docs and `--help`.
    partial: what of it is partial state (resumable checkpoints inside the stage): cleared with the
        rest when the stage's identity changes, and not part of the checksummed result.
    external: the identities of what it reads from outside the run (corpus content, checkpoint
        files), part of its own identity, so replacing such a file at the same path reruns it.
    """

    name: str
    work: Callable[[RunContext], None]
    summary: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    writes: tuple[str, ...]
    models: Callable[[ml_collections.ConfigDict], tuple[str, ...]] = lambda config: ()
    partial: tuple[str, ...] = ()
    external: Callable[[RunContext], list] = lambda ctx: []


def _self_verbalizer(side: str) -> Callable[[ml_collections.ConfigDict], tuple[str, ...]]:
    return lambda config: (side,) if config.verbalizers[side].kind == "self" else ()


def _map_reads(ctx: RunContext) -> list:
    return [["corpus", ctx.corpus_hash()], ["source", ctx.model_identity("source")],
            ["target", ctx.model_identity("target")]]


def _sae_reads(ctx: RunContext) -> list:
    return [["sae", path_identity(ctx.config.sae.path)]] if ctx.config.sae.path else []


def _verbalizer_reads(side: str) -> Callable[[RunContext], list]:
    def reads(ctx: RunContext) -> list:
        v = ctx.config.verbalizers[side]
        return [["verbalizer", path_identity(v.checkpoint)]] if v.kind == "nla" else []
    return reads


def _reconstructor_reads(ctx: RunContext) -> list:
    return [[side, path_identity(r.checkpoint)] for side, r in ctx.config.reconstructors.items() if r.checkpoint]


def _embedder_reads(ctx: RunContext) -> list:
    from ..evaluate import default_embedder_path

    path = ctx.config.evaluate.embedder
    if not path:
        try:
            path = default_embedder_path()
        except (FileNotFoundError, ImportError):
            return [["embedder", "shipped default, not installed"]]  # the evaluate stage itself says so
    return [["embedder", path_identity(path)]]


STAGES: tuple[Stage, ...] = (
    Stage("map", run_map, "both models over the corpus, paired positions, streamed ridge statistics, CV solve",
          sections=("models", "corpus", "pairing", "ridge", "seed"), inputs=(),
          writes=("ridge_map/", "pairs/*.npy", "summary.json", "kept_per_document.json"),
          models=lambda config: ("source", "target"), external=_map_reads),
    Stage("sae", run_sae, "load a public SAE or train a TopK SAE on the source activations; feature statistics",
          sections=("sae",), inputs=("map",), writes=("sae_lens/", "feature_stats.npz", "summary.json"),
          partial=("train/",), external=_sae_reads),
    Stage("features", run_features, "select features, map their decoder directions, draw controls, context overlap",
          sections=("features", "controls", "mapping", "evaluate.context_k"), inputs=("sae",),
          writes=("directions.npz", "features.json")),
    Stage("verbalize_source", lambda ctx: run_verbalize(ctx, "source"),
          "the source verbalizer explains the features' own decoder directions",
          sections=("verbalizers.source", "washout"), inputs=("features",),
          writes=("explanations.json",), models=_self_verbalizer("source"), partial=("partial.json",),
          external=_verbalizer_reads("source")),
    Stage("verbalize_target", lambda ctx: run_verbalize(ctx, "target"),
          "the target verbalizer explains the mapped directions and the controls",
          sections=("verbalizers.target", "washout"), inputs=("features",),
          writes=("explanations.json",), models=_self_verbalizer("target"), partial=("partial.json",),
          external=_verbalizer_reads("target")),
    Stage("round_trip", run_round_trip, "the NLA reconstructors (if configured) turn explanations back into vectors",
          sections=("reconstructors",), inputs=("verbalize_source", "verbalize_target"),
          writes=("reconstructions.npz", "round_trip.json"), external=_reconstructor_reads),
    Stage("evaluate", run_evaluate, "sentence embeddings; lift, permutation p-value, bootstrap CI, retrieval; "
          "round-trip cosines with the same statistics",
          sections=("evaluate",), inputs=("verbalize_source", "verbalize_target", "round_trip"),
          writes=("evaluation.json", "summary.txt"), external=_embedder_reads),
    Stage("report", run_report, "report.md (leading with the cross-model table), report.html (to browse the "
          "features), report.json and figures", sections=(), inputs=("evaluate",),
          writes=("report.md", "report.html", "report.json", "figures/")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def closing_lines(ctx: RunContext, is_done: Callable[[str], bool]) -> list[str]:
    """What `crossmap run` prints last: the evaluation's summary lines and the report's path, each only
    when that stage's result belongs to this config (`is_done`), never an older run's."""
    lines = []
    if is_done("evaluate"):
        lines.append((ctx.stage_dir("evaluate") / "summary.txt").read_text().strip())
    if is_done("report"):
        lines.append(f"report: {ctx.stage_dir('report') / 'report.md'} (to browse: report.html beside it)")
    return lines
