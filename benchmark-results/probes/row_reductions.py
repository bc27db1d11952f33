"""Probe (issue 18, 2026-12-07): the step's whole-row reductions over [128, 152064] logits, flat against chunked.

The greedy choice (argmax) took 0.18-0.19 ms on an H100 (top_p_rejection.py), where reading the 78 MB of float32
logits once takes about 0.03 ms: a reduction over 152k entries with only 128 rows leaves most of the GPU idle.
Reducing each row in chunks first ([n, m, V/m] -> [n, m] -> [n]) gives n * m outputs in the first pass.
Ways: argmax, max, softmax's max + sum; each flat and chunked (m = 256, 512, 1024), timed back to back.
Usage: row_reductions.py OUT.json"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from probe_runs import recorded

from crossmap.benchmarks.common import device_info
from crossmap.benchmarks.decode_parts import back_to_back


def chunked_argmax(x, chunks):
    n, v = x.shape
    length = -(-v // chunks)
    padded = jnp.pad(x, ((0, 0), (0, chunks * length - v)), constant_values=-jnp.inf).reshape(n, chunks, length)
    inner = jnp.argmax(padded, axis=-1)  # [n, m]
    best = jnp.max(padded, axis=-1)
    c = jnp.argmax(best, axis=-1)
    return c * length + jnp.take_along_axis(inner, c[:, None], axis=1)[:, 0]


def chunked_max(x, chunks):
    n, v = x.shape
    length = -(-v // chunks)
    padded = jnp.pad(x, ((0, 0), (0, chunks * length - v)), constant_values=-jnp.inf).reshape(n, chunks, length)
    return jnp.max(jnp.max(padded, axis=-1), axis=-1)


def chunked_softmax(x, chunks):
    n, v = x.shape
    top = chunked_max(x, chunks)
    e = jnp.exp(x - top[:, None])
    length = -(-v // chunks)
    total = jnp.sum(jnp.sum(jnp.pad(e, ((0, 0), (0, chunks * length - v))).reshape(n, chunks, length), -1), -1)
    return e / total[:, None]


def main(out_path: str, batch: int = 128, vocab: int = 152064, reps: int = 50) -> None:
    started = time.time()
    result = {"device": device_info(), "jax": jax.__version__, "batch": batch, "vocab": vocab, "runs": []}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, vocab)) * 2.0, jnp.float32)
    want = np.asarray(x).argmax(axis=1)
    ways = {"argmax flat": jax.jit(lambda x: jnp.argmax(x, -1)), "max flat": jax.jit(lambda x: jnp.max(x, -1)),
            "softmax flat": jax.jit(lambda x: jax.nn.softmax(x, -1))}
    for m in (256, 512, 1024):
        ways |= {f"argmax {m} chunks": jax.jit(lambda x, m=m: chunked_argmax(x, m)),
                 f"max {m} chunks": jax.jit(lambda x, m=m: chunked_max(x, m)),
                 f"softmax {m} chunks": jax.jit(lambda x, m=m: chunked_softmax(x, m))}
    for name, way in ways.items():
        entry = {"way": name}
        with recorded(result, out_path, entry, f"[rows] {name}"):
            out = np.asarray(way(x))
            if name.startswith("argmax"):
                entry["wrong"] = int((out != want).sum())
            entry["s"] = back_to_back(lambda w=way: w(x), reps)
            print(f"[rows] {name:20s}: {entry['s'] * 1e3:.3f} ms {entry.get('wrong', '')}", flush=True)
    result["wall_s"] = time.time() - started
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
