"""Probe (2026-12-06): JAX's own Hopper kernels written in Pallas's Mosaic GPU dialect (TMA loads into a warp-
specialised pipeline feeding wgmma; jax.experimental.pallas.ops.gpu) at the 7B decode step's products, beside
cuBLAS (bf16) and crossmap's Triton int8 kernel (models.int8_matmul).

- int8: `hopper_mixed_type_matmul_mgpu` computes a.astype(bf16) @ b with the int8 operand on the left, converted in
  registers (the Machete/Marlin scheme the int8 kernel lacks). A decode product x [B, K] @ w [K, N] becomes
  (wᵀ [N, K] @ xᵀ [K, B])ᵀ: the int8 weights stored transposed, the scales applied to the output's rows.
- bf16: `hopper_matmul_mgpu` in the same transposed order (the batch on wgmma's narrow side), for o and down, the two
  products cuBLAS runs above the floor.

Each timed program multiplies enough distinct weight copies (1 GiB) that none sits in L2. A configuration that does
not fit or does not compile is recorded with its error. Usage:
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false mosaic_matmul.py OUT.json [BATCHES [PRODUCTS [STAGES]]]
(defaults 32,128 gate_up,down,o,lm_head 4,6; the bf16 Mosaic kernel runs only for o and down)"""
import dataclasses
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as bf16_mgpu
from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed_mgpu

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth
from crossmap.benchmarks.decode_parts import back_to_back
from crossmap.models.int8_matmul import int8_matmul_pallas
from crossmap.models.quantize import quantize_int8

out_path = sys.argv[1]
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "32,128").split(",")]
products = (sys.argv[3] if len(sys.argv) > 3 else "gate_up,down,o,lm_head").split(",")
stage_counts = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "4,6").split(",")]
reps = 10
started = time.time()
bandwidth = measured_copy_bandwidth(2 << 30)["gb_per_s"] * 1e9
rng = np.random.default_rng(0)
result = {"device": device_info(), "jax": jax.__version__, "copy_bandwidth_GBps": bandwidth / 1e9, "runs": []}
SHAPES = {"gate_up": (3584, 37888), "down": (18944, 3584), "o": (3584, 3584), "lm_head": (3584, 152064)}
SHAPES = {name: SHAPES[name] for name in products}


def save():
    json.dump(result, open(out_path, "w"), indent=1)


def timed(fn, xs, ws) -> float:
    """Seconds for one product: `fn` over every weight copy in one program, back to back."""
    program = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    return back_to_back(lambda: program(xs, ws), reps) / len(ws)


def record(**entry):
    result["runs"].append(entry)
    save()
    seconds = entry.get("s")
    text = f"{seconds * 1e6:8.2f} us {entry['ratio_to_floor']:.2f}x" if seconds else entry.get("error", "")[:160]
    print(f"[mosaic] B={entry['batch']} {entry['product']} {entry['kernel']} {entry.get('config', '')}: {text}",
          flush=True)


def tilings(kernels, batch: int, depths: tuple[int, ...]):
    """TuningConfigs of one of JAX's Hopper kernel modules: 64-row warpgroup tiles, K `depths`, `stage_counts`,
    the two warpgroups splitting the weight rows (M) or the batch (N)."""
    dims = kernels.MatmulDimension
    for tile_k, steps, wg in itertools.product(depths, stage_counts, (dims.M, dims.N)):
        tile_n = batch if wg == dims.M else batch // 2
        yield kernels.TuningConfig(tile_m=64, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps,
                                   epi_tile_m=64, epi_tile_n=min(64, tile_n), wg_dimension=wg)


for batch, (name, (k, n)) in itertools.product(batches, SHAPES.items()):
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(batch, k)), jnp.bfloat16)
    q, scale = quantize_int8(w)
    q_t = jnp.asarray(q.T)
    reference = np.asarray(jnp.dot(x, q.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * scale)
    norm = np.abs(reference).max()
    bf16_copies = max(1, (1 << 30) // (2 * k * n))
    int8_copies = max(1, (1 << 30) // (k * n))
    floor16, floor8 = 2 * k * n / bandwidth, k * n / bandwidth
    common = {"batch": batch, "product": name, "K": k, "N": n}

    ws = [w] + [w + i for i in range(1, bf16_copies)]
    s = timed(lambda x, w: x @ w, x, ws)
    record(**common, kernel="cublas-bf16", s=s, floor_s=floor16, ratio_to_floor=s / floor16)
    if name in ("o", "down"):
        ws_t = [jnp.asarray(v.T) for v in ws]
        xt = jnp.asarray(x.T)
        for cfg in tilings(bf16_mgpu, batch, (64, 128)):
            try:
                s = timed(lambda xt, wt, cfg=cfg: bf16_mgpu.matmul(wt, xt, None, cfg), xt, ws_t)
                got = np.asarray(bf16_mgpu.matmul(ws_t[0], xt, None, cfg).T, np.float32)
                want = np.asarray(x @ w, np.float32)
                record(**common, kernel="mosaic-bf16-transposed", config=str(cfg), s=s, floor_s=floor16,
                       ratio_to_floor=s / floor16, max_rel_error=float(np.abs(got - want).max() / np.abs(want).max()))
            except Exception as error:  # noqa: BLE001 (a probe records what failed and goes on)
                record(**common, kernel="mosaic-bf16-transposed", config=str(cfg), error=repr(error)[:600])
        del ws_t
    del ws

    qs = [q] + [q + jnp.int8(i % 3) for i in range(1, int8_copies)]
    s = timed(lambda x, q, scale=scale: int8_matmul_pallas(x, q, scale), x, qs)
    got = np.asarray(int8_matmul_pallas(x, q, scale), np.float32)
    record(**common, kernel="triton-int8", s=s, floor_s=floor8, ratio_to_floor=s / floor8,
           max_rel_error=float(np.abs(got - reference).max() / norm))
    qs_t = [q_t] + [jnp.asarray(v.T) for v in qs[1:]]
    del qs
    xt = jnp.asarray(x.T)
    best = None
    for cfg in tilings(mixed_mgpu, batch, (128, 256)):
        try:
            s = timed(lambda xt, qt, cfg=cfg: mixed_mgpu.mixed_matmul_kernel(qt, xt, out_dtype=jnp.bfloat16,
                                                                             config=cfg), xt, qs_t)
            got = np.asarray(mixed_mgpu.mixed_matmul_kernel(q_t, xt, out_dtype=jnp.bfloat16, config=cfg).T,
                             np.float32) * np.asarray(scale)
            record(**common, kernel="mosaic-int8-transposed", config=str(cfg), s=s, floor_s=floor8,
                   ratio_to_floor=s / floor8, max_rel_error=float(np.abs(got - reference).max() / norm))
            if best is None or s < best[0]:
                best = (s, cfg)
        except Exception as error:  # noqa: BLE001
            record(**common, kernel="mosaic-int8-transposed", config=str(cfg), error=repr(error)[:600])
    if best is not None:
        cfg = best[1]

        def whole(x, qt, cfg=cfg, scale=scale):  # as a layer needs it: x [B, K] in, scaled y [B, N] out
            yt = mixed_mgpu.mixed_matmul_kernel(qt, x.T, out_dtype=jnp.bfloat16, config=cfg)
            return (yt.astype(jnp.float32) * scale[:, None]).T.astype(x.dtype)
        s = timed(whole, x, qs_t)
        record(**common, kernel="mosaic-int8-with-scale-and-transposes", config=str(cfg), s=s, floor_s=floor8,
               ratio_to_floor=s / floor8, config_fields=dataclasses.asdict(cfg) | {"wg_dimension": str(cfg.wg_dimension)})
    del qs_t
result["wall_s"] = time.time() - started
save()
