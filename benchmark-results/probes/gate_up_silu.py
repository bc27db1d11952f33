"""Probe (issue 18, 2026-12-06, sixth session): the 7B decode step's gate + up product with the SiLU product in its
epilogue, as one Pallas (Triton) kernel, against what the fast step runs now: cuBLAS writes gate and up [B, 2, F] in
bf16, and a separate XLA fusion reads them back for silu(gate) * up (on the H100 profile 5.0 µs a layer beside the
product's 97.6, 0.14 ms a step). A program of the kernel owns `block_n` of the F columns: it streams x [B, K] and the
two matching column blocks of the fused weight [K, 2, F] over K, keeps both accumulators in float32, and writes only
silu(gate) * up [B, block_n] in bf16: half the product's output bytes, and no second kernel.

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


def _kernel(x_ref, gate_ref, up_ref, out_ref, *, block_k: int, steps: int):
    rows, cols = out_ref.shape

    def step(i, accs):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        gate = jnp.dot(x, gate_ref[pl.ds(i * block_k, block_k), :], preferred_element_type=jnp.float32)
        up = jnp.dot(x, up_ref[pl.ds(i * block_k, block_k), :], preferred_element_type=jnp.float32)
        return accs[0] + gate, accs[1] + up

    zeros = jnp.zeros((rows, cols), jnp.float32)
    gate, up = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
    # rounded to bf16 first, as the unfused step rounds the product's output before its SiLU fusion
    gate, up = gate.astype(out_ref.dtype).astype(jnp.float32), up.astype(out_ref.dtype).astype(jnp.float32)
    out_ref[...] = (gate * jax.nn.sigmoid(gate) * up).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling",))
def fused_gate_up_silu(x, w, *, tiling: tuple[int, int, int, int]):
    """silu(x @ w[:, 0]) * (x @ w[:, 1]) for x [B, K] and the fused weight w [K, 2, F], in one kernel."""
    block_n, block_k, warps, stages = tiling
    rows, k = x.shape
    f = w.shape[2]
    flat = w.reshape(k, 2 * f)  # gate's columns, then up's
    blocks = f // block_n
    return pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=k // block_k),
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
    reference = np.asarray(unfused(x, w0), np.float32)
    ways = [("cuBLAS + XLA SiLU", None)] + [(f"kernel {t}", t) for t in tilings] + [("cuBLAS + XLA SiLU again", None)]
    for label, tiling in ways:
        entry = {"way": label, "tiling": tiling}
        with recorded(result, out_path, entry, f"[gate-up-silu] B={batch} {label}"):
            if tiling is None:
                program = jax.jit(lambda x, ws: [unfused(x, w) for w in ws])
            else:
                if f % tiling[0] or d % tiling[1]:
                    raise ValueError(f"{tiling} does not tile D={d}, F={f}")
                program = jax.jit(lambda x, ws, t=tiling: [fused_gate_up_silu(x, w, tiling=t) for w in ws])
                got = np.asarray(fused_gate_up_silu(x, w0, tiling=tiling), np.float32)
                entry["max_error_vs_unfused"] = float(np.abs(got - reference).max() / np.abs(reference).max())
            s = time_per_copy(entry, functools.partial(program, x, weights), copies, floor)
            print(f"[gate-up-silu] B={batch} {label:34s}: {s * 1e6:7.2f} us {s / floor:.3f}x the floor "
                  f"{entry.get('max_error_vs_unfused', '')}", flush=True)
    result["wall_s"] = time.time() - started
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128)
