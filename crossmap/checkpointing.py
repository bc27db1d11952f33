"""Orbax checkpoints of a training state (any pytree of arrays) with a JSON record beside it: the one
way every trainer in crossmap (SAEs, NLAs) saves, finds and restores its steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # imported here: orbax is slow to import and only trainers need it

    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=opts)


def save_state(manager, step: int, state: Any, meta: dict) -> None:
    """Save `state` and the JSON-able `meta` as step `step` (asynchronously; see `manager.wait_until_finished`)."""
    import orbax.checkpoint as ocp

    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore_state(manager, step: int, like: Any) -> tuple[Any, dict]:
    """(state, meta) of step `step`, laid out (shapes, dtypes, shardings) like the pytree `like`."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
    return out.state, out.meta
