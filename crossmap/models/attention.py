"""Attention arithmetic shared by the layers: the mask, grouped-query softmax attention, and the one-token decode
step's attention as a Pallas kernel.

`grouped_attention` with `attention_mask` is the definition: explicit logits [B, K, G, T, S] in float32, a float32
softmax, then the probabilities (in the values' dtype) times the values.  A decode step (T = 1) through it runs two
batched products with G (7 at the Qwen2.5-7B shape) rows per KV head, padded by XLA to the tensor cores' 8 or 16, plus
pad, mask and softmax kernels, and reads every slot of the preallocated cache, the future ones too.

`decode_attention_pallas` is that step's attention as one kernel (Triton lowering, GPU): a program per (row, KV head)
streams its key and value slots in blocks of `DECODE_BLOCK_SLOTS`, from the first slot the sliding window can see to
the query's own slot only, with an online softmax (running max and sum in float32), so the cache is read once and only
where a key can be visible.  It reads its G query heads as 16 rows (Triton's smallest dot tile), the rows past G
masked.  `decode_step_attention` is the same kernel with the step's prologue: it reads the q/k/v projections' output
in place, adds the biases, applies the q/k norms and the rotation, and writes this step's key and value into the
cache (aliased, so in place), where XLA ran one fusion and two dynamic-update-slices a layer.  With `interpret=True`
either runs on the CPU, which is how the tests compare them with the definition.  JAX marks the Pallas Triton backend
deprecated in favour of Mosaic GPU; int8_matmul's kernel uses it too.

A model's attention layers carry their choice (IMPLEMENTATIONS; `Attention.decode_attention`, set by
`layers.with_decode_attention`), so it is part of every compiled program's key: "auto" is "pallas" on one GPU for
16-bit caches and the definition elsewhere (a float32 dot in Triton runs in TF32, below the definition's precision;
on several devices see `kernel_applies`); "pallas" is the attention-only kernel (XLA adds the biases, rotates and
writes the cache), "pallas-step" the whole step in the kernel (measured no faster, so not the default), "interpret"
and "interpret-step" the same two on the Pallas interpreter, "reference" the definition.  BENCHMARKS.md, "Fused
projections and the decode-attention kernel" and "The step's prologue in the kernel", has their speed and accuracy.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "pallas", "pallas-step", "interpret", "interpret-step", "reference")
KERNELS = ("pallas", "pallas-step", "interpret", "interpret-step")  # the choices that run a Pallas kernel
STEP_KERNELS = ("pallas-step", "interpret-step")  # the choices that run the whole step in the kernel

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


class StepHeads(NamedTuple):
    """Where one kind of head (query, key or value) of a decode step lies in a projection's output, before its bias,
    norm and rotation: head g of KV head j's group is row `offset + stride * j + g` of `rows` [B, R, H], and row r's
    bias (if any) is row r of `bias` [R, H].  Separate projections give q [B, N, H] (stride G) and k, v [B, K, H]
    (stride 1); a fused one gives its [B, K * (G + 2), H] output three times, with strides G + 2 and offsets 0, G
    and G + 1, so the kernel reads the product in place and no slicing kernel runs."""
    rows: Array
    bias: Array | None
    stride: int
    offset: int


class HeadNorm(NamedTuple):
    """RMSNorm over each head's H features before rotation (Gemma 3's q/k norms), as layers.RMSNorm computes it."""
    q_weight: Array
    k_weight: Array
    eps: float
    plus_one: bool


class _Prologue(NamedTuple):
    """The static part of a step kernel's inputs: each StepHeads' stride and offset, whether biases and norms come,
    and the projections' dtype (every rounding the XLA path makes is made to it)."""
    layout: tuple[int, int, int, int, int, int]
    bias: bool
    norm: tuple[float, bool] | None
    dtype: str


def _prepare(lo: Array, hi: Array, bias, norm, rope, dtype) -> tuple[Array, Array]:
    """Bias, norm and rotation of heads given as float32 halves [n, H/2] of their features, each rounded to `dtype`
    where the XLA path rounds (layers: _add_bias, RMSNorm, apply_rope).  The halves make rotate_half a swap, with no
    concatenation (which Triton lacks)."""
    def rounded(a):
        return a.astype(dtype).astype(jnp.float32)

    if bias is not None:
        lo, hi = rounded(lo + bias[0]), rounded(hi + bias[1])
    if norm is not None:
        (w_lo, w_hi), eps, plus_one = norm
        mean_square = ((lo * lo).sum(axis=1) + (hi * hi).sum(axis=1)) / (2 * lo.shape[1])
        inverse = jax.lax.rsqrt(mean_square + eps)[:, None]
        if plus_one:  # Gemma: scaled in float32, rounded once
            lo, hi = rounded(lo * inverse * (1.0 + w_lo)), rounded(hi * inverse * (1.0 + w_hi))
        else:  # Llama/Qwen: rounded, then scaled by the (already rounded) weight and rounded again
            lo, hi = rounded(rounded(lo * inverse) * w_lo), rounded(rounded(hi * inverse) * w_hi)
    if rope is not None:
        cos_lo, cos_hi, sin_lo, sin_hi = (rounded(t) for t in rope)
        lo, hi = rounded(lo * cos_lo - hi * sin_lo), rounded(hi * cos_hi + lo * sin_hi)
    return lo, hi


def _decode_kernel(*refs, scale: float, window: int | None, block: int, slots: int, groups: int, rows: int,
                   half: int, prologue: _Prologue | None):
    """One (row, KV head) program.  Without a prologue (attention only): refs are layer, q_index, q [N, H], the
    caches' [L, S, H], valid [S] and out [N, H], and this step's key and value are already in the cache.  With one
    (the whole step): layer, q_index, cos [H], sin [H], the three StepHeads' rows [R, H], their biases and the norm
    weights if any, the caches, valid, then out and the caches again (aliased: this step's slot is written in
    place).  Queries and keys are handled as two halves of their features (see _prepare); the logits are the sum of
    the halves' products."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    refs = list(refs)
    layer_ref, q_index_ref = refs.pop(0), refs.pop(0)
    layer, query, kv_head = layer_ref[0], q_index_ref[0], pl.program_id(1)
    lo_part, hi_part = pl.ds(0, half), pl.ds(half, half)
    own = (jnp.arange(rows) < groups)[:, None]  # the `rows` rows read for a group of G query heads: the first G

    def halves(ref, index, mask=None):
        fill = {} if mask is None else {"mask": mask, "other": 0.0}  # Triton takes a fill value only with a mask
        return tuple(plgpu.load(ref.at[(*index, part)], **fill).astype(jnp.float32) for part in (lo_part, hi_part))

    new = None
    if prologue is None:
        q_ref, k_ref, v_ref, valid_ref, out_ref = refs
        q_lo, q_hi = halves(q_ref, (pl.ds(kv_head * groups, rows),), own)
    else:
        (q_stride, q_offset, k_stride, k_offset, v_stride, v_offset), dtype = prologue.layout, prologue.dtype
        cos_ref, sin_ref, q_src, k_src, v_src = refs[:5]
        refs = refs[5:]
        biases = [None] * 3
        if prologue.bias:
            biases, refs = refs[:3], refs[3:]
        norms = [None, None]
        if prologue.norm is not None:
            eps, plus_one = prologue.norm
            norms = [(tuple(w[None, :] for w in halves(ref, ())), eps, plus_one) for ref in refs[:2]]
            refs = refs[2:]
        k_ref, v_ref, valid_ref, out_ref, k_out, v_out = refs
        rope = (*(t[None, :] for t in halves(cos_ref, ())), *(t[None, :] for t in halves(sin_ref, ())))

        def two_halves(src, bias, start, count, mask=None):
            index = (pl.ds(start, count),)
            return halves(src, index, mask), None if bias is None else halves(bias, index, mask)

        (q_lo, q_hi), q_bias = two_halves(q_src, biases[0], q_offset + q_stride * kv_head, rows, own)
        q_lo, q_hi = _prepare(q_lo, q_hi, q_bias, norms[0], rope, dtype)
        (k_lo, k_hi), k_bias = two_halves(k_src, biases[1], k_offset + k_stride * kv_head, 1)
        k_lo, k_hi = _prepare(k_lo, k_hi, k_bias, norms[1], rope, dtype)
        v_row = (pl.ds(v_offset + v_stride * kv_head, 1), slice(None))
        value = plgpu.load(v_src.at[v_row]).astype(jnp.float32)
        if prologue.bias:
            value = value + plgpu.load(biases[2].at[v_row]).astype(jnp.float32)
        # this step's key and value as the cache holds them: written to its slot, and used in place of whatever this
        # program's own read of that slot returns (the write need not be visible to its loads yet)
        new = tuple(a.astype(k_out.dtype) for a in (k_lo, k_hi, value.astype(dtype)))
        slot = pl.ds(query, 1)
        plgpu.store(k_out.at[layer, slot, lo_part], new[0])
        plgpu.store(k_out.at[layer, slot, hi_part], new[1])
        plgpu.store(v_out.at[layer, slot, :], new[2])
    cache_dtype = k_ref.dtype
    q_lo, q_hi = q_lo.astype(cache_dtype), q_hi.astype(cache_dtype)
    # keys at slots first..query can be visible (causal; a sliding window sees fewer than `window` slots back)
    first = jnp.int32(0) if window is None else jnp.maximum(query - window + 1, 0)
    offsets = jnp.arange(block, dtype=jnp.int32)
    floor = jnp.float32(jnp.finfo(jnp.float32).min)

    def step(i, carry):
        acc, running_max, running_sum = carry
        at = i * block + offsets
        inside = (at < slots)[:, None]  # the last block may run past the cache
        span = pl.ds(i * block, block)
        tiles = [plgpu.load(k_ref.at[layer, span, lo_part], mask=inside, other=0.0),
                 plgpu.load(k_ref.at[layer, span, hi_part], mask=inside, other=0.0),
                 plgpu.load(v_ref.at[layer, span, :], mask=inside, other=0.0)]
        if new is not None:
            mine = (at == query)[:, None]
            tiles = [jnp.where(mine, fresh, tile) for fresh, tile in zip(new, tiles, strict=True)]
        keys_lo, keys_hi, values = tiles
        valid = plgpu.load(valid_ref.at[span], mask=at < slots, other=0)
        visible = (valid != 0) & (at >= first) & (at <= query)
        logits = (plgpu.dot(q_lo, keys_lo, trans_b=True) + plgpu.dot(q_hi, keys_hi, trans_b=True)) * scale
        logits = jnp.where(visible[None, :], logits, floor)  # [rows, block], float32
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        weights = jnp.where(visible[None, :], jnp.exp(logits - new_max[:, None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        acc = acc * rescale[:, None] + plgpu.dot(weights.astype(values.dtype), values)
        return acc, new_max, running_sum * rescale + weights.sum(axis=1)

    init = (jnp.zeros((rows, 2 * half), jnp.float32), jnp.full((rows,), floor, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, total = jax.lax.fori_loop(first // block, pl.cdiv(query + 1, block), step, init)
    plgpu.store(out_ref.at[pl.ds(kv_head * groups, rows), :],
                (acc / jnp.maximum(total, 1e-30)[:, None]).astype(out_ref.dtype), mask=own)


def _grid_specs(b: int, n: int, h: int, stack: int, slots: int):
    from jax.experimental import pallas as pl

    scalar = pl.BlockSpec((1,), lambda i, j: (0,))
    q_index = pl.BlockSpec((None, 1), lambda i, j: (i, 0))
    cache = pl.BlockSpec((stack, None, None, slots, h), lambda i, j: (0, i, j, 0, 0))
    valid = pl.BlockSpec((None, slots), lambda i, j: (i, 0))
    heads_out = pl.BlockSpec((None, n, h), lambda i, j: (i, 0, 0))  # every head: each program writes its G
    return scalar, q_index, cache, valid, heads_out


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows_for(groups: int) -> int:
    return max(_MIN_DOT_ROWS, 1 << (groups - 1).bit_length())


def _stacked(k: Array, v: Array) -> tuple[Array, Array]:
    return (k[None], v[None]) if k.ndim == 4 else (k, v)


@functools.partial(jax.jit, static_argnames=("scale", "window", "block", "num_warps", "num_stages", "interpret"))
def decode_attention_pallas(q: Array, k: Array, v: Array, q_index: Array, kv_valid: Array, layer: Array | int = 0,
                            *, scale: float, window: int | None = None, block: int = DECODE_BLOCK_SLOTS,
                            num_warps: int = DECODE_NUM_WARPS, num_stages: int = DECODE_NUM_STAGES,
                            interpret: bool = False) -> Array:
    """The attention-only kernel: one query per row, q [B, 1, N, H], over a cache k, v [B, K, S, H] (or a scanned
    model's stack [L, B, K, S, H] with this layer's entry `layer`) that already holds this step's key and value, the
    query at slot q_index [B, 1], keys valid where kv_valid [B, S]; -> [B, 1, N, H] in q's dtype.  A row that sees no
    key gets zeros (the definition's softmax over no key is uniform over all of them; a decode step always sees its
    own)."""
    from jax.experimental import pallas as pl

    k, v = _stacked(k, v)
    b, t, n, h = q.shape
    stack, kb, kv_heads, slots, kh = k.shape
    if t != 1 or kb != b or kh != h or n % kv_heads or v.shape != k.shape or kv_valid.shape != (b, slots):
        raise ValueError(f"decode_attention: q [B, 1, N, H], k and v [L, B, K, S, H] and kv_valid [B, S] expected, "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}, kv_valid {kv_valid.shape}")
    groups = n // kv_heads
    kernel = functools.partial(_decode_kernel, scale=float(scale), window=window, block=block, slots=slots,
                               groups=groups, rows=_rows_for(groups), half=h // 2, prologue=None)
    scalar, q_spec, cache, valid, heads = _grid_specs(b, n, h, stack, slots)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, n, h), q.dtype), grid=(b, kv_heads),
        in_specs=[scalar, q_spec, heads, cache, cache, valid], out_specs=heads, interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
    )(jnp.asarray(layer, jnp.int32).reshape(1), q_index.astype(jnp.int32), q.reshape(b, n, h), k, v,
      kv_valid.astype(jnp.int32))
    return out.reshape(q.shape)


def _check_heads(name: str, heads: StepHeads, b: int, kv_heads: int, count: int, h: int) -> None:
    rows = heads.rows.shape
    last = heads.offset + heads.stride * (kv_heads - 1) + count
    if len(rows) != 3 or rows[0] != b or rows[2] != h or heads.offset < 0 or heads.stride < count or last > rows[1]:
        raise ValueError(f"decode_step_attention: {name} heads: rows [B={b}, R, H={h}] holding {kv_heads} groups of "
                         f"{count} at stride {heads.stride} from row {heads.offset} expected, got rows {rows}")
    if heads.bias is not None and heads.bias.shape != rows[1:]:
        raise ValueError(f"decode_step_attention: {name} bias {heads.bias.shape} is not one row per row {rows[1:]}")


def decode_step_attention(q: StepHeads, k: StepHeads, v: StepHeads, cos: Array, sin: Array, norm: HeadNorm | None,
                          cache: tuple[Array, Array], q_index: Array, kv_valid: Array, layer: Array | int | None = None,
                          *, groups: int, scale: float, window: int | None = None, block: int = DECODE_BLOCK_SLOTS,
                          num_warps: int = DECODE_NUM_WARPS, num_stages: int = DECODE_NUM_STAGES,
                          interpret: bool = False) -> tuple[Array, tuple[Array, Array]]:
    """A decode step's attention from its projections' outputs, in one kernel: each query, key and value head gets
    its bias, norm (q and k) and rotation by cos, sin [B, H] (rope_tables' layout), this step's key and value are
    written into the cache at slot q_index [B, 1] (in place: the cache is aliased to the result), and the `groups`
    query heads of each KV head attend over it.  `cache` is (k, v) [B, K, S, H], or a scanned model's stack
    [L, B, K, S, H] with this layer's entry `layer`.  Returns (attention [B, 1, K * groups, H] in the projections'
    dtype, the updated cache).

    Per layer and step it replaces the XLA kernels that add the bias, norm and rotate (one fusion) and write the key
    and the value into the cache (two dynamic-update-slices).  Not jitted itself: the StepHeads' strides and offsets
    are Python ints that shape the kernel (call it inside a jitted function)."""
    from jax.experimental import pallas as pl

    if len({heads.bias is None for heads in (q, k, v)}) != 1:
        raise ValueError("decode_step_attention: q, k and v come with biases or none do")
    k_cache, v_cache = cache
    unstacked = k_cache.ndim == 4
    k_cache, v_cache = _stacked(k_cache, v_cache)
    stack, b, kv_heads, slots, h = k_cache.shape
    if v_cache.shape != k_cache.shape or kv_valid.shape != (b, slots) or cos.shape != (b, h) or sin.shape != (b, h):
        raise ValueError(f"decode_step_attention: caches [L, B, K, S, H], kv_valid [B, S] and cos, sin [B, H] "
                         f"expected, got {k_cache.shape}, {v_cache.shape}, {kv_valid.shape}, {cos.shape}, {sin.shape}")
    if h % 2:
        raise ValueError(f"decode_step_attention: head_dim {h} is odd; rotation needs two halves")
    for name, heads, count in (("q", q, groups), ("k", k, 1), ("v", v, 1)):
        _check_heads(name, heads, b, kv_heads, count, h)
    n = kv_heads * groups
    prologue = _Prologue((q.stride, q.offset, k.stride, k.offset, v.stride, v.offset), q.bias is not None,
                         None if norm is None else (float(norm.eps), bool(norm.plus_one)),
                         jnp.dtype(q.rows.dtype).name)
    kernel = functools.partial(_decode_kernel, scale=float(scale), window=window, block=block, slots=slots,
                               groups=groups, rows=_rows_for(groups), half=h // 2, prologue=prologue)
    scalar, q_spec, cache_spec, valid, heads_out = _grid_specs(b, n, h, stack, slots)
    table = pl.BlockSpec((None, h), lambda i, j: (i, 0))
    inputs = [jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1), q_index.astype(jnp.int32),
              cos.astype(jnp.float32), sin.astype(jnp.float32)]
    specs = [scalar, q_spec, table, table]
    for heads in (q, k, v):
        inputs.append(heads.rows)
        specs.append(pl.BlockSpec((None, *heads.rows.shape[1:]), lambda i, j: (i, 0, 0)))
    if q.bias is not None:
        for heads in (q, k, v):
            inputs.append(heads.bias)
            specs.append(pl.BlockSpec(heads.bias.shape, lambda i, j: (0, 0)))
    if norm is not None:
        for weight in (norm.q_weight, norm.k_weight):
            if weight.shape != (h,):
                raise ValueError(f"decode_step_attention: norm weights [H={h}] expected, got {weight.shape}")
            inputs.append(weight)
            specs.append(pl.BlockSpec((h,), lambda i, j: (0,)))
    cache_at = len(inputs)
    inputs += [k_cache, v_cache, kv_valid.astype(jnp.int32)]
    specs += [cache_spec, cache_spec, valid]
    out, k_cache, v_cache = pl.pallas_call(
        kernel, grid=(b, kv_heads), in_specs=specs, out_specs=[heads_out, cache_spec, cache_spec],
        out_shape=[jax.ShapeDtypeStruct((b, n, h), q.rows.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={cache_at: 1, cache_at + 1: 2}, interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
    )(*inputs)
    if unstacked:
        k_cache, v_cache = k_cache[0], v_cache[0]
    return out.reshape(b, 1, n, h), (k_cache, v_cache)


def kernel_applies(q_dtype, cache_dtype, head_dim: int) -> bool:
    """Whether "auto" runs a kernel: on one GPU, for 16-bit queries and cache, and heads whose halves are Triton dot
    operands (a power of two, at least 16 features).  The kernels have no partitioning rule, so XLA would gather a
    cache spread over several devices onto each of them; there "auto" keeps the definition, and forcing a kernel is
    refused before a run starts (pipeline.context)."""
    sixteen_bit = jnp.dtype(q_dtype).itemsize == 2 and jnp.dtype(cache_dtype).itemsize == 2
    half = head_dim // 2
    dot_sized = head_dim % 2 == 0 and half >= 16 and half & (half - 1) == 0
    return jax.default_backend() == "gpu" and jax.device_count() == 1 and sixteen_bit and dot_sized


def resolve(implementation: str, q_dtype, cache_dtype, head_dim: int) -> str:
    """`implementation` with "auto" made concrete ("pallas" or "reference"); an unknown one refused."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"decode attention: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        return "pallas" if kernel_applies(q_dtype, cache_dtype, head_dim) else "reference"
    return implementation


def decode_attention(q: Array, k: Array, v: Array, q_index: Array, kv_valid: Array, layer: Array | int | None = None,
                     *, scale: float, window: int | None = None, implementation: str = "auto") -> Array:
    """One decode step's attention (q [B, 1, N, H], rotated) over the cache k, v [B, K, S, H], or entry `layer` of a
    stacked cache [L, B, K, S, H], that holds this step's key and value already: the XLA definition, or the
    attention-only kernel for any other choice (IMPLEMENTATIONS; a layer sends "pallas-step" and "interpret-step" to
    decode_step_attention instead)."""
    implementation = resolve(implementation, q.dtype, k.dtype, q.shape[-1])
    if implementation == "reference":
        if layer is not None:
            k = jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
        return grouped_attention(q, k, v, attention_mask(q_index, kv_valid, window), scale)
    return decode_attention_pallas(q, k, v, q_index, kv_valid, 0 if layer is None else layer, scale=scale,
                                   window=window, interpret=implementation.startswith("interpret"))
