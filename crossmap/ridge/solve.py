"""The closed-form solve with exact K-fold CV, prediction, scoring and the held-out mean cosine."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .stats import combine_folds, merge_selected
from .types import COMPUTE_DTYPES, RidgeFit, RidgeMap, RidgeStats

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST  # true float32 products (TPU/GPU default to bf16 passes)


class _Moments(NamedTuple):
    n: Array
    mx: Array
    my: Array
    sxx: Array
    sxy: Array
    syy: Array


def _fold(stats: RidgeStats, k) -> _Moments:
    return _Moments(stats.count[k], stats.mean_x[k], stats.mean_y[k], stats.sxx[k], stats.sxy[k], stats.syy[k])


def _leave_out(stats: RidgeStats, k) -> _Moments:
    select = (jnp.arange(stats.n_folds) != k).astype(stats.count.dtype)
    return _Moments(*merge_selected(stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy, select))


def _total(stats: RidgeStats) -> _Moments:
    return _Moments(*merge_selected(stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy,
                                  jnp.ones_like(stats.count)))


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


# A column whose standard deviation is below this fraction of its mean's magnitude is constant: its
# centred sums hold only the rounding of float32 accumulation (about 2^-24 of the mean per row).
_CONSTANT_RELATIVE_SD = 16 * float(np.finfo(np.float32).eps)


def _scale(train: _Moments, standardize: bool) -> tuple[Array, Array]:
    """(feature scale, which features vary).  Scale: the population std of the training rows, or
    ones.  With standardize, a numerically constant column gets scale 1 and is masked out of the
    fit (coefficient 0, as scikit-learn's StandardScaler + Ridge gives), instead of its rounding
    noise being blown up to unit variance."""
    if not standardize:
        return jnp.ones_like(train.mx), jnp.ones_like(train.mx)
    var = jnp.maximum(jnp.diagonal(train.sxx), 0) / jnp.where(train.n > 0, train.n, 1)
    varies = var > (_CONSTANT_RELATIVE_SD * jnp.abs(train.mx)) ** 2 + jnp.finfo(var.dtype).tiny
    return jnp.where(varies, jnp.sqrt(var), 1), varies.astype(var.dtype)


def _eig(train: _Moments, standardize: bool):
    """Eigendecomposition of the (scaled) training Sxx; P = Q^T (scaled Sxy)."""
    s, live = _scale(train, standardize)
    a = train.sxx / (s[:, None] * s[None, :]) * (live[:, None] * live[None, :])
    e, q = jnp.linalg.eigh(a, symmetrize_input=True)
    e = jnp.maximum(e, 0)  # rounding can leave tiny negative eigenvalues of a PSD matrix
    p = _mm(q.T, train.sxy / s[:, None] * live[:, None])
    return s, e, q, p


def _inverse_shift(e: Array, lam: Array) -> Array:
    """1 / (e + lam); for lam == 0 a pseudo-inverse (directions with ~zero variance get 0)."""
    tol = jnp.max(e) * e.shape[0] * jnp.finfo(e.dtype).eps
    denom = e + lam
    keep = (lam > 0) | (e > tol)
    return jnp.where(keep, 1 / jnp.where(keep, denom, 1), 0)


def _cv_fold(train: _Moments, held: _Moments, lambdas: Array, standardize: bool):
    """Held-out [L, d_out] SSE, sum yhat*y and sum yhat^2 of fold `held` for every lambda (module doc)."""
    s, e, q, p = _eig(train, standardize)
    c_held = _mm(_mm(q.T, held.sxx / (s[:, None] * s[None, :])), q)
    p_held = _mm(q.T, held.sxy / s[:, None])
    q_dx = _mm(q.T, (held.mx - train.mx) / s)
    dy = held.my - train.my

    def one_lambda(lam):
        g = p * _inverse_shift(e, lam)[:, None]  # [d_in, d_out] = Q^T W (scaled)
        quad = jnp.sum(g * _mm(c_held, g), 0)  # diag(W^T Sxx_f W)
        lin = jnp.sum(g * p_held, 0)  # diag(W^T Sxy_f)
        shift = _mm(q_dx, g)  # W^T (mx_f - mx_train)
        resid_mean = dy - shift  # my_f - (W^T mx_f + b)
        sse = held.syy - 2 * lin + quad + held.n * resid_mean**2
        yhat_mean = train.my + shift
        yhat_y = lin + held.n * yhat_mean * held.my
        yhat_sq = quad + held.n * yhat_mean**2
        return sse, yhat_y, yhat_sq

    return lax.map(one_lambda, lambdas)


def _fit(train: _Moments, lam: Array, standardize: bool) -> RidgeMap:
    """Closed-form fit on moments; lam [d_out] (one penalty per target)."""
    s, e, q, p = _eig(train, standardize)
    inv = jax.vmap(_inverse_shift, in_axes=(None, 0), out_axes=1)(e, lam)  # [d_in, d_out]
    w = _mm(q, p * inv) / s[:, None]
    b = train.my - _mm(train.mx, w)
    return RidgeMap(W=w, b=b, x_mean=train.mx, y_mean=train.my, lam=lam)


@partial(jax.jit, static_argnames=("standardize", "per_target", "compute_dtype", "out_dtype"))
def _solve_core(stats: RidgeStats, lambdas: Array, standardize: bool, per_target: bool, compute_dtype: str,
                out_dtype):
    """CV table for every (lambda, fold), the choice of lambda, and the refit on all rows: one program."""
    stats = jax.tree.map(lambda a: a.astype(compute_dtype), stats)
    lambdas = lambdas.astype(compute_dtype)
    total = _total(stats)
    d_out = stats.d_out
    if stats.n_folds == 1:  # no CV: a single lambda
        ridge_map = _fit(total, jnp.broadcast_to(lambdas[0], (d_out,)), standardize)
        return jax.tree.map(lambda a: a.astype(out_dtype), ridge_map), None

    def per_fold(k):
        return _cv_fold(_leave_out(stats, k), _fold(stats, k), lambdas, standardize)

    sse, yhat_y, yhat_sq = (a.transpose(1, 0, 2) for a in lax.map(per_fold, jnp.arange(stats.n_folds)))
    # [L, K, d_out] each; argmin takes the first minimum, like np.argmin
    best = jnp.argmin(jnp.sum(sse, (1, 2)))
    chosen = jnp.argmin(jnp.sum(sse, 1), 0) if per_target else jnp.full((d_out,), best)
    ridge_map = _fit(total, lambdas[chosen], standardize)
    cv = {"sse": sse, "yhat_y": yhat_y, "yhat_sq": yhat_sq, "best": best, "chosen": chosen,
          "y_sq": stats.syy + stats.count[:, None] * stats.mean_y**2,  # [K, d_out] sum y^2 per fold
          "sst": total.syy}
    return jax.tree.map(lambda a: a.astype(out_dtype), ridge_map), cv


@partial(jax.jit, static_argnames=("standardize", "compute_dtype", "out_dtype"))
def _fold_maps_core(stats: RidgeStats, lam: Array, standardize: bool, compute_dtype: str, out_dtype) -> RidgeMap:
    stats = jax.tree.map(lambda a: a.astype(compute_dtype), stats)
    lam = lam.astype(compute_dtype)

    def per_fold(k):
        return jax.tree.map(lambda a: a.astype(out_dtype), _fit(_leave_out(stats, k), lam, standardize))

    return lax.map(per_fold, jnp.arange(stats.n_folds))


def _resolve_compute_dtype(compute_dtype: str | None, stats_dtype) -> str:
    if compute_dtype is None:
        return jnp.dtype(stats_dtype).name
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"ridge solve: compute_dtype must be one of {COMPUTE_DTYPES} or None, got {compute_dtype!r}")
    if compute_dtype == "float64" and jax.default_backend() == "tpu":
        warnings.warn("ridge solve: float64 is not available on TPU; solving in float32", RuntimeWarning,
                      stacklevel=3)
        return "float32"
    return compute_dtype


def _precision(dtype_name: str):
    """The solve's context: x64 on when float64 is asked for (jax.enable_x64 exists in jax 0.10/0.11)."""
    if dtype_name == "float64" and not jax.config.jax_enable_x64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _check_stats(stats: RidgeStats, where: str, fitting: bool = True) -> np.ndarray:
    """Host-side sanity checks before a solve (`fitting`) or a score; returns the per-fold counts."""
    counts = np.asarray(jax.device_get(stats.count), np.float64)
    bad = {name: int(np.size(a) - np.count_nonzero(np.isfinite(a))) for name, a in
           zip(("count", "mean_x", "mean_y", "sxx", "sxy", "syy"), jax.device_get(tuple(stats[:6])), strict=True)}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        raise ValueError(f"{where}: the statistics hold non-finite values ({', '.join(f'{n} in {k}' for k, n in bad.items())}): "
                         "values too large for the stats dtype overflowed (scale the inputs, or accumulate in "
                         "float64), or NaN/inf was accumulated with on_nonfinite='ignore'")
    total = float(counts.sum())
    if total <= 0:
        raise ValueError(f"{where}: the statistics are empty (count 0): no valid pairs were accumulated")
    if not fitting:
        return counts
    if stats.n_folds > 1 and (counts <= 0).any():
        empty = [int(i) for i in np.flatnonzero(counts <= 0)]
        raise ValueError(f"{where}: fold(s) {empty} have no rows (fold counts {counts.tolist()}); "
                         "K-fold CV needs every fold non-empty")
    skipped_b, skipped_r, unassigned = (float(v) for v in jax.device_get(
        (stats.skipped_batches, stats.skipped_rows, stats.unassigned_rows)))
    if skipped_b:
        warnings.warn(f"{where}: {int(skipped_b)} batch(es) ({skipped_r:g} valid rows) were skipped for "
                      "non-finite values during accumulation", RuntimeWarning, stacklevel=3)
    if unassigned:
        warnings.warn(f"{where}: {unassigned:g} rows had a fold id outside [0, {stats.n_folds}) and were dropped",
                      RuntimeWarning, stacklevel=3)
    train_min = total - counts.max() if stats.n_folds > 1 else total
    if train_min < stats.d_in:
        warnings.warn(f"{where}: fewer pairs than input dimensions ({train_min:g} training rows < d_in="
                      f"{stats.d_in}); the fit is under-determined and relies on the ridge penalty",
                      RuntimeWarning, stacklevel=3)
    return counts


def _check_lambdas(lambdas) -> np.ndarray:
    lam = np.atleast_1d(np.asarray(lambdas, np.float64))
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"ridge solve: lambdas must be a non-empty 1-D grid, got shape {lam.shape}")
    if not np.all(np.isfinite(lam)) or (lam < 0).any():
        raise ValueError(f"ridge solve: lambdas must be finite and >= 0, got {lam.tolist()}")
    return lam


def solve(stats: RidgeStats, lambdas: Iterable[float] | float, *, standardize: bool = False,
          per_target: bool = False, compute_dtype: str | None = "float64",
          out_dtype: Any = None) -> tuple[RidgeMap, RidgeFit]:
    """Choose lambda by exact K-fold CV from the fold statistics, then fit on all rows.

    lambdas: the grid (>= 0; sklearn `alpha` semantics on raw x, see module doc).  With one fold there is
        no CV: pass a single lambda.
    standardize: penalise coefficients of standardised features (StandardScaler + Ridge semantics).
    per_target: also choose a lambda per target dimension (the map then uses those).
    compute_dtype: "float64" (default; float32 on TPU), "float32", or None (the stats dtype).
    out_dtype: dtype of the returned map (default: the stats dtype).
    Returns (RidgeMap, RidgeFit).  Warns when there are fewer training pairs than input dimensions;
    raises on empty statistics or an empty fold.
    """
    lam_grid = _check_lambdas(lambdas)
    counts = _check_stats(stats, "ridge solve")
    k_folds = stats.n_folds
    if k_folds == 1 and lam_grid.size > 1:
        raise ValueError(f"ridge solve: choosing among {lam_grid.size} lambdas needs K-fold statistics "
                         "(init_stats(..., n_folds>=2)); with one fold pass a single lambda")
    dtype_name = _resolve_compute_dtype(compute_dtype, stats.sxx.dtype)
    out_dtype = jnp.dtype(stats.sxx.dtype if out_dtype is None else out_dtype)
    fit = RidgeFit(lambdas=lam_grid, lam=float(lam_grid[0]), count=float(counts.sum()), fold_counts=counts,
                   n_folds=k_folds, standardize=standardize, compute_dtype=dtype_name)
    with _precision(dtype_name):
        ridge_map, cv = _solve_core(stats, jnp.asarray(lam_grid, dtype_name), standardize, per_target, dtype_name,
                                    out_dtype)
        ridge_map = jax.block_until_ready(ridge_map)
        cv = jax.device_get(cv)
    if not all(bool(np.all(np.isfinite(np.asarray(a)))) for a in (ridge_map.W, ridge_map.b)):
        raise ValueError(f"ridge solve: the fitted map is not finite although the statistics are: the solve "
                         f"overflowed in {dtype_name} or in the output dtype {out_dtype.name}")
    if cv is not None:
        _fill_cv_report(fit, cv, lam_grid, per_target)
    return ridge_map, fit


def _fill_cv_report(fit: RidgeFit, cv: dict[str, np.ndarray], lam_grid: np.ndarray, per_target: bool) -> None:
    """CV table, chosen lambda(s), held-out R^2 and pooled cosine, from the per-(lambda, fold, target) sums."""
    sse, sst_t = np.asarray(cv["sse"], np.float64), np.asarray(cv["sst"], np.float64)
    chosen = np.asarray(cv["chosen"])
    cols = np.arange(sse.shape[-1])
    fit.cv_sse_per_target = sse
    fit.cv_sse = sse.sum(-1)
    fit.cv_r2 = 1 - fit.cv_sse.sum(-1) / sst_t.sum()
    fit.lam = float(lam_grid[int(cv["best"])])
    if per_target:
        fit.lam_per_target = lam_grid[chosen]
    sse_chosen = sse.sum(1)[chosen, cols]  # [d_out], summed over folds
    fit.r2 = float(1 - sse_chosen.sum() / sst_t.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        r2_t = np.where(sst_t > 0, 1 - sse_chosen / sst_t, np.nan)
    fit.r2_per_target = r2_t
    fit.r2_mean = float(np.nanmean(r2_t)) if np.isfinite(r2_t).any() else float("nan")
    num = np.asarray(cv["yhat_y"], np.float64).sum(1)[chosen, cols].sum()
    den = math.sqrt(max(np.asarray(cv["yhat_sq"], np.float64).sum(1)[chosen, cols].sum(), 0.0)
                    * max(np.asarray(cv["y_sq"], np.float64).sum(), 0.0))
    fit.pooled_cosine = float(num / den) if den > 0 else float("nan")


def fold_maps(stats: RidgeStats, lam: float | Array, *, standardize: bool = False,
              compute_dtype: str | None = "float64", out_dtype: Any = None) -> RidgeMap:
    """The K cross-validation maps at `lam` (scalar or [d_out]): map k is trained on every fold but k.

    Returns a RidgeMap whose fields have a leading fold axis K.
    """
    _check_stats(stats, "ridge fold_maps")
    if stats.n_folds < 2:
        raise ValueError("ridge fold_maps: needs statistics with n_folds >= 2")
    dtype_name = _resolve_compute_dtype(compute_dtype, stats.sxx.dtype)
    out_dtype = jnp.dtype(stats.sxx.dtype if out_dtype is None else out_dtype)
    lam_vec = np.broadcast_to(np.asarray(lam, np.float64), (stats.d_out,))
    _check_lambdas(lam_vec)
    with _precision(dtype_name):
        return jax.block_until_ready(_fold_maps_core(stats, jnp.asarray(lam_vec, dtype_name), standardize,
                                                     dtype_name, out_dtype))


def predict(ridge_map: RidgeMap, x: Array) -> Array:
    """x [..., d_in] -> x @ W + b [..., d_out] (full-precision matmul)."""
    x = jnp.asarray(x)
    if x.shape[-1] != ridge_map.W.shape[-2]:
        raise ValueError(f"ridge predict: x{tuple(x.shape)} does not match W{tuple(ridge_map.W.shape)}")
    return jnp.matmul(x.astype(ridge_map.W.dtype), ridge_map.W, precision=_HIGHEST) + ridge_map.b


@jax.jit
def _score_core(ridge_map: RidgeMap, stats: RidgeStats):
    w = ridge_map.W.astype(stats.sxx.dtype)
    b = ridge_map.b.astype(stats.sxx.dtype)
    quad = jnp.sum(w[None] * jnp.matmul(stats.sxx, w[None], precision=_HIGHEST), 1)  # [K, d_out]
    lin = jnp.sum(w[None] * stats.sxy, 1)
    resid_mean = stats.mean_y - jnp.matmul(stats.mean_x, w, precision=_HIGHEST) - b
    return stats.syy - 2 * lin + quad + stats.count[:, None] * resid_mean**2


def score(ridge_map: RidgeMap, stats: RidgeStats) -> dict[str, Any]:
    """Exact squared error and R^2 of a map on the rows summarised by `stats` (e.g. a held-out set).

    Returns {"sse_per_target" [d_out], "sse", "r2" (pooled, SST about the pooled mean),
    "r2_per_target" [d_out]}, all folds of `stats` merged.
    """
    if ridge_map.W.shape != (stats.d_in, stats.d_out):
        raise ValueError(f"ridge score: map W{tuple(ridge_map.W.shape)} does not match stats "
                         f"(d_in={stats.d_in}, d_out={stats.d_out})")
    _check_stats(stats, "ridge score", fitting=False)
    sse_t = np.asarray(jax.device_get(_score_core(ridge_map, stats))).sum(0)
    sst_t = np.asarray(jax.device_get(combine_folds(stats).syy[0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        r2_t = np.where(sst_t > 0, 1 - sse_t / sst_t, np.nan)
    return {"sse_per_target": sse_t, "sse": float(sse_t.sum()), "r2": float(1 - sse_t.sum() / sst_t.sum()),
            "r2_per_target": r2_t}


# ----------------------------------------------------------------------------------------------
# exact held-out mean cosine (second pass)


class CosineAcc(NamedTuple):
    """Per-fold sum of row cosines and row weights."""

    cos_sum: Array
    count: Array


def init_cosine(n_folds: int, dtype: Any = jnp.float32) -> CosineAcc:
    return CosineAcc(jnp.zeros((n_folds,), dtype), jnp.zeros((n_folds,), dtype))


def cosine_update(acc: CosineAcc, maps: RidgeMap, x: Array, y: Array, fold: Array | int,
                  weights: Array | None = None) -> CosineAcc:
    """Add batch rows' cosine(yhat, y), each row predicted by the map of its own fold (maps from
    `fold_maps`, leading fold axis).  Rows with zero-norm prediction or target count as cosine 0."""
    fold = jnp.asarray(fold)
    k_folds = maps.W.shape[0]
    dtype = acc.cos_sum.dtype
    w = jnp.ones((x.shape[0],), dtype) if weights is None else jnp.asarray(weights).astype(dtype)
    x = jnp.where((w > 0)[:, None], x.astype(maps.W.dtype), 0)
    y = jnp.where((w > 0)[:, None], y.astype(maps.W.dtype), 0)
    if fold.ndim == 0:
        k = jnp.clip(fold, 0, k_folds - 1)
        yhat = jnp.matmul(x, maps.W[k], precision=_HIGHEST) + maps.b[k]
        onehot = jnp.broadcast_to(jax.nn.one_hot(fold, k_folds, dtype=dtype), (x.shape[0], k_folds))
    else:
        all_pred = jnp.einsum("bi,kio->kbo", x, maps.W, precision=_HIGHEST) + maps.b[:, None, :]
        yhat = jnp.take_along_axis(all_pred, jnp.clip(fold, 0, k_folds - 1)[None, :, None], 0)[0]
        onehot = jax.nn.one_hot(fold, k_folds, dtype=dtype)
    num = jnp.sum(yhat * y, -1)
    den = jnp.linalg.norm(yhat, axis=-1) * jnp.linalg.norm(y, axis=-1)
    cos = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0).astype(dtype)
    wk = onehot * w[:, None]
    return CosineAcc(acc.cos_sum + wk.T @ cos, acc.count + jnp.sum(wk, 0))


_cosine_update_jit = jax.jit(cosine_update, donate_argnums=0)


def heldout_cosine(stats: RidgeStats, lam: float | Array, batches: Iterable, *, standardize: bool = False,
                   compute_dtype: str | None = "float64", progress: bool = True) -> dict[str, Any]:
    """Exact held-out mean cosine: stream (x, y, fold[, weights]) batches through the fold maps.

    Each row is predicted by the map trained on all folds but its own (the same maps the CV error was
    computed for) and cos(yhat_i, y_i) is averaged over rows.  Returns {"mean_cosine", "per_fold" [K],
    "count"}.  Set RidgeFit.mean_cosine from it if you want it in the report.
    """
    maps = fold_maps(stats, lam, standardize=standardize, compute_dtype=compute_dtype)
    acc = init_cosine(stats.n_folds, jnp.float32 if maps.W.dtype == jnp.float32 else maps.W.dtype)
    for batch in _progress(batches, progress, "held-out cosine"):
        x, y, fold, *rest = batch
        acc = _cosine_update_jit(acc, maps, x, y, fold, rest[0] if rest else None)
    cos_sum, count = (np.asarray(a, np.float64) for a in jax.device_get(acc))
    per_fold = np.where(count > 0, cos_sum / np.where(count > 0, count, 1), np.nan)
    total = float(count.sum())
    return {"mean_cosine": float(cos_sum.sum() / total) if total else float("nan"), "per_fold": per_fold,
            "count": total}


def _progress(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


