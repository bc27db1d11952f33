"""`crossmap bench ridge`: streaming accumulation + K-fold ridge solve, against sklearn and PyTorch.

What it measures (all on random activations generated on the device, so no model is needed):

1. "Measured peak": a plain matmul with the accumulation's shape and FLOPs, X^T [X | Y] over a chunk of
   rows, in bf16 (f32 accumulate), tf32 (f32 inputs, lax.Precision.HIGH) and full f32.
2. Accumulation: `crossmap.ridge.accumulate` over `--pairs` rows in chunks of `--chunk` (bf16 inputs cast
   to f32, fold id per chunk: the fast path), for each precision in `--precisions` (the first one's
   statistics are solved); TFLOP/s counts
   2 * rows * d_in * (d_in + d_out) and is compared with the plain matmul of the same precision.  Chunks
   come from a pool of `--pool` pre-generated chunks so generation stays out of the timing.  The
   accuracy of each precision is reported as the relative Frobenius error of Sxx and Sxy against the
   "highest" run on the same data.  A few batches of the per-row fold path are timed too.
3. Solve: `crossmap.ridge.solve` with `--folds` folds and `--lambdas` lambdas (a log grid in units of
   the mean eigenvalue of Sxx, i.e. trace(Sxx) / d_in), compile time and warm time, per compute dtype.
4. PyTorch (if importable; `--torch-device auto` uses CUDA when present, else skips): the
   straightforward solve on the same statistics, torch.linalg.solve for each (fold, lambda) plus the same
   exact held-out error, and the final refit; checks the chosen lambda and W against ours.
5. scikit-learn RidgeCV on the CPU with the same folds (given as explicit splits) and lambda grid on
   small problems (`--sklearn-n` x `--sklearn-d-in`, d_out scaled with the full size's ratio), then a
   least-squares fit t = a * F + c of time against F, the FLOPs of sklearn's cholesky path for all
   K * L fits plus the refit, extrapolated to the full size.  The JSON says so under sklearn.method.

Writes everything to `--out` (JSON) and returns the same dict.  Tiny sizes run on CPU in seconds:
    python -m crossmap.benchmarks.ridge --d-in 64 --d-out 32 --pairs 20000 --chunk 2048 --out /tmp/r.json
On a GPU set XLA_PYTHON_CLIENT_PREALLOCATE=false so PyTorch finds memory next to JAX.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crossmap import ridge
from crossmap.benchmarks.common import device_info, median_time, timed_loop, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-in", type=int, default=3584, help="source width (Qwen2.5-7B: 3584)")
    parser.add_argument("--d-out", type=int, default=5376, help="target width (Gemma-3-27B: 5376)")
    parser.add_argument("--pairs", type=int, default=1 << 20, help="pairs accumulated per precision")
    parser.add_argument("--chunk", type=int, default=8192, help="rows per accumulate call")
    parser.add_argument("--pool", type=int, default=16, help="distinct pre-generated chunks cycled through")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--lambdas", type=int, default=16, help="size of the lambda grid")
    parser.add_argument("--lambda-range", type=float, nargs=2, default=(-7.0, 1.0),
                        help="log10 range of the grid in units of trace(Sxx)/d_in")
    parser.add_argument("--precisions", default="tf32,bf16,highest",
                        help="accumulation precisions to time (comma list; the first is the one solved)")
    parser.add_argument("--per-row-batches", type=int, default=8, help="batches timed on the per-row fold path")
    parser.add_argument("--solve-dtypes", default="float32,float64", help="compute dtypes of the solve")
    parser.add_argument("--cosine-pass", type=int, default=1,
                        help="1: also time the exact held-out mean-cosine second pass over all pairs")
    parser.add_argument("--peak-reps", type=int, default=20)
    parser.add_argument("--torch-device", default="auto", help="auto | cuda | cpu | none")
    parser.add_argument("--torch-dtypes", default="float32,float64")
    parser.add_argument("--sklearn-n", default="4000,16000", help="rows of the sklearn timing problems")
    parser.add_argument("--sklearn-d-in", default="256,512", help="d_in of the sklearn timing problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ridge_bench.json", help="JSON output path")


# ----------------------------------------------------------------------------------------------
# helpers


def _rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a - b))


@partial(jax.jit, static_argnames=("rows", "d_in", "d_out"))
def _make_chunk(key, w_true, x_scale, x_mean, rows: int, d_in: int, d_out: int):
    """Random activation pairs: features of unequal scale (condition number ~1e4) and a few large
    means, y = x W + noise; bf16 like collected activations."""
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (rows, d_in), jnp.float32) * x_scale + x_mean
    y = jnp.matmul(x - x_mean, w_true, precision=jax.lax.Precision.HIGHEST)
    y = y + jax.random.normal(kn, (rows, d_out), jnp.float32)
    return x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# pieces


def _peak(chunk: int, d_in: int, d_out: int, reps: int, key) -> dict[str, Any]:
    """Plain X^T [X | Y] matmul rates (the accumulation's shape and FLOPs)."""
    ka, kb = jax.random.split(key)
    a16 = jax.random.normal(ka, (chunk, d_in), jnp.float32).astype(jnp.bfloat16)
    b16 = jax.random.normal(kb, (chunk, d_in + d_out), jnp.float32).astype(jnp.bfloat16)
    a32, b32 = a16.astype(jnp.float32), b16.astype(jnp.float32)
    flops = 2.0 * chunk * d_in * (d_in + d_out)
    variants = {
        "bf16": (jax.jit(lambda a, b: jnp.einsum("bi,bj->ij", a, b, preferred_element_type=jnp.float32)), a16, b16),
        "tf32": (jax.jit(lambda a, b: jnp.einsum("bi,bj->ij", a, b, precision=jax.lax.Precision.HIGH)), a32, b32),
        "highest": (jax.jit(lambda a, b: jnp.einsum("bi,bj->ij", a, b, precision=jax.lax.Precision.HIGHEST)),
                    a32, b32),
    }
    out = {"shape": f"[{chunk},{d_in}]^T x [{chunk},{d_in + d_out}]", "flops": flops}
    for name, (fn, a, b) in variants.items():
        t = median_time(lambda fn=fn, a=a, b=b: fn(a, b), reps)
        out[name] = {"seconds": t, "tflops": flops / t / 1e12}
    return out


def _accumulate(pool, n_batches: int, folds: int, d_in: int, d_out: int, precision: str, fold_ids=None):
    """Time n_batches accumulate calls cycling through the pool; returns (stats, seconds).

    fold_ids: None gives each batch one fold (the fast path); a list of per-row id arrays, one per
    pool entry, times the per-row path.
    """
    def fold_of(i):
        j = i % len(pool)
        return j % folds if fold_ids is None else fold_ids[j]

    def step(stats, i):
        x, y = pool[i % len(pool)]
        return ridge.accumulate(stats, x, y, fold=fold_of(i), precision=precision)

    return timed_loop(lambda: ridge.init_stats(d_in, d_out, folds), step, lambda stats: stats, n_batches)


def _lambda_grid(stats: ridge.RidgeStats, n: int, lo: float, hi: float) -> np.ndarray:
    total = ridge.combine_folds(stats)
    mean_eig = float(jnp.trace(total.sxx[0])) / stats.d_in
    return np.logspace(lo, hi, n) * mean_eig


def _torch_solve(stats: ridge.RidgeStats, lambdas: np.ndarray, device: str, dtype_name: str) -> dict[str, Any]:
    """Straightforward PyTorch K-fold ridge on the same statistics: linalg.solve per (fold, lambda)."""
    import torch

    dt = getattr(torch, dtype_name)
    host = {k: np.asarray(v, np.float64) for k, v in zip(ridge.RidgeStats._fields, jax.device_get(stats),
                                                          strict=True)}
    t = {k: torch.tensor(v, dtype=dt, device=device) for k, v in host.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    k_folds, d_in = t["count"].shape[0], t["mean_x"].shape[1]
    eye = torch.eye(d_in, dtype=dt, device=device)

    def merge_except(skip: int | None):
        idx = [j for j in range(k_folds) if j != skip]
        n = t["count"][idx].sum()
        mx = (t["count"][idx, None] * t["mean_x"][idx]).sum(0) / n
        my = (t["count"][idx, None] * t["mean_y"][idx]).sum(0) / n
        dx = (t["mean_x"][idx] - mx) * t["count"][idx, None].sqrt()
        dy = (t["mean_y"][idx] - my) * t["count"][idx, None].sqrt()
        return (n, mx, my, t["sxx"][idx].sum(0) + dx.T @ dx, t["sxy"][idx].sum(0) + dx.T @ dy)

    def run():
        sse = torch.zeros(len(lambdas), k_folds, dtype=dt, device=device)
        for k in range(k_folds):
            _, mx, my, sxx, sxy = merge_except(k)
            dx, dy = t["mean_x"][k] - mx, t["mean_y"][k] - my
            for li, lam in enumerate(lambdas):
                w = torch.linalg.solve(sxx + float(lam) * eye, sxy)
                quad = (w * (t["sxx"][k] @ w)).sum(0)
                lin = (w * t["sxy"][k]).sum(0)
                resid_mean = dy - dx @ w
                sse[li, k] = (t["syy"][k] - 2 * lin + quad + t["count"][k] * resid_mean**2).sum()
        best = int(torch.argmin(sse.sum(1)))
        _, mx, my, sxx, sxy = merge_except(None)
        w = torch.linalg.solve(sxx + float(lambdas[best]) * eye, sxy)
        sync()
        return sse, best, w

    t0 = time.perf_counter()
    run()  # warm-up (cuSOLVER handles, allocator)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    sse, best, w = run()
    secs = time.perf_counter() - t0
    return {"device": device, "dtype": dtype_name, "seconds": secs, "first_call_seconds": first,
            "lambda": float(lambdas[best]), "cv_sse": sse.double().cpu().numpy(), "W": w.double().cpu().numpy()}


def _sklearn_flops(n: int, d_in: int, d_out: int, folds: int, n_lambdas: int) -> float:
    """FLOPs of sklearn's cholesky path for RidgeCV(cv=K splits, L alphas): K*L fits + test scoring + refit."""
    n_te = n / folds
    n_tr = n - n_te

    def fit(rows):
        return 2 * rows * d_in * d_in + 2 * rows * d_in * d_out + d_in**3 / 3 + 2 * d_in * d_in * d_out

    return folds * n_lambdas * (fit(n_tr) + 2 * n_te * d_in * d_out) + fit(n)


def _sklearn(args, lambdas_rel: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    from sklearn.linear_model import RidgeCV

    points = []
    ratio = args.d_out / args.d_in
    for d_in in (int(v) for v in args.sklearn_d_in.split(",")):
        d_out = max(1, round(d_in * ratio))
        scale = np.logspace(0, -2, d_in)
        w_true = rng.normal(size=(d_in, d_out)) / math.sqrt(np.sum(scale**2))
        for n in (int(v) for v in args.sklearn_n.split(",")):
            x = rng.normal(size=(n, d_in)) * scale
            y = x @ w_true + rng.normal(size=(n, d_out))
            groups = rng.integers(0, args.folds, n)
            splits = [(np.flatnonzero(groups != k), np.flatnonzero(groups == k)) for k in range(args.folds)]
            mean_eig = float(np.trace(np.cov(x, rowvar=False, bias=True))) * n / d_in
            t0 = time.perf_counter()
            RidgeCV(alphas=lambdas_rel * mean_eig, cv=splits).fit(x, y)
            secs = time.perf_counter() - t0
            points.append({"n": n, "d_in": d_in, "d_out": d_out, "seconds": secs,
                           "flops": _sklearn_flops(n, d_in, d_out, args.folds, len(lambdas_rel))})
    f = np.array([p["flops"] for p in points])
    s = np.array([p["seconds"] for p in points])
    from scipy.optimize import nnls  # scipy comes with sklearn

    (a, c), _ = nnls(np.stack([f, np.ones_like(f)], 1), s)  # a, c >= 0: no negative extrapolation
    full_flops = _sklearn_flops(args.pairs, args.d_in, args.d_out, args.folds, len(lambdas_rel))
    predicted = float(a * full_flops + c)
    return {
        "method": ("RidgeCV(alphas=grid, cv=explicit K group splits) timed on CPU at the sizes in 'points'; "
                   "time fitted as t = a * F + c by non-negative least squares, F = FLOPs of sklearn's cholesky path "
                   "(K*L fits of 2 n_tr d_in^2 + 2 n_tr d_in d_out + d_in^3/3 + 2 d_in^2 d_out, test "
                   "predictions 2 n_te d_in d_out, one refit); extrapolated to the full n, d_in, d_out. "
                   "sklearn holds X and Y in float64 memory: full-size memory_gb below."),
        "points": points, "a_seconds_per_flop": float(a), "c_seconds": float(c),
        "effective_gflops": float(1 / a / 1e9) if a > 0 else None,
        "full_size_flops": full_flops, "predicted_full_seconds": predicted,
        "full_size_memory_gb": args.pairs * (args.d_in + args.d_out) * 8 / 1e9,
        "threads": os.cpu_count(),
    }


# ----------------------------------------------------------------------------------------------
# run


def run(args: argparse.Namespace) -> dict[str, Any]:
    d_in, d_out, chunk, folds = args.d_in, args.d_out, args.chunk, args.folds
    n_batches = max(1, math.ceil(args.pairs / chunk))
    if n_batches < folds:
        raise ValueError(f"--pairs {args.pairs} in --chunk {chunk} rows gives {n_batches} batch(es), fewer than "
                         f"--folds {folds}: every fold needs a batch (raise --pairs or lower --chunk)")
    n_pool = max(args.pool, folds)  # every fold needs at least one chunk of its own
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    key = jax.random.PRNGKey(args.seed)
    k_peak, k_w, k_pool, k_rows = jax.random.split(key, 4)
    result: dict[str, Any] = {
        "benchmark": "ridge", "device": device_info(),
        "config": {"d_in": d_in, "d_out": d_out, "pairs": n_batches * chunk, "chunk": chunk, "batches": n_batches,
                   "pool_chunks": n_pool, "fold_of_pool_chunk": "j % folds", "folds": folds, "lambdas": args.lambdas,
                   "lambda_range_log10_rel": list(args.lambda_range), "precisions": precisions,
                   "on_nonfinite": "skip (default)", "seed": args.seed},
    }

    print(f"[ridge bench] device {result['device']['device_kind']} ({result['device']['backend']})", flush=True)
    result["peak"] = _peak(chunk, d_in, d_out, args.peak_reps, k_peak)
    print("[ridge bench] peak TFLOP/s: " + ", ".join(f"{p} {result['peak'][p]['tflops']:.1f}"
                                                    for p in ("bf16", "tf32", "highest")), flush=True)

    x_scale = jnp.logspace(0, -2, d_in, dtype=jnp.float32)
    # signal variance ~1 per target against noise 1: held-out R^2 near 0.5
    w_true = jax.random.normal(k_w, (d_in, d_out), jnp.float32) / jnp.sqrt(jnp.sum(x_scale**2))
    x_mean = jnp.zeros((d_in,), jnp.float32).at[: min(4, d_in)].set(100.0)  # a few "massive activations"
    pool = [_make_chunk(k, w_true, x_scale, x_mean, chunk, d_in, d_out)
            for k in jax.random.split(k_pool, n_pool)]
    jax.block_until_ready(pool)

    flops_per_batch = 2.0 * chunk * d_in * (d_in + d_out)
    acc: dict[str, Any] = {}
    stats_by_precision: dict[str, ridge.RidgeStats] = {}
    for prec in precisions:
        stats, secs = _accumulate(pool, n_batches, folds, d_in, d_out, prec)
        tflops = flops_per_batch * n_batches / secs / 1e12
        peak_name = prec if prec in ("bf16", "tf32", "highest") else "tf32"
        acc[prec] = {"seconds": secs, "pairs_per_second": n_batches * chunk / secs, "tflops": tflops,
                     "fraction_of_measured_peak": tflops / result["peak"][peak_name]["tflops"],
                     "peak_compared": peak_name}
        stats_by_precision[prec] = stats
        print(f"[ridge bench] accumulate {prec}: {secs:.3f} s, {tflops:.1f} TFLOP/s "
              f"({acc[prec]['fraction_of_measured_peak']:.0%} of {peak_name} matmul)", flush=True)
    if "highest" in stats_by_precision:
        ref = stats_by_precision["highest"]
        for prec, st in stats_by_precision.items():
            acc[prec]["rel_err_sxx_vs_highest"] = _rel_err(st.sxx, ref.sxx)
            acc[prec]["rel_err_sxy_vs_highest"] = _rel_err(st.sxy, ref.sxy)
    main_prec = precisions[0]
    stats = stats_by_precision[main_prec]
    for prec in list(stats_by_precision):
        if prec != main_prec:
            del stats_by_precision[prec]
    if args.per_row_batches > 0:
        chunk = pool[0][0].shape[0]
        fold_ids = [jax.random.randint(k, (chunk,), 0, folds) for k in jax.random.split(k_rows, len(pool))]
        _, secs = _accumulate(pool, args.per_row_batches, folds, d_in, d_out, main_prec, fold_ids)
        tflops = flops_per_batch * args.per_row_batches / secs / 1e12
        acc["per_row_folds"] = {"precision": main_prec, "batches": args.per_row_batches, "seconds": secs,
                                "useful_tflops": tflops,
                                "slowdown_vs_fast_path": (secs / args.per_row_batches)
                                / (acc[main_prec]["seconds"] / n_batches),
                                "note": "per-row fold ids cost K masked products per batch"}
    result["accumulate"] = acc

    lambdas = _lambda_grid(stats, args.lambdas, *args.lambda_range)
    solves: dict[str, Any] = {}
    maps = {}
    for dt in (d.strip() for d in args.solve_dtypes.split(",") if d.strip()):
        t0 = time.perf_counter()
        ridge.solve(stats, lambdas, compute_dtype=dt)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ridge_map, fit = ridge.solve(stats, lambdas, compute_dtype=dt)
        secs = time.perf_counter() - t0
        maps[dt] = (ridge_map, fit)
        solves[dt] = {"seconds": secs, "first_call_seconds": first, "lambda": fit.lam,
                      "lambda_index": int(np.argmin(np.abs(lambdas - fit.lam))), "heldout_r2": fit.r2,
                      "heldout_pooled_cosine": fit.pooled_cosine, "cv_r2": fit.cv_r2.tolist()}
        print(f"[ridge bench] solve {dt}: {secs:.3f} s warm, {first:.3f} s first; lambda {fit.lam:.4g}, "
              f"held-out R2 {fit.r2:.4f}", flush=True)
    result["solve"] = solves
    result["lambdas"] = lambdas.tolist()
    best_dt = "float64" if "float64" in maps else next(iter(maps))
    if len(maps) > 1:
        result["solve"]["rel_diff_W_float32_vs_float64"] = _rel_err(maps["float32"][0].W, maps["float64"][0].W) \
            if {"float32", "float64"} <= set(maps) else None
    result["fit_total_seconds"] = acc[main_prec]["seconds"] + solves[best_dt]["seconds"]
    if args.cosine_pass:
        result["heldout_cosine_pass"] = _cosine_pass(stats, maps[best_dt][1].lam, pool, n_batches, folds, best_dt)

    result["torch"] = _torch_part(args, stats, lambdas, maps[best_dt])
    sk_lams = np.logspace(args.lambda_range[0], args.lambda_range[1], args.lambdas)
    try:
        result["sklearn"] = _sklearn(args, sk_lams, np.random.default_rng(args.seed))
    except ImportError as e:
        result["sklearn"] = {"skipped": f"scikit-learn not importable: {e}"}

    ratios = {}
    if "predicted_full_seconds" in result["sklearn"]:
        ratios["sklearn_predicted_over_jax_fit_total"] = (result["sklearn"]["predicted_full_seconds"]
                                                          / result["fit_total_seconds"])
    for entry in result["torch"].get("runs", []):
        if entry["dtype"] in solves:
            ratios[f"torch_{entry['dtype']}_over_jax_solve_{entry['dtype']}"] = (
                entry["seconds"] / solves[entry["dtype"]]["seconds"])
    result["ratios"] = ratios
    write_json(result, args.out, echo=False)
    print(f"[ridge bench] wrote {args.out}: " + json.dumps(ratios), flush=True)
    return result


def _cosine_pass(stats, lam: float, pool, n_batches: int, folds: int, dtype_name: str) -> dict[str, Any]:
    """Exact held-out mean cosine: a second pass over the same pairs through the K fold maps."""
    batches = [(*pool[i % len(pool)], (i % len(pool)) % folds) for i in range(n_batches)]
    ridge.heldout_cosine(stats, lam, batches[: len(pool)], compute_dtype=dtype_name, progress=False)  # warm-up
    t0 = time.perf_counter()
    out = ridge.heldout_cosine(stats, lam, batches, compute_dtype=dtype_name, progress=False)
    secs = time.perf_counter() - t0
    print(f"[ridge bench] held-out mean cosine pass: {secs:.3f} s, mean cosine {out['mean_cosine']:.4f}", flush=True)
    return {"seconds": secs, "mean_cosine": out["mean_cosine"], "rows": out["count"],
            "note": "fold_maps (K eigendecompositions) + one full-precision prediction per row"}


def _torch_part(args, stats, lambdas, ours) -> dict[str, Any]:
    if args.torch_device == "none":
        return {"skipped": "--torch-device none"}
    try:
        import torch
    except ImportError as e:
        return {"skipped": f"torch not importable: {e}"}
    device = args.torch_device
    if device == "auto":
        if not torch.cuda.is_available():
            return {"skipped": "torch has no CUDA device (pass --torch-device cpu to run it on the CPU)"}
        device = "cuda"
    our_map, our_fit = ours
    runs = []
    for dt in (d.strip() for d in args.torch_dtypes.split(",") if d.strip()):
        r = _torch_solve(stats, lambdas, device, dt)
        runs.append({"dtype": dt, "device": device, "seconds": r["seconds"],
                     "first_call_seconds": r["first_call_seconds"], "lambda": r["lambda"],
                     "same_lambda_as_jax": bool(np.isclose(r["lambda"], our_fit.lam)),
                     "rel_diff_cv_sse_vs_jax": _rel_err(r["cv_sse"], our_fit.cv_sse),
                     "rel_diff_W_vs_jax": _rel_err(r["W"], our_map.W) if np.isclose(r["lambda"], our_fit.lam)
                     else None})
        print(f"[ridge bench] torch {dt} on {device}: {r['seconds']:.3f} s, lambda {r['lambda']:.4g}", flush=True)
    return {"method": "torch.linalg.solve(Sxx_train + lam I, Sxy_train) per (fold, lambda), same exact held-out "
                      "SSE from fold stats, argmin, refit; train stats merged from the other folds",
            "runs": runs}
