"""Statistics kept per device: each accumulates its own rows, one exact psum at the end."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import sharding as shd
from .stats import _check_batch, init_stats, psum_stats, update
from .types import RidgeStats

Array = jax.Array


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


