"""Where the Triton int8 kernel's time goes, without hardware counters (issue 18, 2026-12-06): the kernel's loop
rebuilt with parts left out, timed at the 7B's decode products under `int8_matmul_pallas`'s default tiling.

Variants of one program's K loop (same grid, tiles, warps and stages as the kernel):
  full        load the x and int8 w tiles, convert w, multiply (the kernel's loop; checked against the kernel)
  no-x        x not loaded: a constant bf16 tile multiplies the converted w (x's L2/shared-memory traffic left out)
  no-mma      both tiles loaded and converted, no product: column sums of w and row sums of x accumulated
  w-only      only the int8 w tile loaded and converted, its column sums accumulated (the weight stream alone)
  x-only      only the x tile loaded, its row sums accumulated (x's traffic alone)
and two tilings of the full loop at 128 rows: 64-row blocks (`block_m=64`, half the accumulator; the weights are
read once per row block, the second time mostly from L2) and 256-column blocks with 8 warps (half the x bytes per
weight byte).  The variants write float32 partials [splits, M, N] and stop there; the kernel itself
(`int8_matmul_pallas`, timed first and last) also sums the partials of a split product and applies the scales.
(int8-ablation-h100.json came from the first version, which timed the kernel first only.)  Each variant runs over
at least WEIGHT_BYTES_PER_CALL of distinct weight copies, dispatched back to back, so few weight reads hit L2;
floors are the int8 weight bytes at the copy bandwidth measured in the same run.
Usage: XLA_FLAGS=--xla_gpu_enable_triton_gemm=false int8_ablation.py OUT.json [BATCHES [PRODUCTS]]"""
import dataclasses
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from probe_runs import recorded, time_per_copy

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth
from crossmap.models.int8_matmul import KernelBlocks, default_blocks, int8_matmul_pallas
from crossmap.models.quantize import quantize_int8

SHAPES = {"o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
WEIGHT_BYTES_PER_CALL = 256 << 20
VARIANTS = ("full", "no-x", "no-mma", "w-only", "x-only")


def _loop(x_ref, w_ref, out_ref, *, block_k: int, steps: int, variant: str):
    rows, cols = out_ref.shape[-2:]

    def step(i, acc):
        if variant in ("full", "no-x"):
            x = (x_ref[:, pl.ds(i * block_k, block_k)] if variant == "full"
                 else jnp.full((rows, block_k), 1.0, x_ref.dtype))
            w = w_ref[pl.ds(i * block_k, block_k), :].astype(x_ref.dtype)
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
        if variant in ("no-mma", "w-only"):
            w = w_ref[pl.ds(i * block_k, block_k), :].astype(x_ref.dtype).astype(jnp.float32)
            acc = acc + jnp.sum(w, axis=0)[None, :]
        if variant in ("no-mma", "x-only"):
            x = x_ref[:, pl.ds(i * block_k, block_k)].astype(jnp.float32)
            acc = acc + jnp.sum(x, axis=1)[:, None]
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows, cols), jnp.float32))
    out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("blocks", "variant"))
def variant_product(x, w, *, blocks: KernelBlocks, variant: str):
    """float32 partials [splits, M, N] of x @ w (unscaled) by one variant of the kernel's loop."""
    m, k = x.shape
    n = w.shape[1]
    block_m = blocks.rows_per_program(m)  # the kernel's rows per program (m a whole number of them here)
    k_slice = k // blocks.splits
    return pl.pallas_call(
        functools.partial(_loop, block_k=blocks.block_k, steps=k_slice // blocks.block_k, variant=variant),
        out_shape=jax.ShapeDtypeStruct((blocks.splits, m, n), jnp.float32),
        name=f"int8_ablation_{variant.replace('-', '_')}",
        grid=(n // blocks.block_n, blocks.splits, m // block_m),
        in_specs=[pl.BlockSpec((block_m, k_slice), lambda j, s, r: (r, s)),
                  pl.BlockSpec((k_slice, blocks.block_n), lambda j, s, r: (s, j))],
        out_specs=pl.BlockSpec((None, block_m, blocks.block_n), lambda j, s, r: (s, r, j)),
        interpret=jax.default_backend() == "cpu",  # the CPU runs it interpreted: how the loop was checked here
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
    )(x, w)


def main(out_path: str, batches: list[int], products: list[str]):
    started = time.time()
    bandwidth = measured_copy_bandwidth(2 << 30)["gb_per_s"] * 1e9
    result = {"device": device_info(), "jax": jax.__version__, "copy_bandwidth_GBps": bandwidth / 1e9, "runs": []}
    print(f"[ablation] copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rng = np.random.default_rng(0)
    for batch, name in itertools.product(batches, products):
        k, n = SHAPES[name]
        x = jnp.asarray(rng.normal(size=(batch, k)), jnp.bfloat16)
        q, scale = quantize_int8(jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16))
        copies = max(1, -(-WEIGHT_BYTES_PER_CALL // (k * n)))
        weights = [q] + [q + jnp.int8(i % 3) for i in range(1, copies)]
        floor = k * n / bandwidth
        base = default_blocks(batch, k, n)
        # the kernel is timed first and again last: on the H100 (2026-12-06) the first timing of a group, right
        # after the host had built its weights, once read 25% above every other measurement of the same kernel
        tilings = [("int8_matmul_pallas", base)] + [(v, base) for v in VARIANTS]
        if batch > 64:
            tilings += [("full bm64", dataclasses.replace(base, block_m=64)),
                        ("full bn256 w8", dataclasses.replace(base, block_n=256, num_warps=8))]
        tilings.append(("int8_matmul_pallas again", base))
        reference = np.asarray(jnp.dot(x, q.astype(jnp.bfloat16), preferred_element_type=jnp.float32))
        for label, blocks in tilings:
            variant = label.split()[0]
            entry = {"batch": batch, "product": name, "K": k, "N": n, "variant": label, "tiling": str(blocks)}
            with recorded(result, out_path, entry, f"[ablation] B={batch} {name} {label}"):
                if n % blocks.block_n:
                    raise ValueError(f"{blocks.block_n} columns do not tile N={n}")
                if variant == "int8_matmul_pallas":
                    program = jax.jit(lambda x, ws, scale=scale: [int8_matmul_pallas(x, w, scale) for w in ws])
                else:
                    program = jax.jit(lambda x, ws, blocks=blocks, variant=variant:
                                      [variant_product(x, w, blocks=blocks, variant=variant) for w in ws])
                if variant == "full":  # the rebuilt loop must be the kernel's product
                    got = np.asarray(variant_product(x, q, blocks=blocks, variant=variant).sum(0))
                    entry["rel_rms_error_vs_xla"] = float(np.sqrt(np.mean((got - reference) ** 2) /
                                                              np.mean(reference ** 2)))
                s = time_per_copy(entry, functools.partial(program, x, weights), copies, floor)
                print(f"[ablation] B={batch} {name} {label:24s}: {s * 1e6:7.2f} us {s / floor:.2f}x "
                      f"{entry.get('rel_rms_error_vs_xla', '')}", flush=True)
        del weights
    result["wall_s"] = time.time() - started
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "32,128").split(",")],
         (sys.argv[3] if len(sys.argv) > 3 else "gate_up,down,o").split(","))
