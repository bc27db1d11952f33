"""Probe (2026-12-06): crossmap's split-K Mosaic GPU int8 kernel (models.int8_split_k) at the 7B decode step's
products, beside cuBLAS (bf16), crossmap's Triton int8 kernel (models.int8_matmul) and JAX's mixed-type Mosaic kernel
("mosaic" for the wide products), each with its error against the XLA reference.

Each timed program multiplies enough distinct weight copies (at least 256 MiB, five times the H100's L2) that few
reads hit L2.  With --ncu BATCH PRODUCT KERNEL CALLS the script instead runs that one product CALLS times, each
call waited for, for `ncu -k regex:NAME --launch-skip CALLS-1 --launch-count 1` (benchmark-results/probes/
ncu_products.sh, which sets CALLS).  An earlier --ncu mode bracketed the calls with cuProfilerStart/Stop through
ctypes for `ncu --profile-from-start off`; on the H100 it profiled nothing and hung (2026-12-06), so it was replaced.
Usage: XLA_FLAGS=--xla_gpu_enable_triton_gemm=false split_k_int8.py OUT.json [BATCHES [PRODUCTS]]
       split_k_int8.py --ncu BATCH PRODUCT KERNEL CALLS"""
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from probe_runs import recorded, time_per_copy

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth
from crossmap.models.int8_matmul import int8_matmul_mosaic, int8_matmul_pallas
from crossmap.models.int8_split_k import choose_tiling, int8_matmul_split_k
from crossmap.models.quantize import quantize_int8

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584),
          "lm_head": (3584, 152064)}
rng = np.random.default_rng(0)


def operands(batch: int, k: int, n: int):
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(batch, k)), jnp.bfloat16)
    q, scale = quantize_int8(w)
    return x, w, q, jnp.asarray(q.T), scale


KERNELS = {
    "cublas-bf16": lambda x, w, q, q_t, scale: x @ w,
    "triton-int8": lambda x, w, q, q_t, scale: int8_matmul_pallas(x, q, scale),
    "jax-mosaic-int8": lambda x, w, q, q_t, scale: int8_matmul_mosaic(x, q_t, scale),
    "split-k-int8": lambda x, w, q, q_t, scale: int8_matmul_split_k(x, q_t, scale),
}


def ncu_mode(batch: int, name: str, kernel: str, calls: int):
    """`calls` calls of one kernel at one product, each waited for: the profiler takes the last."""
    args = operands(batch, *SHAPES[name])
    program = jax.jit(KERNELS[kernel])
    for _ in range(calls):
        jax.block_until_ready(program(*args))
    print(f"[ncu] B={batch} {name} {kernel}: {calls} calls", flush=True)


def timing_mode(out_path: str, batches: list[int], products: list[str]):
    started = time.time()
    bandwidth = measured_copy_bandwidth(2 << 30)["gb_per_s"] * 1e9
    result = {"device": device_info(), "jax": jax.__version__, "copy_bandwidth_GBps": bandwidth / 1e9, "runs": []}
    cores = getattr(jax.devices()[0], "core_count", 132)
    for batch, name in itertools.product(batches, products):
        k, n = SHAPES[name]
        x, w, q, q_t, scale = operands(batch, k, n)
        reference = np.asarray(jnp.dot(x, q.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * scale)
        norm = np.sqrt(np.mean(reference ** 2))
        for kernel, fn in KERNELS.items():
            if kernel == "jax-mosaic-int8" and n < 16384:
                continue
            itemsize = 2 if kernel == "cublas-bf16" else 1
            floor = itemsize * k * n / bandwidth
            copies = max(1, -(-(256 << 20) // (itemsize * k * n)))
            entry = {"batch": batch, "product": name, "K": k, "N": n, "kernel": kernel, "weight_copies": copies}
            if kernel == "split-k-int8":
                padded = 128 * -(-batch // 128) if batch > 64 else batch
                entry["tiling"] = str(choose_tiling(padded, k, n, cores))
            with recorded(result, out_path, entry, f"[split-k] B={batch} {name} {kernel}"):
                t = time.time()
                got = np.asarray(jax.jit(fn)(x, w, q, q_t, scale), np.float32)
                entry["first_call_s"] = time.time() - t
                entry["rel_rms_error_vs_int8_reference"] = float(np.sqrt(np.mean((got - reference) ** 2)) / norm)
                if kernel == "cublas-bf16":  # the bf16 product's own distance from the int8 reference
                    entry["note"] = "error is bf16 weights vs int8 weights"
                bump = (lambda c, i: c + i) if kernel == "cublas-bf16" else (lambda c, i: c + jnp.int8(i % 3))
                first = w if kernel == "cublas-bf16" else q if kernel == "triton-int8" else q_t
                weights = [first] + [bump(first, i) for i in range(1, copies)]
                slot = {"cublas-bf16": 1, "triton-int8": 2}.get(kernel, 3)

                def every_copy(x, ws, scale, fn=fn, slot=slot):
                    return [fn(*[v if i == slot else a for i, a in enumerate((x, None, None, None))], scale)
                            for v in ws]
                program = jax.jit(every_copy)
                s = time_per_copy(entry, functools.partial(program, x, weights, scale), copies, floor)
                del weights
                print(f"[split-k] B={batch} {name} {kernel}: {s * 1e6:8.2f} us {s / floor:.2f}x its floor, "
                      f"err {entry['rel_rms_error_vs_int8_reference']:.2e} {entry.get('tiling', '')}", flush=True)
    result["wall_s"] = time.time() - started
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "--ncu":
        ncu_mode(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        timing_mode(sys.argv[1], [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "32,128").split(",")],
                    (sys.argv[3] if len(sys.argv) > 3 else "qkv,o,down,gate_up,lm_head").split(","))
