"""Streaming sufficient statistics and a jitted closed-form ridge regression with exact K-fold CV.

Everything here is a pure function on pytrees (NamedTuples of arrays), usable outside crossmap.

Accumulate
----------
    stats = init_stats(d_in, d_out, n_folds=5)               # RidgeStats, all zeros
    for x, y, fold, valid in batches:                          # x [B, d_in], y [B, d_out]
        stats = accumulate(stats, x, y, fold=fold, weights=valid)   # jitted, donates `stats`
    ridge_map, fit = solve(stats, lambdas=np.logspace(-2, 6, 16))

`update` is the same step as a plain (un-jitted, un-donated) pure function, for use inside your own
`jax.jit` / `shard_map`; `accumulate` is `update` jitted with the old stats donated, so K folds of
[d_in, d_in] and [d_in, d_out] statistics are updated in place.

On several devices, `accumulate` on batch-sharded inputs is correct (XLA all-reduces every batch's
products); `init_device_stats` / `accumulate_on_devices` / `reduce_device_stats` instead keep one slot of
statistics per device and merge them with a single exact psum (`psum_stats`) at the end, which scales
better (on 2 H100s: 0.94 of linear with 32k-row batches; BENCHMARKS.md).

Per fold k the statistics are the (weighted) row count n, the means of x and y, the centred
cross-products Sxx = sum w (x - mx)(x - mx)^T and Sxy = sum w (x - mx)(y - my)^T, and syy, the centred
sum of squares of each target dimension.  These are all that ridge with an intercept needs, and all
that the exact held-out squared error (hence held-out R^2) of any linear map needs.

Rows carry a fold id (documents are assigned to folds, never single tokens, so that CV error is
honest about document-level generalisation).  `fold` is either a scalar for the whole batch (the fast
path: one matmul per batch; the collector gives each batch one fold) or an int array with one id per
row (K masked matmuls per batch, so K times the FLOPs).  Rows whose fold id is outside [0, K) are
dropped and counted in `stats.unassigned_rows`.

Numerics
--------
* Each batch is centred on its own mean before any product is formed (with the corrected two-pass
  fix-up for the rounding error of that mean), then merged into the running statistics with the
  pairwise update of Chan, Golub & LeVeque: n = na + nb, m = ma + (nb / n) d, S = Sa + Sb + (na nb / n) d d^T
  with d = mb - ma.  So large column means (residual-stream activations carry some large constant
  directions) never enter a product and never cancel.
* `precision` chooses the accumulation matmul: "highest" (true f32 products), "tf32" (lax.Precision.HIGH:
  TensorFloat-32 on Ampere/Hopper GPUs, 3-pass bf16 on TPU, exact f32 on CPU), or "bf16" (the centred
  values rounded to bf16, products accumulated in f32).  Operands are rounded *after* centring, so the
  relative error is about 2^-11 (tf32) or 2^-9 (bf16) of the spread of the data, not of its mean: for
  bf16 activations this is at or below the rounding the inputs already carry (2^-9).  All sums are f32
  (or f64 for float64 stats).  Measured on one H100 (d_in=3584, d_out=5376, 1M pairs, 8192-row batches,
  `python -m crossmap.benchmarks.ridge`): tf32 203 TFLOP/s (88% of a plain tf32 matmul of the same
  shape; Sxx off the "highest" run by 7e-5 relative), bf16 443 TFLOP/s (72% of plain bf16; 4e-4),
  highest 51 TFLOP/s (99%).  Per-row fold ids cost 3.3x the fast path at K=5.  Counts are stored in the stats dtype: in float32 a count is exact up to
  2^24 rows for 0/1 weights, beyond that off by at most one part in 1e7.
* `solve` works in float64 by default (`compute_dtype="float64"`) on CPU and GPU: it wraps the jitted
  solve in `jax.enable_x64(True)` (the context manager that jax 0.10 and 0.11 provide;
  `jax.experimental.enable_x64` is gone in 0.10), upcasts the float32 stats, and hands back the map in
  the stats dtype.  On TPU (no float64) it falls back to float32 with a warning.  Results are in float64
  only if x64 is on globally (`jax.config.update("jax_enable_x64", True)`) and the stats are float64.
  On the H100 above the whole K=5, 16-lambda solve takes 0.8 s warm in float64 or float32 (the six
  3584x3584 eigendecompositions dominate); the first call adds compilation (4 s in float64, 18 s in
  float32, where XLA also autotunes the GEMMs).

Solve
-----
Ridge with intercept on raw x, the same objective as scikit-learn's `Ridge(alpha=lam, fit_intercept=True)`:
minimise ||y - x W - b||^2 + lam ||W||_F^2, so W = (Sxx + lam I)^-1 Sxy and b = my - mx^T W.
With `standardize=True` each feature is divided by its (population, ddof=0) standard deviation over the
training rows first and the penalty applies to the standardised coefficients, as in
`make_pipeline(StandardScaler(), Ridge(alpha=lam))`; the returned W is folded back to raw-x units.

K-fold CV: the training statistics of fold k (all rows not in fold k) are built exactly from the other
folds' statistics (a K-way Chan merge; no subtraction of uncentred sums).  One eigendecomposition per
fold, A_k = Q diag(e) Q^T, serves every lambda: W(lam) = Q diag(1 / (e + lam)) Q^T Sxy.  The held-out
squared error of fold f (count n_f, means mx_f, my_f, centred Sxx_f, Sxy_f, syy_f) under a map (W, b)
trained elsewhere is exact from f's statistics, because residuals split into a centred part and a
constant part whose cross term sums to zero:

    r_i = y_i - W^T x_i - b = (yc_i - W^T xc_i) + c,      c = my_f - W^T mx_f - b
    SSE_j = syy_f[j] - 2 (W^T Sxy_f)_jj + (W^T Sxx_f W)_jj + n_f c_j^2      (per target dim j)

In the eigenbasis, with G = diag(1/(e + lam)) Q^T Sxy_r, the two traces are colsum(G * (Q^T Sxy_f)) and
colsum(G * (Q^T Sxx_f Q) G): one [d_in, d_in] x [d_in, d_out] product per (fold, lambda).

Reported (see RidgeFit): the CV table (lambda x fold SSE), held-out R^2 of the out-of-fold predictions
pooled over targets (1 - sum SSE / sum SST, sklearn's multioutput="variance_weighted") and per target,
the chosen lambda (one for all targets, and optionally one per target), and the held-out *pooled*
cosine sum_i <yhat_i, y_i> / sqrt(sum_i |yhat_i|^2 sum_i |y_i|^2), which is exact from the same
second-order statistics.

Held-out *mean* cosine (the mean over rows of <yhat_i, y_i> / (|yhat_i| |y_i|)) is not a function of
second-order statistics (each row is divided by its own norms), so it needs a second pass over the
data: `heldout_cosine(stats, lam, batches)` (or `fold_maps` + `cosine_update` in your own loop) streams
each row through the map trained on the folds other than its own and averages exactly.

Save / load: `save_map(path, ridge_map, metadata)` and `load_map(path, expect)` through orbax-checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import sharding as shd

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST
_ACCUM_PRECISIONS = ("highest", "tf32", "bf16", "default")
_NONFINITE_MODES = ("skip", "raise", "ignore")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# types


class RidgeStats(NamedTuple):
    """Per-fold streaming sufficient statistics (leading axis K = number of folds).

    count [K]: sum of row weights; mean_x [K, d_in]; mean_y [K, d_out];
    sxx [K, d_in, d_in] = sum w (x - mean_x)(x - mean_x)^T; sxy [K, d_in, d_out]; syy [K, d_out] centred
    sum of squares of each target dimension.  Counters (scalars): skipped_batches / skipped_rows (batches
    with NaN/Inf left out under on_nonfinite="skip", and the weight of their valid rows) and
    unassigned_rows (weight of rows whose fold id was outside [0, K)).
    """

    count: Array
    mean_x: Array
    mean_y: Array
    sxx: Array
    sxy: Array
    syy: Array
    skipped_batches: Array
    skipped_rows: Array
    unassigned_rows: Array

    @property
    def n_folds(self) -> int:
        return self.count.shape[0]

    @property
    def d_in(self) -> int:
        return self.mean_x.shape[-1]

    @property
    def d_out(self) -> int:
        return self.mean_y.shape[-1]


class RidgeMap(NamedTuple):
    """A fitted affine map y ~ x @ W + b.

    W [d_in, d_out] (raw-x units, also when fitted with standardize=True), b [d_out], x_mean [d_in] and
    y_mean [d_out] (means of the training rows), lam [d_out] (the ridge penalty used for each target;
    all equal unless chosen per target).  `fold_maps` returns the same type with a leading fold axis.
    """

    W: Array
    b: Array
    x_mean: Array
    y_mean: Array
    lam: Array


@dataclasses.dataclass
class RidgeFit:
    """What `solve` reports.  Arrays are host numpy (float64 when computed in float64).

    lambdas [L] the grid; cv_sse [L, K] held-out sum of squared errors of fold k (summed over targets)
    under the model trained on the other folds; cv_r2 [L] pooled held-out R^2 per lambda; lam the chosen
    lambda (argmin of the summed CV error, first on ties); lam_per_target [d_out] or None; r2 / r2_mean /
    r2_per_target held-out R^2 at the chosen lambda(s) of the out-of-fold predictions (pooled =
    variance-weighted over targets, mean = plain average over targets with nonzero variance); pooled_cosine
    (see module doc); mean_cosine None until `heldout_cosine` fills it.  For a fit without CV (one fold,
    one lambda) the CV fields are None.
    """

    lambdas: np.ndarray
    lam: float
    count: float
    fold_counts: np.ndarray
    n_folds: int
    standardize: bool
    compute_dtype: str
    cv_sse: np.ndarray | None = None
    cv_sse_per_target: np.ndarray | None = None
    cv_r2: np.ndarray | None = None
    lam_per_target: np.ndarray | None = None
    r2: float | None = None
    r2_mean: float | None = None
    r2_per_target: np.ndarray | None = None
    pooled_cosine: float | None = None
    mean_cosine: float | None = None

    def to_metadata(self, per_target: bool = False) -> dict[str, Any]:
        """JSON-able summary for `save_map` metadata (per-target arrays only if `per_target`)."""
        out: dict[str, Any] = {
            "lambda": self.lam,
            "lambdas": self.lambdas,
            "count": self.count,
            "fold_counts": self.fold_counts,
            "n_folds": self.n_folds,
            "standardize": self.standardize,
            "compute_dtype": self.compute_dtype,
            "cv_sse": self.cv_sse,
            "cv_r2": self.cv_r2,
            "heldout_r2": self.r2,
            "heldout_r2_mean": self.r2_mean,
            "heldout_pooled_cosine": self.pooled_cosine,
            "heldout_mean_cosine": self.mean_cosine,
        }
        if per_target:
            out["lambda_per_target"] = self.lam_per_target
            out["heldout_r2_per_target"] = self.r2_per_target
        return _jsonable(out)


class MetadataMismatchError(ValueError):
    """A saved map's metadata does not match what the caller expected."""


# ----------------------------------------------------------------------------------------------
# accumulation


def init_stats(d_in: int, d_out: int, n_folds: int = 1, dtype: Any = jnp.float32) -> RidgeStats:
    """Zero statistics for `n_folds` folds of x [., d_in] -> y [., d_out] pairs.

    float64 needs x64 on (globally or inside `with jax.enable_x64(True):`).
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
        raise ValueError(f"init_stats: dtype must be float32 or float64 (sums need at least f32), got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("init_stats: float64 stats need x64: set jax.config.update('jax_enable_x64', True) "
                         "or call inside `with jax.enable_x64(True):`")
    if min(d_in, d_out, n_folds) < 1:
        raise ValueError(f"init_stats: d_in={d_in}, d_out={d_out}, n_folds={n_folds} must all be >= 1")
    k = n_folds
    z = partial(jnp.zeros, dtype=dtype)
    return RidgeStats(count=z((k,)), mean_x=z((k, d_in)), mean_y=z((k, d_out)), sxx=z((k, d_in, d_in)),
                      sxy=z((k, d_in, d_out)), syy=z((k, d_out)), skipped_batches=z(()), skipped_rows=z(()),
                      unassigned_rows=z(()))


def _check_batch(stats: RidgeStats, x, y, fold, weights) -> None:
    """Static shape checks (shapes are known under jit too), errors naming the shapes at fault."""
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"ridge update: x and y must be 2-D [rows, dim], got x{tuple(x.shape)} y{tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"ridge update: x has {x.shape[0]} rows but y has {y.shape[0]} "
                         f"(x{tuple(x.shape)}, y{tuple(y.shape)})")
    if x.shape[1] != stats.d_in or y.shape[1] != stats.d_out:
        raise ValueError(f"ridge update: widths do not match the stats: x{tuple(x.shape)} y{tuple(y.shape)} "
                         f"but stats are for d_in={stats.d_in}, d_out={stats.d_out}")
    if weights is not None and tuple(weights.shape) != (x.shape[0],):
        raise ValueError(f"ridge update: weights/mask must have shape ({x.shape[0]},), got {tuple(weights.shape)}")
    if fold is None:
        if stats.n_folds > 1:
            raise ValueError(f"ridge update: stats have {stats.n_folds} folds, so each batch needs `fold` "
                             "(a scalar or one id per row)")
    elif fold.ndim > 1 or (fold.ndim == 1 and fold.shape[0] != x.shape[0]):
        raise ValueError(f"ridge update: fold must be a scalar or shape ({x.shape[0]},), got {tuple(fold.shape)}")
    elif not jnp.issubdtype(fold.dtype, jnp.integer):
        raise ValueError(f"ridge update: fold ids must be integers, got dtype {fold.dtype}")


_PRECISIONS = {"highest": lax.Precision.HIGHEST, "tf32": lax.Precision.HIGH, "default": lax.Precision.DEFAULT}


def _products(spec: str, a: Array, b: Array, precision: str) -> Array:
    """einsum(spec, a, b) accumulated in a's dtype, at the requested matmul precision."""
    out_dtype = a.dtype
    if precision == "bf16":
        return jnp.einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=out_dtype)
    return jnp.einsum(spec, a, b, precision=_PRECISIONS[precision], preferred_element_type=out_dtype)


def _cross(a: Array, b: Array, precision: str) -> Array:
    """a^T b over the row axis: a [B, i], b [B, j] -> [i, j]."""
    return _products("bi,bj->ij", a, b, precision)


def _cross_folds(a: Array, b: Array, precision: str) -> Array:
    """Per-fold a_k^T b for a [K, B, i], b [B, j] -> [K, i, j]."""
    return _products("kbi,bj->kij", a, b, precision)


def _safe_div(a: Array, n: Array) -> Array:
    return a / jnp.where(n > 0, n, 1)


def _chan_merge(na, mxa, mya, sxxa, sxya, syya, nb, mxb, myb, sxxb, sxyb, syyb):
    """Pairwise merge of centred moments (Chan et al.); broadcasts over a leading fold axis."""
    n = na + nb
    dx = mxb - mxa
    dy = myb - mya
    frac_b = _safe_div(nb, n)
    coef = _safe_div(na * nb, n)
    mx = mxa + frac_b[..., None] * dx
    my = mya + frac_b[..., None] * dy
    sxx = sxxa + sxxb + coef[..., None, None] * dx[..., :, None] * dx[..., None, :]
    sxy = sxya + sxyb + coef[..., None, None] * dx[..., :, None] * dy[..., None, :]
    syy = syya + syyb + coef[..., None] * dy * dy
    return n, mx, my, sxx, sxy, syy


def _nonfinite_count(x: Array, y: Array, valid: Array) -> Array:
    bad_x = jnp.sum(jnp.where(valid[:, None], ~jnp.isfinite(x), False))
    bad_y = jnp.sum(jnp.where(valid[:, None], ~jnp.isfinite(y), False))
    return bad_x + bad_y


def _warn_skipped(n_bad, n_rows) -> None:
    warnings.warn(f"ridge update: skipped a batch with {int(n_bad)} non-finite (NaN/Inf) values "
                  f"in its {int(n_rows)} valid rows; see stats.skipped_batches / skipped_rows",
                  RuntimeWarning, stacklevel=2)


def update(stats: RidgeStats, x: Array, y: Array, fold: Array | int | None = None,
           weights: Array | None = None, *, on_nonfinite: str = "skip", precision: str = "tf32",
           warn: bool = False) -> RidgeStats:
    """Add one batch of pairs to the statistics (pure; jit/shard_map friendly).

    x [B, d_in], y [B, d_out] (any float dtype; cast to the stats dtype before centring).
    fold: None (single-fold stats), a scalar fold id for the whole batch (fast path), or int [B] per row.
    weights: None, a bool mask [B] of valid rows (padding rows False: fixed batch shapes, no recompiles),
        or non-negative float row weights [B] (the objective becomes sum_i w_i |y_i - x_i W - b|^2).
        Values in rows with weight 0 are ignored, even NaN.
    on_nonfinite: "skip" leaves out a batch whose valid rows hold NaN/Inf and counts it in
        stats.skipped_batches/skipped_rows (`solve` warns about them once);
        "raise" raises ValueError (needs concrete arrays: use `accumulate` or call outside jit);
        "ignore" does no check (NaN then poisons the stats).
    precision: "tf32" (default), "bf16", "highest" or "default" for the accumulation matmul (module doc).
    warn: also warn at each skipped batch, through a host callback behind a `lax.cond`.  On a GPU that
        conditional makes the host wait for the device every batch: on 2 H100s with batch-sharded inputs
        it cut the accumulation rate by about a third (BENCHMARKS.md), hence off by default.

    Under jax.jit with x/y sharded over the batch axis, the sums are global (XLA inserts the
    all-reduce); inside shard_map each device accumulates its own rows: combine with `psum_stats`.
    """
    if on_nonfinite not in _NONFINITE_MODES:
        raise ValueError(f"ridge update: on_nonfinite must be one of {_NONFINITE_MODES}, got {on_nonfinite!r}")
    if precision not in _ACCUM_PRECISIONS:
        raise ValueError(f"ridge update: precision must be one of {_ACCUM_PRECISIONS}, got {precision!r}")
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    fold = None if fold is None else jnp.asarray(fold)
    weights = None if weights is None else jnp.asarray(weights)
    _check_batch(stats, x, y, fold, weights)
    dtype = stats.sxx.dtype
    k_folds = stats.n_folds
    n_rows = x.shape[0]

    w = jnp.ones((n_rows,), dtype) if weights is None else weights.astype(dtype)
    valid = w > 0
    if on_nonfinite == "raise":
        if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer) or isinstance(w, jax.core.Tracer):
            raise ValueError("ridge update: on_nonfinite='raise' needs concrete arrays; under jit use 'skip' "
                             "and check stats.skipped_batches, or call `accumulate` (which checks on the host)")
        _raise_if_nonfinite("ridge update", x, y, valid)
    skipped_batches, skipped_rows = stats.skipped_batches, stats.skipped_rows
    if on_nonfinite == "skip":
        n_bad = _nonfinite_count(x, y, valid)
        ok = n_bad == 0
        if warn:
            lax.cond(ok, lambda: None, lambda: jax.debug.callback(_warn_skipped, n_bad, jnp.sum(valid)))
        skipped_batches = skipped_batches + jnp.where(ok, 0, 1).astype(dtype)
        skipped_rows = skipped_rows + jnp.where(ok, 0, jnp.sum(w)).astype(dtype)
        w = jnp.where(ok, w, 0)
        valid = valid & ok

    # rows with a fold id outside [0, K) are dropped and counted
    if fold is None:
        fold = jnp.zeros((), jnp.int32)
    row_in_range = jnp.broadcast_to((fold >= 0) & (fold < k_folds), (n_rows,))
    unassigned = stats.unassigned_rows + jnp.sum(jnp.where(valid & ~row_in_range, w, 0))
    w = jnp.where(row_in_range, w, 0)
    valid = w > 0

    # zero invalid rows first: padding may hold garbage (NaN) and 0 * NaN = NaN
    x = jnp.where(valid[:, None], x.astype(dtype), 0)
    y = jnp.where(valid[:, None], y.astype(dtype), 0)

    if fold.ndim == 0:
        nb, mxb, myb, sxxb, sxyb, syyb = _batch_moments(x, y, w, precision)
        k = jnp.clip(fold, 0, k_folds - 1)
        merged = _chan_merge(stats.count[k], stats.mean_x[k], stats.mean_y[k], stats.sxx[k], stats.sxy[k],
                             stats.syy[k], nb, mxb, myb, sxxb, sxyb, syyb)
        count, mean_x, mean_y, sxx, sxy, syy = (
            full.at[k].set(part) for full, part in
            zip((stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy), merged, strict=True))
    else:
        nb, mxb, myb, sxxb, sxyb, syyb = _batch_moments_per_row(x, y, w, fold, k_folds, precision)
        count, mean_x, mean_y, sxx, sxy, syy = _chan_merge(
            stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy,
            nb, mxb, myb, sxxb, sxyb, syyb)
    return RidgeStats(count, mean_x, mean_y, sxx, sxy, syy, skipped_batches, skipped_rows, unassigned)


def _batch_moments(x: Array, y: Array, w: Array, precision: str):
    """Weighted moments of one batch, centred on the batch mean (corrected two-pass)."""
    n = jnp.sum(w)
    mx = _safe_div(jnp.sum(w[:, None] * x, 0), n)
    my = _safe_div(jnp.sum(w[:, None] * y, 0), n)
    xc = x - mx
    yc = y - my
    xw = w[:, None] * xc
    # rounding error of the mean, removed exactly: sum w (xc - r)(xc - r)^T = sum w xc xc^T - n r r^T
    rx = _safe_div(jnp.sum(xw, 0), n)
    ry = _safe_div(jnp.sum(w[:, None] * yc, 0), n)
    sxx = _cross(xw, xc, precision) - n * rx[:, None] * rx[None, :]
    sxy = _cross(xw, yc, precision) - n * rx[:, None] * ry[None, :]
    syy = jnp.sum(w[:, None] * yc * yc, 0) - n * ry * ry
    return n, mx + rx, my + ry, sxx, sxy, syy


def _batch_moments_per_row(x: Array, y: Array, w: Array, fold: Array, k_folds: int, precision: str):
    """Per-fold weighted moments of a batch whose rows carry fold ids: [K, ...] (K masked products)."""
    fold_c = jnp.clip(fold, 0, k_folds - 1)
    wk = jax.nn.one_hot(fold_c, k_folds, dtype=x.dtype) * w[:, None]  # [B, K]
    n = jnp.sum(wk, 0)  # [K]
    mx = _safe_div(jnp.einsum("bk,bi->ki", wk, x, precision=_HIGHEST), n[:, None])
    my = _safe_div(jnp.einsum("bk,bj->kj", wk, y, precision=_HIGHEST), n[:, None])
    xc = x - mx[fold_c]  # each row centred on its own fold's batch mean (a gather: exact)
    yc = y - my[fold_c]
    rx = _safe_div(jnp.einsum("bk,bi->ki", wk, xc, precision=_HIGHEST), n[:, None])
    ry = _safe_div(jnp.einsum("bk,bj->kj", wk, yc, precision=_HIGHEST), n[:, None])
    xw = wk.T[:, :, None] * xc[None]  # [K, B, d_in]
    sxx = _cross_folds(xw, xc, precision) - n[:, None, None] * rx[:, :, None] * rx[:, None, :]
    sxy = _cross_folds(xw, yc, precision) - n[:, None, None] * rx[:, :, None] * ry[:, None, :]
    syy = jnp.einsum("bk,bj->kj", wk, yc * yc, precision=_HIGHEST) - n[:, None] * ry * ry
    return n, mx + rx, my + ry, sxx, sxy, syy


_update_donated = jax.jit(update, donate_argnums=0, static_argnames=("on_nonfinite", "precision", "warn"))


def accumulate(stats: RidgeStats, x: Array, y: Array, fold: Array | int | None = None,
               weights: Array | None = None, *, on_nonfinite: str = "skip", precision: str = "tf32",
               warn: bool = False) -> RidgeStats:
    """`update`, jitted, with `stats` donated (updated in place: do not reuse the old stats).

    A Python int `fold` is traced as a value, so every fold shares one compiled step.  With
    on_nonfinite="raise" the finite check runs first on the host (a device sync per batch).
    """
    if on_nonfinite == "raise":
        xa, ya = jnp.asarray(x), jnp.asarray(y)
        valid = jnp.ones((xa.shape[0],), bool) if weights is None else jnp.asarray(weights) > 0
        _raise_if_nonfinite("ridge accumulate", xa, ya, valid)
        on_nonfinite = "ignore"
    return _update_donated(stats, x, y, fold, weights, on_nonfinite=on_nonfinite, precision=precision, warn=warn)


_nonfinite_count_jit = jax.jit(_nonfinite_count)


def _raise_if_nonfinite(where: str, x: Array, y: Array, valid: Array) -> None:
    """The host-side check of on_nonfinite="raise" (concrete arrays only: it reads the count back)."""
    n_bad = int(_nonfinite_count_jit(x, y, valid))
    if n_bad:
        raise ValueError(f"{where}: batch x{tuple(x.shape)} y{tuple(y.shape)} has {n_bad} non-finite (NaN/Inf) "
                         "values in its valid rows")


# ----------------------------------------------------------------------------------------------
# merging


@jax.jit
def merge(a: RidgeStats, b: RidgeStats) -> RidgeStats:
    """Exact merge of two statistics over disjoint rows (fold by fold; Chan's pairwise update)."""
    if a.sxx.shape != b.sxx.shape or a.sxy.shape != b.sxy.shape:
        raise ValueError(f"ridge merge: shapes differ: sxx {a.sxx.shape} vs {b.sxx.shape}, "
                         f"sxy {a.sxy.shape} vs {b.sxy.shape}")
    merged = _chan_merge(a.count, a.mean_x, a.mean_y, a.sxx, a.sxy, a.syy,
                         b.count, b.mean_x, b.mean_y, b.sxx, b.sxy, b.syy)
    return RidgeStats(*merged, a.skipped_batches + b.skipped_batches, a.skipped_rows + b.skipped_rows,
                      a.unassigned_rows + b.unassigned_rows)


def _multi_merge(count, mean_x, mean_y, sxx, sxy, syy, select):
    """Merge the folds where `select` [K] is 1 into one set of moments (K-way exact merge).

    S = sum_k S_k + sum_k n_k (m_k - m)(m_k - m)^T: only differences of means enter the products.
    """
    nk = count * select
    n = jnp.sum(nk)
    mx = _safe_div(jnp.sum(nk[:, None] * mean_x, 0), n)
    my = _safe_div(jnp.sum(nk[:, None] * mean_y, 0), n)
    dx = (mean_x - mx) * jnp.sqrt(nk)[:, None]
    dy = (mean_y - my) * jnp.sqrt(nk)[:, None]
    sel3 = select[:, None, None]
    out_sxx = jnp.sum(sel3 * sxx, 0) + jnp.einsum("ki,kj->ij", dx, dx, precision=_HIGHEST)
    out_sxy = jnp.sum(sel3 * sxy, 0) + jnp.einsum("ki,kj->ij", dx, dy, precision=_HIGHEST)
    out_syy = jnp.sum(select[:, None] * syy, 0) + jnp.sum(dy * dy, 0)
    return n, mx, my, out_sxx, out_sxy, out_syy


@jax.jit
def combine_folds(stats: RidgeStats) -> RidgeStats:
    """All folds merged into one (result has n_folds=1)."""
    parts = _multi_merge(stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy,
                         jnp.ones_like(stats.count))
    return RidgeStats(*(p[None] for p in parts), stats.skipped_batches, stats.skipped_rows, stats.unassigned_rows)


def psum_stats(stats: RidgeStats, axis_name: str | tuple[str, ...]) -> RidgeStats:
    """Inside shard_map: merge per-device statistics of disjoint rows into the global ones (exact).

    Each device must hold statistics of its own rows only (start every device from `init_stats`).
    N = psum n; m = psum(n m) / N; S = psum(S + n (m_dev - m)(m_dev - m)^T).
    """
    n = lax.psum(stats.count, axis_name)
    mx = _safe_div(lax.psum(stats.count[:, None] * stats.mean_x, axis_name), n[:, None])
    my = _safe_div(lax.psum(stats.count[:, None] * stats.mean_y, axis_name), n[:, None])
    dx = stats.mean_x - mx
    dy = stats.mean_y - my
    c = stats.count
    sxx = lax.psum(stats.sxx + c[:, None, None] * dx[:, :, None] * dx[:, None, :], axis_name)
    sxy = lax.psum(stats.sxy + c[:, None, None] * dx[:, :, None] * dy[:, None, :], axis_name)
    syy = lax.psum(stats.syy + c[:, None] * dy * dy, axis_name)
    return RidgeStats(n, mx, my, sxx, sxy, syy, lax.psum(stats.skipped_batches, axis_name),
                      lax.psum(stats.skipped_rows, axis_name), lax.psum(stats.unassigned_rows, axis_name))


# ----------------------------------------------------------------------------------------------
# several devices: each accumulates its own rows, one psum at the end


def _device_axes(mesh, rules: dict | None) -> tuple[tuple[str, ...], int]:
    return shd.batch_axes(mesh, rules), shd.batch_shards(mesh, rules)


def init_device_stats(mesh, d_in: int, d_out: int, n_folds: int = 1, dtype: Any = jnp.float32,
                      rules: dict | None = None) -> RidgeStats:
    """Zero statistics with one slot per batch shard of `mesh`, each slot on its own device(s).

    The leading axis has one entry per shard of the batch axes ("data", "fsdp" by default); feed it
    to `accumulate_on_devices` and finish with `reduce_device_stats`.  Compared with a plain
    `accumulate` on batch-sharded inputs (where XLA all-reduces the [d_in, d_in + d_out] products
    after every batch), devices exchange nothing until the single reduction at the end.
    """
    jax.eval_shape(lambda: init_stats(d_in, d_out, n_folds, dtype))  # its argument checks, no allocation
    axes, n = _device_axes(mesh, rules)
    spec = NamedSharding(mesh, P(axes if axes else None))

    def zeros():
        return jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), init_stats(d_in, d_out, n_folds, dtype))

    return jax.jit(zeros, out_shardings=spec)()


@partial(jax.jit, static_argnames=("mesh", "axes", "on_nonfinite", "precision", "warn"), donate_argnums=0)
def _accumulate_on_devices(stats, x, y, fold, weights, *, mesh, axes, on_nonfinite, precision, warn):
    rows = P(axes if axes else None)
    # defaults made here, inside jit, so a call dispatches no extra device ops
    fold = jnp.zeros((), jnp.int32) if fold is None else fold
    weights = jnp.ones((x.shape[0],), bool) if weights is None else weights
    fold_spec = rows if fold.ndim else P()

    def local(st, xb, yb, fb, wb):
        st = update(jax.tree.map(lambda a: a[0], st), xb, yb, fb, wb, on_nonfinite=on_nonfinite,
                    precision=precision, warn=warn)
        return jax.tree.map(lambda a: a[None], st)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, fold_spec, rows), out_specs=rows,
                         check_vma=False)(stats, x, y, fold, weights)


def accumulate_on_devices(stats: RidgeStats, x: Array, y: Array, fold: Array | int | None = None,
                          weights: Array | None = None, *, mesh, rules: dict | None = None,
                          on_nonfinite: str = "skip", precision: str = "tf32", warn: bool = False) -> RidgeStats:
    """`update` on every device at once: each adds the rows of the batch it holds to its own slot of
    `stats` (from `init_device_stats`), with no communication.  Jitted; `stats` is donated.

    x [B, d_in], y [B, d_out], weights [B] and a per-row `fold` [B] are split over the batch axes
    like `sharding.shard_batch` does (B must divide evenly); a scalar `fold` applies to every row.
    """
    if on_nonfinite not in ("skip", "ignore"):
        raise ValueError(f"accumulate_on_devices: on_nonfinite must be 'skip' or 'ignore' (no host check per "
                         f"device), got {on_nonfinite!r}")
    axes, n = _device_axes(mesh, rules)
    if stats.count.shape[0] != n:
        raise ValueError(f"accumulate_on_devices: stats have {stats.count.shape[0]} device slots but the mesh "
                         f"splits the batch {n} ways: build them with init_device_stats(mesh, ...)")
    rows = jnp.shape(x)[0]
    if rows % n:
        raise ValueError(f"accumulate_on_devices: batch of {rows} rows does not split evenly over {n} devices "
                         f"(mesh axes {axes}); pad it and pass weights=0 for the padding rows")
    fold = None if fold is None else jnp.asarray(fold)
    weights = None if weights is None else jnp.asarray(weights)
    one_slot = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stats)
    _check_batch(one_slot, jnp.asarray(x), jnp.asarray(y), fold, weights)  # the same errors as `update`
    return _accumulate_on_devices(stats, x, y, fold, weights, mesh=mesh, axes=axes, on_nonfinite=on_nonfinite,
                                  precision=precision, warn=warn)


def reduce_device_stats(stats: RidgeStats, mesh, rules: dict | None = None) -> RidgeStats:
    """The per-device slots merged into one `RidgeStats` (exact `psum_stats`), replicated on the mesh."""
    axes, n = _device_axes(mesh, rules)
    if stats.count.shape[0] != n:
        raise ValueError(f"reduce_device_stats: stats have {stats.count.shape[0]} device slots, mesh has {n}")
    return _reduce_device_stats(stats, mesh=mesh, axes=axes)


@partial(jax.jit, static_argnames=("mesh", "axes"))  # module level: compiled once per mesh, not per call
def _reduce_device_stats(stats: RidgeStats, *, mesh, axes: tuple[str, ...]) -> RidgeStats:
    def local(st):
        st = jax.tree.map(lambda a: a[0], st)
        return psum_stats(st, axes) if axes else st

    rows = P(axes if axes else None)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows,), out_specs=P(), check_vma=False)(stats)


# ----------------------------------------------------------------------------------------------
# solve


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
    return _Moments(*_multi_merge(stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy, select))


def _total(stats: RidgeStats) -> _Moments:
    return _Moments(*_multi_merge(stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy,
                                  jnp.ones_like(stats.count)))


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _scale(train: _Moments, standardize: bool) -> Array:
    """Feature scale: population std of the training rows (1 where zero), or ones."""
    if not standardize:
        return jnp.ones_like(train.mx)
    sd = jnp.sqrt(jnp.maximum(jnp.diagonal(train.sxx), 0) / jnp.where(train.n > 0, train.n, 1))
    return jnp.where(sd > 0, sd, 1)


def _eig(train: _Moments, standardize: bool):
    """Eigendecomposition of the (scaled) training Sxx; P = Q^T (scaled Sxy)."""
    s = _scale(train, standardize)
    a = train.sxx / (s[:, None] * s[None, :])
    e, q = jnp.linalg.eigh(a, symmetrize_input=True)
    e = jnp.maximum(e, 0)  # rounding can leave tiny negative eigenvalues of a PSD matrix
    p = _mm(q.T, train.sxy / s[:, None])
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
    if compute_dtype not in ("float32", "float64"):
        raise ValueError(f"ridge solve: compute_dtype must be 'float32', 'float64' or None, got {compute_dtype!r}")
    if compute_dtype == "float64" and jax.default_backend() == "tpu":
        warnings.warn("ridge solve: float64 is not available on TPU; solving in float32", RuntimeWarning,
                      stacklevel=3)
        return "float32"
    return compute_dtype


class _Precision:
    """Context for the solve: x64 on when float64 is asked for (jax.enable_x64 exists in jax 0.10/0.11)."""

    def __init__(self, dtype_name: str):
        self.ctx = jax.enable_x64(True) if dtype_name == "float64" and not jax.config.jax_enable_x64 else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def _check_stats(stats: RidgeStats, where: str, fitting: bool = True) -> np.ndarray:
    """Host-side sanity checks before a solve (`fitting`) or a score; returns the per-fold counts."""
    counts = np.asarray(jax.device_get(stats.count), np.float64)
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
    with _Precision(dtype_name):
        ridge_map, cv = _solve_core(stats, jnp.asarray(lam_grid, dtype_name), standardize, per_target, dtype_name,
                                    out_dtype)
        ridge_map = jax.block_until_ready(ridge_map)
        cv = jax.device_get(cv)
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
    with _Precision(dtype_name):
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
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency, but keep this module importable without it
        return it
    return tqdm(it, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------------
# save / load


def _jsonable(value: Any) -> Any:
    """numpy/jax values -> plain JSON types (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (jax.Array, np.ndarray)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"ridge metadata: value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def save_map(path: str | os.PathLike, ridge_map: RidgeMap, metadata: Mapping[str, Any] | None = None, *,
             overwrite: bool = False) -> str:
    """Save a RidgeMap with a free-form JSON metadata dict (model ids, layers, lambda, CV table, corpus
    hash, pairing settings, ...) as an orbax checkpoint directory.  Returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = _jsonable(dict(metadata or {}))
    meta["_crossmap_ridge"] = {"format_version": FORMAT_VERSION, "d_in": int(ridge_map.W.shape[-2]),
                               "d_out": int(ridge_map.W.shape[-1]), "dtype": str(ridge_map.W.dtype),
                               "fields": list(RidgeMap._fields)}
    arrays = {name: np.asarray(jax.device_get(getattr(ridge_map, name))) for name in RidgeMap._fields}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, ocp.args.Composite(map=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(meta)),
                   force=overwrite)
    return path


def load_map(path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> tuple[RidgeMap, dict[str, Any]]:
    """Load (RidgeMap, metadata) saved by `save_map`.

    expect: fields the metadata must have with these values (e.g. source_model, target_model,
    source_layer, target_layer); a missing or different field raises MetadataMismatchError naming the
    field and both values.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"ridge load_map: no checkpoint directory at {path}")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(path, ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        info = meta.get("_crossmap_ridge", {})
        d_in, d_out, dtype = info.get("d_in"), info.get("d_out"), info.get("dtype", "float32")
        if d_in is None or d_out is None:
            raise ValueError(f"ridge load_map: {path} is not a crossmap ridge map (no _crossmap_ridge metadata)")
        _check_expect(path, meta, expect)
        shapes = {"W": (d_in, d_out), "b": (d_out,), "x_mean": (d_in,), "y_mean": (d_out,), "lam": (d_out,)}
        target = {k: np.zeros(shape, dtype) for k, shape in shapes.items()}
        arrays = ckptr.restore(path, ocp.args.Composite(map=ocp.args.StandardRestore(target)))["map"]
    ridge_map = RidgeMap(**{k: jnp.asarray(arrays[k]) for k in RidgeMap._fields})
    return ridge_map, meta


def _check_expect(path: str, meta: Mapping[str, Any], expect: Mapping[str, Any] | None) -> None:
    for key, want in (expect or {}).items():
        if key not in meta:
            raise MetadataMismatchError(f"ridge map at {path}: metadata has no field {key!r} "
                                        f"(expected {want!r}); it has {sorted(k for k in meta if k[0] != '_')}")
        have = meta[key]
        if _jsonable(want) != have:
            raise MetadataMismatchError(f"ridge map at {path}: metadata field {key!r} is {have!r} "
                                        f"but {want!r} was expected")


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """The metadata as it will be stored (for logging / hashing)."""
    return json.dumps(_jsonable(dict(metadata)), sort_keys=True)
