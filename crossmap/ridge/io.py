"""A fitted map on disk: orbax checkpoint plus JSON metadata, checked against what the caller expects."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..jsonio import to_jsonable
from .types import FORMAT_VERSION, MetadataMismatchError, RidgeMap

Array = jax.Array


def save_map(path: str | os.PathLike, ridge_map: RidgeMap, metadata: Mapping[str, Any] | None = None, *,
             overwrite: bool = False) -> str:
    """Save a RidgeMap with a free-form JSON metadata dict (model ids, layers, lambda, CV table, corpus
    hash, pairing settings, ...) as an orbax checkpoint directory.  Returns the absolute path."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = to_jsonable(dict(metadata or {}))
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
        if to_jsonable(want) != have:
            raise MetadataMismatchError(f"ridge map at {path}: metadata field {key!r} is {have!r} "
                                        f"but {want!r} was expected")

