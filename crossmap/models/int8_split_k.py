"""A weight-only int8 Hopper kernel with split-K, written in Pallas's Mosaic GPU dialect: int8 w_t [N, K] (stored
output-major) times x [M, K], the product computed transposed, (w_t @ xᵀ) [N, M].

Why it exists: JAX's own mixed-type Hopper kernel (`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu`,
used by int8 implementation "mosaic" for the wide products) streams the weights through TMA into a warp-specialised
pipeline and converts each int8 tile in registers before wgmma takes it as its left operand, but it gives each program
whole output tiles only.  A decode step's narrow products (the 7B's o and down have 3,584 outputs: 28 tiles of 128
rows) then keep 28 of an H100's 132 multiprocessors busy.  Here a unit of work is one output tile *and one slice of
K*: the K slices write float32 partial products, which the caller sums (with the scales and the transpose back, in
one XLA fusion).

Layout of one program (a persistent grid, one program per multiprocessor, looping over units): a memory warpgroup
issues the TMA loads of a [2 * rows, depth] weight tile and a [depth, cols] tile of xᵀ into `stages` shared-memory
buffers; two compute warpgroups each take `rows` of the weight tile, convert them to x's dtype in registers and
accumulate wgmma products in float32; the epilogue stores the accumulator through shared memory by TMA.

Status: correct on an H100 (tests/test_int8_split_k.py), but not faster than the Triton kernel reproducibly (two
probe runs at batch 128: o -5% then +120%, down -10% then even; slower at batch 32), so no `int8_matmul`
implementation routes products here (BENCHMARKS.md, "A split-K Mosaic GPU int8 kernel of crossmap's own").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

Array = jax.Array

# rows of the weight tile per compute warpgroup (wgmma's M), and K per pipeline step
ROWS_PER_WARPGROUP = 64
DEPTH = 128
# shared memory a program may use on Hopper (227 KiB), less what the pipeline's barriers take
_SHARED_BYTES = 220 * 1024
# pipeline steps lost each time a program starts a unit (the loads of its first stages before any product)
_FILL_STEPS = 2


@dataclass(frozen=True)
class SplitKTiling:
    """One launch: K slices, columns of xᵀ per tile (the batch side, wgmma's N), pipeline buffers."""

    splits: int
    cols: int
    stages: int


def choose_tiling(m: int, k: int, n: int, multiprocessors: int) -> SplitKTiling:
    """The tiling for w_t [n, k] @ xᵀ [k, m]: the number of K slices (a divisor of the K steps) that minimises a
    program's steps on the critical path, waves × (steps per unit + fill), the fewest slices among ties; as many
    pipeline buffers as shared memory holds, up to 6.  m must already be a whole number of column tiles."""
    cols = min(128, m)
    row_tiles, col_tiles, steps = n // (2 * ROWS_PER_WARPGROUP), m // cols, k // DEPTH

    def cost(splits: int) -> tuple[int, int]:
        units = row_tiles * col_tiles * splits
        return math.ceil(units / multiprocessors) * (steps // splits + _FILL_STEPS), splits

    # enough output tiles for every multiprocessor: no slices, whose float32 partials would add output bytes
    splits = 1 if row_tiles * col_tiles >= multiprocessors else min(
        (s for s in range(1, steps + 1) if steps % s == 0), key=cost)
    stage_bytes = 2 * ROWS_PER_WARPGROUP * DEPTH + DEPTH * cols * 2
    epilogue_bytes = _epilogue_bytes(cols, 4 if splits > 1 else 2)
    stages = max(2, min(6, (_SHARED_BYTES - epilogue_bytes) // stage_bytes))
    return SplitKTiling(splits=splits, cols=cols, stages=stages)


def _epilogue_columns(cols: int) -> int:
    return min(64, cols)


def _epilogue_slots(cols: int) -> int:
    # two buffers let one TMA store drain while the next is filled; one suffices when there is one store
    return 2 if cols > _epilogue_columns(cols) else 1


def _epilogue_bytes(cols: int, itemsize: int) -> int:
    return 2 * _epilogue_slots(cols) * ROWS_PER_WARPGROUP * _epilogue_columns(cols) * itemsize


def _swizzled(bits: int, minor: int, role: str):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(bits * minor, role)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def split_k_product(w_t: Array, xt: Array, tiling: SplitKTiling, multiprocessors: int) -> Array:
    """int8 w_t [N, K] @ xᵀ [K, M] -> [splits * N, M]: K slice s's partial product in rows s*N to (s+1)*N, float32
    when split, else xᵀ's dtype.  N must be a multiple of 128, K of 128 * splits, M of tiling.cols."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n, k = w_t.shape
    m = xt.shape[1]
    rows, cols, splits, stages = ROWS_PER_WARPGROUP, tiling.cols, tiling.splits, tiling.stages
    cta_rows = 2 * rows
    if n % cta_rows or k % (DEPTH * splits) or m % cols or xt.shape[0] != k:
        raise ValueError(f"split_k_product: w_t {w_t.shape} and xt {xt.shape} do not tile by {cta_rows} rows, "
                         f"{DEPTH} x {splits} K and {cols} columns")
    out_dtype = jnp.dtype(jnp.float32 if splits > 1 else xt.dtype)
    k_slice = k // splits
    row_tiles, col_tiles = n // cta_rows, m // cols
    units = row_tiles * col_tiles * splits
    epilogue_cols, slots = _epilogue_columns(cols), _epilogue_slots(cols)
    w_transforms = _swizzled(8, DEPTH, "lhs")
    x_transforms = _swizzled(xt.dtype.itemsize * 8, cols, "rhs")
    out_transforms = _swizzled(out_dtype.itemsize * 8, epilogue_cols, "out")

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_slice // DEPTH,),
            memory_registers=40,
            in_specs=[plgpu.BlockSpec((cta_rows, DEPTH), lambda step: (0, step), transforms=w_transforms,
                                      memory_space=plgpu.SMEM),
                      plgpu.BlockSpec((DEPTH, cols), lambda step: (step, 0), transforms=x_transforms,
                                      memory_space=plgpu.SMEM)],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=context,
        )

    def kernel(w_gmem, x_gmem, out_gmem, out_smem):
        def ignored(*_, **__):
            return None

        # the buffers depend only on the block shapes: allocated once, reused by every unit
        @functools.partial(pl.run_scoped, buffers=pipeline(ignored, ignored).get_allocations(w_gmem, x_gmem),
                           collective_axes="wg")
        def _(buffers):
            warpgroup = jax.lax.axis_index("wg")

            @plgpu.nd_loop((units,), collective_axes="sm")
            def _(loop):
                (unit,) = loop.index
                split, tile = unit % splits, unit // splits
                row_tile, col_tile = tile // col_tiles, tile % col_tiles
                first_row = split * n + row_tile * cta_rows + warpgroup * rows

                def multiply(_, w_smem, x_smem, acc):
                    w = w_smem[pl.ds(warpgroup * rows, rows)].astype(xt.dtype)  # converted in registers
                    plgpu.wgmma(acc, w, x_smem)
                    # the next tile is converted only after this product: leaving it in flight (wait(1), buffers
                    # released a step late) gave wrong results on an H100 (BENCHMARKS.md)
                    plgpu.wgmma_wait(0)
                    return acc

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((rows, cols), jnp.float32))
                    def _(acc):
                        run(acc)
                        result = acc[...].astype(out_dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last unit's stores have left
                        for index, start in enumerate(range(0, cols, epilogue_cols)):
                            slot = index % slots
                            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                            out_smem[warpgroup, slot] = result[:, start:start + epilogue_cols]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[warpgroup, slot],
                                out_gmem.at[pl.ds(first_row, rows), pl.ds(col_tile * cols + start, epilogue_cols)])

                pipeline(multiply, context)(
                    w_gmem.at[pl.ds(row_tile * cta_rows, cta_rows), pl.ds(split * k_slice, k_slice)],
                    x_gmem.at[pl.ds(split * k_slice, k_slice), pl.ds(col_tile * cols, cols)],
                    allocations=buffers)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits * n, m), out_dtype),
        grid=(min(multiprocessors, units),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=dict(out_smem=plgpu.SMEM((2, slots, rows, epilogue_cols), out_dtype, transforms=out_transforms)),
    )
    return call(w_t, xt)


@functools.partial(jax.jit, static_argnames=("out_dtype", "multiprocessors", "tiling"))
def int8_matmul_split_k(x: Array, w_t: Array, scale: Array, *, out_dtype=None, multiprocessors: int | None = None,
                        tiling: SplitKTiling | None = None) -> Array:
    """x [M, K] @ (int8 w_t [N, K])ᵀ * scale [N] -> [M, N] in `out_dtype` (default x's dtype), through the
    split-K kernel; M at most 256 (a decode step), padded here to whole column tiles.  `multiprocessors` defaults
    to the device's count; `tiling` to `choose_tiling`'s."""
    m, k = x.shape
    n = w_t.shape[0]
    if w_t.shape != (n, k) or w_t.dtype != jnp.int8 or scale.shape != (n,):
        raise ValueError(f"int8_matmul_split_k: x {x.shape} needs int8 w_t [N, {k}] and scale [N], got w_t "
                         f"{w_t.shape} {w_t.dtype}, scale {scale.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"int8_matmul_split_k multiplies bfloat16 or float16 activations, got {x.dtype}")
    if multiprocessors is None:
        multiprocessors = jax.devices()[0].core_count
    cols = 128 if m > 64 else max(16, -(-m // 16) * 16)
    padded = -(-m // cols) * cols
    tiling = tiling or choose_tiling(padded, k, n, multiprocessors)
    xt = jnp.pad(x, ((0, padded - m), (0, 0))).T
    partials = split_k_product(w_t, xt, tiling, multiprocessors).reshape(tiling.splits, n, padded)
    out = partials.astype(jnp.float32).sum(axis=0) * scale.astype(jnp.float32)[:, None]
    return out.T[:m].astype(out_dtype or x.dtype)
