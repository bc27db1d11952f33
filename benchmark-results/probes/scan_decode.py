"""Probe: decode steps of the 7B shape, unrolled blocks vs lax.scan over stacked block weights, with the KV cache
stacked [L, ...] in the scan carry (updated in place).  Run once per XLA_FLAGS variant (subprocess)."""
import json, os, subprocess, sys, time

if len(sys.argv) == 1:
    variants = {"dsf_cublas": "--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_triton_gemm=false",
                "triton_any": "--xla_gpu_triton_gemm_any=true",
                "dsf_triton_any": "--xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_triton_gemm_any=true"}
    out = {}
    for name, flags in variants.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        p = subprocess.run([sys.executable, __file__, "child"], env=env, capture_output=True, text=True, timeout=400)
        out[name] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-3000:]}
        print(name, out[name], flush=True)
    print(json.dumps(out))
    sys.exit()

import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from crossmap.models import ModelConfig, init_random
from crossmap.benchmarks.verbalize import QWEN25_7B

L = int(os.environ.get("PROBE_LAYERS", 28))
cfg = ModelConfig(**{**QWEN25_7B, "n_layers": L})
B, S, T = 128, 192, 32
model = init_random(cfg, seed=0, dtype="bfloat16")
graphdef, state = nnx.split(model)
block_def, _ = nnx.split(model.layers[0])
stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(b)[1] for b in model.layers])
kv_valid = jnp.ones((B, S), bool)


def unrolled(state, x0):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(B, S)
    def body(t, carry):
        x, cache = carry
        pos = jnp.full((B, 1), 64 + t, jnp.int32)
        h, cache = m.run(x, pos, kv_valid, q_index=pos, cache=cache)
        return h * 0.01 + x, cache
    x, cache = jax.lax.fori_loop(0, T, body, (x0, cache))
    return x


def scanned(state, stacked, x0):
    m = nnx.merge(graphdef, state)
    shape = (L, B, cfg.n_kv_heads, S, cfg.head_dim)
    cache = (jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16))
    def step(t, carry):
        x, (ck, cv) = carry
        pos = jnp.full((B, 1), 64 + t, jnp.int32)
        cos, sin = m._rope(pos)["full"]
        def layer(c, params_i):
            h, ck, cv, i = c
            blk = nnx.merge(block_def, params_i)
            h, (k, v) = blk(h, cos, sin, pos, kv_valid, (ck[i], cv[i]))
            ck = jax.lax.dynamic_update_index_in_dim(ck, k, i, 0)
            cv = jax.lax.dynamic_update_index_in_dim(cv, v, i, 0)
            return (h, ck, cv, i + 1), None
        (h, ck, cv, _), _ = jax.lax.scan(layer, (x, ck, cv, 0), stacked)
        return h * 0.01 + x, (ck, cv)
    x, _ = jax.lax.fori_loop(0, T, step, (x0, cache))
    return x


x0 = jax.random.normal(jax.random.key(1), (B, 1, cfg.d_model), jnp.float32).astype(jnp.bfloat16)
res = {}
for name, fn, args in (("scanned", scanned, (state, stacked, x0)),):
    f = jax.jit(fn)
    t0 = time.perf_counter(); lowered = f.lower(*args); compiled = lowered.compile(); c = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(5):
        t0 = time.perf_counter(); out = jax.block_until_ready(compiled(*args)); times.append(time.perf_counter() - t0)
    res[name] = {"compile_s": c, "step_ms": sorted(times)[2] / T * 1e3, "checksum": float(jnp.abs(out.astype(jnp.float32)).mean())}
print(json.dumps(res))
