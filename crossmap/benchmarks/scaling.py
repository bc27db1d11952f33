"""`crossmap bench scaling`: the reference-scale workloads on one device and over every device.

For a model config at real shape (random weights; default Gemma-3-27B-it, the reference target)
this runs, first on one device and then on each mesh layout that spans all devices (default:
all devices on the data axis, then all on the tensor axis):

1. forward: the truncated forward (`make_hidden_fn`) on one global batch.  Tokens/s, TFLOP/s per
   device, MFU per device (against the bf16 matmul peak measured on device 0 in this run), scaling
   efficiency = tokens/s / (n_devices x single-device tokens/s), and the largest per-row relative
   difference of the residuals from the single-device result on the same batch.
2. ridge: streaming statistics of d_in -> d_out pairs, on one device (`ridge.accumulate`), then over
   every device with the batch split two ways: a jitted `accumulate` on batch-sharded inputs (XLA
   all-reduces the products after each batch) and `accumulate_on_devices` (each device keeps its own
   slot; `reduce_device_stats` does one psum at the end).  Pairs/s and the largest relative
   difference of every statistic from the single-device run.
3. verbalize: `verbalize.generate` with a vector injected at one prompt position (batch x prompt
   tokens, `--new-tokens` greedy tokens, no early stop) on the same model: explanations/s, decode
   step, and the decode step's memory-bandwidth floor per device (weights and KV cache each device
   holds, read once per step at the copy bandwidth measured on device 0).

Each layout builds the model once, straight onto its mesh (the same seed gives the same weights on
every layout), and frees it before the next.  The JSON at --out is rewritten after every step, so a
run cut short keeps what finished.  On CPU with forced devices (XLA_FLAGS=
--xla_force_host_platform_device_count=8) the same code runs at tiny shapes: that is its test.
Run it on a multi-GPU node through the node's launch script:

    launch/gpu_node.sh bench scaling --out scaling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import ridge
from ..models import init_random
from ..sharding import batch_shards, make_mesh, shard_batch
from ..verbalize import Injection, mean_embedding_norm
from .common import device_info, measured_copy_bandwidth, measured_matmul_peak, timed_loop, write_json
from .forward import model_config, time_forward
from .verbalize import param_bytes, time_generate

PARTS = ("forward", "ridge", "verbalize")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-27b-it",
                   help="a shipped shape config (crossmap/models/shapes/) or a config.json path, or tiny-<arch> "
                        "for a smoke run")
    p.add_argument("--layer", type=int, default=41, help="truncate the forward after this block (paper: 41)")
    p.add_argument("--dtype", default="bfloat16", help="parameter dtype of the forward and verbalizer models")
    p.add_argument("--layouts", default='[{"data": -1}, {"tensor": -1}]',
                   help="JSON list of mesh shapes to compare with one device (-1 = all devices on that axis)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--batch", type=int, default=16, help="forward: global batch (the same on every layout)")
    p.add_argument("--seq", type=int, default=1024, help="forward: tokens per row")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each forward (median reported)")
    p.add_argument("--ridge-d-in", type=int, default=3584, help="ridge: source width (Qwen2.5-7B)")
    p.add_argument("--ridge-d-out", type=int, default=5376, help="ridge: target width (Gemma-3-27B)")
    p.add_argument("--ridge-pairs", type=int, default=1 << 20)
    p.add_argument("--ridge-chunk", type=int, default=8192, help="ridge: rows per batch (global)")
    p.add_argument("--ridge-folds", type=int, default=5)
    p.add_argument("--ridge-nonfinite", default="skip", choices=["skip", "ignore"],
                   help="ridge: skip batches holding NaN/Inf (default, as the pipeline does) or no check")
    p.add_argument("--ridge-warn", default="default", choices=["default", "yes", "no"],
                   help="ridge: per-batch warning for skipped batches (a host callback); default: the library's")
    p.add_argument("--verbalize-batch", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--copy-mib", type=int, default=4096, help="size of the bandwidth-probe copy")
    p.add_argument("--single-device", default="auto", choices=["auto", "yes", "no"],
                   help="run the one-device baseline (auto: yes; its numbers are what the rest is compared to)")
    p.add_argument("--out", default="bench-scaling.json")


def _rel_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Largest over rows of |a - b| / |b| (flattened per batch row and position)."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)))


def _rel_stats(a: ridge.RidgeStats, b: ridge.RidgeStats) -> dict[str, float]:
    out = {}
    for f in ("count", "mean_x", "mean_y", "sxx", "sxy", "syy"):
        x, y = np.asarray(getattr(a, f), np.float64), np.asarray(getattr(b, f), np.float64)
        out[f] = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))
    return out


def _layout_name(shape: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in shape.items() if v != 1) or "data1"  # "one" names the baseline


# -- forward ---------------------------------------------------------------------------------------

def _forward(model, layer: int, mesh, tokens, positions, valid, repeats: int) -> tuple[dict, np.ndarray]:
    """Time the truncated forward: fused cuDNN attention on GPU (as `bench forward`), else XLA's."""
    attention = "cudnn" if jax.devices()[0].platform == "gpu" else "xla"
    try:
        timing, out = time_forward(model, layer, mesh, (tokens, positions, valid), attention, repeats)
    finally:
        model.attention_impl = None  # the verbalizer part runs the model next
    return timing, np.asarray(jax.device_get(out)).astype(np.float32)


# -- ridge -----------------------------------------------------------------------------------------

def _ridge_pool(key, n_pool: int, chunk: int, d_in: int, d_out: int):
    """Random correlated pairs (a few large column means, as residual streams have)."""
    kw, kp = jax.random.split(key)
    w = jax.random.normal(kw, (d_in, d_out), jnp.float32) / math.sqrt(d_in)

    @jax.jit
    def make(k):
        kx, ky = jax.random.split(k)
        x = jax.random.normal(kx, (chunk, d_in), jnp.float32).at[:, :4].add(100.0)
        return x, x @ w + jax.random.normal(ky, (chunk, d_out), jnp.float32)

    return [make(k) for k in jax.random.split(kp, n_pool)]


def _ridge(args, mesh, pool_single, result_layout: dict, reference: ridge.RidgeStats | None):
    d_in, d_out, folds, nf = args.ridge_d_in, args.ridge_d_out, args.ridge_folds, args.ridge_nonfinite
    check = {"on_nonfinite": nf} | ({} if args.ridge_warn == "default" else {"warn": args.ridge_warn == "yes"})
    chunk = pool_single[0][0].shape[0]
    n_batches = max(folds, args.ridge_pairs // chunk)
    out: dict[str, Any] = {"pairs": n_batches * chunk}
    result_layout["ridge"] = out
    pool = pool_single if mesh is None else [(shard_batch(x, mesh), shard_batch(y, mesh)) for x, y in pool_single]
    jax.block_until_ready(pool)

    def plain_init():
        return ridge.init_stats(d_in, d_out, folds)

    def plain_step(stats, i):
        return ridge.accumulate(stats, *pool[i % len(pool)], fold=i % folds, **check)

    stats, secs = timed_loop(plain_init, plain_step, lambda st: st, n_batches)
    if mesh is None:  # one device: the reference
        out["accumulate"] = {"seconds": secs, "pairs_per_s": n_batches * chunk / secs}
        return stats
    # (a) plain accumulate on batch-sharded inputs: XLA all-reduces each batch's products
    out["accumulate_sharded_batch"] = {"seconds": secs, "pairs_per_s": n_batches * chunk / secs}
    if reference is not None:
        out["accumulate_sharded_batch"]["rel_diff_vs_one_device"] = _rel_stats(stats, reference)
    del stats

    # (b) one slot per device, one psum at the end
    def device_init():
        return ridge.init_device_stats(mesh, d_in, d_out, folds)

    def device_step(stats, i):
        return ridge.accumulate_on_devices(stats, *pool[i % len(pool)], i % folds, mesh=mesh, **check)

    stats, secs = timed_loop(device_init, device_step, lambda st: ridge.reduce_device_stats(st, mesh),
                                      n_batches)
    out["accumulate_on_devices_psum"] = {"seconds": secs, "pairs_per_s": n_batches * chunk / secs,
                                         "device_slots": batch_shards(mesh)}
    if reference is not None:
        out["accumulate_on_devices_psum"]["rel_diff_vs_one_device"] = _rel_stats(stats, reference)
        m1, f1 = ridge.solve(reference, [1e-2, 1.0, 1e2, 1e4])
        mn, fn = ridge.solve(stats, [1e-2, 1.0, 1e2, 1e4])
        out["solve_vs_one_device"] = {"lambda_one": f1.lam, "lambda_mesh": fn.lam,
                                      "W_max_rel_diff": float(np.max(np.abs(np.asarray(mn.W) - np.asarray(m1.W)))
                                                              / np.max(np.abs(np.asarray(m1.W))))}
    return None


# -- verbalize -------------------------------------------------------------------------------------

def _verbalize(model, cfg, mesh, args, tensor: int, data: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(0)
    batch, plen, new = args.verbalize_batch, args.prompt_len, args.new_tokens
    prompts = rng.integers(0, cfg.vocab_size, size=(batch, plen)).astype(np.int32)
    vectors = rng.normal(size=(batch, cfg.d_model)).astype(np.float32)
    vectors *= mean_embedding_norm(model) / np.linalg.norm(vectors, axis=1, keepdims=True)
    inj = Injection(vectors, [plen // 2] * batch)

    timing, generated = time_generate(model, prompts, inj, new, mesh, max(3, args.repeats // 2))
    # per-device bytes read by one decode step: the weights it holds (tensor-split) and its KV share
    total, table = param_bytes(model)
    itemsize = model.embed[...].dtype.itemsize
    weights = (total - (0 if cfg.tie_embeddings else table)) / tensor
    rows = batch / data
    kv_split = tensor if cfg.n_kv_heads % tensor == 0 else 1
    kv = 2 * cfg.n_layers * rows * cfg.n_kv_heads / kv_split * cfg.head_dim * itemsize * (plen + new / 2)
    out = {"batch": batch, "prompt_len": plen, **timing, "weight_bytes_per_device_step": weights,
           "kv_bytes_per_device_step_avg": kv}
    return out, np.asarray(generated.tokens)


# -- driver ----------------------------------------------------------------------------------------

def _release_device_memory() -> None:
    """After the caller dropped its references: collect them and the compiled programs that hold buffers."""
    gc.collect()
    jax.clear_caches()


class _Baseline:
    """What the one-device run produced, for every later layout to be compared with."""

    def __init__(self) -> None:
        self.stats = self.hidden = self.tokens = None
        self.rates: dict[str, float] = {}


def _ridge_part(args, name: str, mesh, entry: dict, base: _Baseline) -> None:
    if name != "one" and batch_shards(mesh) == 1:
        entry["ridge"] = {"skipped": "this layout does not split the batch (pure tensor parallelism)"}
        return
    with jax.default_device(jax.devices()[0]):
        pool = _ridge_pool(jax.random.key(1), 8, args.ridge_chunk, args.ridge_d_in, args.ridge_d_out)
    if name == "one":
        with jax.default_device(jax.devices()[0]):
            base.stats = _ridge(args, None, pool, entry, None)
        base.rates["ridge"] = entry["ridge"]["accumulate"]["pairs_per_s"]
    else:
        _ridge(args, mesh, pool, entry, base.stats)
        if "ridge" in base.rates:
            for key in ("accumulate_sharded_batch", "accumulate_on_devices_psum"):
                entry["ridge"][key]["scaling_efficiency"] = entry["ridge"][key]["pairs_per_s"] / (
                    mesh.devices.size * base.rates["ridge"])
    del pool
    _release_device_memory()
    print(f"[scaling]   ridge: {json.dumps(entry['ridge'])[:400]}", flush=True)


def _forward_part(model, layer: int, name: str, mesh, batch: tuple, flops: float, peak: float, repeats: int,
                  entry: dict, base: _Baseline) -> None:
    n = mesh.devices.size
    fwd, hidden = _forward(model, layer, mesh, *batch, repeats)
    fwd["tokens_per_s"] = batch[0].size / fwd["median_s"]
    fwd["tflops_per_device"] = flops / fwd["median_s"] / n / 1e12
    fwd["mfu_per_device"] = fwd["tflops_per_device"] / peak
    if name == "one":
        base.hidden, base.rates["forward"] = hidden, fwd["tokens_per_s"]
    else:
        if "forward" in base.rates:
            fwd["scaling_efficiency"] = fwd["tokens_per_s"] / (n * base.rates["forward"])
        if base.hidden is not None:
            fwd["max_row_rel_diff_vs_one_device"] = _rel_rows(hidden, base.hidden)
    entry["forward"] = fwd
    checks = {k: v for k, v in fwd.items() if "diff" in k or "eff" in k}
    print(f"[scaling]   forward: {fwd['tokens_per_s']:.0f} tok/s, MFU/device {fwd['mfu_per_device']:.3f}, "
          f"{json.dumps(checks)}", flush=True)


def _verbalize_part(model, cfg, args, name: str, mesh, bandwidth: float, entry: dict, base: _Baseline) -> None:
    tensor, data = mesh.shape["tensor"], mesh.shape["data"] * mesh.shape["fsdp"]
    verb, gen = _verbalize(model, cfg, mesh, args, tensor, data)
    verb["floor_step_s"] = (verb["weight_bytes_per_device_step"] + verb["kv_bytes_per_device_step_avg"]) / bandwidth
    verb["ratio_to_floor"] = verb["decode_step_s"] / verb["floor_step_s"]
    if name == "one":
        base.tokens, base.rates["verbalize"] = gen, verb["explanations_per_s"]
    else:
        if "verbalize" in base.rates:
            verb["speedup_vs_one_device"] = verb["explanations_per_s"] / base.rates["verbalize"]
        if base.tokens is not None:
            verb["tokens_equal_to_one_device"] = float(np.mean(gen == base.tokens))
            verb["first_token_equal_to_one_device"] = float(np.mean(gen[:, 0] == base.tokens[:, 0]))
    entry["verbalize"] = verb
    print(f"[scaling]   verbalize: {verb['explanations_per_s']:.1f} explanations/s, step "
          f"{verb['decode_step_s'] * 1e3:.2f} ms ({verb['ratio_to_floor']:.2f}x floor)", flush=True)


def _guarded(entry: dict, key: str, fn, *fn_args) -> None:
    """Run one part; a failure (e.g. out of memory on one device) is recorded and the rest go on."""
    try:
        fn(*fn_args)
    except Exception as err:  # noqa: BLE001
        entry[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"[scaling]   {key} failed: {entry[key]['error']}", flush=True)


def run(args: argparse.Namespace) -> dict:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--parts: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    layouts = json.loads(args.layouts)
    if not isinstance(layouts, list) or not all(isinstance(x, dict) for x in layouts):
        raise ValueError(f"--layouts must be a JSON list of mesh shapes like {{\"tensor\": -1}}, got {args.layouts}")
    cfg, _ = model_config(args.model)
    layer = cfg.n_layers - 1 if args.layer < 0 else min(args.layer, cfg.n_layers - 1)
    devices = jax.devices()
    result: dict[str, Any] = {"bench": "scaling", "model": args.model, "layer": layer, "dtype": args.dtype,
                              "parts": parts, "device": device_info(), "layouts": {}}

    def save():
        write_json(result, args.out, echo=False)

    print(f"[scaling] {len(devices)} x {devices[0].device_kind}; {args.model} to block {layer}; parts {parts}",
          flush=True)
    with jax.default_device(devices[0]):
        result["measured_peak_tflops_device0"] = measured_matmul_peak(args.dtype)["tflops"]
        if "verbalize" in parts:
            result["copy_bandwidth_GBps_device0"] = measured_copy_bandwidth(args.copy_mib << 20)["gb_per_s"]
    save()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy()
    batch = (tokens, positions, np.ones(tokens.shape, bool))
    result["forward_flops"] = flops = cfg.forward_flops_per_token(args.seq, upto_layer=layer) * tokens.size

    plan = [("one", make_mesh({"data": 1}, devices=devices[:1]))] if args.single_device != "no" else []
    for mesh in (make_mesh(shape) for shape in layouts):
        if _layout_name(dict(mesh.shape)) not in dict(plan):  # on one device every layout is the same
            plan.append((_layout_name(dict(mesh.shape)), mesh))
    base = _Baseline()
    for name, mesh in plan:
        entry: dict[str, Any] = {"mesh": dict(mesh.shape), "n_devices": mesh.devices.size}
        result["layouts"][name] = entry
        print(f"[scaling] layout {name}: {dict(mesh.shape)}", flush=True)
        if "ridge" in parts:
            _guarded(entry, "ridge", _ridge_part, args, name, mesh, entry, base)
            save()
        if not {"forward", "verbalize"} & set(parts):
            continue
        try:
            t0 = time.perf_counter()
            model = init_random(cfg, seed=0, dtype=args.dtype, mesh=mesh)
            jax.block_until_ready(nnx.split(model)[1])
            entry["init_random_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - e.g. the model does not fit one device: say so, go on
            entry["error"] = f"init_random: {type(err).__name__}: {str(err)[:300]}"
            print(f"[scaling]   {entry['error']}", flush=True)
            save()
            continue
        if "forward" in parts:
            _guarded(entry, "forward", _forward_part, model, layer, name, mesh, batch, flops,
                     result["measured_peak_tflops_device0"], args.repeats, entry, base)
            save()
        if "verbalize" in parts:
            _guarded(entry, "verbalize", _verbalize_part, model, cfg, args, name, mesh,
                     result["copy_bandwidth_GBps_device0"] * 1e9, entry, base)
            save()
        del model
        _release_device_memory()
    save()
    return result
