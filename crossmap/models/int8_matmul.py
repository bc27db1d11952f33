"""Weight-only int8 matrix products: x [M, K] (bf16/f16/f32) times int8 weights [K, N] with one
float32 scale per output column, out[m, n] = scale[n] * sum_k x[m, k] * w[k, n].

Two implementations of that one function:
- `int8_matmul_reference`: XLA; the weights are converted to x's dtype and multiplied, the scale
  applied to the product.  The definition, and what runs on backends without the kernel (CPU).
- `int8_matmul_pallas`: a Pallas kernel (Triton lowering, GPU) that converts each weight tile
  after loading it, so only the int8 bytes cross memory.  XLA, given the reference, mostly writes
  the converted weights out in full before its matmul reads them back (it fused the conversion for
  some shapes at few rows); a decode step reads every weight once, so the bytes read are its cost.
  The kernel does not yet read at the bytes floor, nor beat bf16 (BENCHMARKS.md, "Weight-only int8"); the
  hardware counters put the cause in occupancy (registers at 32 rows, shared memory at 128), partial last waves,
  bank conflicts where the converted tile is stored for wgmma, and the split-K partials' traffic; x's loads add
  up to 14%, and the conversion is not the limit (BENCHMARKS.md, "Nsight Compute on single products").
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
  With `half` (implementation "pallas-f16") the kernel multiplies in float16: x enters prescaled as
  float16 and the int8 tile becomes float16 through integer and packed-half operations
  (`int8_as_float16`) rather than conversion instructions, of which Hopper runs 16 a cycle per
  multiprocessor (at the 7B's shapes, two conversions a weight would take about as long as reading the
  int8 bytes).  It measured slower than the plain kernel at batch 32 and 128, so the conversions do not
  look like what holds the kernel above its floor; no default uses it (BENCHMARKS.md, "JAX's Mosaic GPU
  kernels for the int8 products").

`int8_matmul` picks: the kernel on GPU for up to KERNEL_MAX_ROWS rows (decode steps), the reference
for more rows (prefill, bound by compute) and on other backends; `implementation=` forces one,
"interpret" being the kernel run by the Pallas interpreter.  A quantized model carries its choice
(`models.quantize.quantized(..., implementation=)`), so it is part of every compiled program's key.

"mosaic" (Hopper GPUs) also runs the wide products (at least OUTPUT_MAJOR_MIN_COLUMNS output columns: gate
and up, the LM head) through JAX's own mixed-type Hopper kernel, written in Pallas's Mosaic GPU dialect
(`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu`): TMA loads into a warp-specialised
pipeline, the int8 tile converted in registers and fed to wgmma as its left operand.  That kernel computes
int8 a [M, K] @ b [K, N], so the product runs transposed, (wᵀ @ xᵀ)ᵀ, over weights stored output-major,
wᵀ [N, K] (`quantize` stores them so for "mosaic"; `int8_matmul_output_major`), the scales and the
transpose back applied by XLA.  It has no split-K, so the narrow products (q/k/v, o, down) stay with the
Triton kernel (crossmap's own split-K Mosaic kernel, `models.int8_split_k`, did not beat it reproducibly).  On an
H100 it ran the 7B's wide products faster than the Triton kernel at batch 128 (a few percent off the int8 step,
still no faster than bf16) and tied at batch 32, so "auto" stays the Triton kernel
(BENCHMARKS.md, "JAX's Mosaic GPU kernels for the int8 products").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "pallas", "pallas-f16", "mosaic", "interpret", "reference")

# "mosaic" stores a kernel output-major, and runs it through the Mosaic GPU kernel, when it has at least this many
# output columns (enough 128-column tiles for every multiprocessor: the kernel does not split K) and its K and N are
# whole 128-element tiles
OUTPUT_MAJOR_MIN_COLUMNS = 16384
_MOSAIC_TILE = 128


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

    def rows_per_program(self, m: int) -> int:
        """Rows of x a program multiplies for an x of m rows: `block_m`, or by default all of them (padded to 16,
        Triton's smallest tile) up to 128, else blocks of 128; each block of rows reads the weights once more."""
        return self.block_m or min(128, max(16, -(-m // 16) * 16))


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


# The float16 conversion (`int8_matmul_pallas(..., half=True)`): x enters as float16 times HALF_PRESCALE (a power
# of two, so exact wherever float16 holds bf16's 8 significant bits: |x| from 2**-9 (about 2e-3) to 1.6e7; below,
# float16's subnormals round x by at most 2**-25 / HALF_PRESCALE (8e-6), far under the weights' own rounding; above,
# it overflows).
HALF_PRESCALE = 2.0 ** -8
# 1024 + 128 in float16: an int8 v as the low byte of float16 bits 0x6400 | (v + 128) reads 1024 + v + 128
_HALF_OFFSET = 1152.0


def int8_as_float16(w: Array) -> Array:
    """int8 values as float16, exactly, without a conversion instruction: v's byte, zero-extended to 16 bits and
    XORed with 0x6480 (0x6400 | 0x80: the bias of 128 flips the sign bit), is float16's 1024 + 128 + v; one float16
    subtraction leaves v.  (Hopper converts 16 values a cycle per multiprocessor; integer and packed-half
    operations run several times as many.  In the kernel it measured slower all the same: module docstring.)"""
    bits = jax.lax.bitcast_convert_type(w, jnp.uint8).astype(jnp.uint16) ^ jnp.uint16(0x6480)
    return jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(_HALF_OFFSET)


def _kernel(x_ref, w_ref, scale_ref, out_ref, *, block_k: int, steps: int, scaled: bool, swap: bool, half: bool):
    from jax.experimental import pallas as pl

    rows, cols = x_ref.shape[0], w_ref.shape[1]
    # swapped, the accumulator is the product's transpose, [cols, rows]: w_tile [k, cols] contracted on its
    # first axis with x_tile [rows, k] on its second
    acc = jnp.zeros((cols, rows) if swap else (rows, cols), jnp.float32)
    contract = (((0,), (1,)), ((), ())) if swap else (((1,), (0,)), ((), ()))

    def step(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[pl.ds(i * block_k, block_k), :]  # converted after the load
        w = int8_as_float16(w) if half else w.astype(x.dtype)
        a, b = (w, x) if swap else (x, w)
        return acc + jax.lax.dot_general(a, b, contract, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, acc)
    if swap:
        acc = acc.T
    if scaled:
        out_ref[...] = (acc * scale_ref[...][None, :]).astype(out_ref.dtype)
    else:
        out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "interpret", "half"))
def int8_matmul_pallas(x: Array, w: Array, scale: Array, *, out_dtype=None, blocks: KernelBlocks | None = None,
                       interpret: bool = False, half: bool = False) -> Array:
    """The kernel: x [M, K] @ int8 w [K, N] * scale [N], in `out_dtype` (default x's dtype).  M is
    padded here to whole row blocks; K and N must be multiples of 16 (`default_blocks`).

    half: multiply in float16 (x * HALF_PRESCALE as float16, the weights by `int8_as_float16`) instead of
    converting the weights to x's dtype; the prescale is undone with the scales."""
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
    block_m = blocks.rows_per_program(m)
    padded_m = -(-m // block_m) * block_m
    if padded_m != m:
        x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    k_slice = k // blocks.splits
    if k % blocks.splits or k_slice % blocks.block_k or n % blocks.block_n:
        raise ValueError(f"int8_matmul: blocks {blocks} do not tile K={k}, N={n}")
    scaled = blocks.splits == 1  # one slice: scale and cast in the kernel; else sum the partials first
    scale = scale.astype(jnp.float32)
    if half:  # XLA fuses the prescale into whatever produced x
        x = (x.astype(jnp.float32) * HALF_PRESCALE).astype(jnp.float16)
        scale = scale / HALF_PRESCALE
    kernel = functools.partial(_kernel, block_k=blocks.block_k, steps=k_slice // blocks.block_k, scaled=scaled,
                               swap=blocks.swap, half=half)
    if scaled:
        out_shape = jax.ShapeDtypeStruct((padded_m, n), out_dtype)
        out_spec = pl.BlockSpec((block_m, blocks.block_n), lambda j, s, r: (r, j))
    else:
        out_shape = jax.ShapeDtypeStruct((blocks.splits, padded_m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, block_m, blocks.block_n), lambda j, s, r: (s, r, j))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        name="int8_matmul",  # the GPU kernel's name, as profilers list it
        # row blocks innermost: programs that share a weight tile run close together (it stays in L2)
        grid=(n // blocks.block_n, blocks.splits, padded_m // block_m),
        in_specs=[pl.BlockSpec((block_m, k_slice), lambda j, s, r: (r, s)),
                  pl.BlockSpec((k_slice, blocks.block_n), lambda j, s, r: (s, j)),
                  pl.BlockSpec((blocks.block_n,), lambda j, s, r: (j,))],
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                                        num_stages=blocks.num_stages),
    )(x, w, scale)
    if not scaled:
        out = (out.sum(axis=0) * scale).astype(out_dtype)
    return out[:m]


def stores_output_major(k: int, n: int, implementation: str) -> bool:
    """Whether `models.quantize` stores an int8 kernel with K inputs and N outputs output-major ([N, K]) for
    `implementation`: only "mosaic", for the wide products its Mosaic GPU kernel runs (module docstring)."""
    return (implementation == "mosaic" and n >= OUTPUT_MAJOR_MIN_COLUMNS and n % _MOSAIC_TILE == 0
            and k % _MOSAIC_TILE == 0)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def int8_matmul_mosaic(x: Array, w_t: Array, scale: Array, *, out_dtype=None) -> Array:
    """x [M, K] @ (int8 w_t [N, K])ᵀ * scale [N] through JAX's Mosaic GPU mixed-type Hopper kernel, as
    (w_t @ xᵀ)ᵀ; M at most 256 (decode steps), padded here to whole tiles.  GPU (Hopper) only."""
    # imported here: the module needs jaxlib's Mosaic GPU, and only a "mosaic" int8 run pays for it
    try:
        from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed
    except ImportError as error:
        raise ImportError(f"int8 implementation 'mosaic' needs JAX's Mosaic GPU mixed-type kernel (jax."
                          f"experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu), which jax {jax.__version__} "
                          f"does not import: {error}") from error
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and capability is not None and str(capability).split(".")[0] != "9":
        # the kernel is built on Hopper's wgmma, which neither earlier GPUs nor Blackwell run
        raise ValueError(f"int8 implementation 'mosaic' runs on Hopper GPUs (compute capability 9.x); "
                         f"{device.device_kind} has {capability}: use 'auto' or 'pallas'")

    m, k = x.shape
    n = w_t.shape[0]
    if w_t.shape != (n, k) or w_t.dtype != jnp.int8 or n % _MOSAIC_TILE or k % _MOSAIC_TILE:
        raise ValueError(f"int8_matmul_mosaic: x {x.shape} needs int8 w_t [N, {k}] with N and K multiples of "
                         f"{_MOSAIC_TILE}, got w_t {w_t.shape} {w_t.dtype}")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"int8_matmul_mosaic multiplies bfloat16 or float16 activations, got {x.dtype}")
    if m > KERNEL_MAX_ROWS:
        raise ValueError(f"int8_matmul_mosaic serves decode steps (at most {KERNEL_MAX_ROWS} rows), got {m}")
    # the batch is the kernel's N side: one tile of up to 128 (whole 16s below that), two warpgroups splitting
    # the weight rows, 128-deep K steps, 4 stages; the probe's fastest at batch 128 on an H100 (BENCHMARKS.md)
    tile_n = 128 if m > 64 else max(16, -(-m // 16) * 16)
    padded_m = -(-m // tile_n) * tile_n
    xt = jnp.pad(x, ((0, padded_m - m), (0, 0))).T
    config = mixed.TuningConfig(tile_m=64, tile_n=tile_n, tile_k=_MOSAIC_TILE, max_concurrent_steps=4,
                                epi_tile_m=64, epi_tile_n=min(64, tile_n), wg_dimension=mixed.MatmulDimension.M)
    # the kernel rounds to x's dtype (as a bf16 model's products do); the scales are applied in float32 after
    yt = mixed.mixed_matmul_kernel(w_t, xt, out_dtype=x.dtype, config=config)
    out = (yt.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]).T[:m]
    return out.astype(out_dtype or x.dtype)


def int8_matmul_output_major(x: Array, w_t: Array, scale: Array, *, out_dtype=None,
                             implementation: str = "mosaic") -> Array:
    """`int8_matmul` over a kernel stored output-major, w_t [N, K] (`stores_output_major`): x [..., K] ->
    [..., N].  "mosaic" runs the Mosaic GPU kernel for up to KERNEL_MAX_ROWS rows and the reference above;
    "reference" always the reference (how the CPU tests check the layout).  The other implementations do not
    store kernels output-major, so they are refused."""
    if implementation not in ("mosaic", "reference"):
        raise ValueError(f"int8_matmul_output_major: an output-major kernel runs with implementation 'mosaic' or "
                         f"'reference', got {implementation!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if implementation == "mosaic" and x2.shape[0] <= KERNEL_MAX_ROWS:
        out = int8_matmul_mosaic(x2, w_t, scale, out_dtype=out_dtype)
    else:  # the definition over the transposed view (XLA folds the transpose into the dot)
        out = int8_matmul_reference(x2, w_t.T, scale, out_dtype=out_dtype)
    return out.reshape(*lead, w_t.shape[0])


def int8_matmul(x: Array, w: Array, scale: Array, *, out_dtype=None, implementation: str = "auto") -> Array:
    """x [..., K] @ int8 w [K, N] * scale [N] -> [..., N] in `out_dtype` (default x's dtype).

    implementation: "auto" (the Pallas kernel on GPU up to KERNEL_MAX_ROWS rows, else the reference), "pallas",
    "pallas-f16" (the kernel multiplying in float16, `int8_as_float16`),
    "mosaic" (for a kernel stored [K, N], the narrow products: as "auto"), "interpret" (the kernel on the Pallas
    interpreter), "reference".
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"int8_matmul: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    use_kernel = implementation in ("pallas", "pallas-f16", "interpret") or (
        implementation in ("auto", "mosaic") and jax.default_backend() == "gpu" and x2.shape[0] <= KERNEL_MAX_ROWS)
    if use_kernel:
        out = int8_matmul_pallas(x2, w, scale, out_dtype=out_dtype, interpret=implementation == "interpret",
                                 half=implementation == "pallas-f16")
    else:
        out = int8_matmul_reference(x2, w, scale, out_dtype=out_dtype)
    return out.reshape(*lead, w.shape[1])
