"""`crossmap bench decode-parts`: one decode step of the generation engine taken apart, each part against the
time its bytes take at the copy bandwidth measured in the same run.

Random weights at a `bench verbalize` preset's shape (default the Qwen2.5-7B verbalizer), `--batch` rows, one
query token attending to a cache of `--cache` slots (half of them valid).  Each part is its own jitted program
over every layer, with the model's own weights, timed over `--reps` calls dispatched back to back (as steps run
inside the decode loop, with no wait for the host between them):

    step         a whole decode step: embed, every block with the cache (written in place, donated), head, argmax
    blocks       the same without the final norm, LM head and argmax
    head         final norm, LM head and argmax on one token per row
    mlps         every layer's gated MLP, chained (weights read: gate, up, down)
    projections  every layer's q, k, v and o einsums, chained (no rope, no attention)
    attention    every layer's softmax attention of one query over its cache (`layers.grouped_attention`)

Floors: the bytes each part must read (its weights; the attention's K and V over the whole cache; the step's
weights without the input-embedding table plus the cache) / the copy bandwidth.  The parts overlap (step >=
blocks + head; blocks ~ mlps + projections + attention + norms, rope and the cache write), so what the step
spends beyond the sum of its parts' floors is read off part by part.

    crossmap bench decode-parts --out decode_parts.json              # on a GPU: the 7B shape
    crossmap bench decode-parts --preset tiny --out /tmp/d.json      # CPU smoke run
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth, write_json
from crossmap.benchmarks.verbalize import PRESETS, param_bytes, preset_config
from crossmap.models import init_random
from crossmap.models.layers import attention_mask, grouped_attention

PARTS = ("step", "blocks", "head", "mlps", "projections", "attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b", help="the model shape (bench verbalize's)")
    parser.add_argument("--batch", type=int, default=None, help="rows (preset default)")
    parser.add_argument("--cache", type=int, default=None,
                        help="cache slots (default: the preset's prompt + new tokens); half are valid")
    parser.add_argument("--reps", type=int, default=30, help="calls per part, back to back")
    parser.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth-probe copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="decode_parts.json", help="JSON output path")


def _nbytes(*arrays) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in arrays))


def back_to_back(call, n: int) -> float:
    """Seconds per call of `n` calls dispatched back to back and waited for once (after a warm-up call):
    what a part costs inside a decode loop, where no step waits for the host; one call waited for alone
    would add the dispatch and synchronisation latency to every part."""
    jax.block_until_ready(call())
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def part_programs(model, batch: int, cache_len: int) -> tuple[dict[str, Any], dict[str, int]]:
    """({part: zero-argument callable running it once}, {part: bytes it must read})."""
    cfg = model.config
    graphdef, state = nnx.split(model)
    dtype = model.embed[...].dtype
    valid_upto = cache_len // 2
    kv_valid = jnp.broadcast_to(jnp.arange(cache_len)[None, :] <= valid_upto, (batch, cache_len))
    q_index = jnp.full((batch, 1), valid_upto, jnp.int32)
    tokens = jnp.zeros((batch,), jnp.int32)
    x1 = jnp.ones((batch, 1, cfg.d_model), dtype)
    holder = {"cache": model.init_cache(batch, cache_len)}

    def decode(state, cache, tok, with_head: bool):
        m = nnx.merge(graphdef, state)
        h, cache = m.run(m.embed_tokens(tok[:, None]), q_index, kv_valid, q_index=q_index, cache=cache)
        return (jnp.argmax(m.head(h)[:, 0], -1) if with_head else h), cache

    def cached(with_head: bool):
        jitted = jax.jit(lambda s, c, t: decode(s, c, t, with_head), donate_argnums=(1,))

        def call():
            out, holder["cache"] = jitted(state, holder["cache"], tokens)
            return out
        return call

    @jax.jit
    def head(state, x):
        return jnp.argmax(nnx.merge(graphdef, state).head(x)[:, 0], -1)

    @jax.jit
    def mlps(state, x):
        for layer in nnx.merge(graphdef, state).layers:
            x = x + layer.mlp(x)
        return x

    @jax.jit
    def projections(state, x):
        for layer in nnx.merge(graphdef, state).layers:
            a = layer.attn
            q = jnp.einsum("btd,dnh->btnh", x, a.q[...])
            k = jnp.einsum("btd,dkh->btkh", x, a.k[...])
            v = jnp.einsum("btd,dkh->btkh", x, a.v[...])
            mixed = q + jnp.repeat(k + v, cfg.n_heads // cfg.n_kv_heads, axis=2)
            x = x + jnp.einsum("btnh,nhd->btd", mixed, a.o[...])
        return x

    mask = attention_mask(q_index, kv_valid, None)
    q0 = jnp.ones((batch, 1, cfg.n_heads, cfg.head_dim), dtype)

    @jax.jit
    def attention(q, cache):
        for k, v in cache:
            q = q + grouped_attention(q, k, v, mask, cfg.attn_scale)
        return q

    layers = model.layers
    mlp_bytes = sum(_nbytes(layer.mlp.gate[...], layer.mlp.up[...], layer.mlp.down[...]) for layer in layers)
    proj_bytes = sum(_nbytes(layer.attn.q[...], layer.attn.k[...], layer.attn.v[...], layer.attn.o[...])
                     for layer in layers)
    kv_bytes = sum(_nbytes(k, v) for k, v in holder["cache"])
    head_w = model.embed[...] if model.lm_head is None else model.lm_head[...]
    total, embed = param_bytes(model)
    step_bytes = total - (0 if cfg.tie_embeddings else embed) + kv_bytes
    programs = {"step": cached(True), "blocks": cached(False), "head": lambda: head(state, x1),
                "mlps": lambda: mlps(state, x1), "projections": lambda: projections(state, x1),
                "attention": lambda: attention(q0, holder["cache"])}
    floors = {"step": step_bytes, "blocks": step_bytes - _nbytes(head_w), "head": _nbytes(head_w),
              "mlps": mlp_bytes, "projections": proj_bytes, "attention": kv_bytes}
    return programs, floors


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    cfg = preset_config(preset)
    batch = preset["batch"] if args.batch is None else args.batch  # 0 is an error below, not the default
    cache_len = preset["prompt_len"] + preset["new_tokens"] if args.cache is None else args.cache
    if batch < 1 or cache_len < 2:
        raise ValueError(f"need --batch >= 1 and --cache >= 2, got {batch} and {cache_len}")
    model = init_random(cfg, seed=args.seed, dtype=preset["dtype"])
    programs, floor_bytes = part_programs(model, batch, cache_len)
    bandwidth = measured_copy_bandwidth((args.copy_mib or preset["copy_mib"]) << 20, repeats=5)["gb_per_s"] * 1e9
    parts = {}
    for name in PARTS:
        seconds = back_to_back(programs[name], args.reps)
        floor = floor_bytes[name] / bandwidth
        parts[name] = {"ms": seconds * 1e3, "floor_ms": floor * 1e3, "bytes": floor_bytes[name],
                       "ratio_to_floor": seconds / floor}
        print(f"[decode-parts] {name:<12} {seconds * 1e3:8.3f} ms   floor {floor * 1e3:7.3f} ms   "
              f"ratio {seconds / floor:5.2f}", flush=True)
    result = {"benchmark": "decode-parts", "preset": args.preset, "model": cfg.name or cfg.model_type,
              "batch": batch, "cache_slots": cache_len, "valid_slots": cache_len // 2 + 1, "dtype": preset["dtype"],
              "copy_bandwidth_GBps": bandwidth / 1e9, "parts": parts, "device": device_info()}
    write_json(result, args.out, echo=False)
    return result
