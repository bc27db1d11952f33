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
better (BENCHMARKS.md has the measured efficiency).

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
  (or f64 for float64 stats).  Rates and errors of each precision are in BENCHMARKS.md.  Counts are stored in the stats dtype: in float32 a count is exact up to
  2^24 rows for 0/1 weights, beyond that off by at most one part in 1e7.
* `solve` works in float64 by default (`compute_dtype="float64"`) on CPU and GPU: it wraps the jitted
  solve in `jax.enable_x64(True)` (the context manager that jax 0.10 and 0.11 provide;
  `jax.experimental.enable_x64` is gone in 0.10), upcasts the float32 stats, and hands back the map in
  the stats dtype.  On TPU (no float64) it falls back to float32 with a warning.  Results are in float64
  only if x64 is on globally (`jax.config.update("jax_enable_x64", True)`) and the stats are float64.
  Solve times are in BENCHMARKS.md.

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

Modules: `types` (the pytrees), `stats` (accumulation and exact merges), `device_stats` (statistics
kept per device), `solve` (the CV solve, prediction, scoring, held-out cosine), `io` (save / load).
"""

from __future__ import annotations

from .device_stats import accumulate_on_devices, init_device_stats, reduce_device_stats
from .io import load_map, save_map
from .solve import CosineAcc, cosine_update, fold_maps, heldout_cosine, init_cosine, predict, score, solve
from .stats import accumulate, combine_folds, init_stats, merge, psum_stats, update
from .types import (
    ACCUMULATION_PRECISIONS,
    COMPUTE_DTYPES,
    FORMAT_VERSION,
    NONFINITE_MODES,
    MetadataMismatchError,
    RidgeFit,
    RidgeMap,
    RidgeStats,
)

__all__ = [
    "ACCUMULATION_PRECISIONS", "COMPUTE_DTYPES", "FORMAT_VERSION", "NONFINITE_MODES", "CosineAcc", "MetadataMismatchError",
    "RidgeFit", "RidgeMap", "RidgeStats", "accumulate", "accumulate_on_devices", "combine_folds",
    "cosine_update", "fold_maps", "heldout_cosine", "init_cosine", "init_device_stats", "init_stats", "load_map",
    "merge", "predict", "psum_stats", "reduce_device_stats", "save_map", "score", "solve", "update",
]
