"""Attention arithmetic shared by the layers: the mask, grouped-query softmax attention, and the one-token decode
step's attention as a Pallas kernel.

`grouped_attention` with `attention_mask` is the definition: explicit logits [B, K, G, T, S] in float32, a float32
softmax, then the probabilities (in the values' dtype) times the values.  A decode step (T = 1) through it runs two
batched products with G (7 at the Qwen2.5-7B shape) rows per KV head, padded by XLA to the tensor cores' 8 or 16, plus
pad, mask and softmax kernels, and reads every slot of the preallocated cache, the future ones too.

`decode_attention_pallas` is that step as one kernel (Triton lowering, GPU): a program per (row, KV head) streams its
key and value slots in blocks of `DECODE_BLOCK_SLOTS`, from the first slot the sliding window can see to the query's
own slot only, with an online softmax (running max and sum in float32), so the cache is read once and only where a
key can be visible.  It reads its G query heads as 16 rows (Triton's smallest dot tile), the rows past G masked.
With `interpret=True` it runs on the CPU, which is how the tests compare it with the definition.  JAX marks the
Pallas Triton backend deprecated in favour of Mosaic GPU; int8_matmul's kernel uses it too.

`decode_attention` picks (IMPLEMENTATIONS): "auto" is the kernel on one GPU for 16-bit caches and the definition
elsewhere (a float32 dot in Triton runs in TF32, below the definition's precision; on several devices see
`kernel_applies`); "pallas", "interpret" and "reference" force one.  A model's attention layers carry their choice
(`Attention.decode_attention`, set by `layers.with_decode_attention`), so it is part of every compiled program's
key.  BENCHMARKS.md, "Fused projections and the decode-attention kernel", has its speed and accuracy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "pallas", "interpret", "reference")

# key/value slots per kernel loop step: a [64, head_dim] tile of each, and the granularity at which slots past the
# query (and before a sliding window) are skipped
DECODE_BLOCK_SLOTS = 64
DECODE_NUM_WARPS, DECODE_NUM_STAGES = 4, 2  # Triton's warps per program and pipelining depth
_MIN_DOT_ROWS = 16  # Triton's smallest dot tile: a KV head's G query heads are read as at least this many rows


def attention_mask(q_index: Array, kv_valid: Array, window: int | None) -> Array:
    """Boolean mask [B, 1, T, S]: causal by cache index, key padding, optional sliding window.

    q_index [B, T] is each query's index in key coordinates (its slot in the cache); keys are
    slots 0..S-1.  A key is visible when it is valid, not in the future, and (sliding layers)
    fewer than `window` slots back, which matches HF's `kv_idx > q_idx - window`.
    """
    k_index = jnp.arange(kv_valid.shape[1])[None, None, :]
    q = q_index[:, :, None]
    mask = (k_index <= q) & kv_valid[:, None, :]
    if window is not None:
        mask = mask & (q - k_index < window)
    return mask[:, None, :, :]


def grouped_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """Softmax attention with GQA (query heads grouped over KV heads), float32 softmax.

    q [B, T, N, H]; k, v [B, K, S, H]; mask [B, 1, T, S].
    """
    b, t, n, h = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _decode_kernel(layer_ref, q_index_ref, q_ref, k_ref, v_ref, valid_ref, out_ref, *, scale: float,
                   window: int | None, block: int, slots: int, groups: int, rows: int):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    layer, query = layer_ref[0], q_index_ref[0]
    # keys at slots lo..query can be visible (causal; a sliding window sees fewer than `window` slots back)
    lo = jnp.int32(0) if window is None else jnp.maximum(query - window + 1, 0)
    # this KV head's G query heads, read straight from q [N, H] as `rows` rows (the rows past G masked to zero)
    heads = pl.ds(pl.program_id(1) * groups, rows)
    own = (jnp.arange(rows) < groups)[:, None]
    q = plgpu.load(q_ref.at[heads, :], mask=own, other=0.0)
    offsets = jnp.arange(block, dtype=jnp.int32)
    floor = jnp.float32(jnp.finfo(jnp.float32).min)

    def step(i, carry):
        acc, running_max, running_sum = carry
        at = i * block + offsets
        inside = at < slots  # the last block may run past the cache
        span = pl.ds(i * block, block)
        keys = plgpu.load(k_ref.at[layer, span, :], mask=inside[:, None], other=0.0)
        values = plgpu.load(v_ref.at[layer, span, :], mask=inside[:, None], other=0.0)
        valid = plgpu.load(valid_ref.at[span], mask=inside, other=0)
        visible = (valid != 0) & (at >= lo) & (at <= query)
        logits = plgpu.dot(q, keys, trans_b=True) * scale  # [rows, block], float32
        logits = jnp.where(visible[None, :], logits, floor)
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        weights = jnp.where(visible[None, :], jnp.exp(logits - new_max[:, None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        acc = acc * rescale[:, None] + plgpu.dot(weights.astype(values.dtype), values)
        return acc, new_max, running_sum * rescale + weights.sum(axis=1)

    head_dim = q.shape[1]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), floor, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, total = jax.lax.fori_loop(lo // block, pl.cdiv(query + 1, block), step, init)
    plgpu.store(out_ref.at[heads, :], (acc / jnp.maximum(total, 1e-30)[:, None]).astype(out_ref.dtype), mask=own)


@functools.partial(jax.jit, static_argnames=("scale", "window", "block", "num_warps", "num_stages", "interpret"))
def decode_attention_pallas(q: Array, k: Array, v: Array, q_index: Array, kv_valid: Array, layer: Array | int = 0,
                            *, scale: float, window: int | None = None, block: int = DECODE_BLOCK_SLOTS,
                            num_warps: int = DECODE_NUM_WARPS, num_stages: int = DECODE_NUM_STAGES,
                            interpret: bool = False) -> Array:
    """The kernel: one query per row, q [B, 1, N, H], over a cache k, v [B, K, S, H] (or a scanned model's stack
    [L, B, K, S, H] with this layer's entry `layer`), the query at slot q_index [B, 1], keys valid where kv_valid
    [B, S]; -> [B, 1, N, H] in q's dtype.  A row that sees no key gets zeros (the definition's softmax over no
    key is uniform over all of them; a decode step always sees its own)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if k.ndim == 4:
        k, v = k[None], v[None]
    b, t, n, h = q.shape
    _, kb, kv_heads, slots, kh = k.shape
    if t != 1 or kb != b or kh != h or n % kv_heads or v.shape != k.shape or kv_valid.shape != (b, slots):
        raise ValueError(f"decode_attention: q [B, 1, N, H], k and v [L, B, K, S, H] and kv_valid [B, S] expected, "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}, kv_valid {kv_valid.shape}")
    groups = n // kv_heads
    kernel = functools.partial(_decode_kernel, scale=float(scale), window=window, block=block, slots=slots,
                               groups=groups, rows=max(_MIN_DOT_ROWS, 1 << (groups - 1).bit_length()))
    cache_block = pl.BlockSpec((k.shape[0], None, None, slots, h), lambda i, j: (0, i, j, 0, 0))
    heads_block = pl.BlockSpec((None, None, n, h), lambda i, j: (i, 0, 0, 0))  # every head: each program reads its G
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, kv_heads),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), pl.BlockSpec((None, 1), lambda i, j: (i, 0)),
                  heads_block, cache_block, cache_block, pl.BlockSpec((None, slots), lambda i, j: (i, 0))],
        out_specs=heads_block,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(jnp.asarray(layer, jnp.int32).reshape(1), q_index.astype(jnp.int32), q, k, v, kv_valid.astype(jnp.int32))


def kernel_applies(q_dtype, cache_dtype) -> bool:
    """Whether "auto" runs the kernel: on one GPU, for 16-bit queries and cache.  The kernel has no partitioning
    rule, so XLA would gather a cache spread over several devices onto each of them; there "auto" keeps the
    definition, and forcing the kernel is refused before a run starts (pipeline.context)."""
    sixteen_bit = jnp.dtype(q_dtype).itemsize == 2 and jnp.dtype(cache_dtype).itemsize == 2
    return jax.default_backend() == "gpu" and jax.device_count() == 1 and sixteen_bit


def decode_attention(q: Array, k: Array, v: Array, q_index: Array, kv_valid: Array, layer: Array | int | None = None,
                     *, scale: float, window: int | None = None, implementation: str = "auto") -> Array:
    """One decode step's attention (q [B, 1, N, H]) over the cache k, v [B, K, S, H], or entry `layer` of a
    stacked cache [L, B, K, S, H]; `implementation` as IMPLEMENTATIONS says."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"decode_attention: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        implementation = "pallas" if kernel_applies(q.dtype, k.dtype) else "reference"
    if implementation == "reference":
        if layer is not None:
            k = jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
        return grouped_attention(q, k, v, attention_mask(q_index, kv_valid, window), scale)
    return decode_attention_pallas(q, k, v, q_index, kv_valid, 0 if layer is None else layer, scale=scale,
                                   window=window, interpret=implementation == "interpret")
