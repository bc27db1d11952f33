"""Probe (issue 18, 2026-12-06, sixth session): the 7B decode step's gate + up product with the SiLU product in its
epilogue, as one Pallas (Triton) kernel, against what the fast step runs now: cuBLAS writes gate and up [B, 2, F] in
bf16, and a separate XLA fusion reads them back for silu(gate) * up (on the H100 profile 5.0 µs a layer beside the
product's 97.6, 0.14 ms a step). A program of the kernel owns `block_n` of the F columns: it streams x [B, K] and the
two matching column blocks of the fused weight [K, 2, F] over K, keeps both accumulators in float32, and writes only
silu(gate) * up [B, block_n] in bf16: half the product's output bytes, and no second kernel.

The normed ways (added 2026-12-07) also take the RMS norm before the product into the kernel. The norm's weight g is
folded into the product's weight once (diag(g) @ w, as a converter would at load time), so the kernel multiplies the
raw residual x and scales each row's accumulators by rsqrt(mean(x²) + eps) in its epilogue, from the sum of squares
it gathers from the x tiles it loads anyway. That takes away the norm's kernel too (the step's glue was 15.2 µs a
layer on the H100 profile, of which the SiLU product was 5.0): against XLA's norm fusion, cuBLAS and the SiLU fusion.

Each timed call chains the product over distinct weight copies (at least WEIGHT_BYTES_PER_CALL), so that few weight
reads hit L2, as in a decode step; the floor is the weight bytes at the copy bandwidth measured in the same run.
Usage: XLA_FLAGS=--xla_gpu_enable_triton_gemm=false gate_up_silu.py OUT.json [BATCH]"""
import functools
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

D, F = 3584, 18944  # Qwen2.5-7B
WEIGHT_BYTES_PER_CALL = 1 << 30
# (block_n, block_k, num_warps, num_stages)
TILINGS = [(64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 8, 4), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 4),
           (32, 128, 4, 3), (32, 64, 2, 4), (128, 64, 8, 3), (16, 128, 4, 4)]


EPS = 1e-6


def _kernel(x_ref, gate_ref, up_ref, out_ref, *, block_k: int, steps: int, normed: bool):
    rows, cols = out_ref.shape

    def step(i, accs):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        gate = jnp.dot(x, gate_ref[pl.ds(i * block_k, block_k), :], preferred_element_type=jnp.float32)
        up = jnp.dot(x, up_ref[pl.ds(i * block_k, block_k), :], preferred_element_type=jnp.float32)
        squares = accs[2]
        if normed:
            xf = x.astype(jnp.float32)
            squares = squares + jnp.sum(xf * xf, axis=1, keepdims=True)
        return accs[0] + gate, accs[1] + up, squares

    zeros = jnp.zeros((rows, cols), jnp.float32)
    gate, up, squares = jax.lax.fori_loop(0, steps, step, (zeros, zeros, jnp.zeros((rows, 1), jnp.float32)))
    if normed:
        row_scale = jax.lax.rsqrt(squares / (steps * block_k) + EPS)
        gate, up = gate * row_scale, up * row_scale
    # rounded to bf16 first, as the unfused step rounds the product's output before its SiLU fusion
    gate, up = gate.astype(out_ref.dtype).astype(jnp.float32), up.astype(out_ref.dtype).astype(jnp.float32)
    out_ref[...] = (gate * jax.nn.sigmoid(gate) * up).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "normed"))
def fused_gate_up_silu(x, w, *, tiling: tuple[int, int, int, int], normed: bool = False):
    """silu(x @ w[:, 0]) * (x @ w[:, 1]) for x [B, K] and the fused weight w [K, 2, F], in one kernel; `normed`:
    each row of the products scaled by rsqrt(mean(x²) + eps), i.e. RMS-normed x with the norm's weight folded into w."""
    block_n, block_k, warps, stages = tiling
    rows, k = x.shape
    f = w.shape[2]
    flat = w.reshape(k, 2 * f)  # gate's columns, then up's
    blocks = f // block_n
    return pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=k // block_k, normed=normed),
        out_shape=jax.ShapeDtypeStruct((rows, f), x.dtype),
        name="gate_up_silu",
        grid=(blocks,),
        in_specs=[pl.BlockSpec((rows, k), lambda j: (0, 0)),
                  pl.BlockSpec((k, block_n), lambda j: (0, j)),
                  pl.BlockSpec((k, block_n), lambda j: (0, j + blocks))],
        out_specs=pl.BlockSpec((rows, block_n), lambda j: (0, j)),
        interpret=jax.default_backend() == "cpu",
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
    )(x, flat, flat)


def unfused(x, w):
    """What the fast step runs: the product (cuBLAS) in bf16, then silu(gate) * up (an XLA fusion)."""
    both = jnp.einsum("bd,dcf->bcf", x, w)
    return jax.nn.silu(both[:, 0]) * both[:, 1]


def rms_normed(x, g):
    """The step's RMS norm (an XLA fusion), rounded to x's dtype as the product's input."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS) * g).astype(x.dtype)


def main(out_path: str, batch: int, d: int = D, f: int = F, tilings=TILINGS):
    started = time.time()
    bandwidth = measured_copy_bandwidth(2 << 30)["gb_per_s"] * 1e9
    result = {"device": device_info(), "jax": jax.__version__, "copy_bandwidth_GBps": bandwidth / 1e9,
              "batch": batch, "D": d, "F": f, "runs": []}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, d)), jnp.bfloat16)
    w0 = jnp.asarray(rng.normal(size=(d, 2, f)) / np.sqrt(d), jnp.bfloat16)
    copies = max(1, -(-WEIGHT_BYTES_PER_CALL // (2 * w0.size)))
    weights = [w0] + [w0 * jnp.bfloat16(1 + i / 64) for i in range(1, copies)]
    floor = 2 * w0.size / bandwidth
    g = jnp.asarray(1 + 0.1 * rng.normal(size=(d,)), jnp.float32)
    folded = [(w.astype(jnp.float32) * g[:, None, None]).astype(w.dtype) for w in weights]
    reference = np.asarray(unfused(x, w0), np.float32)
    reference_normed = np.asarray(unfused(rms_normed(x, g), w0), np.float32)
    best: list[tuple[float, tuple]] = []

    def measure(label: str, tiling, normed: bool):
        entry = {"way": label, "tiling": tiling, "normed": normed}
        with recorded(result, out_path, entry, f"[gate-up-silu] B={batch} {label}"):
            if tiling is None:
                if normed:
                    program = jax.jit(lambda x, ws: [unfused(rms_normed(x, g), w) for w in ws])
                else:
                    program = jax.jit(lambda x, ws: [unfused(x, w) for w in ws])
                args = (x, weights)
            else:
                if f % tiling[0] or d % tiling[1]:
                    raise ValueError(f"{tiling} does not tile D={d}, F={f}")
                program = jax.jit(lambda x, ws, t=tiling: [fused_gate_up_silu(x, w, tiling=t, normed=normed)
                                                           for w in ws])
                args = (x, folded if normed else weights)
                got = np.asarray(fused_gate_up_silu(x, args[1][0], tiling=tiling, normed=normed), np.float32)
                want = reference_normed if normed else reference
                entry["max_error_vs_unfused"] = float(np.abs(got - want).max() / np.abs(want).max())
            s = time_per_copy(entry, functools.partial(program, *args), copies, floor)
            if tiling is not None and not normed:
                best.append((s, tiling))
            print(f"[gate-up-silu] B={batch} {label:40s}: {s * 1e6:7.2f} us {s / floor:.3f}x the floor "
                  f"{entry.get('max_error_vs_unfused', '')}", flush=True)

    measure("cuBLAS + XLA SiLU", None, False)
    for tiling in tilings:
        measure(f"kernel {tiling}", tiling, False)
    measure("cuBLAS + XLA SiLU again", None, False)
    # the norm taken in: against the norm's fusion before the unfused product, with the three fastest tilings
    measure("XLA norm + cuBLAS + XLA SiLU", None, True)
    for _, tiling in sorted(best)[:3]:
        measure(f"normed kernel {tiling}", tiling, True)
    measure("XLA norm + cuBLAS + XLA SiLU again", None, True)
    result["wall_s"] = time.time() - started
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128)
