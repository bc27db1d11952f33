"""The one place where logical axis names meet the device mesh.

Every parameter and activation in crossmap is annotated with *logical* axis names
("batch", "embed", "heads", "mlp", ...).  `LOGICAL_RULES` maps each to a mesh axis
("data", "fsdp", "tensor") or to None (replicated).  Nothing else in the package names
mesh axes directly, so changing the parallelism layout is a one-line edit here.  Library
callers can pass their own `rules` dict to every function that takes one; the experiment config
has no such field (its `mesh` sets only the axis sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations: batch split over data and fsdp replicas
    "length": None,
    "embed": "fsdp",  # parameters: model width sharded fully (FSDP / ZeRO-3 style)
    "act_embed": None,  # activations keep the width whole
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "features": None,  # SAE features / ridge outputs
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ("data", "fsdp", "tensor") mesh.

    `shape` gives the size of each axis; at most one may be -1 (takes what is left), and 0 means
    "the devices of one host" (jax.local_device_count()), so `{"data": -1, "tensor": 0}` keeps
    tensor parallelism inside each host's fast interconnect and data parallelism across hosts
    on any node or slice size.  With no shape, every device goes on the data axis.  Sizes that
    do not multiply to the device count are an error naming both.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis name(s) {sorted(unknown)}; known axes are {MESH_AXES}")
    local = min(jax.local_device_count(), n)
    sizes = [local if int(shape.get(a, 1)) == 0 else int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if n % rest:
            raise ValueError(f"mesh: {n} devices cannot be split by fixed axes {shape}")
        sizes[sizes.index(-1)] = n // rest
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: axis sizes {dict(zip(MESH_AXES, sizes, strict=False))} multiply to "
                         f"{math.prod(sizes)}, but there are {n} devices")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical: Sequence[str | None], rules: dict | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names.

    A mesh axis is used at most once per array (the first logical axis that claims it wins),
    and axes of size 1 in `mesh` are dropped so specs stay readable.
    """
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in logical:
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical: Sequence[str | None], rules: dict | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, rules, mesh))


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide the dimension they shard (e.g. 2 KV heads on 4-way tensor)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = []
        size = 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def sharding_for(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int],
                 rules: dict | None = None) -> NamedSharding:
    """NamedSharding for an array of `shape` whose axes carry `logical` names."""
    spec = logical_to_spec(logical, rules, mesh)
    return NamedSharding(mesh, fit_spec_to_shape(spec, shape, mesh))


def batch_axes(mesh: Mesh | None, rules: dict | None = None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch, by the logical rules."""
    if mesh is None:
        return ()
    entry = logical_to_spec(("batch",), rules, mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def batch_shards(mesh: Mesh | None, rules: dict | None = None) -> int:
    """How many ways the batch axis is split on `mesh` (1 without a mesh)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules)) if mesh is not None else 1


def shard_batch(x, mesh: Mesh, rules: dict | None = None):
    """Place a host array (batch first) on the mesh, split over the batch axes.

    Every process passes the same global batch; each materialises only the shards its own devices
    hold (`make_array_from_callback`), so this works unchanged on one host and on a multi-host
    slice.  A device array already laid out that way passes through.
    """
    logical = ("batch",) + (None,) * (np.ndim(x) - 1)
    sharding = sharding_for(mesh, logical, np.shape(x), rules)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on every process."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize_distributed() -> None:
    """Start jax.distributed for a multi-process launch (one process per host).

    On TPU pod slices and under SLURM, jax finds the coordinator itself; elsewhere set
    JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/ does).
    """
    import os

    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
                  "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                  "process_id": int(os.environ["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**kwargs)


DEFAULT_COMPILE_CACHE = "~/.cache/crossmap/xla"


def enable_compile_cache(directory: str | None = None) -> str | None:
    """Keep compiled XLA programs on disk, so a resumed or repeated run skips recompiling.

    At the paper's shapes each bucket of the 27B forward and each verbalizer program takes
    20-50 s to compile (the blocks are unrolled); a stage resumed after a kill, or the same
    config run again, loads them instead.  `directory` None reads $CROSSMAP_COMPILE_CACHE, then
    falls back to ~/.cache/crossmap/xla; "" or "off" leaves the cache off.  A cache directory
    already chosen for jax (JAX_COMPILATION_CACHE_DIR) is left as it is.  Returns the directory
    in use, or None.
    """
    import os

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if directory is None:
        directory = os.environ.get("CROSSMAP_COMPILE_CACHE", DEFAULT_COMPILE_CACHE)
    if directory in ("", "off"):
        return None
    path = os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def constrain(x, logical: Sequence[str | None], mesh: Mesh | None, rules: dict | None = None):
    """with_sharding_constraint by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(mesh, logical, x.shape, rules))
