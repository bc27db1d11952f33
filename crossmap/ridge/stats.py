"""Streaming sufficient statistics: accumulate batches, merge folds, devices and hosts exactly."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .types import ACCUMULATION_PRECISIONS, NONFINITE_MODES, RidgeStats

Array = jax.Array
_HIGHEST = lax.Precision.HIGHEST  # true float32 products (TPU/GPU default to bf16 passes)


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


def _nonfinite_count(x: Array, y: Array, valid: Array, w: Array | None = None) -> Array:
    """Non-finite values in the valid rows, plus weights that are non-finite or negative."""
    bad_x = jnp.sum(jnp.where(valid[:, None], ~jnp.isfinite(x), False))
    bad_y = jnp.sum(jnp.where(valid[:, None], ~jnp.isfinite(y), False))
    bad_w = 0 if w is None else jnp.sum(~jnp.isfinite(w) | (w < 0))
    return bad_x + bad_y + bad_w


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
        Values in rows with weight 0 are ignored, even NaN.  A NaN, infinite or negative weight is
        bad input, treated like a non-finite value (`on_nonfinite`).
    on_nonfinite: "skip" leaves out a batch whose valid rows hold NaN/Inf and counts it in
        stats.skipped_batches/skipped_rows (`solve` warns about them once);
        "raise" raises ValueError (needs concrete arrays: use `accumulate` or call outside jit);
        "ignore" does no check (NaN then poisons the stats).
    precision: "tf32" (default), "bf16", "highest" or "default" for the accumulation matmul (module doc).
    warn: also warn at each skipped batch, through a host callback behind a `lax.cond`.  On a GPU that
        conditional makes the host wait for the device every batch, which costs a large part of the
        multi-GPU accumulation rate (BENCHMARKS.md), hence off by default.

    Under jax.jit with x/y sharded over the batch axis, the sums are global (XLA inserts the
    all-reduce); inside shard_map each device accumulates its own rows: combine with `psum_stats`.
    """
    if on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"ridge update: on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
    if precision not in ACCUMULATION_PRECISIONS:
        raise ValueError(f"ridge update: precision must be one of {ACCUMULATION_PRECISIONS}, got {precision!r}")
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
        _raise_if_nonfinite("ridge update", x, y, valid, w)
    skipped_batches, skipped_rows = stats.skipped_batches, stats.skipped_rows
    if on_nonfinite == "skip":
        n_bad = _nonfinite_count(x, y, valid, w)
        ok = n_bad == 0
        if warn:
            lax.cond(ok, lambda: None, lambda: jax.debug.callback(_warn_skipped, n_bad, jnp.sum(valid)))
        skipped_batches = skipped_batches + jnp.where(ok, 0, 1).astype(dtype)
        usable = jnp.where(jnp.isfinite(w) & (w > 0), w, 0)  # a bad weight must not make the count NaN
        skipped_rows = skipped_rows + jnp.where(ok, 0, jnp.sum(usable)).astype(dtype)
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
        wa = jnp.ones((xa.shape[0],), jnp.float32) if weights is None else jnp.asarray(weights).astype(jnp.float32)
        _raise_if_nonfinite("ridge accumulate", xa, ya, wa > 0, wa)
        on_nonfinite = "ignore"
    return _update_donated(stats, x, y, fold, weights, on_nonfinite=on_nonfinite, precision=precision, warn=warn)


_nonfinite_count_jit = jax.jit(_nonfinite_count)


def _raise_if_nonfinite(where: str, x: Array, y: Array, valid: Array, w: Array | None = None) -> None:
    """The host-side check of on_nonfinite="raise" (concrete arrays only: it reads the count back)."""
    n_bad = int(_nonfinite_count_jit(x, y, valid, w))
    if n_bad:
        raise ValueError(f"{where}: batch x{tuple(x.shape)} y{tuple(y.shape)} has {n_bad} non-finite (NaN/Inf) "
                         "values in its valid rows, or NaN, infinite or negative weights")


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


def merge_selected(count, mean_x, mean_y, sxx, sxy, syy, select):
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
    parts = merge_selected(stats.count, stats.mean_x, stats.mean_y, stats.sxx, stats.sxy, stats.syy,
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


