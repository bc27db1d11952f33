"""`crossmap bench int8-matmul`: the weight-only int8 kernel at a decode step's matmul shapes, against bf16.

For every kernel of a `bench verbalize` preset's model (q, k/v, o, gate/up, down, LM head) at `--batch` rows,
three products of the same x [batch, K] and weights [K, N].  Each is timed as one program that multiplies by
enough distinct weight copies (`--rotate-mib` in all) that none is found in L2, as a decode step runs its
layers' products back to back:

    bf16        XLA's x @ w with bf16 weights
    reference   XLA's int8 path: the weights converted to bf16, multiplied, the product scaled
    pallas      crossmap's kernel (`models.int8_matmul`), with its default tiling, and with each tiling of
                `--sweep` (the fastest is reported with its tiling)

Floors, from rates measured in the same run: the weight bytes at the copy bandwidth (bf16: 2 bytes an entry;
int8: 1, plus the scales) and the matmul FLOPs at the measured bf16 matmul rate.  A product cannot beat the
larger of the two; at batch 128 the 7B's int8 products sit near the compute floor.

    crossmap bench int8-matmul --out int8_matmul.json            # on a GPU
    crossmap bench int8-matmul --preset tiny --out /tmp/m.json   # CPU smoke run (kernel in interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth, measured_matmul_peak, write_json
from crossmap.benchmarks.decode_parts import back_to_back
from crossmap.benchmarks.verbalize import PRESETS, preset_config
from crossmap.models.int8_matmul import (
    KernelBlocks,
    default_blocks,
    int8_matmul_pallas,
    int8_matmul_reference,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b", help="the model shape (bench verbalize's)")
    parser.add_argument("--batch", type=int, default=None, help="rows of x (preset default)")
    parser.add_argument("--reps", type=int, default=20, help="calls per measurement, back to back")
    parser.add_argument("--rotate-mib", type=int, default=1024,
                        help="distinct weight copies per shape, this many MiB of int8 in all (L2 holds none)")
    parser.add_argument("--sweep", default="",
                        help="comma-separated kernels (q, k_v, o, gate_up, down, lm_head) whose product is also timed "
                             "at every tiling of a grid; the fastest is reported with its tiling")
    parser.add_argument("--sweep-orders", default="plain",
                        help="which products the sweep tiles: plain (x @ w) and/or swapped (the transposed product, "
                             "the converted weight tile on the left; models.int8_matmul), comma-separated; swapped "
                             "measured slower at every tiling on an H100, so only plain by default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="int8_matmul.json", help="JSON output path")


def decode_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(K, N) of each kernel a decode step multiplies by (k and v share a shape)."""
    d, h = cfg.d_model, cfg.head_dim
    return {"q": (d, cfg.n_heads * h), "k_v": (d, cfg.n_kv_heads * h), "o": (cfg.n_heads * h, d),
            "gate_up": (d, cfg.d_ff), "down": (cfg.d_ff, d), "lm_head": (d, cfg.vocab_size)}


SWEEP_ORDERS = ("plain", "swapped")


def sweep_blocks(k: int, n: int, orders: tuple[str, ...] = SWEEP_ORDERS) -> list[KernelBlocks]:
    unknown = set(orders) - set(SWEEP_ORDERS)
    if unknown:
        raise ValueError(f"--sweep-orders: {sorted(unknown)} not among {SWEEP_ORDERS}")
    out = []
    for order in orders:
        # swapped, a program's column block is the tensor-core instruction's 64-row side: no narrower
        widths = (64, 128, 256) if order == "swapped" else (32, 64, 128, 256)
        for block_n, block_k, splits, warps, stages in itertools.product(widths, (64, 128, 256), (1, 2, 4, 8),
                                                                           (4, 8), (3, 4, 6)):
            if n % block_n or k % (splits * block_k) or k // splits < block_k:
                continue
            if (n // block_n) * splits < 66 or (n // block_n) * splits > 4096:
                continue  # fewer programs than half the multiprocessors, or far more than needed
            out.append(KernelBlocks(block_n, block_k, splits, warps, stages, swap=order == "swapped"))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    cfg = preset_config(preset)
    batch = args.batch if args.batch is not None else preset["batch"]
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.bfloat16
    bandwidth = measured_copy_bandwidth(preset["copy_mib"] << 20)["gb_per_s"] * 1e9
    peak = measured_matmul_peak("bfloat16")["tflops"] * 1e12
    print(f"[int8-matmul bench] {cfg.name or cfg.model_type}, batch {batch}: copy {bandwidth / 1e9:.0f} GB/s, "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    rng = np.random.default_rng(args.seed)
    shapes = {}
    for name, (k, n) in decode_shapes(cfg).items():
        copies = max(1, min(64, (args.rotate_mib << 20) // (k * n)))
        x = jnp.asarray(rng.normal(size=(batch, k)), dtype)
        ws = [jnp.asarray(rng.integers(-127, 128, size=(k, n)), jnp.int8) for _ in range(copies)]
        scales = [jnp.asarray(rng.uniform(1e-3, 1e-2, size=n), jnp.float32) for _ in range(copies)]
        floats = [(w.astype(jnp.float32) * s).astype(dtype) for w, s in zip(ws, scales, strict=True)]
        pairs = list(zip(ws, scales, strict=True))

        def timed(fn, operands, x=x):
            # one program multiplies by every copy in turn (as a decode step runs its layers' products back to
            # back); one dispatch per product would time the host instead
            chain = jax.jit(lambda x, operands: [fn(x, *o) for o in operands])
            return back_to_back(lambda: chain(x, operands), args.reps) / len(operands)

        entry: dict[str, Any] = {"K": k, "N": n, "weight_copies": copies}
        entry["bf16_s"] = timed(jnp.matmul, [(w,) for w in floats])
        entry["reference_s"] = timed(int8_matmul_reference, pairs)

        def kernel(blocks):
            return functools.partial(int8_matmul_pallas, blocks=blocks, interpret=on_cpu)

        blocks = default_blocks(batch, k, n)
        entry["pallas_default_blocks"] = blocks.__dict__
        try:
            entry["pallas_s"] = timed(kernel(blocks), pairs)
        except Exception as err:  # a tiling Triton cannot build (shared memory, registers): recorded, not fatal
            entry["pallas_error"] = f"{type(err).__name__}: {str(err)[:2000]}"
            print(f"[int8-matmul bench] {name} {k}x{n}: the kernel failed: {entry['pallas_error'][:600]}", flush=True)
            shapes[name] = entry
            continue
        want = np.asarray(jax.jit(int8_matmul_reference)(x, ws[0], scales[0]), np.float32)
        got = np.asarray(int8_matmul_pallas(x, ws[0], scales[0], blocks=blocks, interpret=on_cpu), np.float32)
        entry["pallas_max_error_vs_reference"] = float(np.abs(got - want).max() / np.abs(want).max())
        if name in args.sweep.split(",") and not on_cpu:
            best, failed = (entry["pallas_s"], blocks), 0
            best_by_order: dict[str, tuple[float, KernelBlocks]] = {}
            for candidate in sweep_blocks(k, n, tuple(args.sweep_orders.split(","))):
                try:
                    seconds = timed(kernel(candidate), pairs)
                except Exception:
                    failed += 1
                    continue
                best = min(best, (seconds, candidate), key=lambda t: t[0])
                order = "swapped" if candidate.swap else "plain"
                best_by_order[order] = min(best_by_order.get(order, (seconds, candidate)), (seconds, candidate),
                                           key=lambda t: t[0])
            entry["pallas_best_s"], entry["pallas_best_blocks"] = best[0], best[1].__dict__
            entry["pallas_best_by_order"] = {order: {"s": t[0], "blocks": t[1].__dict__}
                                             for order, t in best_by_order.items()}
            entry["sweep_tilings_failed"] = failed
        entry["floor"] = {"bf16_bytes_s": 2 * k * n / bandwidth, "int8_bytes_s": (k * n + 4 * n) / bandwidth,
                          "compute_s": 2 * batch * k * n / peak}
        bound = max(entry["floor"]["int8_bytes_s"], entry["floor"]["compute_s"])
        entry["pallas_ratio_to_bf16_bytes_floor"] = entry["pallas_s"] / entry["floor"]["bf16_bytes_s"]
        entry["pallas_ratio_to_int8_bound"] = entry["pallas_s"] / bound
        entry["bf16_ratio_to_bf16_bound"] = entry["bf16_s"] / max(entry["floor"]["bf16_bytes_s"],
                                                                  entry["floor"]["compute_s"])
        shapes[name] = entry
        print(f"[int8-matmul bench] {name} {k}x{n}: bf16 {entry['bf16_s'] * 1e6:.1f} us, reference "
              f"{entry['reference_s'] * 1e6:.1f} us, pallas {entry['pallas_s'] * 1e6:.1f} us "
              f"({entry['pallas_ratio_to_bf16_bytes_floor']:.2f}x the bf16 bytes floor)"
              + (f", best {entry['pallas_best_s'] * 1e6:.1f} us {entry['pallas_best_blocks']}"
                 if "pallas_best_s" in entry else ""), flush=True)
        del ws, scales, floats
    result = {"benchmark": "int8-matmul", "preset": args.preset, "model": cfg.name or cfg.model_type,
              "batch": batch, "device": device_info(), "copy_bandwidth_GBps": bandwidth / 1e9,
              "bf16_matmul_tflops": peak / 1e12, "kernel_mode": "interpret" if on_cpu else "triton",
              "shapes": shapes}
    write_json(result, args.out, echo=False)
    return result
