"""Shared decoder layers: RMSNorm, rotary embeddings, grouped-query attention with an optional
KV cache, gated MLP, the decoder block and the transformer stack.

Every architecture (llama, qwen2, gemma3) is this one stack with different `ModelConfig`
flags.  Parameters are `nnx.Param`s that carry their *logical* axis names in the `logical`
metadata field; `crossmap.sharding` maps those names to the mesh.

Conventions: kernels are stored (in, out) so that `x @ W` applies them (HF stores (out, in));
activations are [batch, length, ...]; attention weights [d_model, heads, head_dim].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import IMPLEMENTATIONS as DECODE_ATTENTION
from .attention import (
    STEP_KERNELS,
    HeadNorm,
    StepHeads,
    attention_mask,
    decode_attention,
    decode_step_attention,
    grouped_attention,
    resolve,
)
from .config import ModelConfig
from .int8_matmul import int8_matmul, int8_matmul_output_major

Array = jax.Array


def _param(rngs: nnx.Rngs, shape, logical, dtype, std: float | None = None, zeros: bool = False) -> nnx.Param:
    if zeros:
        value = jnp.zeros(shape, dtype)
    else:
        fan_in = shape[0] if std is None else None
        scale = std if std is not None else 1.0 / math.sqrt(fan_in)
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)
    return nnx.Param(value, logical=tuple(logical))


def project(x: Array, kernel: nnx.Param, scale: nnx.Param | None, equation: str, contract: int,
            out_dtype=None, implementation: str = "auto", slices: int = 1) -> Array:
    """x @ kernel over x's last `contract` axes and kernel's first `contract` axes (`equation` spells it;
    "" is `x @ kernel`).

    A float kernel is that einsum or matmul; with `slices` > 1, the contracted axis (flattened) is cut into that
    many slices, multiplied as one batched product with float32 partials, and the partials summed and rounded
    once (`sliced_product`).  An int8 kernel (`models.quantize`: `scale` holds one float32 scale per output
    channel) is one 2-D `int8_matmul`: x and the kernel are reshaped to matrices, which for row-major arrays
    moves no data; a kernel stored output-major for the Mosaic GPU kernel (its Param's `output_major` mark) is
    [out..., in...] and goes through `int8_matmul_output_major`.
    """
    if scale is None and slices > 1:
        return sliced_product(x, kernel[...], contract, slices)
    if scale is None:
        return jnp.einsum(equation, x, kernel[...]) if equation else x @ kernel[...]
    w = kernel[...]
    x2 = x.reshape(*x.shape[:x.ndim - contract], -1)
    if kernel.get_metadata().get("output_major"):  # stored [out..., in...] for the Mosaic GPU kernel
        out_axes = w.shape[:w.ndim - contract]
        y = int8_matmul_output_major(x2, w.reshape(math.prod(out_axes), -1), scale[...].reshape(-1),
                                     out_dtype=out_dtype, implementation=implementation)
    else:
        out_axes = w.shape[contract:]
        y = int8_matmul(x2, w.reshape(-1, math.prod(out_axes)), scale[...].reshape(-1), out_dtype=out_dtype,
                        implementation=implementation)
    return y.reshape(*y.shape[:-1], *out_axes)


def sliced_product(x: Array, w: Array, contract: int, slices: int) -> Array:
    """x @ w over x's last and w's first `contract` axes, as `slices` products over equal slices of the
    (flattened) contracted axis in one batched GEMM, their float32 partials summed and rounded to x's dtype.

    Why: a decode step's down product (few rows, N = d_model, wide K) gives cuBLAS too few output tiles to
    occupy every multiprocessor, so it splits K itself and reduces in a kernel of its own.  Slicing K here
    gives it `slices` times the tiles, and the sum of the partials joins the residual add's fusion.  Equal to
    the one product up to float32 summation order.  (The o product, measured the same way, got slower.)"""
    k = math.prod(w.shape[:contract])
    if k % slices:
        raise ValueError(f"sliced_product: {slices} slices do not divide the contracted size {k}")
    out_axes = w.shape[contract:]
    lead = x.shape[:x.ndim - contract]
    xs = x.reshape(*lead, slices, k // slices)
    ws = w.reshape(slices, k // slices, math.prod(out_axes))
    if jnp.dtype(x.dtype).itemsize < 4 and jax.default_backend() == "cpu":
        # XLA's CPU runtime has no batched 16-bit product with a float32 result: multiply the float32 values
        xs, ws = xs.astype(jnp.float32), ws.astype(jnp.float32)
    parts = jnp.einsum("...sk,skn->...sn", xs, ws, preferred_element_type=jnp.float32)
    return parts.sum(-2).astype(x.dtype).reshape(*lead, *out_axes)


class RMSNorm(nnx.Module):
    """RMS normalisation computed in float32; Gemma scales by (1 + w), others by w."""

    def __init__(self, dim: int, eps: float, plus_one: bool, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.plus_one = plus_one
        # Gemma's weight is an offset from 1 (zeros = identity); others start at 1.
        init = jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype)
        self.weight = nnx.Param(init, logical=("norm",))

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        if self.plus_one:
            # Gemma multiplies in float32 before casting back (HF Gemma3RMSNorm).
            return (x32 * (1.0 + w)).astype(dtype)
        # Llama/Qwen cast the normalised value back first, then scale (HF LlamaRMSNorm).
        return self.weight[...].astype(dtype) * x32.astype(dtype)


def llama3_inv_freq(inv_freq: Array, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_context: int) -> Array:
    """Llama 3's RoPE scaling: wavelengths longer than original_context / low_freq_factor are
    stretched by `factor`, those shorter than original_context / high_freq_factor kept, and the band
    between blended linearly in original_context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    stretched = jnp.where(wavelength > original_context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelength >= original_context / high_freq_factor) & (wavelength <= original_context / low_freq_factor)
    return jnp.where(medium, blended, stretched)


def rope_tables(positions: Array, head_dim: int, theta: float, scaling: float = 1.0,
                llama3: tuple[float, float, float, int] | None = None) -> tuple[Array, Array]:
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (HF "rotate_half" layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / scaling  # linear scaling stretches positions by `scaling`
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [B, T, H, D] by tables [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = n, k, h
        self.scale = cfg.attn_scale
        self.window = cfg.sliding_window if layer_type == "sliding" else None
        self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype)
        self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype, std=1.0 / math.sqrt(n * h))
        # per-output-channel scales of int8 kernels (models.quantize); None: the kernels are floats
        self.q_scale = self.k_scale = self.v_scale = self.o_scale = None
        self.int8_implementation = "auto"  # int8_matmul's implementation (static: part of the program key)
        # q, k and v as one kernel [D, K, G + 2, H], its bias and int8 scales (models.fuse); None: separate kernels
        self.qkv = self.qkv_bias = self.qkv_scale = None
        # how a one-token step with a cache attends (models.attention.IMPLEMENTATIONS; static, like the above): "auto"
        # is the Pallas kernel on GPU for 16-bit caches, the XLA definition elsewhere (with_decode_attention)
        self.decode_attention = "auto"
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), dtype, std=0.02)
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, std=0.02)
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, std=0.02)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_eps, cfg.norm_plus_one, dtype, rngs)
            self.k_norm = RMSNorm(h, cfg.rms_eps, cfg.norm_plus_one, dtype, rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: Array, cos: Array, sin: Array, q_index: Array, kv_valid: Array,
                 cache: tuple[Array, Array] | None = None, implementation: str | None = None,
                 cache_index: Array | int | None = None):
        """x [B, T, D] -> ([B, T, D], new cache).

        With a cache (k, v each [B, K, S, H]: kv-heads before slots, so a decode step's two
        attention products are plain batched matmuls with no per-step transpose of the cache) the
        new keys and values are written at the slots `q_index` (contiguous per row: q_index[:, 0] +
        arange(T)) and attention reads the whole cache; without one, keys are this call's own.

        `cache_index` set: the cache is a stack over layers (k, v each [G, B, K, S, H], a scanned
        model's) and this layer's entry is `cache_index`.  Only the new slots are written into the
        stack, so a decode step looping over the layers writes T slots, not the layer's whole cache.
        """
        impl = self.int8_implementation
        if cache is not None and x.shape[1] == 1:
            attend = resolve(self.decode_attention, x.dtype, cache[0].dtype, self.head_dim)
            if attend in STEP_KERNELS:
                return self._step_in_kernel(x, cos, sin, q_index, kv_valid, cache, cache_index,
                                            attend == "interpret-step")
        if self.qkv is not None:  # one product, then each KV head's G queries, its key and its value
            qkv = project(x, self.qkv, self.qkv_scale, "btd,dkch->btkch", 1, implementation=impl)
            if self.qkv_bias is not None:
                qkv = _add_bias(qkv, self.qkv_bias[...])
            groups = self.n_heads // self.n_kv_heads
            q = qkv[..., :groups, :].reshape(*qkv.shape[:2], self.n_heads, self.head_dim)
            k, v = qkv[..., groups, :], qkv[..., groups + 1, :]
        else:
            q = project(x, self.q, self.q_scale, "btd,dnh->btnh", 1, implementation=impl)
            k = project(x, self.k, self.k_scale, "btd,dkh->btkh", 1, implementation=impl)
            v = project(x, self.v, self.v_scale, "btd,dkh->btkh", 1, implementation=impl)
            if self.q_bias is not None:
                q, k, v = _add_bias(q, self.q_bias[...]), _add_bias(k, self.k_bias[...]), _add_bias(v, self.v_bias[...])
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if implementation == "cudnn" and cache is None:
            # Fused flash attention; assumes right padding (valid prefix per row).
            out = jax.nn.dot_product_attention(
                q, k, v, scale=self.scale, is_causal=True, implementation="cudnn",
                key_value_seq_lengths=kv_valid.sum(-1).astype(jnp.int32),
                local_window_size=(self.window - 1, 0) if self.window else None)
            return project(out, self.o, self.o_scale, "btnh,nhd->btd", 2, implementation=impl), None
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
        if cache is not None:
            start = q_index[0, 0]  # every row writes the same slots; padding lives in kv_valid
            if cache_index is not None:
                at = (cache_index, 0, 0, start, 0)
                cache = (jax.lax.dynamic_update_slice(cache[0], k[None].astype(cache[0].dtype), at),
                         jax.lax.dynamic_update_slice(cache[1], v[None].astype(cache[1].dtype), at))
            else:
                cache = (jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, axis=2),
                         jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, axis=2))
            if x.shape[1] == 1:  # a decode step: the kernel reads a stacked cache's entry in place
                out = decode_attention(q, *cache, q_index, kv_valid, cache_index, scale=self.scale,
                                       window=self.window, implementation=self.decode_attention)
                return project(out, self.o, self.o_scale, "btnh,nhd->btd", 2, implementation=impl), cache
            k, v = cache
            if cache_index is not None:
                k = jax.lax.dynamic_index_in_dim(k, cache_index, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(v, cache_index, 0, keepdims=False)
        mask = attention_mask(q_index, kv_valid, self.window)
        out = grouped_attention(q, k, v, mask, self.scale)
        return project(out, self.o, self.o_scale, "btnh,nhd->btd", 2, implementation=impl), cache


    def _step_in_kernel(self, x, cos, sin, q_index, kv_valid, cache, cache_index, interpret: bool):
        """A decode step whose biases, norms, rotation, cache writes and attention all run in one kernel
        (models.attention.decode_step_attention), which reads the projections' output where it lies."""
        impl = self.int8_implementation
        b, n, kv, h = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        groups = n // kv
        if self.qkv is not None:  # [B, K * (G + 2), H]: each KV head's G queries, its key, its value
            rows = project(x, self.qkv, self.qkv_scale, "btd,dkch->btkch", 1, implementation=impl)
            rows = rows.reshape(b, kv * (groups + 2), h)
            bias = None if self.qkv_bias is None else self.qkv_bias[...].reshape(kv * (groups + 2), h)
            heads = [StepHeads(rows, bias, groups + 2, offset) for offset in (0, groups, groups + 1)]
        else:
            heads = []
            for kernel, scale, bias, stride in ((self.q, self.q_scale, self.q_bias, groups),
                                                (self.k, self.k_scale, self.k_bias, 1),
                                                (self.v, self.v_scale, self.v_bias, 1)):
                rows = project(x, kernel, scale, "btd,dnh->btnh", 1, implementation=impl)
                heads.append(StepHeads(rows.reshape(b, -1, h), None if bias is None else bias[...], stride, 0))
        norm = None if self.q_norm is None else HeadNorm(self.q_norm.weight[...], self.k_norm.weight[...],
                                                         self.q_norm.eps, self.q_norm.plus_one)
        out, cache = decode_step_attention(*heads, cos[:, 0], sin[:, 0], norm, cache, q_index, kv_valid, cache_index,
                                           groups=groups, scale=self.scale, window=self.window, interpret=interpret)
        return project(out, self.o, self.o_scale, "btnh,nhd->btd", 2, implementation=impl), cache


def _add_bias(x: Array, bias: Array) -> Array:
    """x + bias, added in float32 and rounded once to x's dtype.  Written on a 16-bit product's output, the add
    is folded by XLA's GEMM rewriter into cuBLAS's C operand, which it first materialises as a full [rows, N]
    broadcast: one more kernel a projection a decode step.  Through float32 the add joins the next fusion."""
    return (x.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.activation = cfg.activation
        self.gate = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), dtype)
        self.up = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), dtype)
        self.down = _param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), dtype)
        self.gate_scale = self.up_scale = self.down_scale = None  # int8 kernels' scales (models.quantize)
        self.int8_implementation = "auto"
        self.gate_up = self.gate_up_scale = None  # gate and up as one kernel [D, 2, F] (models.fuse)
        self.down_slices = 1  # K slices of a decode step's down product (sliced_product, with_down_slices; static)

    def __call__(self, x: Array) -> Array:
        impl = self.int8_implementation
        if self.gate_up is not None:
            both = project(x, self.gate_up, self.gate_up_scale, "btd,dcf->btcf", 1, implementation=impl)
            gate, up = both[..., 0, :], both[..., 1, :]
        else:
            gate = project(x, self.gate, self.gate_scale, "", 1, implementation=impl)
            up = project(x, self.up, self.up_scale, "", 1, implementation=impl)
        slices = self.down_slices if x.shape[-2] == 1 else 1  # decode steps only: a prefill fills the GPU
        return project(gate_activation(gate, self.activation) * up, self.down, self.down_scale, "", 1,
                       implementation=impl, slices=slices)


def gate_activation(gate: Array, activation: str) -> Array:
    """The MLP's activation on its gate product: SiLU, or GELU (tanh form) computed in float32 on the rounded
    gate and rounded once, as transformers computes it in bf16. Written on the product's own dtype, XLA folds
    the GELU into a cuBLASLt epilogue, which cannot read a scanned block's weight slice in place: that copied
    the gate kernel (231 MB) once a block per decode step at the Gemma-3-27B shape (BENCHMARKS.md)."""
    if activation == "silu":
        return jax.nn.silu(gate)
    return jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(gate.dtype)


class Block(nnx.Module):
    """Pre-norm decoder block; Gemma adds post-attention and post-feedforward ("sandwich") norms."""

    def __init__(self, cfg: ModelConfig, layer_type: str, dtype, rngs: nnx.Rngs):
        self.layer_type = layer_type
        norm = lambda: RMSNorm(cfg.d_model, cfg.rms_eps, cfg.norm_plus_one, dtype, rngs)
        self.input_norm = norm()
        self.attn = Attention(cfg, layer_type, dtype, rngs)
        self.pre_mlp_norm = norm()
        self.mlp = MLP(cfg, dtype, rngs)
        self.post_attn_norm = norm() if cfg.sandwich_norms else None
        self.post_mlp_norm = norm() if cfg.sandwich_norms else None

    def __call__(self, x, cos, sin, q_index, kv_valid, cache=None, implementation=None, cache_index=None):
        h, cache = self.attn(self.input_norm(x), cos, sin, q_index, kv_valid, cache, implementation, cache_index)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, cache


class Transformer(nnx.Module):
    """A decoder-only LM: embedding, `n_layers` blocks, final norm, LM head (maybe tied)."""

    def __init__(self, cfg: ModelConfig, *, dtype="float32", rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        dtype = jnp.dtype(dtype)
        self.config = cfg
        self.attention_impl: str | None = None  # None: explicit-mask XLA attention; "cudnn": fused
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dtype, std=1.0)
        self.layers = nnx.List([Block(cfg, t, dtype, rngs) for t in cfg.layer_types])
        # A scanned model (models.scan) holds its first scan_groups * scan_period blocks as scan_period
        # stacked Blocks (leading axis: the group) and runs them with one loop over the groups;
        # `layers` then holds only the blocks after the last whole group.  None: every block unrolled.
        self.layer_stacks: nnx.List | None = None
        self.scan_period = 0
        self.scan_groups = 0
        self.scan_unroll = 1  # groups per loop iteration (fori_loop unroll; 2 was no faster at 27B, BENCHMARKS.md)
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.norm_plus_one, dtype, rngs)
        self.lm_head = None if cfg.tie_embeddings else _param(
            rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype)
        # an int8 LM head's scales (models.quantize); a quantized tied model gets its own int8 lm_head
        self.lm_head_scale = None
        self.int8_implementation = "auto"

    # -- pieces -----------------------------------------------------------------------------
    def embed_tokens(self, tokens: Array) -> Array:
        """Input embeddings [B, T, D] (Gemma: times sqrt(d_model), rounded to the weight dtype)."""
        table = self.embed[...]
        x = jnp.take(table, tokens, axis=0)
        if self.config.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.config.d_model), table.dtype)
        return x

    def _rope(self, positions: Array) -> dict[str, tuple[Array, Array]]:
        cfg = self.config
        tables = {"full": rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_llama3)}
        if "sliding" in cfg.layer_types:
            tables["sliding"] = rope_tables(positions, cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta)
        return tables

    def check_layer(self, layer: int) -> int:
        n = self.config.n_layers
        if not isinstance(layer, int) or not -n <= layer < n:
            raise IndexError(f"layer {layer!r} out of range for {self.config.name or self.config.model_type} "
                             f"with {n} decoder blocks (valid: 0..{n - 1}, or negative from the end)")
        return layer % n

    def run(self, x: Array, positions: Array, kv_valid: Array, *, q_index: Array | None = None,
            cache: list | None = None, stop_after: int | None = None,
            residual_add: tuple[int, Array] | None = None):
        """Run blocks 0..stop_after (all by default) on embeddings x [B, T, D].

        `residual_add=(k, delta)` adds delta [B, T, D] to the residual stream after block k
        (activation injection).  Returns (residual after the last block run, new cache list).
        """
        if q_index is None:
            q_index = jnp.broadcast_to(jnp.arange(x.shape[1])[None], x.shape[:2])
        last = self.config.n_layers - 1 if stop_after is None else stop_after
        tables = self._rope(positions)
        if self.layer_stacks is not None:
            return self._run_scanned(x, tables, q_index, kv_valid, cache, last, residual_add)
        new_cache = []
        for i in range(last + 1):
            x, c = self._block(self.layers[i], i, x, tables, q_index, kv_valid,
                               None if cache is None else cache[i], residual_add)
            new_cache.append(c)
        return x, new_cache

    def _block(self, block, index, x, tables, q_index, kv_valid, cache, residual_add, cache_index=None):
        """One block, then the injection if it is due after block `index` (an int, or traced in a scan)."""
        cos, sin = tables[block.layer_type]
        x, cache = block(x, cos, sin, q_index, kv_valid, cache, self.attention_impl, cache_index)
        if residual_add is not None:
            delta = residual_add[1].astype(x.dtype)
            if isinstance(index, int):
                x = x + delta if index == residual_add[0] else x
            else:
                x = jnp.where(index == residual_add[0], x + delta, x)
        return x, cache

    def _run_scanned(self, x, tables, q_index, kv_valid, cache, last, residual_add):
        """`run` for a scanned model: one loop over the whole groups needed, then any blocks of a
        partial group (a truncated forward) and the tail, unrolled.

        The stacked weights are closed over, not scanned as xs, and indexed by the group inside the body,
        so a forward that stops early never slices (copies) a prefix of the stack.  The stacked caches ride
        in the loop's carry and each block writes only its new slots into them (Attention's cache_index).
        Without a cache the second result is None (an unrolled model returns a list of Nones).
        """
        period, groups = self.scan_period, self.scan_groups
        stacks = [nnx.split(stack) for stack in self.layer_stacks]
        caches = None if cache is None else list(cache)
        n_scanned = min((last + 1) // period, groups)

        def group(g, carry):
            x, stack_caches = carry
            updated = []
            for j, (graphdef, state) in enumerate(stacks):
                params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, 0, keepdims=False), state)
                c = None if stack_caches is None else stack_caches[j]
                x, c = self._block(nnx.merge(graphdef, params), g * period + j, x, tables, q_index, kv_valid, c,
                                   residual_add, cache_index=None if c is None else g)
                updated.append(c)
            return x, None if stack_caches is None else updated

        if n_scanned:
            carry = (x, None if caches is None else caches[:period])
            # fori_loop (a scan with the group index in its carry): every slice's offset is the loop's induction
            # variable, which XLA's dynamic-slice fusion can read in place; an index read from a scanned
            # arange is a load it cannot follow
            x, stack_caches = jax.lax.fori_loop(0, n_scanned, group, carry, unroll=self.scan_unroll)
            if caches is not None:
                caches[:period] = stack_caches
        for i in range(n_scanned * period, last + 1):  # a partial group's blocks, then the tail's
            if i < groups * period:  # block i is entry g of stack j, and of its stacked cache
                g, j = divmod(i, period)
                graphdef, state = stacks[j]
                block, slot, index = nnx.merge(graphdef, jax.tree.map(lambda a, g=g: a[g], state)), j, g
            else:
                t = i - groups * period
                block, slot, index = self.layers[t], period + t, None
            c = None if caches is None else caches[slot]
            x, c = self._block(block, i, x, tables, q_index, kv_valid, c, residual_add,
                               cache_index=None if c is None else index)
            if caches is not None:
                caches[slot] = c
        return x, caches

    def head(self, x: Array) -> Array:
        """Final norm and LM head: logits [B, T, V] in float32."""
        x = self.final_norm(x)
        if self.lm_head_scale is not None:
            logits = project(x, self.lm_head, self.lm_head_scale, "", 1, out_dtype=jnp.float32,
                             implementation=self.int8_implementation)
        else:
            w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
            logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits

    # -- the public forward API ----------------------------------------------------------------
    def hidden(self, tokens: Array, positions: Array, valid: Array, *, layer: int) -> Array:
        """Residual stream [B, T, D] at the output of decoder block `layer` (0-based).

        Runs blocks 0..layer only (a truncated forward: no later blocks, no LM head); equals
        HF `output_hidden_states[layer + 1]` for every layer but the last.
        """
        layer = self.check_layer(layer)
        x, _ = self.run(self.embed_tokens(tokens), positions, valid, stop_after=layer)
        return x

    def logits(self, tokens: Array, positions: Array, valid: Array) -> Array:
        """Full forward: next-token logits [B, T, V] (float32)."""
        x, _ = self.run(self.embed_tokens(tokens), positions, valid)
        return self.head(x)

    def init_cache(self, batch: int, length: int, dtype=None) -> list[tuple[Array, Array]]:
        """Zeroed KV cache, one (k, v) pair of [batch, n_kv_heads, length, head_dim] per layer.

        A scanned model's: one pair per position in its period, stacked [scan_groups, batch, ...], then one
        per tail block.  Either way the batch is axis -4 of every array.
        """
        cfg = self.config
        dtype = dtype or self.embed[...].dtype
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        if self.layer_stacks is None:
            return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]
        stacked = (self.scan_groups,) + shape
        return ([(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype)) for _ in range(self.scan_period)]
                + [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers])


def _with_setting(model: Transformer, kind: type, name: str, value) -> Transformer:
    """A new module over `model`'s arrays with `name` = `value` on every `kind` submodule: `model` itself (a
    self-verbalizer's, which also serves the other stages) is unchanged."""
    copy = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, kind):
            setattr(module, name, value)
    return copy


def with_decode_attention(model: Transformer, implementation: str) -> Transformer:
    """`model` whose decode steps attend by `implementation` (models.attention.IMPLEMENTATIONS)."""
    if implementation not in DECODE_ATTENTION:
        raise ValueError(f"decode attention must be one of {DECODE_ATTENTION}, got {implementation!r}")
    return _with_setting(model, Attention, "decode_attention", implementation)


def with_down_slices(model: Transformer, slices: int) -> Transformer:
    """`model` whose decode steps run each MLP's down product (float kernels) as `slices` products over slices of
    d_ff (`sliced_product`); 1 is the one product.  Raises ValueError where `slices` is not a positive int
    dividing d_ff."""
    d_ff = model.config.d_ff
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1 or d_ff % slices:
        raise ValueError(f"down slices must be a positive int dividing d_ff = {d_ff}, got {slices!r}")
    return _with_setting(model, MLP, "down_slices", slices)
