"""Probe: one decode step's attention alone, the XLA definition against the Pallas kernel at several tilings, at the
7B and 27B decode shapes (batch 128, bf16).  Eight caches are chained per timed call so L2 holds none of them; the
floor is the bytes of the slots the kernel must read (the valid ones) at the copy bandwidth measured here.

    python3 benchmark-results/probes/decode_attention_sweep.py OUT.json
"""
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from crossmap.benchmarks.common import measured_copy_bandwidth
from crossmap.models.attention import attention_mask, decode_attention_pallas, grouped_attention

SHAPES = {"7b": dict(k=4, g=7, h=128, window=None), "27b-global": dict(k=16, g=2, h=128, window=None),
          "27b-sliding": dict(k=16, g=2, h=128, window=1024)}
B, S, SLOT, COPIES, REPS = 128, 192, 160, 8, 20


def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / COPIES


def main(out):
    bandwidth = measured_copy_bandwidth(4096 << 20, repeats=5)["gb_per_s"] * 1e9
    rng = np.random.default_rng(0)
    results = {"bandwidth_GBps": bandwidth / 1e9, "batch": B, "slots": S, "query_slot": SLOT, "shapes": {}}
    for name, shape in SHAPES.items():
        k, g, h, window = shape["k"], shape["g"], shape["h"], shape["window"]
        q = jnp.asarray(rng.normal(size=(B, 1, k * g, h)), jnp.bfloat16)
        caches = [(jnp.asarray(rng.normal(size=(B, k, S, h)), jnp.bfloat16),
                   jnp.asarray(rng.normal(size=(B, k, S, h)), jnp.bfloat16)) for _ in range(COPIES)]
        q_index = jnp.full((B, 1), SLOT, jnp.int32)
        valid = jnp.ones((B, S), bool)
        floor = 2 * B * k * (SLOT + 1) * h * 2 / bandwidth
        mask = attention_mask(q_index, valid, window)

        @jax.jit
        def reference(q, caches):
            return [grouped_attention(q, kc, vc, mask, 0.088) for kc, vc in caches]

        entry = {"floor_s": floor, "reference_s": timed(reference, q, caches)}
        want = reference(q, caches)[0].astype(jnp.float32)
        configs = {}
        for block, warps, stages in itertools.product((16, 32, 64, 128), (2, 4), (1, 2)):
            def kernel(q, caches, block=block, warps=warps, stages=stages):
                return [decode_attention_pallas(q, kc, vc, q_index, valid, scale=0.088, window=window, block=block,
                                                num_warps=warps, num_stages=stages) for kc, vc in caches]
            try:
                fn = jax.jit(kernel)
                got = fn(q, caches)[0].astype(jnp.float32)
                err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
                configs[f"{block}/{warps}/{stages}"] = {"s": timed(fn, q, caches), "max_rel_error": err}
            except Exception as e:  # a tiling Triton cannot build is recorded, not fatal
                configs[f"{block}/{warps}/{stages}"] = {"error": str(e)[:200]}
        entry["kernel"] = configs
        ok = {c: r for c, r in configs.items() if "s" in r}
        best = min(ok, key=lambda c: ok[c]["s"])
        entry["best"] = best
        print(f"{name}: floor {floor * 1e6:.1f} us, XLA {entry['reference_s'] * 1e6:.1f} us, kernel best {best} "
              f"{ok[best]['s'] * 1e6:.1f} us (err {ok[best]['max_rel_error']:.4f}); 64/4/2 "
              f"{ok.get('64/4/2', {}).get('s', float('nan')) * 1e6:.1f} us", flush=True)
        for c in sorted(ok, key=lambda c: ok[c]["s"])[:6]:
            print(f"   {c}: {ok[c]['s'] * 1e6:.1f} us", flush=True)
        results["shapes"][name] = entry
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
