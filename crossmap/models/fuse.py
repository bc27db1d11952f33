"""Fused projections: q, k and v as one kernel, gate and up as one, so a decode step runs one product where it ran
three (and one where it ran two).

A decode step multiplies a few hundred rows by every kernel once, so each product costs its weight bytes plus a
fixed launch-and-tail cost; k and v (512 columns at the 7B shape) are almost all fixed cost, and cuBLAS split them
over K, adding a reduction kernel each (BENCHMARKS.md, "The 7B step in the same profile").  One [D, q+k+v] product
pays the fixed cost once.

`fused(model)` returns a new `Transformer` whose attention blocks hold `qkv` [D, K, G + 2, H] (per KV head: its G
query heads, then its key, then its value; logical axes ("embed", "kv_heads", None, "head_dim")) and whose MLPs hold
`gate_up` [D, 2, F] (("embed", None, "mlp")); q/k/v and gate/up are then None.  The layout keeps each KV head's
queries, key and value together, so sharding "kv_heads" over the tensor axis gives every device whole heads, and the
query head order is the model's own (head n = k * G + g, as `grouped_attention` groups them).  Biases are fused the
same way.  The result computes what `model` computes (tests/test_fuse.py); it is for inference: training, LoRA and
checkpoints read the separate kernels.  It composes with `scanned` (either order) and `quantized` (fuse first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import sharding as shd
from .layers import MLP, Attention, Transformer
from .quantize import is_quantized

# verbalizers.<side>.projections: "separate" (the model's own kernels) or "fused" (q/k/v and gate/up as one each)
PROJECTION_LAYOUTS = ("separate", "fused")


def _leading(param: nnx.Param) -> int:
    """1 for a scanned model's stacked parameter (its group axis in front), else 0."""
    return 1 if tuple(param.get_metadata().get("logical", ()))[:1] == ("layers",) else 0


def _placed(value: jax.Array, like: jax.Array, logical: tuple) -> jax.Array:
    """`value` laid out on `like`'s mesh by its logical axes, when `like` is spread over a mesh."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1:
        return jax.device_put(value, shd.sharding_for(sharding.mesh, logical, value.shape))
    return value


def _new_param(value: jax.Array, like: nnx.Param, logical: tuple) -> nnx.Param:
    return nnx.data(nnx.Param(_placed(value, like[...], logical), logical=logical))


def _release(consume: bool, *params: nnx.Param | None) -> None:
    if consume:
        for param in params:
            if param is not None:
                param[...].delete()


def _fuse_attention(attn: Attention, consume: bool) -> None:
    lead = _leading(attn.q)
    layers = ("layers",) * lead
    k_heads, groups = attn.n_kv_heads, attn.n_heads // attn.n_kv_heads

    def grouped(q: jax.Array, at: int) -> jax.Array:  # [.., N, H] at axis `at` -> [.., K, G, H]
        return q.reshape(q.shape[:at] + (k_heads, groups) + q.shape[at + 1:])

    def own_slot(kv: jax.Array, at: int) -> jax.Array:  # [.., K, H] -> [.., K, 1, H]
        return jnp.expand_dims(kv, at + 1)

    at = lead + 1  # the heads axis of q [.., D, N, H]
    qkv = jnp.concatenate([grouped(attn.q[...], at), own_slot(attn.k[...], at), own_slot(attn.v[...], at)],
                          axis=at + 1)
    logical = layers + ("embed", "kv_heads", None, "head_dim")
    fused_kernel = _new_param(qkv, attn.q, logical)
    fused_bias = None
    if attn.q_bias is not None:
        at = lead  # the heads axis of q_bias [.., N, H]
        bias = jnp.concatenate([grouped(attn.q_bias[...], at), own_slot(attn.k_bias[...], at),
                                own_slot(attn.v_bias[...], at)], axis=at + 1)
        fused_bias = _new_param(bias, attn.q_bias, layers + ("kv_heads", None, "head_dim"))
    _release(consume, attn.q, attn.k, attn.v, attn.q_bias, attn.k_bias, attn.v_bias)
    attn.qkv, attn.qkv_bias = fused_kernel, fused_bias
    attn.q = attn.k = attn.v = None
    attn.q_bias = attn.k_bias = attn.v_bias = None


def _fuse_mlp(mlp: MLP, consume: bool) -> None:
    lead = _leading(mlp.gate)
    both = jnp.stack([mlp.gate[...], mlp.up[...]], axis=lead + 1)  # [.., D, 2, F]
    fused_kernel = _new_param(both, mlp.gate, ("layers",) * lead + ("embed", None, "mlp"))
    _release(consume, mlp.gate, mlp.up)
    mlp.gate_up = fused_kernel
    mlp.gate = mlp.up = None


def fused(model: Transformer, projections: str = "fused", *, consume: bool = False) -> Transformer:
    """`model` with its projections in `projections` layout (PROJECTION_LAYOUTS); "separate" returns it unchanged.

    The result is a new module over new fused arrays (and the model's other arrays): `model` keeps its separate
    kernels, unless `consume`, which deletes each one as it is fused (for a model nothing else uses: an NLA's AV;
    the peak memory is then the model plus one block's kernels, not two copies of them)."""
    if projections not in PROJECTION_LAYOUTS:
        raise ValueError(f"projections must be one of {PROJECTION_LAYOUTS}, got {projections!r}")
    if projections == "separate":
        return model
    if is_fused(model):
        raise ValueError("model's projections are already fused")
    if is_quantized(model):
        raise ValueError("model is quantized: fuse its projections first, then quantize (models.quantize)")
    copy = nnx.merge(*nnx.split(model))  # a new module tree over the same arrays (and Variables)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, Attention):
            _fuse_attention(module, consume)
        elif isinstance(module, MLP):
            _fuse_mlp(module, consume)
    return copy


def is_fused(model: Transformer) -> bool:
    return any(isinstance(m, Attention) and m.qkv is not None for _, m in nnx.iter_modules(model))
