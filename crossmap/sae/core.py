"""The one in-memory SAE every reader produces and the trainer returns, and its maths.

`SAE` is a pytree (flax.struct dataclass): the arrays are leaves, the metadata is static, so
an SAE passes straight through `jax.jit` and can be placed on a mesh like any parameter tree.

Conventions
-----------
* Shapes: W_enc [d_model, n_features], b_enc [n_features], W_dec [n_features, d_model],
  b_dec [d_model], threshold [n_features] (JumpReLU only, else None).
* The SAE works internally on `x * input_scale` (the trainer normalises activations so that
  E||x||^2 = d_model); `encode` and `decode` take and return *raw* activations, so callers
  never see the scale.  Readers of public formats set input_scale = 1.
* `layer` follows crossmap's residual-stream convention: the output of decoder block `layer`
  (0-based); -1 is the embedding output.  SAE-Lens 'blocks.L.hook_resid_post' and sparsify
  'layers.L' are layer L; 'blocks.L.hook_resid_pre' is layer L-1.
* Activations: 'relu' (SAE-Lens standard), 'topk' (keep the k largest pre-activations, then
  ReLU; relu-then-topk as in sparsify gives the same vector), 'jumprelu'
  (pre * (pre > threshold), with ReLU, as in Gemma Scope).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ACTIVATIONS = ("relu", "topk", "jumprelu")


@struct.dataclass
class SAE:
    """A sparse autoencoder in crossmap's normal form (see the module docstring)."""

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    threshold: jax.Array | None
    input_scale: jax.Array  # scalar; encode sees x * input_scale, decode divides by it
    activation: str = struct.field(pytree_node=False, default="topk")
    k: int | None = struct.field(pytree_node=False, default=None)
    apply_b_dec_to_input: bool = struct.field(pytree_node=False, default=True)
    layer: int | None = struct.field(pytree_node=False, default=None)
    hook_name: str = struct.field(pytree_node=False, default="")
    model_id: str = struct.field(pytree_node=False, default="")
    source_format: str = struct.field(pytree_node=False, default="")
    source_path: str = struct.field(pytree_node=False, default="")

    @property
    def d_model(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.W_dec.shape[0])


def make_sae(W_enc, b_enc, W_dec, b_dec, *, activation: str, k: int | None = None, threshold=None,
             input_scale: float = 1.0, apply_b_dec_to_input: bool = True, layer: int | None = None,
             hook_name: str = "", model_id: str = "", source_format: str = "", source_path: str = "",
             where: str = "SAE") -> SAE:
    """Build an `SAE` from arrays (any float dtype -> float32), checking every shape.

    `where` names the file or caller in error messages.
    """
    W_enc, b_enc, W_dec, b_dec = (np.asarray(a, np.float32) for a in (W_enc, b_enc, W_dec, b_dec))
    if W_dec.ndim != 2:
        raise ValueError(f"{where}: W_dec must be 2-D [n_features, d_model], got shape {W_dec.shape}")
    n, d = W_dec.shape
    expected = {"W_enc": (d, n), "b_enc": (n,), "b_dec": (d,)}
    for name, arr in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
        if arr.shape != expected[name]:
            raise ValueError(f"{where}: {name} has shape {arr.shape}, expected {expected[name]} "
                             f"from W_dec {W_dec.shape} ([n_features, d_model])")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {activation!r} is not one of {ACTIVATIONS}")
    if activation == "topk":
        if k is None or not 0 < int(k) <= n:
            raise ValueError(f"{where}: topk SAE needs 0 < k <= n_features={n}, got k={k}")
        k = int(k)
    else:
        k = None
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError(f"{where}: jumprelu SAE has no 'threshold' array")
        threshold = np.broadcast_to(np.asarray(threshold, np.float32), (n,)).copy()
        threshold = jnp.asarray(threshold)
    else:
        threshold = None
    if not (math.isfinite(input_scale) and input_scale > 0):
        raise ValueError(f"{where}: input_scale must be a positive finite number, got {input_scale}")
    return SAE(W_enc=jnp.asarray(W_enc), b_enc=jnp.asarray(b_enc), W_dec=jnp.asarray(W_dec),
               b_dec=jnp.asarray(b_dec), threshold=threshold,
               input_scale=jnp.asarray(input_scale, jnp.float32), activation=activation, k=k,
               apply_b_dec_to_input=bool(apply_b_dec_to_input), layer=layer, hook_name=hook_name,
               model_id=model_id, source_format=source_format, source_path=source_path)


def scatter_topk(values: jax.Array, indices: jax.Array, n: int) -> jax.Array:
    """Dense [..., n] array holding `values` at `indices` (last axis) and zeros elsewhere."""
    lead = values.shape[:-1]
    flat_v = values.reshape(-1, values.shape[-1])
    flat_i = indices.reshape(-1, indices.shape[-1])
    dense = jax.vmap(lambda v, i: jnp.zeros((n,), values.dtype).at[i].set(v))(flat_v, flat_i)
    return dense.reshape(*lead, n)


def pre_activations(sae: SAE, x: jax.Array) -> jax.Array:
    """Encoder pre-activations [..., n_features] of raw activations x [..., d_model]."""
    x = jnp.asarray(x, jnp.float32) * sae.input_scale
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    return x @ sae.W_enc + sae.b_enc


def activate(sae: SAE, pre: jax.Array) -> jax.Array:
    """Apply the SAE's activation function to pre-activations."""
    if sae.activation == "relu":
        return jax.nn.relu(pre)
    if sae.activation == "jumprelu":
        return jnp.where(pre > sae.threshold, jax.nn.relu(pre), 0.0)
    values, indices = jax.lax.top_k(pre, sae.k)
    return scatter_topk(jax.nn.relu(values), indices, pre.shape[-1])


@jax.jit
def encode(sae: SAE, x: jax.Array) -> jax.Array:
    """Feature activations z [..., n_features] of raw activations x [..., d_model]."""
    return activate(sae, pre_activations(sae, x))


@jax.jit
def encode_selected(sae: SAE, x: jax.Array, features: jax.Array) -> jax.Array:
    """Activations [..., len(features)] of the chosen features only.

    Every feature is still computed (TopK needs them all), but only the chosen columns leave
    the device: for a 65k-wide SAE that is 45 columns copied to the host instead of 65,536.
    """
    return jnp.take(encode(sae, x), features, axis=-1)


@jax.jit
def decode(sae: SAE, z: jax.Array) -> jax.Array:
    """Reconstruction [..., d_model] (raw activation units) of feature activations z."""
    return (jnp.asarray(z, jnp.float32) @ sae.W_dec + sae.b_dec) / sae.input_scale


def decoder_directions(sae: SAE, unit: bool = False) -> jax.Array:
    """Decoder rows [n_features, d_model] in raw activation space.

    Row i is what one unit of feature i adds to the reconstruction (W_dec[i] / input_scale).
    With `unit=True` the rows are normalised to unit L2 norm.
    """
    rows = sae.W_dec / sae.input_scale
    if unit:
        rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return rows


@jax.jit
def _chunk_error_sums(sae: SAE, x: jax.Array, valid: jax.Array):
    z = encode(sae, x)
    recon = decode(sae, z)
    w = valid.astype(jnp.float32)[:, None]
    x = x.astype(jnp.float32)
    return {
        "sse": jnp.sum(w * (x - recon) ** 2),
        "sum_x": jnp.sum(w * x, axis=0),
        "sum_sq": jnp.sum(w * x * x),
        "l0": jnp.sum(w * (z > 0)),
        "fired": jnp.any((z > 0) & valid[:, None], axis=0),
    }


def evaluate_sae(sae: SAE, acts: np.ndarray, chunk_rows: int = 4096) -> dict[str, float]:
    """Reconstruction quality of `sae` on raw activations acts [N, d_model].

    Returns fve = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 (over the whole set), mse (per
    element), l0 (mean active features per row) and dead_frac (fraction of features that never
    fire on `acts`).  Chunks are padded to one shape so this compiles once.
    """
    acts = np.asarray(acts)
    if acts.ndim != 2 or acts.shape[1] != sae.d_model:
        raise ValueError(f"evaluate_sae: acts must be [N, {sae.d_model}], got {acts.shape}")
    n_rows = acts.shape[0]
    if n_rows == 0:
        raise ValueError("evaluate_sae: acts is empty")
    chunk_rows = min(chunk_rows, n_rows)
    sse = sum_sq = l0 = 0.0
    sum_x = np.zeros(sae.d_model, np.float64)
    fired = np.zeros(sae.n_features, bool)
    for start in range(0, n_rows, chunk_rows):
        chunk = acts[start:start + chunk_rows].astype(np.float32)
        valid = np.ones(chunk_rows, bool)
        if len(chunk) < chunk_rows:
            valid[len(chunk):] = False
            chunk = np.concatenate([chunk, np.zeros((chunk_rows - len(chunk), sae.d_model), np.float32)])
        out = jax.device_get(_chunk_error_sums(sae, chunk, valid))
        sse += float(out["sse"])
        sum_sq += float(out["sum_sq"])
        l0 += float(out["l0"])
        sum_x += out["sum_x"]
        fired |= out["fired"]
    total_var = sum_sq - float(sum_x @ sum_x) / n_rows
    return {"fve": 1.0 - sse / total_var, "mse": sse / (n_rows * sae.d_model), "l0": l0 / n_rows,
            "dead_frac": float(1.0 - fired.mean()), "n_rows": n_rows}
