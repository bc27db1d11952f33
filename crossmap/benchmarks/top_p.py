"""`crossmap bench top-p`: the nucleus filter at a verbalizer's decode shape, alone.

One sampled decode step of the paper config's verbalizers filters a [batch, vocab] float32 block
of logits (128 x 152,064 for the 7B).  `crossmap.verbalize.engine.top_p_filter` finds the exact
cut-off by searching the probabilities' float32 bit patterns, `arity - 1` candidates a pass.
This times it for several arities against the textbook filter (sort each row, cumulative sum,
keep the prefix), and times the other per-step sampling work (argmax for greedy, one categorical
draw) for scale.  It then times the two ways a sampled step can draw from the nucleus: the filter
followed by one categorical draw, and `engine.sample_nucleus` (what the step runs: candidates drawn
from the whole softmax, the first inside the nucleus kept, no filter unless every candidate misses);
each draw is checked to lie inside the float64 nucleus.  Both filters are checked against the
definition computed on the host in float64: with random weights the rows are nearly flat (about
125k of 152k tokens kept, each near 8e-6), so float32 summation order alone can move the cut by a
few tokens; the counts of tokens that differ from the float64 cut are reported for both.

    crossmap bench top-p --out top_p.json                        # 7B shape, on a GPU
    crossmap bench top-p --batch 4 --vocab 5000 --reps 3         # CPU smoke run
    launch/gpu_node.sh bench top-p --tensor 2 --out top_p_tp2.json   # vocabulary split over 2 GPUs

With `--tensor N` the logits are split along the vocabulary over N devices, as a tensor-parallel
verbalizer's LM head leaves them (the paper config on a multi-GPU node).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..sharding import make_mesh, sharding_for
from .common import device_info, time_jax, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=128, help="rows (sequences decoded at once)")
    p.add_argument("--vocab", type=int, default=152064, help="vocabulary width (Qwen2.5: 152,064)")
    p.add_argument("--arities", default="2,3,4,6,8,16", help="comma-separated search arities to time")
    p.add_argument("--temperature", type=float, default=0.7, help="logits are divided by it first (paper config: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass to keep (paper config: 0.95)")
    p.add_argument("--spread", type=float, default=0.5,
                   help="std of the random logits: small = flat rows (random weights; a wide nucleus)")
    p.add_argument("--reps", type=int, default=50, help="timed calls (median reported)")
    p.add_argument("--peer-reps", type=int, default=3, help="timed calls of the sort-and-cumsum filter")
    p.add_argument("--tensor", type=int, default=1,
                   help="split the vocabulary over this many devices (1 = one device)")
    p.add_argument("--out", default=None, help="write the JSON result here")


def sort_cumsum_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """The textbook nucleus filter: sort each row, keep the prefix whose mass first reaches top_p."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    ordered = jnp.sort(probs, axis=-1)[:, ::-1]
    above = jnp.cumsum(ordered, axis=-1) - ordered  # mass strictly above each sorted entry
    cut = jnp.min(jnp.where(above < top_p, ordered, jnp.inf), axis=-1)
    return jnp.where(probs >= cut[:, None], logits, -jnp.inf)


def float64_kept(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The nucleus of each row by the definition, in float64 on the host: [n, V] bool."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    ordered = -np.sort(-probs, axis=1)
    above = np.cumsum(ordered, axis=1) - ordered
    cut = np.where(above < top_p, ordered, np.inf).min(axis=1)
    return probs >= cut[:, None]


def _differences(kept: jax.Array, exact: np.ndarray) -> dict[str, int]:
    wrong = (np.asarray(kept) != exact).sum(axis=1)
    return {"tokens_differing_from_float64": int(wrong.sum()), "worst_row": int(wrong.max())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..verbalize.engine import sample_categorical, sample_nucleus, top_p_filter

    arities = [int(a) for a in str(args.arities).split(",") if a.strip()]
    if not arities or min(arities) < 2:
        raise ValueError(f"--arities: each must be >= 2, got {args.arities!r}")
    logits = jax.random.normal(jax.random.key(0), (args.batch, args.vocab), jnp.float32) * args.spread
    if args.tensor > 1:
        if args.tensor > jax.device_count() or args.vocab % args.tensor:
            raise ValueError(f"--tensor {args.tensor}: needs that many devices (have {jax.device_count()}) and a "
                             f"vocabulary divisible by it (--vocab {args.vocab})")
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": args.tensor}, jax.devices()[:args.tensor])
        logits = jax.device_put(logits, sharding_for(mesh, ("batch", "vocab"), logits.shape))
    key = jax.random.key(1)
    t, p = args.temperature, args.top_p
    exact = float64_kept(np.asarray(logits), t, p)
    peer = jax.jit(lambda x: sort_cumsum_filter(x / t, p))
    result: dict[str, Any] = {"bench": "top-p", "device": device_info(), "batch": args.batch, "vocab": args.vocab,
                              "temperature": t, "top_p": p, "spread": args.spread, "tensor": args.tensor,
                              "kept_per_row_mean": float(exact.sum(axis=1).mean()), "arity": {}}

    def measure(f, repeats: int) -> dict[str, Any]:
        differences = _differences(jnp.isfinite(f(logits)), exact)  # this first call also compiles f
        return {"ms": time_jax(lambda: f(logits), warmup=0, repeats=repeats)["median_s"] * 1e3, **differences}

    result["sort_cumsum"] = measure(peer, args.peer_reps)
    for arity in arities:
        result["arity"][str(arity)] = measure(jax.jit(lambda x, a=arity: top_p_filter(x / t, p, arity=a)), args.reps)
    greedy = jax.jit(lambda x: jnp.argmax(x, -1))
    result["argmax_ms"] = time_jax(lambda: greedy(logits), repeats=args.reps)["median_s"] * 1e3
    draw = jax.jit(lambda k, x: jax.random.categorical(k, x / t))
    result["categorical_ms"] = time_jax(lambda: draw(key, logits), repeats=args.reps)["median_s"] * 1e3
    one_draw = jax.jit(sample_categorical)
    result["sample_categorical_ms"] = time_jax(lambda: one_draw(key, logits), repeats=args.reps)["median_s"] * 1e3
    samplers = {"filter_then_sample": lambda k, x: sample_categorical(k, top_p_filter(x / t, p)),
                "sample_nucleus": lambda k, x: sample_nucleus(k, x / t, jnp.float32(p))}
    result["samplers"] = {}
    for name, sampler in samplers.items():
        sampler = jax.jit(sampler)
        drawn = np.asarray(sampler(key, logits))
        result["samplers"][name] = {
            "ms": time_jax(lambda f=sampler: f(key, logits), repeats=args.reps)["median_s"] * 1e3,
            "draws_outside_float64_nucleus": int((~exact[np.arange(drawn.size), drawn]).sum())}
    result["sample_nucleus_speedup"] = (result["samplers"]["filter_then_sample"]["ms"]
                                        / result["samplers"]["sample_nucleus"]["ms"])
    best = min(result["arity"], key=lambda a: result["arity"][a]["ms"])
    result["fastest_arity"] = int(best)
    result["speedup_vs_sort_cumsum"] = result["sort_cumsum"]["ms"] / result["arity"][best]["ms"]
    line = ", ".join(f"arity {a}: {r['ms']:.3f} ms ({r['tokens_differing_from_float64']} off)"
                     for a, r in result["arity"].items())
    peer_r = result["sort_cumsum"]
    print(f"[top-p bench] [{args.batch}, {args.vocab}] on {args.tensor} x {result['device']['device_kind']}, "
          f"{result['kept_per_row_mean']:.0f} kept a row: {line}; sort+cumsum {peer_r['ms']:.3f} ms "
          f"({peer_r['tokens_differing_from_float64']} off); categorical draw {result['categorical_ms']:.3f} ms; "
          f"filter then sample {result['samplers']['filter_then_sample']['ms']:.3f} ms, "
          f"sample_nucleus {result['samplers']['sample_nucleus']['ms']:.3f} ms")
    write_json(result, args.out, echo=False)
    return result
