"""Probe (issue 18, 2026-12-07): nucleus sampling by rejection, against the step's filter-then-sample.

The sampled 7B step is 1.08 ms slower than the greedy one on the H100 (7.47 against 6.39 ms, autotuning off,
BENCHMARKS.md), about what `crossmap bench top-p` measured for the nucleus filter alone (1.16 ms: 16 passes of
its bit-pattern search over [128, 152k] probabilities). Sampling needs no cut-off: draw K candidate tokens from
the whole softmax (one inversion of the cumulative distribution, K uniforms a row), and keep a row's first
candidate that lies in the nucleus, i.e. whose probability has less than top_p of mass strictly above it (the
filter's own rule: one pass of K masked sums). A token accepted this way is distributed exactly as the
renormalised nucleus, since every nucleus token keeps its relative weight. A row accepts each candidate with the
nucleus's mass, which is at least top_p, so K = 4 misses with odds at most (1 - top_p)^4 (1e-4 at 0.9); a row
that misses takes the exact filter and sampler, under `lax.cond`, whose branch runs only when some row missed.

The CPU check (`check`) compares, over many draws, each way's token frequencies with the nucleus distribution
computed exactly on the host. The GPU run times both ways (dispatched back to back, as inside a decode loop) on
flat rows (random weights: a wide nucleus) and peaked rows (a trained model's: a narrow one).
Usage: top_p_rejection.py OUT.json   |   top_p_rejection.py --check"""
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from probe_runs import recorded

from crossmap.benchmarks.common import device_info
from crossmap.benchmarks.decode_parts import back_to_back
from crossmap.verbalize.engine import invert_cdf, sample_categorical, sample_nucleus, top_p_filter


def sample_whole_row(key, logits):
    """The sampler before commit (this probe's wiring): one inversion of the whole row's cumsum."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
    last = logits.shape[1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), last)


@jax.jit
def filter_then_sample(key, logits, top_p):
    """What the step ran before (`_choose` with top-p: the filter, then the whole-row sampler)."""
    return sample_whole_row(key, top_p_filter(logits, top_p))


@functools.partial(jax.jit, static_argnames=("candidates",))
def rejection_sample(key, logits, top_p, *, candidates: int = 4):
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    draw_key, fallback_key = jax.random.split(key)
    u = jax.random.uniform(draw_key, (logits.shape[0], candidates, 1), jnp.float32) * cdf[:, None, -1:]
    last = logits.shape[1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    tokens = jnp.minimum(jnp.sum(cdf[:, None, :] <= u, axis=-1), last[:, None])  # [n, K]
    p_token = jnp.take_along_axis(probs, tokens, axis=1)
    mass_above = jnp.sum(jnp.where(probs[:, None, :] > p_token[:, :, None], probs[:, None, :], 0.0), axis=-1)
    return keep_first_inside(tokens, mass_above, fallback_key, logits, top_p)


def keep_first_inside(tokens, mass_above, fallback_key, logits, top_p):
    """Each row's first candidate (tokens [n, K]) with less than top_p of mass above it (mass_above [n, K]); rows
    with none take the filter then the sampler, in a branch that runs only when some row has none."""
    inside = (mass_above < top_p) | (top_p >= 1.0)
    first = jnp.argmax(inside, axis=1)
    chosen = jnp.take_along_axis(tokens, first[:, None], axis=1)[:, 0]
    missed = ~jnp.any(inside, axis=1)
    return jax.lax.cond(jnp.any(missed),
                        lambda: jnp.where(missed, filter_then_sample(fallback_key, logits, top_p), chosen),
                        lambda: chosen)


@functools.partial(jax.jit, static_argnames=("chunks",))
def sample_two_level(key, logits, *, chunks: int = 512):
    """One draw a row (the sampler alone, K = 1), against `sample_categorical`'s whole-row cumsum."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return invert_cdf(probs, jax.random.uniform(key, (logits.shape[0], 1), jnp.float32), chunks=chunks)[:, 0]


@functools.partial(jax.jit, static_argnames=("candidates", "chunks"))
def rejection_two_level(key, logits, top_p, *, candidates: int = 4, chunks: int = 512):
    """`rejection_sample` with the candidates drawn by `engine.invert_cdf` and the K masked sums of the nucleus
    test reduced chunk by chunk (n x K x chunks partial sums, then the chunks)."""
    n, v = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    draw_key, fallback_key = jax.random.split(key)
    tokens = invert_cdf(probs, jax.random.uniform(draw_key, (n, candidates), jnp.float32), chunks=chunks)
    p_token = jnp.take_along_axis(probs, tokens, axis=1)
    length = -(-v // chunks)
    p = jnp.pad(probs, ((0, 0), (0, chunks * length - v))).reshape(n, 1, chunks, length)
    partial_mass = jnp.sum(jnp.where(p > p_token[:, :, None, None], p, 0.0), axis=-1)  # [n, K, m]
    return keep_first_inside(tokens, jnp.sum(partial_mass, axis=-1), fallback_key, logits, top_p)


def filter_unrolled_then_sample(key, logits, top_p):
    """`filter_then_sample` with the filter's 16-pass `fori_loop` unrolled (traced with the loop patched), to see
    what the loop itself costs inside a step."""
    loop = jax.lax.fori_loop
    jax.lax.fori_loop = functools.partial(loop, unroll=True)
    try:
        return sample_whole_row(key, top_p_filter(logits, top_p))
    finally:
        jax.lax.fori_loop = loop


filter_unrolled_then_sample = jax.jit(filter_unrolled_then_sample)


WHOLE_ROW, CATEGORICAL = jax.jit(sample_whole_row), jax.jit(sample_categorical)


@jax.jit
def greedy(key, logits, top_p):
    """The greedy step's choice, for scale."""
    del key, top_p
    return jnp.argmax(logits, axis=-1)


def nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The exact nucleus distribution of each row, in float64 on the host."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros_like(p)
    for r, row in enumerate(p):
        above = np.array([row[row > x].sum() for x in row])
        kept = above < top_p
        out[r, kept] = row[kept] / row[kept].sum()
    return out


def check(draws: int = 40_000, vocab: int = 64, top_p: float = 0.6) -> None:
    """Token frequencies of both ways against the exact nucleus, on a flat and a peaked row."""
    rng = np.random.default_rng(0)
    logits = np.stack([rng.normal(size=vocab) * 0.5, rng.normal(size=vocab) * 3.0]).astype(np.float32)
    tiled = jnp.asarray(np.repeat(logits, draws // 2, axis=0))  # draws // 2 copies of each row
    for name, way in (("filter then sample", filter_then_sample), ("rejection K=4", rejection_sample),
                      ("filter unrolled then sample", filter_unrolled_then_sample),
                      ("rejection K=1", functools.partial(rejection_sample, candidates=1)),
                      ("two-level K=4", functools.partial(rejection_two_level, chunks=5)),
                      ("two-level K=1", functools.partial(rejection_two_level, candidates=1, chunks=7)),
                      ("two-level sampler", lambda k, x, p: sample_two_level(k, x, chunks=5)),
                      ("engine sample_nucleus", sample_nucleus),
                      ("engine sample_categorical", lambda k, x, p: sample_categorical(k, x))):
        want = nucleus(logits.astype(np.float64), 1.0 if "sampler" in name or "categorical" in name else top_p)
        got = np.asarray(way(jax.random.key(1), tiled, jnp.float32(top_p))).reshape(2, -1)
        freq = np.stack([np.bincount(row, minlength=vocab) / row.size for row in got])
        outside = freq[want == 0].sum()
        # three standard errors of a frequency, at the largest probability
        tolerance = 3 * np.sqrt(want.max() * (1 - want.max()) / (draws // 2))
        worst = np.abs(freq - want).max()
        print(f"[top-p check] {name:20s}: max |freq - exact| {worst:.4f} (3 s.e. {tolerance:.4f}), "
              f"mass drawn outside the nucleus {outside:.5f}", flush=True)
        assert outside == 0 and worst < tolerance, name


def main(out_path: str, batch: int = 128, vocab: int = 152064, top_p: float = 0.9, reps: int = 50) -> None:
    started = time.time()
    result = {"device": device_info(), "jax": jax.__version__, "batch": batch, "vocab": vocab, "top_p": top_p,
              "runs": []}
    rng = np.random.default_rng(0)
    for spread in (0.5, 4.0):
        logits = jnp.asarray(rng.normal(size=(batch, vocab)) * spread, jnp.float32)
        for name, way in (("greedy argmax", greedy), ("filter then sample", filter_then_sample),
                          ("filter unrolled then sample", filter_unrolled_then_sample),
                          ("whole-row sampler alone", lambda k, x, p: WHOLE_ROW(k, x)),
                          ("engine sample_categorical", lambda k, x, p: CATEGORICAL(k, x)),
                          ("engine sample_nucleus", jax.jit(sample_nucleus)),
                          ("rejection K=4", rejection_sample),
                          ("two-level K=4", rejection_two_level),
                          ("two-level K=4 256 chunks", functools.partial(rejection_two_level, chunks=256)),
                          ("two-level K=4 1024 chunks", functools.partial(rejection_two_level, chunks=1024)),
                          ("two-level K=8", functools.partial(rejection_two_level, candidates=8))):
            entry = {"way": name, "spread": spread}
            with recorded(result, out_path, entry, f"[top-p] spread {spread} {name}"):
                keys = iter(jax.random.split(jax.random.key(0), reps + 2))  # a fresh key a call, as a decode step
                entry["s"] = back_to_back(lambda w=way, k=keys, x=logits: w(next(k), x, jnp.float32(top_p)), reps)
                print(f"[top-p] spread {spread} {name:20s}: {entry['s'] * 1e3:.3f} ms", flush=True)
    result["wall_s"] = time.time() - started
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    else:
        main(sys.argv[1])
