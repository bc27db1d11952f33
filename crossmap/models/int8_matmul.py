"""Weight-only int8 matrix products: x [M, K] (bf16/f16/f32) times int8 weights [K, N] with one
float32 scale per output column, out[m, n] = scale[n] * sum_k x[m, k] * w[k, n].

Two implementations of that one function:
- `int8_matmul_reference`: XLA; the weights are converted to x's dtype and multiplied, the scale
  applied to the product.  The definition, and what runs on backends without the kernel (CPU).
- `int8_matmul_pallas`: a Pallas kernel (Triton lowering, GPU) that converts each weight tile
  after loading it, so only the int8 bytes cross memory.  XLA, given the reference, mostly writes
  the converted weights out in full before its matmul reads them back (it fused the conversion for
  some shapes at few rows); a decode step reads every weight once, so the bytes read are its cost.
  The kernel does not yet read at the bytes floor, nor beat bf16 (BENCHMARKS.md, "Weight-only int8").
  The grid splits the output columns into blocks and, for wide K and narrow N (the down and output
  projections), K into `splits` slices whose float32 partial products are summed afterwards: enough
  programs to keep every multiprocessor streaming.  With `swap` a program computes the transposed
  product, w_tileᵀ @ x_tileᵀ: the converted weight tile becomes the left operand, which Hopper's
  tensor-core instruction (wgmma) may take from registers, where a right operand must sit in shared
  memory (so the plain order converts the tile and stores it back before the product).  It also puts
  the weight's columns on the instruction's 64-row side and the few rows of x on its narrow side.  On an
  H100 it measured slower than the plain order at every tiling swept, so no default uses it; it stays
  for `crossmap bench int8-matmul --sweep-orders`.  With `interpret=True` the same kernel runs on the
  CPU, which is how the tests compare it with the reference.

`int8_matmul` picks: the kernel on GPU for up to KERNEL_MAX_ROWS rows (decode steps), the reference
for more rows (prefill, bound by compute) and on other backends; `implementation=` forces one,
"interpret" being the kernel run by the Pallas interpreter.  A quantized model carries its choice
(`models.quantize.quantized(..., implementation=)`), so it is part of every compiled program's key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "pallas", "interpret", "reference")


def int8_matmul_reference(x: Array, w: Array, scale: Array, *, out_dtype=None) -> Array:
    """x [M, K] @ int8 w [K, N], times scale [N] per column, accumulated in float32; the result in
    `out_dtype` (default x's dtype)."""
    product = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (product * scale.astype(jnp.float32)).astype(out_dtype or x.dtype)


# The kernel serves decode steps (a few hundred rows at most, bound by reading the weights); above this many
# rows (a prefill) the product is bound by compute and "auto" takes the reference, whose one conversion of the
# weights is small beside the matmul.
KERNEL_MAX_ROWS = 256


@dataclass(frozen=True)
class KernelBlocks:
    """Tiling of one kernel launch: output columns per program, K per loop step, K slices (split-K),
    Triton's warps per program and pipelining depth, rows per program (0: all rows, up to 128), and whether
    a program multiplies in the transposed order (module docstring)."""

    block_n: int
    block_k: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    block_m: int = 0
    swap: bool = False


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def default_blocks(m: int, k: int, n: int, multiprocessors: int = 132) -> KernelBlocks:
    """A tiling for x [m, k] @ w [k, n], from `crossmap bench int8-matmul --sweep` on an H200 at the 7B's
    decode shapes (BENCHMARKS.md).  64-deep K steps and 4 warps won at every shape.  At 128 rows the fastest
    ran about 1.7 programs a multiprocessor, from 128- or 64-column blocks and split-K for narrow N; at 32
    rows, 128-column blocks split over K until about 3.4 programs a multiprocessor (at most 8 slices).

    Raises ValueError when n or k is not a multiple of 16 (Triton's smallest dot tile)."""
    if n % 16 or k % 16:
        raise ValueError(f"the int8 kernel needs K and N multiples of 16, got K={k}, N={n}")
    block_k = _largest_divisor(k, (64, 32, 16))
    if m <= 64:
        target, max_splits = int(3.4 * multiprocessors), 8
        block_n = next(c for c in (128, 64, 32, 16) if n % c == 0)
    else:
        target, max_splits = int(1.7 * multiprocessors), k
        wide = [c for c in (128, 64) if n % c == 0 and n // c >= target]
        block_n = wide[0] if wide else next(c for c in ((128, 64, 32, 16) if k >= 8192 else (64, 32, 16))
                                            if n % c == 0)
    splits = 1
    while ((n // block_n) * splits < target and splits * 2 <= max_splits and k % (splits * 2 * block_k) == 0
           and k // (splits * 2) >= 256):
        splits *= 2
    return KernelBlocks(block_n=block_n, block_k=block_k, splits=splits, num_warps=4)


def _kernel(x_ref, w_ref, scale_ref, out_ref, *, block_k: int, steps: int, scaled: bool, swap: bool):
    from jax.experimental import pallas as pl

    rows, cols = x_ref.shape[0], w_ref.shape[1]
    # swapped, the accumulator is the product's transpose, [cols, rows]: w_tile [k, cols] contracted on its
    # first axis with x_tile [rows, k] on its second
    acc = jnp.zeros((cols, rows) if swap else (rows, cols), jnp.float32)
    contract = (((0,), (1,)), ((), ())) if swap else (((1,), (0,)), ((), ()))

    def step(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[pl.ds(i * block_k, block_k), :].astype(x.dtype)  # converted after the load
        a, b = (w, x) if swap else (x, w)
        return acc + jax.lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, acc)
    if swap:
        acc = acc.T
    if scaled:
        out_ref[...] = (acc * scale_ref[...][None, :]).astype(out_ref.dtype)
    else:
        out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "interpret"))
def int8_matmul_pallas(x: Array, w: Array, scale: Array, *, out_dtype=None, blocks: KernelBlocks | None = None,
                       interpret: bool = False) -> Array:
    """The kernel: x [M, K] @ int8 w [K, N] * scale [N], in `out_dtype` (default x's dtype).  M is
    padded here to whole row blocks; K and N must be multiples of 16 (`default_blocks`)."""
    # Pallas is imported here, not with crossmap.models: only a run that multiplies int8 weights pays for it
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    if w.ndim != 2 or w.shape[0] != k or w.dtype != jnp.int8 or scale.shape != (w.shape[1],):
        raise ValueError(f"int8_matmul: x {x.shape} needs int8 w [{k}, N] and scale [N], got w {w.shape} "
                         f"{w.dtype}, scale {scale.shape}")
    n = w.shape[1]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    blocks = blocks or default_blocks(m, k, n)
    # rows per program: all of them (padded to 16, Triton's smallest tile) up to 128, else blocks of 128;
    # each block of rows reads the weights once more
    block_m = blocks.block_m or min(128, max(16, -(-m // 16) * 16))
    padded_m = -(-m // block_m) * block_m
    if padded_m != m:
        x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    k_slice = k // blocks.splits
    if k % blocks.splits or k_slice % blocks.block_k or n % blocks.block_n:
        raise ValueError(f"int8_matmul: blocks {blocks} do not tile K={k}, N={n}")
    scaled = blocks.splits == 1  # one slice: scale and cast in the kernel; else sum the partials first
    kernel = functools.partial(_kernel, block_k=blocks.block_k, steps=k_slice // blocks.block_k, scaled=scaled,
                               swap=blocks.swap)
    if scaled:
        out_shape = jax.ShapeDtypeStruct((padded_m, n), out_dtype)
        out_spec = pl.BlockSpec((block_m, blocks.block_n), lambda j, s, r: (r, j))
    else:
        out_shape = jax.ShapeDtypeStruct((blocks.splits, padded_m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, block_m, blocks.block_n), lambda j, s, r: (s, r, j))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        # row blocks innermost: programs that share a weight tile run close together (it stays in L2)
        grid=(n // blocks.block_n, blocks.splits, padded_m // block_m),
        in_specs=[pl.BlockSpec((block_m, k_slice), lambda j, s, r: (r, s)),
                  pl.BlockSpec((k_slice, blocks.block_n), lambda j, s, r: (s, j)),
                  pl.BlockSpec((blocks.block_n,), lambda j, s, r: (j,))],
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                                        num_stages=blocks.num_stages),
    )(x, w, scale.astype(jnp.float32))
    if not scaled:
        out = (out.sum(axis=0) * scale.astype(jnp.float32)).astype(out_dtype)
    return out[:m]


def int8_matmul(x: Array, w: Array, scale: Array, *, out_dtype=None, implementation: str = "auto") -> Array:
    """x [..., K] @ int8 w [K, N] * scale [N] -> [..., N] in `out_dtype` (default x's dtype).

    implementation: "auto" (the Pallas kernel on GPU up to KERNEL_MAX_ROWS rows, else the reference), "pallas",
    "interpret" (the kernel on the Pallas interpreter), "reference".
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"int8_matmul: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    use_kernel = implementation in ("pallas", "interpret") or (
        implementation == "auto" and jax.default_backend() == "gpu" and x2.shape[0] <= KERNEL_MAX_ROWS)
    if use_kernel:
        out = int8_matmul_pallas(x2, w, scale, out_dtype=out_dtype, interpret=implementation == "interpret")
    else:
        out = int8_matmul_reference(x2, w, scale, out_dtype=out_dtype)
    return out.reshape(*lead, w.shape[1])
