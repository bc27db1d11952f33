"""crossmap.ridge against scikit-learn (float64 oracle) and numpy; crossmap.benchmarks.ridge smoke run.

Shapes are shared between tests (d_in=40, d_out=4, padded batches of 64 rows) so that the jitted steps
compile once per option set: XLA compiles dominate the run time on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_with_devices
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from crossmap import ridge

D_IN, D_OUT, BATCH, K = 40, 4, 64, 5
update_jit = jax.jit(ridge.update)  # eager op-by-op dispatch would compile every primitive separately


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_problem(kind: str, n: int, seed: int = 0, noise: float = 1.0):
    """x [n, D_IN], y [n, D_OUT] of a given difficulty, float64."""
    rng = np.random.default_rng(seed)
    if kind == "correlated":  # rank-5 signal plus tiny noise: Sxx nearly singular
        x = rng.normal(size=(n, 5)) @ rng.normal(size=(5, D_IN)) + 1e-3 * rng.normal(size=(n, D_IN))
    elif kind == "large_mean":
        x = rng.normal(size=(n, D_IN)) * np.logspace(0, -1, D_IN) + 1e4
    else:
        x = rng.normal(size=(n, D_IN))
    w = rng.normal(size=(D_IN, D_OUT)) / np.sqrt(D_IN)
    y = (x - x.mean(0)) @ w + noise * rng.normal(size=(n, D_OUT)) + rng.normal(size=D_OUT) * 50
    return x, y


def padded_batches(x, y, fold=None, rng=None):
    """Fixed-shape batches of BATCH rows; padding rows are garbage (NaN) with mask False."""
    n = x.shape[0]
    for start in range(0, n, BATCH):
        stop = min(start + BATCH, n)
        xb = np.full((BATCH, x.shape[1]), np.nan)
        yb = np.full((BATCH, y.shape[1]), np.nan)
        xb[: stop - start] = x[start:stop]
        yb[: stop - start] = y[start:stop]
        mask = np.arange(BATCH) < stop - start
        fb = None
        if fold is not None:
            fb = np.zeros(BATCH, np.int32)
            fb[: stop - start] = fold[start:stop]
        yield xb, yb, fb, mask


def accumulate_all(x, y, fold=None, n_folds=1, dtype=jnp.float64):
    stats = ridge.init_stats(x.shape[1], y.shape[1], n_folds, dtype)
    for xb, yb, fb, mask in padded_batches(x, y, fold):
        stats = ridge.accumulate(stats, xb.astype(dtype), yb.astype(dtype), fold=fb, weights=mask)
    return stats


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def numpy_moments(x, y):
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    return len(x), mx, my, xc.T @ xc, xc.T @ yc, (yc**2).sum(0)


# ----------------------------------------------------------------------------------------------
# closed form vs sklearn


@pytest.mark.parametrize("kind,n", [("plain", 30), ("correlated", 200), ("large_mean", 300)])
def test_coefficients_match_sklearn(x64, kind, n):
    x, y = make_problem(kind, n)
    stats = accumulate_all(x, y)
    if n < D_IN:
        with pytest.warns(RuntimeWarning, match="fewer pairs than input dimensions"):
            ridge.solve(stats, 1.0)
    for lam in (1e-2, 30.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # n < d warning, checked above
            ridge_map, fit = ridge.solve(stats, lam)
        oracle = Ridge(alpha=lam, fit_intercept=True).fit(x, y)
        assert rel(ridge_map.W, oracle.coef_.T) < 1e-6, (kind, lam)
        assert rel(ridge_map.b, oracle.intercept_) < 1e-6, (kind, lam)
        assert fit.lam == lam and fit.cv_sse is None
        np.testing.assert_allclose(ridge.predict(ridge_map, x), oracle.predict(x), rtol=1e-6, atol=1e-6)


def test_standardized_matches_sklearn_pipeline(x64):
    x, y = make_problem("large_mean", 300, seed=1)
    stats = accumulate_all(x, y)
    for lam in (0.1, 100.0):
        ridge_map, _ = ridge.solve(stats, lam, standardize=True)
        pipe = make_pipeline(StandardScaler(), Ridge(alpha=lam)).fit(x, y)
        np.testing.assert_allclose(ridge.predict(ridge_map, x), pipe.predict(x), rtol=1e-7, atol=1e-7)
        scale = pipe[0].scale_
        assert rel(ridge_map.W, pipe[1].coef_.T / scale[:, None]) < 1e-6


def test_kfold_cv_matches_sklearn_loop(x64):
    x, y = make_problem("large_mean", 400, seed=2, noise=3.0)
    x = x + 0.5 * np.random.default_rng(3).normal(size=(400, 1))  # correlate all columns a bit
    groups = np.random.default_rng(4).integers(0, K, len(x))  # "documents" -> folds
    lambdas = np.logspace(-2, 4, 9)
    stats = accumulate_all(x, y, groups, n_folds=K)
    ridge_map, fit = ridge.solve(stats, lambdas, per_target=False)
    map_t, fit_t = ridge.solve(stats, lambdas, per_target=True)

    sse = np.zeros((len(lambdas), K, D_OUT))
    oof = np.zeros((len(lambdas),) + y.shape)
    for li, lam in enumerate(lambdas):
        for k in range(K):
            train, held = groups != k, groups == k
            pred = Ridge(alpha=lam).fit(x[train], y[train]).predict(x[held])
            oof[li, held] = pred
            sse[li, k] = ((y[held] - pred) ** 2).sum(0)
    best = int(np.argmin(sse.sum((1, 2))))
    assert 0 < best < len(lambdas) - 1, "the oracle's optimum should be inside the grid"
    np.testing.assert_allclose(fit.cv_sse, sse.sum(-1), rtol=1e-8)
    np.testing.assert_allclose(fit.cv_sse_per_target, sse, rtol=1e-8)
    assert fit.lam == lambdas[best]
    per_target_best = np.argmin(sse.sum(1), 0)
    np.testing.assert_array_equal(fit_t.lam_per_target, lambdas[per_target_best])
    assert fit_t.lam == fit.lam

    # held-out R^2 = r2_score of the out-of-fold predictions
    assert fit.r2 == pytest.approx(r2_score(y, oof[best], multioutput="variance_weighted"), rel=1e-9)
    np.testing.assert_allclose(fit.r2_per_target, r2_score(y, oof[best], multioutput="raw_values"), rtol=1e-9)
    assert fit.r2_mean == pytest.approx(r2_score(y, oof[best]), rel=1e-9)
    oof_t = oof[per_target_best, :, np.arange(D_OUT)].T
    np.testing.assert_allclose(fit_t.r2_per_target, r2_score(y, oof_t, multioutput="raw_values"), rtol=1e-9)
    np.testing.assert_allclose(fit.cv_r2, 1 - sse.sum((1, 2)) / ((y - y.mean(0)) ** 2).sum(), rtol=1e-9)

    # pooled cosine (exact from stats) and mean cosine (second pass)
    pooled = (oof[best] * y).sum() / np.sqrt((oof[best] ** 2).sum() * (y**2).sum())
    assert fit.pooled_cosine == pytest.approx(pooled, rel=1e-9)
    row_cos = (oof[best] * y).sum(1) / np.linalg.norm(oof[best], axis=1) / np.linalg.norm(y, axis=1)
    batches = [(xb, yb, fb, mb) for xb, yb, fb, mb in padded_batches(x, y, groups)]
    cos = ridge.heldout_cosine(stats, fit.lam, batches, progress=False)
    assert cos["mean_cosine"] == pytest.approx(row_cos.mean(), rel=1e-9)
    np.testing.assert_allclose(cos["per_fold"], [row_cos[groups == k].mean() for k in range(K)], rtol=1e-9)

    # final maps: refit on everything at the chosen lambda(s)
    oracle = Ridge(alpha=fit.lam).fit(x, y)
    assert rel(ridge_map.W, oracle.coef_.T) < 1e-6 and rel(ridge_map.b, oracle.intercept_) < 1e-6
    for j in range(D_OUT):
        col = Ridge(alpha=fit_t.lam_per_target[j]).fit(x, y[:, j])
        assert rel(map_t.W[:, j], col.coef_) < 1e-6 and rel(map_t.b[j], col.intercept_) < 1e-6

    # exact score of a map on held-out statistics
    held_fold = jax.tree.map(lambda a: a[2:3] if a.ndim else a, stats)
    s = ridge.score(ridge_map, held_fold)
    direct = ((y[groups == 2] - oracle.predict(x[groups == 2])) ** 2).sum(0)
    np.testing.assert_allclose(s["sse_per_target"], direct, rtol=1e-8)


# ----------------------------------------------------------------------------------------------
# streaming statistics


def test_streaming_equals_one_batch_and_numpy(x64):
    x, y = make_problem("large_mean", 300, seed=5)
    groups = np.random.default_rng(6).integers(0, K, len(x))
    streamed = accumulate_all(x, y, groups, n_folds=K)
    one = update_jit(ridge.init_stats(D_IN, D_OUT, K, jnp.float64), x, y, fold=groups)
    for name in ("count", "mean_x", "mean_y", "sxx", "sxy", "syy"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(one, name), rtol=1e-9, atol=1e-9, err_msg=name)
    for k in range(K):
        n, mx, my, sxx, sxy, syy = numpy_moments(x[groups == k], y[groups == k])
        assert float(streamed.count[k]) == n
        np.testing.assert_allclose(streamed.mean_x[k], mx, rtol=1e-12)
        np.testing.assert_allclose(streamed.sxx[k], sxx, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(streamed.sxy[k], sxy, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(streamed.syy[k], syy, rtol=1e-9)
    # merge of two disjoint halves == everything; combine_folds == one-fold stats
    half = len(x) // 2
    a = update_jit(ridge.init_stats(D_IN, D_OUT, K, jnp.float64), x[:half], y[:half], fold=groups[:half])
    b = update_jit(ridge.init_stats(D_IN, D_OUT, K, jnp.float64), x[half:], y[half:], fold=groups[half:])
    np.testing.assert_allclose(ridge.merge(a, b).sxx, one.sxx, rtol=1e-9, atol=1e-9)
    total = ridge.combine_folds(streamed)
    n, mx, my, sxx, sxy, syy = numpy_moments(x, y)
    np.testing.assert_allclose(total.sxx[0], sxx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(total.syy[0], syy, rtol=1e-9)


def test_scalar_fold_fast_path_and_float32_large_means():
    """Whole batches per fold (the fast path), float32 stats, column means 1e4 and spreads 0.1..1.

    Centred accumulation with Chan merges keeps Sxx to ~1e-4 (the limit is storing a mean of 1e4 in
    float32: resolution 1e-3); uncentred float32 sums lose every digit (1e8 * 2^-24 > spread^2)."""
    x, y = make_problem("large_mean", 20 * BATCH, seed=7)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    stats = ridge.init_stats(D_IN, D_OUT, K, jnp.float32)
    fold_of_batch = np.arange(20) % K
    for i in range(20):
        sl = slice(i * BATCH, (i + 1) * BATCH)
        stats = ridge.accumulate(stats, x32[sl], y32[sl], fold=int(fold_of_batch[i]), precision="highest")
    rows_fold = np.repeat(fold_of_batch, BATCH)
    xr, yr = x32.astype(np.float64), y32.astype(np.float64)
    for k in range(K):
        n, mx, my, sxx, sxy, syy = numpy_moments(xr[rows_fold == k], yr[rows_fold == k])
        assert float(stats.count[k]) == n
        assert rel(stats.sxx[k], sxx) < 1e-3 and rel(stats.sxy[k], sxy) < 1e-3 and rel(stats.syy[k], syy) < 1e-3
        assert rel(stats.mean_x[k], mx) < 1e-7
        xk = x32[rows_fold == k]
        naive = xk.T @ xk - np.float32(n) * np.outer(xk.mean(0), xk.mean(0)).astype(np.float32)
        assert rel(naive, sxx) > 100 * rel(stats.sxx[k], sxx)


def test_out_of_range_fold_ids_are_dropped_and_counted(x64):
    x, y = make_problem("plain", BATCH, seed=8)
    fold = np.arange(BATCH) % (K + 2)  # ids K and K+1 are out of range
    stats = update_jit(ridge.init_stats(D_IN, D_OUT, K, jnp.float64), x, y, fold=fold)
    assert float(stats.unassigned_rows) == np.sum(fold >= K)
    assert float(stats.count.sum()) == np.sum(fold < K)


MULTI_DEVICE_CODE = """
import json
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from jax.sharding import NamedSharding, PartitionSpec as P
from crossmap import ridge
from crossmap.sharding import make_mesh, shard_batch

assert jax.device_count() == 8
mesh = make_mesh()
rng = np.random.default_rng(0)
n, d_in, d_out, k = 512, 12, 5, 3
x = rng.normal(size=(n, d_in)) * 3 + 1e3
y = x @ rng.normal(size=(d_in, d_out)) + rng.normal(size=(n, d_out))
fold = rng.integers(0, k, n)
mask = rng.random(n) > 0.1

step = jax.jit(ridge.update)
one = ridge.init_stats(d_in, d_out, k, jnp.float64)
for s in range(0, n, 128):
    one = step(one, x[s:s+128], y[s:s+128], fold[s:s+128], mask[s:s+128])

sharded = ridge.init_stats(d_in, d_out, k, jnp.float64)
for s in range(0, n, 128):
    xb = shard_batch(x[s:s+128], mesh)
    assert len(xb.sharding.device_set) == 8
    sharded = step(sharded, xb, shard_batch(y[s:s+128], mesh), shard_batch(fold[s:s+128], mesh),
                   shard_batch(mask[s:s+128], mesh))

def local(xb, yb, fb, mb):
    st = ridge.init_stats(d_in, d_out, k, jnp.float64)
    st = ridge.update(st, xb, yb, fb, mb)
    return ridge.psum_stats(st, "data")

spec = P("data")
mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=P()))
parts = [mapped(shard_batch(x[s:s+128], mesh), shard_batch(y[s:s+128], mesh),
                shard_batch(fold[s:s+128], mesh), shard_batch(mask[s:s+128], mesh)) for s in range(0, n, 128)]
psummed = parts[0]
for p in parts[1:]:
    psummed = ridge.merge(psummed, p)

def err(a, b):
    return max(float(np.max(np.abs(np.asarray(getattr(a, f)) - np.asarray(getattr(b, f)))
                        / (1 + np.max(np.abs(np.asarray(getattr(b, f)))))))
               for f in ("count", "mean_x", "mean_y", "sxx", "sxy", "syy"))

# each device keeps its own slot, one psum at the end (scalar folds and per-row folds)
dev = ridge.init_device_stats(mesh, d_in, d_out, k, jnp.float64)
assert dev.sxx.shape == (8, k, d_in, d_in) and len(dev.sxx.sharding.device_set) == 8
for s in range(0, n, 128):
    dev = ridge.accumulate_on_devices(dev, shard_batch(x[s:s+128], mesh), shard_batch(y[s:s+128], mesh),
                                      shard_batch(fold[s:s+128], mesh), shard_batch(mask[s:s+128], mesh),
                                      mesh=mesh)
on_devices = ridge.reduce_device_stats(dev, mesh)
scalar_one = ridge.init_stats(d_in, d_out, k, jnp.float64)
scalar_dev = ridge.init_device_stats(mesh, d_in, d_out, k, jnp.float64)
for i, s in enumerate(range(0, n, 128)):
    scalar_one = step(scalar_one, x[s:s+128], y[s:s+128], i % k)
    scalar_dev = ridge.accumulate_on_devices(scalar_dev, x[s:s+128], y[s:s+128], i % k, mesh=mesh)
scalar_dev = ridge.reduce_device_stats(scalar_dev, mesh)
errors = []
for bad in (lambda: ridge.accumulate_on_devices(ridge.init_device_stats(mesh, d_in, d_out, k, jnp.float64),
                                                x[:100], y[:100], 0, mesh=mesh),
            lambda: ridge.accumulate_on_devices(one, x[:128], y[:128], 0, mesh=mesh)):
    try:
        bad()
    except ValueError as e:
        errors.append(str(e))

m1, _ = ridge.solve(one, [0.1, 10.0])
m8, _ = ridge.solve(sharded, [0.1, 10.0])
print(json.dumps({"sharded": err(sharded, one), "shard_map": err(psummed, one),
                  "on_devices": err(on_devices, one), "on_devices_scalar_fold": err(scalar_dev, scalar_one),
                  "errors": errors,
                  "W": float(np.max(np.abs(np.asarray(m8.W) - np.asarray(m1.W)))),
                  "count": float(one.count.sum()), "expected_count": int(mask.sum())}))
"""


def test_eight_devices_equal_one_device():
    out = run_with_devices(MULTI_DEVICE_CODE, n_devices=8, timeout=120)
    assert out["count"] == out["expected_count"]
    assert out["sharded"] < 1e-12
    assert out["shard_map"] < 1e-12
    assert out["on_devices"] < 1e-12
    assert out["on_devices_scalar_fold"] < 1e-12
    assert "100 rows does not split evenly over 8 devices" in out["errors"][0]
    assert "3 device slots but the mesh splits the batch 8 ways" in out["errors"][1]
    assert out["W"] < 1e-10


# ----------------------------------------------------------------------------------------------
# bad input


def test_nonfinite_batches_skip_warn_or_raise(x64):
    x, y = make_problem("plain", 2 * BATCH, seed=9)
    clean = ridge.init_stats(D_IN, D_OUT, 1, jnp.float64)
    clean = ridge.accumulate(clean, x[:BATCH], y[:BATCH])
    bad_x = x[BATCH:].copy()
    bad_x[3, 1] = np.nan
    bad_x[7, 2] = np.inf
    bad_y = y[BATCH:].copy()
    bad_y[5, 0] = -np.inf
    stats = ridge.init_stats(D_IN, D_OUT, 1, jnp.float64)
    stats = ridge.accumulate(stats, x[:BATCH], y[:BATCH])
    with warnings.catch_warnings():  # by default no per-batch warning (it would sync every batch)...
        warnings.simplefilter("error")
        quiet = ridge.accumulate(ridge.init_stats(D_IN, D_OUT, 1, jnp.float64), bad_x, bad_y)
        jax.effects_barrier()
    assert float(quiet.skipped_batches) == 1
    with pytest.warns(RuntimeWarning, match=r"skipped a batch with 3 non-finite .* 64 valid rows"):
        stats = ridge.accumulate(stats, bad_x, bad_y, warn=True)
        jax.effects_barrier()  # the warning comes from a jax.debug.callback
    assert float(stats.skipped_batches) == 1 and float(stats.skipped_rows) == BATCH
    np.testing.assert_array_equal(np.asarray(stats.sxx), np.asarray(clean.sxx))
    with pytest.warns(RuntimeWarning, match=r"1 batch\(es\) \(64 valid rows\) were skipped"):
        ridge.solve(stats, 1.0)

    # NaN only in rows masked out is not an error
    mask = np.ones(BATCH, bool)
    mask[[3, 5, 7]] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = ridge.accumulate(ridge.init_stats(D_IN, D_OUT, 1, jnp.float64), bad_x, bad_y, weights=mask)
        jax.effects_barrier()
    assert float(masked.count[0]) == BATCH - 3 and float(masked.skipped_batches) == 0

    with pytest.raises(ValueError, match="3 non-finite"):
        ridge.accumulate(ridge.init_stats(D_IN, D_OUT, 1, jnp.float64), bad_x, bad_y, on_nonfinite="raise")
    with pytest.raises(ValueError, match="needs concrete arrays"):
        jax.jit(lambda s, a, b: ridge.update(s, a, b, on_nonfinite="raise"))(clean, bad_x, bad_y)


def test_bad_shapes_and_empty_stats(x64):
    stats = ridge.init_stats(D_IN, D_OUT, K, jnp.float64)
    x, y = make_problem("plain", BATCH)
    with pytest.raises(ValueError, match=r"x\(64, 41\) y\(64, 4\) but stats are for d_in=40, d_out=4"):
        ridge.update(stats, np.zeros((BATCH, D_IN + 1)), y, fold=0)
    with pytest.raises(ValueError, match=r"x has 64 rows but y has 63"):
        ridge.update(stats, x, y[:-1], fold=0)
    with pytest.raises(ValueError, match="needs `fold`"):
        ridge.update(stats, x, y)
    with pytest.raises(ValueError, match="empty"):
        ridge.solve(stats, [1.0, 2.0])
    one_fold = update_jit(stats, x, y, fold=1)
    with pytest.raises(ValueError, match=r"fold\(s\) \[0, 2, 3, 4\] have no rows"):
        ridge.solve(one_fold, [1.0, 2.0])
    with pytest.raises(ValueError, match="needs K-fold statistics"):
        ridge.solve(update_jit(ridge.init_stats(D_IN, D_OUT, 1, jnp.float64), x, y), [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        ridge.solve(one_fold, [-1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        ridge.merge(stats, ridge.init_stats(D_IN, D_OUT + 1, K, jnp.float64))


# ----------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip_and_metadata_mismatch(x64, tmp_path):
    x, y = make_problem("plain", 2 * BATCH, seed=10)
    groups = np.arange(len(x)) % 2
    stats = accumulate_all(x, y, groups, n_folds=2)
    ridge_map, fit = ridge.solve(stats, [0.1, 1.0, 10.0], per_target=True)
    metadata = {"source_model": "Qwen2.5-Coder-0.5B-Instruct", "target_model": "gemma-3-270m", "source_layer": 20,
                "target_layer": 12, "corpus_sha256": "ab12", "pairing": {"mode": "char_end", "skip_bos": True},
                **fit.to_metadata(per_target=True)}
    path = ridge.save_map(tmp_path / "map", ridge_map, metadata)
    loaded, meta = ridge.load_map(path, expect={"source_model": "Qwen2.5-Coder-0.5B-Instruct", "source_layer": 20})
    for name in ridge.RidgeMap._fields:
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)), np.asarray(getattr(ridge_map, name)))
    assert meta["pairing"] == {"mode": "char_end", "skip_bos": True}
    assert meta["lambda"] == fit.lam and np.allclose(meta["cv_sse"], fit.cv_sse)
    assert json.loads(json.dumps(meta)) == meta

    with pytest.raises(ridge.MetadataMismatchError, match=r"'source_layer' is 20 but 21 was expected"):
        ridge.load_map(path, expect={"source_layer": 21})
    with pytest.raises(ridge.MetadataMismatchError, match=r"'target_model' is 'gemma-3-270m' but 'gemma-2b'"):
        ridge.load_map(path, expect={"target_model": "gemma-2b"})
    with pytest.raises(ridge.MetadataMismatchError, match="no field 'corpus'"):
        ridge.load_map(path, expect={"corpus": "x"})
    with pytest.raises(FileNotFoundError):
        ridge.load_map(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# benchmark


def test_benchmark_smoke(tmp_path):
    from crossmap.benchmarks import ridge as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "ridge.json"
    args = parser.parse_args(["--d-in", "64", "--d-out", "32", "--pairs", "20000", "--chunk", "2048", "--pool", "2",
                              "--lambdas", "6", "--precisions", "tf32", "--solve-dtypes", "float64",
                              "--per-row-batches", "1", "--peak-reps", "1", "--cosine-pass", "0", "--torch-device", "cpu",
                              "--torch-dtypes", "float64", "--sklearn-n", "200,400", "--sklearn-d-in", "8",
                              "--out", str(out)])
    result = bench.run(args)
    assert json.loads(out.read_text())["config"]["pairs"] == 20480
    assert result["accumulate"]["tf32"]["tflops"] > 0
    assert result["solve"]["float64"]["seconds"] > 0
    torch_run = result["torch"]["runs"][0]
    assert torch_run["same_lambda_as_jax"] and torch_run["rel_diff_W_vs_jax"] < 1e-5
    assert torch_run["rel_diff_cv_sse_vs_jax"] < 1e-6
    assert len(result["sklearn"]["points"]) == 2 and result["sklearn"]["predicted_full_seconds"] > 0
