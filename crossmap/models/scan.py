"""Scanned layers: a model's blocks run by one loop (`lax.fori_loop`) over groups of identical blocks.

An unrolled program holds one copy of every block, so what XLA compiles grows with the depth; a scanned
one holds one group's and loops over the groups.  A group is one period of the layer pattern: a single
block for Qwen and Llama, Gemma 3's five sliding-window blocks and one global block.  Blocks after the
last whole group (Gemma-3-27B's 62 = 10 x 6 + 2) stay unrolled.

`scanned(model)` returns a new `Transformer` whose first `scan_groups * scan_period` blocks are stored as
`scan_period` stacked Blocks (each parameter with a leading group axis, logical name "layers"), its KV
cache stacked the same way (`Transformer.init_cache`).  Embeddings, final norm and head are the
model's own arrays; the stacks are new arrays, so until the unrolled model is dropped both are held.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Transformer

# models, verbalizers and reconstructors.<side>.layers: how the blocks run
LAYER_LAYOUTS = ("unrolled", "scanned")

# On GPU a scanned decode step reads each block's weights as a slice of its stack.  Without these XLA flags
# the slices are copied before every matmul (2-3x slower steps); with them cuBLAS reads them in place, and
# q/k/v are not merged into one product whose concatenated kernel would be rebuilt every step (BENCHMARKS.md,
# "Scanned layers").  XLA reads its flags once, when the backend starts: set them in XLA_FLAGS beforehand.
SCANNED_GPU_XLA_FLAGS = ("--xla_gpu_enable_dynamic_slice_fusion=true", "--xla_gpu_enable_triton_gemm=false",
                         "--xla_gpu_dot_merger_threshold_mb=0")


def missing_gpu_xla_flags(xla_flags: str | None = None) -> list[str]:
    """SCANNED_GPU_XLA_FLAGS not in `xla_flags` (default: the XLA_FLAGS environment variable)."""
    given = set((os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags).split())
    return [flag for flag in SCANNED_GPU_XLA_FLAGS if flag not in given]


def layer_period(layer_types: tuple[str, ...]) -> int:
    """The shortest period p of the layer pattern: layer_types[i] == layer_types[i % p] for every i."""
    n = len(layer_types)
    return next(p for p in range(1, n + 1) if all(layer_types[i] == layer_types[i % p] for i in range(n)))


@partial(jax.jit, donate_argnums=0)
def _write(stack: jax.Array, value: jax.Array, index: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, value, index, 0)


def _stack(values: list[jax.Array], consume: bool) -> jax.Array:
    """The values stacked on a new leading axis, laid out as they are (the group axis whole on every device).

    consume: each value is deleted once written into a preallocated stack, so stacking holds one block's
    array beyond the model instead of a second copy of every block."""
    first = values[0]
    placed = getattr(first, "sharding", None)  # None while traced (eval_shape)
    sharding = placed if isinstance(placed, jax.sharding.NamedSharding) else None
    if sharding is not None:
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    if not consume:
        stacked = jnp.stack(values)
        return stacked if sharding is None else jax.device_put(stacked, sharding)
    stacked = jnp.zeros((len(values),) + first.shape, first.dtype, device=sharding or placed)
    for i, value in enumerate(values):
        stacked = _write(stacked, value, i)
        value.delete()
    return stacked


def scanned(model: Transformer, layers: str = "scanned", *, consume: bool = False) -> Transformer:
    """`model` with its blocks in `layers` layout (LAYER_LAYOUTS); "unrolled" returns it unchanged.

    The result computes what `model` computes (the same operations per block, `tests/test_scan.py`)
    and is a new module: `model` keeps its unrolled blocks, unless `consume`, which deletes each block
    array as it is stacked (for a model nothing else uses: `model`'s blocks are then unusable, and the
    peak memory is the model plus one block array, not two copies of every block).  Quantizing before or
    after scanning gives the same int8 model.
    """
    if layers not in LAYER_LAYOUTS:
        raise ValueError(f"layers must be one of {LAYER_LAYOUTS}, got {layers!r}")
    if layers == "unrolled":
        return model
    if is_scanned(model):
        raise ValueError("model is already scanned")
    cfg = model.config
    period = layer_period(cfg.layer_types)
    groups = cfg.n_layers // period
    copy = nnx.merge(*nnx.split(model))  # a new module tree over the same arrays (and Variables)
    blocks = list(copy.layers)
    stacks = []
    for j in range(period):
        members = blocks[j:groups * period:period]
        graphdef, first = nnx.split(members[0])
        flat = [dict(nnx.to_flat_state(first))] + [dict(nnx.to_flat_state(nnx.state(b))) for b in members[1:]]
        # new Variables (replace), never set_value: the Variables are shared with `model`, which keeps its own
        stacked = {path: var.replace(_stack([f[path][...] for f in flat], consume),
                                     logical=("layers",) + tuple(var.get_metadata().get("logical", ())))
                   for path, var in flat[0].items()}
        stacks.append(nnx.merge(graphdef, nnx.from_flat_state(stacked)))
    copy.layer_stacks = nnx.data(nnx.List(stacks))  # None (static) in an unrolled model: now data
    copy.layers = nnx.List(blocks[groups * period:])
    copy.scan_period, copy.scan_groups = period, groups
    return copy


def is_scanned(model: Transformer) -> bool:
    return model.layer_stacks is not None
