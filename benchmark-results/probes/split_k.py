"""Probe (2026-12-06): the 7B decode step's two narrow products, o (3584 -> 3584) and down (18944 -> 3584), at
batch 128 with the residual add after each, written as one product (cuBLAS picks split-K for down and runs its
reduction as a second kernel; o runs 56 tiles on 132 multiprocessors) or as `s` products over K slices in one
batched GEMM, the slices' float32 partials summed in the residual add's fusion. Each timed program chains the
product over enough distinct weight copies (1 GiB) that none sits in L2, each step reading the last one's residual,
as a decode step's layers do. Also (2026-12-06, sixth session) the one product with its weight stored output-major,
w [N, K] multiplied as x @ wᵀ ("nk": cuBLAS's other operand layout, for which it may pick other kernels).
Usage: XLA_FLAGS=--xla_gpu_enable_triton_gemm=false split_k.py [OUT.json]"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth
from crossmap.benchmarks.decode_parts import back_to_back

batch, reps = 128, 20
bandwidth = measured_copy_bandwidth(2 << 30)["gb_per_s"] * 1e9
rng = np.random.default_rng(0)
result = {"device": device_info(), "copy_bandwidth_GBps": bandwidth / 1e9, "batch": batch, "shapes": {}}


def chained(slices: int, output_major: bool = False):
    def run(x, r, ws):
        for w in ws:
            if output_major:
                r = r + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
                continue
            k, n = w.shape
            if slices == 1:
                r = r + x @ w
            else:
                parts = jnp.einsum("bsk,skn->bsn", x.reshape(batch, slices, k // slices),
                                   w.reshape(slices, k // slices, n), preferred_element_type=jnp.float32)
                r = (r.astype(jnp.float32) + parts.sum(1)).astype(r.dtype)
        return r
    return jax.jit(run)


def measured(fn, x, r, ws, copies: int, floor: float, reference: np.ndarray) -> dict:
    """Seconds per weight copy of `fn`'s chain over the copies `ws`, against the floor, and the error of one
    product against `reference` (the one product, unsliced)."""
    seconds = back_to_back(lambda: fn(x, r, ws), reps) / copies
    got = np.asarray(fn(x, r, ws[:1]), np.float32)
    return {"s": seconds, "ratio_to_floor": seconds / floor,
            "max_rel_error_vs_one": float(np.abs(got - reference).max() / np.abs(reference).max())}


for name, (k, n) in {"o": (3584, 3584), "down": (18944, 3584)}.items():
    copies = max(1, (1 << 30) // (2 * k * n))
    ws = [jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16) for _ in range(copies)]
    x = jnp.asarray(rng.normal(size=(batch, k)), jnp.bfloat16)
    r = jnp.asarray(rng.normal(size=(batch, n)), jnp.bfloat16)
    floor = 2 * k * n / bandwidth
    entry = {"K": k, "N": n, "weight_copies": copies, "floor_s": floor, "slices": {}}
    reference = np.asarray(chained(1)(x, r, ws[:1]), np.float32)
    for slices in (1, 2, 4, 8):
        if k % slices:
            continue
        timing = entry["slices"][slices] = measured(chained(slices), x, r, ws, copies, floor, reference)
        print(f"[split-k] {name} {k}x{n}, {slices} slice(s): {timing['s'] * 1e6:.2f} us, "
              f"{timing['ratio_to_floor']:.2f}x the floor ({floor * 1e6:.2f} us at {bandwidth / 1e9:.0f} GB/s)",
              flush=True)
    ws = [jnp.asarray(w.T) for w in ws]  # output-major copies, the [K, N] ones freed
    timing = entry["output_major"] = measured(chained(1, output_major=True), x, r, ws, copies, floor, reference)
    print(f"[split-k] {name} {k}x{n}, output-major w [N, K]: {timing['s'] * 1e6:.2f} us, "
          f"{timing['ratio_to_floor']:.2f}x the floor", flush=True)
    result["shapes"][name] = entry
if len(sys.argv) > 1:
    json.dump(result, open(sys.argv[1], "w"), indent=1)
