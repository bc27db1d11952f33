"""The decode step's faster paths against their definitions: fused projections (models.fuse) against the separate
kernels, and the Pallas decode-attention kernel (models.attention, in the Pallas interpreter on CPU) against the XLA
definition; both through generation on tiny and real shipped models, the config fields that select them, and the
bench that times them side by side.  The kernel compiled for a GPU is checked by the gpu-marked test at the end."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crossmap.models import (
    fused,
    init_random,
    is_fused,
    is_quantized,
    is_scanned,
    quantized,
    scanned,
    tiny_config,
    with_decode_attention,
    with_down_slices,
)
from crossmap.models.attention import attention_mask, decode_attention, grouped_attention
from crossmap.models.layers import sliced_product
from crossmap.verbalize import Injection, generate

CONFIGS = Path(__file__).parent.parent / "configs"


def _close(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _random_step(rng, b, k, g, s, h, dtype, stacked=0):
    """One decode step's inputs: q [B, 1, K*G, H], a cache [B, K, S, H] (or a stack of `stacked` of them), each row's
    query slot anywhere in the cache and a key-validity mask with gaps (not only left padding)."""
    def draw(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    q = draw(b, 1, k * g, h)
    lead = (stacked,) if stacked else ()
    keys, values = draw(*lead, b, k, s, h), draw(*lead, b, k, s, h)
    q_index = jnp.asarray(rng.integers(s // 3, s, size=(b, 1)), jnp.int32)
    valid = rng.random((b, s)) > 0.25
    valid[np.arange(b), np.asarray(q_index)[:, 0]] = True  # a decode step always sees its own slot
    return q, keys, values, q_index, jnp.asarray(valid)


@pytest.mark.parametrize("b,k,g,s,h,window", [
    (3, 2, 7, 40, 16, None),    # Qwen2.5's 7 query heads a KV head; a cache shorter than one block of slots
    (2, 1, 4, 200, 32, 5),      # a sliding window far inside one block, 200 slots (not a multiple of 64)
    (2, 4, 1, 130, 64, 70),     # one query head a KV head (padded to 16 rows); a window across blocks
    (1, 2, 16, 64, 32, None),   # 16 query heads: no padding; exactly one block
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_kernel_equals_the_definition(b, k, g, s, h, window, dtype):
    rng = np.random.default_rng(hash((b, k, g, s, h, window, dtype)) % 2**32)
    q, keys, values, q_index, valid = _random_step(rng, b, k, g, s, h, dtype)
    reference = grouped_attention(q, keys, values, attention_mask(q_index, valid, window), 0.3)
    out = decode_attention(q, keys, values, q_index, valid, scale=0.3, window=window, implementation="interpret")
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    # float32: rounding only; bfloat16: the kernel normalises once at the end, the definition rounds the
    # probabilities to bfloat16 first
    assert _close(out, reference) < (1e-5 if dtype == "float32" else 2e-2)


def test_decode_attention_kernel_in_bfloat16_is_no_further_from_float32_than_the_definition():
    """Against attention computed in float32 on the same bfloat16 inputs: the kernel normalises once, in float32, at
    the end; the definition rounds the probabilities to bfloat16 before multiplying the values.  So the kernel's
    error is at most the definition's (measured: about 0.8 of it), and the two differ by rounding alone."""
    rng = np.random.default_rng(3)
    q, keys, values, q_index, valid = _random_step(rng, 6, 4, 7, 192, 128, "bfloat16")
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, keys, values)]
    oracle = np.asarray(grouped_attention(*f32, attention_mask(q_index, valid, None), 0.09), np.float64)

    def error(out):
        return float(np.sqrt(((np.asarray(out, np.float64) - oracle) ** 2).mean() / (oracle ** 2).mean()))

    reference = decode_attention(q, keys, values, q_index, valid, scale=0.09, implementation="reference")
    kernel = decode_attention(q, keys, values, q_index, valid, scale=0.09, implementation="interpret")
    assert error(kernel) <= error(reference) < 1e-2


def test_decode_attention_reads_a_stacked_cache_entry_in_place():
    rng = np.random.default_rng(1)
    q, keys, values, q_index, valid = _random_step(rng, 2, 2, 3, 90, 16, "float32", stacked=3)
    for layer in range(3):
        reference = grouped_attention(q, keys[layer], values[layer], attention_mask(q_index, valid, None), 0.25)
        for implementation in ("interpret", "reference"):
            out = decode_attention(q, keys, values, q_index, valid, jnp.int32(layer), scale=0.25,
                                   implementation=implementation)
            assert _close(out, reference) < 1e-5


def test_decode_attention_auto_is_the_definition_on_cpu_and_bad_input_is_refused():
    rng = np.random.default_rng(2)
    q, keys, values, q_index, valid = _random_step(rng, 2, 2, 2, 20, 16, "bfloat16")
    auto = decode_attention(q, keys, values, q_index, valid, scale=0.5)
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(
        grouped_attention(q, keys, values, attention_mask(q_index, valid, None), 0.5), np.float32))
    with pytest.raises(ValueError, match="implementation must be one of"):
        decode_attention(q, keys, values, q_index, valid, scale=0.5, implementation="flash")
    with pytest.raises(ValueError, match=r"q \[B, 1, N, H\]"):
        decode_attention(jnp.concatenate([q, q], 1), keys, values, q_index, valid, scale=0.5,
                         implementation="interpret")
    with pytest.raises(ValueError, match="decode attention must be one of"):
        with_decode_attention(init_random(tiny_config("qwen2"), seed=0), "flash")


def _one_step(cfg, layer_type, dtype, projections, stacked, seed):
    """An Attention layer with random weights (norm weights too), a one-token input and a cache with random keys and
    values in every slot, the step's slot shared by every row (as generate writes it) and key padding with gaps."""
    from crossmap.models.fuse import _fuse_attention
    from crossmap.models.layers import Attention, rope_tables

    rng = np.random.default_rng(seed)
    layer = Attention(cfg, layer_type, jnp.dtype(dtype), nnx.Rngs(seed))
    for norm in (layer.q_norm, layer.k_norm):
        if norm is not None:
            norm.weight[...] = jnp.asarray(rng.normal(size=norm.weight[...].shape) * 0.5, dtype)
    if projections == "fused":
        _fuse_attention(layer, consume=False)
    b, s = 3, 75
    slot = 61
    x = jnp.asarray(rng.normal(size=(b, 1, cfg.d_model)), dtype)
    cos, sin = rope_tables(jnp.asarray(rng.integers(0, 500, (b, 1))), cfg.head_dim, cfg.rope_theta)
    lead = (stacked,) if stacked else ()
    shape = (*lead, b, cfg.n_kv_heads, s, cfg.head_dim)
    cache = (jnp.asarray(rng.normal(size=shape), dtype), jnp.asarray(rng.normal(size=shape), dtype))
    valid = rng.random((b, s)) > 0.25
    valid[:, slot] = True
    q_index = jnp.full((b, 1), slot, jnp.int32)
    return layer, (x, cos, sin, q_index, jnp.asarray(valid), cache), (stacked - 1 if stacked else None)


@pytest.mark.parametrize("arch,layer_type,overrides", [
    ("qwen2", "full", {}),                                   # q/k/v biases, 2 query heads a KV head
    ("gemma3", "sliding", {}),                               # q/k norms scaling by (1 + w), a sliding window
    ("gemma3", "full", {}),
    ("llama", "full", {"qk_norm": True, "n_heads": 6}),      # plain q/k norms (rounded, then scaled), 3 a KV head
])
@pytest.mark.parametrize("projections", ["separate", "fused"])
@pytest.mark.parametrize("dtype,stacked", [("float32", 0), ("float32", 3), ("bfloat16", 0)])
def test_decode_step_kernel_equals_the_xla_step(arch, layer_type, overrides, projections, dtype, stacked):
    """One attention layer's decode step with its prologue (bias, q/k norms, rotation) and the cache writes in the
    kernel (interpret mode) against the XLA layer (the same module with the definition): the output, the new key and
    value in their slot, and every other slot of the cache untouched; a stacked cache written at its entry only."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config(arch), **overrides)
    layer, inputs, entry = _one_step(cfg, layer_type, dtype, projections, stacked, seed=len(arch) + stacked)
    layer.decode_attention = "reference"
    want, want_cache = layer(*inputs, None, entry)
    layer.decode_attention = "interpret-step"
    got, got_cache = layer(*inputs, None, entry)
    tolerance = 2e-6 if dtype == "float32" else 2e-2
    assert got.shape == want.shape and got.dtype == want.dtype and _close(got, want) < tolerance
    slot = int(inputs[3][0, 0])
    for old, new, mine in zip(inputs[5], want_cache, got_cache, strict=True):
        new, mine, old = (np.asarray(a, np.float32) for a in (new, mine, old))
        at = (entry,) if stacked else ()
        # rounding alone: bfloat16 halves may round the rotation's last bit apart
        assert _close(mine[at][..., slot, :], new[at][..., slot, :]) < (1e-6 if dtype == "float32" else 1e-2)
        untouched = np.ones(mine.shape, bool)
        untouched[(*at, ..., slot, slice(None))] = False
        np.testing.assert_array_equal(mine[untouched], old[untouched])


@pytest.mark.parametrize("arch,layer_type,heads", [
    ("qwen2", "full", {"n_heads": 28, "n_kv_heads": 4, "head_dim": 128}),       # Qwen2.5-7B's heads
    ("gemma3", "sliding", {"n_heads": 32, "n_kv_heads": 16, "head_dim": 128}),  # Gemma-3-27B's
])
@pytest.mark.parametrize("implementation,projections,stacked", [
    ("pallas-step", "separate", 0), ("pallas-step", "fused", 0), ("pallas-step", "separate", 3), ("pallas", "fused", 3)])
def test_decode_kernels_lower_for_a_gpu_on_cpu(arch, layer_type, heads, implementation, projections, stacked):
    """The compiled kernels' first hurdle, reachable without a GPU: the layer's decode step lowered for CUDA, which
    runs the Pallas-to-Triton lowering (the interpreter accepts what Triton refuses, e.g. a load's fill value without
    a mask).  The aliased cache must reach the custom call as an output-operand alias, or XLA copies it each step."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config(arch), d_model=256, **heads)
    layer, inputs, entry = _one_step(cfg, layer_type, "bfloat16", projections, stacked, seed=5)
    layer.decode_attention = implementation
    graph, state = nnx.split(layer)
    lowered = jax.jit(lambda state, *a: nnx.merge(graph, state)(*a, None, entry)).trace(state, *inputs).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert ("output_operand_alias" in text) == (implementation == "pallas-step")


def test_decode_step_kernel_refuses_misplaced_heads():
    from crossmap.models.attention import StepHeads, decode_step_attention

    b, k, g, s, h = 2, 2, 3, 16, 8
    cache = (jnp.zeros((b, k, s, h)), jnp.zeros((b, k, s, h)))
    q = StepHeads(jnp.zeros((b, k * g, h)), None, g, 0)
    kv = StepHeads(jnp.zeros((b, k, h)), None, 1, 0)
    args = (jnp.zeros((b, h)), jnp.zeros((b, h)), None, cache, jnp.zeros((b, 1), jnp.int32), jnp.ones((b, s), bool))
    with pytest.raises(ValueError, match=r"q heads: rows \[B=2, R, H=8\] holding 2 groups of 3 at stride 3 from row 1"):
        decode_step_attention(q._replace(offset=1), kv, kv, *args, groups=g, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="biases or none do"):
        decode_step_attention(q._replace(bias=jnp.zeros((k * g, h))), kv, kv, *args, groups=g, scale=1.0,
                              interpret=True)
    with pytest.raises(ValueError, match=r"k bias \(3, 8\) is not one row per row \(2, 8\)"):
        bias = jnp.zeros((k * g, h))
        decode_step_attention(q._replace(bias=bias), kv._replace(bias=jnp.zeros((3, h))), kv._replace(bias=bias[:k]),
                              *args, groups=g, scale=1.0, interpret=True)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "llama"])
def test_fused_projections_compute_what_the_separate_kernels_compute(arch):
    """Logits of the whole model: qwen2 (q/k/v biases), gemma3 (q/k norms, sandwich norms, GELU), llama; fused before
    or after scanning; int8 of the fused kernels equals int8 of the separate ones (per output channel either way)."""
    cfg = tiny_config(arch)
    model = init_random(cfg, seed=3, dtype="float32")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)))
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    valid = jnp.ones((2, 11), bool)
    logits = jax.jit(lambda m: m.logits(tokens, positions, valid))
    reference = logits(model)
    fuse = fused(model)
    assert is_fused(fuse) and not is_fused(model) and fuse.layers[0].attn.q is None
    assert fuse.layers[0].attn.qkv[...].shape == (cfg.d_model, cfg.n_kv_heads,
                                                  cfg.n_heads // cfg.n_kv_heads + 2, cfg.head_dim)
    assert _close(logits(fuse), reference) < 1e-6
    assert _close(logits(scanned(fuse)), reference) < 2e-5  # a loop body fuses differently (test_scan.py)
    assert _close(logits(fused(scanned(model))), reference) < 2e-5
    np.testing.assert_array_equal(np.asarray(logits(quantized(fuse, "int8"))),
                                  np.asarray(logits(quantized(model, "int8"))))


def test_fused_refuses_unknown_layouts_refusing_twice_and_after_quantizing_and_consumes_in_place():
    model = init_random(tiny_config("qwen2"), seed=0, dtype="float32")
    assert fused(model, "separate") is model
    with pytest.raises(ValueError, match="projections must be one of"):
        fused(model, "merged")
    with pytest.raises(ValueError, match="already fused"):
        fused(fused(model))
    with pytest.raises(ValueError, match="fuse its projections first"):
        fused(quantized(model, "int8"))
    kept = fused(model)
    owned = init_random(tiny_config("qwen2"), seed=0, dtype="float32")
    consumed = fused(owned, consume=True)
    assert owned.layers[0].attn.q[...].is_deleted() and owned.layers[3].mlp.up[...].is_deleted()
    assert not owned.layers[0].attn.o[...].is_deleted()  # o and down are the fused model's own, unchanged
    for a, b in zip(jax.tree.leaves(nnx.state(kept)), jax.tree.leaves(nnx.state(consumed)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kernel", ["interpret", "interpret-step"])
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_generation_with_fused_projections_and_the_kernel_equals_the_definition(arch, kernel):
    """Left-padded prompts of different lengths, an injected vector, washout-style groups, gemma3's sliding window
    (5 slots) shorter than the prompts: the same tokens and logits unrolled and scanned, with either kernel."""
    cfg = tiny_config(arch)
    model = init_random(cfg, seed=5, dtype="float32")
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(2, cfg.vocab_size, n)) for n in (4, 9, 13, 7)]
    vectors = rng.normal(size=(4, cfg.d_model)).astype(np.float32)
    inj = Injection(vectors, [1, 3, 5, 2])

    def run(m):
        return generate(m, prompts, max_new_tokens=12, stop_token_ids=[], use_model_eos=False, pad_id=0,
                        injection=inj, group_size=2, group_weights=[1.0, -0.5], return_logits=True)

    reference = run(model)
    fast = with_decode_attention(fused(model), kernel)
    for variant in (with_decode_attention(model, kernel), fast, scanned(fast)):
        out = run(variant)
        np.testing.assert_array_equal(out.tokens, reference.tokens)
        assert _close(out.logits, reference.logits) < 2e-5


@pytest.mark.parametrize("contract,x_shape,w_shape,slices", [
    (1, (3, 1, 96), (96, 40), 2),  # a down product: x [B, T, F] @ [F, D]
    (1, (3, 1, 96), (96, 40), 8),
    (2, (3, 1, 4, 16), (4, 16, 40), 4),  # an o product: x [B, T, N, H] @ [N, H, D], slices across heads
    (2, (3, 1, 4, 16), (4, 16, 40), 32),  # slices within a head
])
def test_sliced_product_equals_the_one_product(contract, x_shape, w_shape, slices):
    rng = np.random.default_rng(slices)
    x = rng.normal(size=x_shape)
    w = rng.normal(size=w_shape)
    exact = np.tensordot(x, w, axes=contract)
    got = sliced_product(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), contract, slices)
    assert got.shape == exact.shape and got.dtype == jnp.float32
    assert np.abs(np.asarray(got, np.float64) - exact).max() < 1e-5 * np.abs(exact).max()
    half = sliced_product(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), contract, slices)
    assert half.dtype == jnp.bfloat16  # float32 partials, rounded once to x's dtype
    assert np.abs(np.asarray(half, np.float64) - exact).max() < 2e-2 * np.abs(exact).max()
    with pytest.raises(ValueError, match="5 slices do not divide the contracted size"):
        sliced_product(jnp.asarray(x), jnp.asarray(w), contract, 5)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_generation_with_sliced_down_products_equals_the_one_product(arch, monkeypatch):
    """Decode steps with the down product in 2 and 4 slices: the same tokens and logits as the one product,
    unrolled, fused and scanned; the prefill keeps the one product; the shared model is unchanged."""
    from crossmap.models import layers

    traced = []

    def spy(x, w, contract, slices):
        traced.append((x.shape, slices))
        return sliced_product(x, w, contract, slices)

    monkeypatch.setattr(layers, "sliced_product", spy)
    cfg = tiny_config(arch)
    model = init_random(cfg, seed=7, dtype="float32")
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(2, cfg.vocab_size, n)) for n in (4, 9, 13)]
    inj = Injection(rng.normal(size=(3, cfg.d_model)).astype(np.float32), [1, 3, 5])

    def run(m):
        return generate(m, prompts, max_new_tokens=10, stop_token_ids=[], use_model_eos=False, pad_id=0,
                        injection=inj, return_logits=True)

    reference = run(model)
    for slices in (2, 4):
        sliced = with_down_slices(model, slices)
        assert sliced.layers[0].mlp.down_slices == slices and model.layers[0].mlp.down_slices == 1
        for variant in (sliced, fused(sliced), scanned(fused(sliced))):
            traced.clear()
            out = run(variant)
            np.testing.assert_array_equal(out.tokens, reference.tokens)
            assert _close(out.logits, reference.logits) < 2e-5
            # traced in the decode step only (one row a sequence), with the slices asked for
            assert traced and all(shape[-2] == 1 and n == slices for shape, n in traced)
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match=f"down slices must be a positive int dividing d_ff = {cfg.d_ff}"):
            with_down_slices(model, bad)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["interpret", "interpret-step"])
@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_real_shipped_models_fused_with_the_kernel_give_the_same_tokens(shipped_model, name, kernel):
    """Gemma-3-270M (head_dim 256, one KV head, sliding layers) and Qwen2.5-Coder-0.5B (7 query heads a KV head,
    biases), real weights and tokenizers: greedy tokens equal the separate kernels' with the XLA attention."""
    lm, _ = shipped_model(name)
    ids = lm.tokenizer("The river ran past the mill and into the town, where the")["input_ids"]
    fast = with_decode_attention(fused(lm.model), kernel)
    a = generate(lm.model, [ids], max_new_tokens=8, use_model_eos=False, return_logits=True)
    b = generate(fast, [ids], max_new_tokens=8, use_model_eos=False, return_logits=True)
    np.testing.assert_array_equal(b.tokens, a.tokens)
    assert _close(b.logits, a.logits) < 1e-4
    assert not is_fused(lm.model)  # the shared model keeps its separate kernels


def test_a_model_sharded_over_a_mesh_fuses_onto_its_layout_and_the_kernel_is_refused_there():
    """On 4 CPU devices (fsdp 2 x tensor 2): the fused kernels are laid out by their logical axes (embed over fsdp,
    KV heads over tensor), the fused forward and generation equal the separate ones, and a run that forces the
    decode-attention kernel on that mesh is refused before any stage (the kernel has no partitioning rule)."""
    from conftest import run_with_devices

    result = run_with_devices("""
        import json, tempfile
        from pathlib import Path
        import jax, jax.numpy as jnp, numpy as np
        from crossmap.models import fused, init_random
        from crossmap.models.synthetic import tiny_config
        from crossmap.pipeline import load_config
        from crossmap.pipeline.context import RunContext
        from crossmap.sharding import make_mesh
        from crossmap.verbalize import generate
        cfg = tiny_config("qwen2", eos_token_ids=(1,))
        mesh = make_mesh({"fsdp": 2, "tensor": 2})
        model = init_random(cfg, seed=3, dtype="float32", mesh=mesh)
        fuse = fused(model)
        tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (4, 10)))
        positions = jnp.broadcast_to(jnp.arange(10), (4, 10))
        valid = jnp.ones((4, 10), bool)
        f = jax.jit(lambda m: m.logits(tokens, positions, valid))
        a, b = np.asarray(f(model)), np.asarray(f(fuse))
        prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]
        ga = generate(model, prompts, max_new_tokens=6, mesh=mesh)
        gb = generate(fuse, prompts, max_new_tokens=6, mesh=mesh)
        c = load_config(str(Path("configs") / "tiny.py"))
        c.run_dir = tempfile.mkdtemp()
        c.mesh = {"data": 1, "fsdp": 2, "tensor": 2}
        c.verbalizers.source.decode_attention = "pallas"
        try:
            RunContext(c)
            refused = ""
        except ValueError as err:
            refused = str(err)
        print(json.dumps({"qkv_spec": list(fuse.layers[0].attn.qkv[...].sharding.spec),
                          "gate_up_spec": list(fuse.layers[0].mlp.gate_up[...].sharding.spec),
                          "relative": float(np.abs(a - b).max() / np.abs(a).max()),
                          "tokens_equal": bool((ga.tokens == gb.tokens).all()), "refused": refused}))
    """, n_devices=4)
    assert result["qkv_spec"] == ["fsdp", "tensor", None, None]
    assert result["gate_up_spec"] == ["fsdp", None, "tensor"]
    assert result["relative"] < 1e-6 and result["tokens_equal"]
    assert "verbalizers.source.decode_attention='pallas' runs on one device so far" in result["refused"]


def test_bench_times_down_slices_side_by_side(tmp_path):
    import argparse

    from crossmap.benchmarks import verbalize

    parser = argparse.ArgumentParser()
    verbalize.add_arguments(parser)
    for bad in ("2,2", "0", "two"):
        with pytest.raises(ValueError, match="--down-slices must list distinct integers >= 1"):
            verbalize.run(parser.parse_args(["--preset", "tiny", "--down-slices", bad, "--out", str(tmp_path / "x.json")]))
    result = verbalize.run(parser.parse_args([
        "--preset", "tiny", "--down-slices", "1,2", "--torch-device", "none", "--new-tokens", "4", "--reps", "1",
        "--out", str(tmp_path / "v.json")]))
    entries = result["weights"]
    assert list(entries) == ["float", "float/down-slices-2"]
    assert [entries[n]["crossmap"]["down_slices"] for n in entries] == [1, 2]
    decode = entries["float/down-slices-2"]["decode_logits_vs_float"]
    assert decode["rows"] == result["batch"] and decode["max_abs_error"] <= 1e-5 * decode["reference_max_abs"]


def test_config_selects_fused_projections_and_decode_attention_per_verbalizer(tmp_path):
    from crossmap.pipeline import load_config, validate
    from crossmap.pipeline.context import RunContext
    from crossmap.pipeline.stages import build_verbalizer

    c = load_config(CONFIGS / "tiny.py")
    c.run_dir = str(tmp_path / "run")
    assert c.verbalizers.source.projections == "separate" and c.verbalizers.source.decode_attention == "auto"
    c.verbalizers.source.projections = "fused"
    c.verbalizers.source.decode_attention = "interpret"
    c.verbalizers.source.weights = "int8"
    c.verbalizers.source.layers = "scanned"
    ctx = RunContext(c)
    verbalizer, lm = build_verbalizer(ctx, "source")
    model = verbalizer.model
    assert is_fused(model) and is_quantized(model) and is_scanned(model)
    assert model.layer_stacks[0].attn.decode_attention == "interpret"
    assert not is_fused(lm.model) and not lm.model.layers[0].attn.q[...].is_deleted()
    assert lm.model.layers[0].attn.decode_attention == "auto"
    target, _ = build_verbalizer(ctx, "target")
    assert not is_fused(target.model) and target.model.layers[0].attn.decode_attention == "auto"
    c.verbalizers.source.down_slices = 3  # the tiny models' d_ff is 128: refused as the verbalizer is built
    with pytest.raises(ValueError, match="verbalizers.source.down_slices: down slices must be a positive int "
                                         "dividing d_ff = 128, got 3"):
        build_verbalizer(ctx, "source")
    c.verbalizers.source.down_slices = 2
    assert build_verbalizer(ctx, "source")[0].model.layer_stacks[0].mlp.down_slices == 2
    c.verbalizers.target.projections = "merged"
    c.verbalizers.target.decode_attention = "flash"
    c.verbalizers.target.down_slices = 0
    with pytest.raises(ValueError) as refused:
        validate(c)
    assert "verbalizers.target.projections must be one of 'separate', 'fused'" in str(refused.value)
    assert ("verbalizers.target.decode_attention must be one of 'auto', 'pallas', 'pallas-step', 'interpret', "
            "'interpret-step', 'reference'") \
        in str(refused.value)
    assert "verbalizers.target.down_slices must be an int >= 1 (got 0)" in str(refused.value)


def test_bench_times_projections_and_decode_attention_side_by_side(tmp_path):
    import argparse

    from crossmap.benchmarks import verbalize

    assert verbalize.variant_names({"float": ("float", "auto")}, ["unrolled"], ("separate", "fused"),
                                   ("reference", "auto")) == [
        ("float/attention-reference", "float", "unrolled", "separate", "reference", 1, 1),
        ("float", "float", "unrolled", "separate", "auto", 1, 1),
        ("float/fused/attention-reference", "float", "unrolled", "fused", "reference", 1, 1),
        ("float/fused", "float", "unrolled", "fused", "auto", 1, 1)]
    parser = argparse.ArgumentParser()
    verbalize.add_arguments(parser)
    for flag, bad in (("--projections", "fused,fused"), ("--decode-attention", "flash")):
        with pytest.raises(ValueError, match=f"{flag} must list distinct values"):
            verbalize.run(parser.parse_args(["--preset", "tiny", flag, bad, "--out", str(tmp_path / "x.json")]))
    assert not (tmp_path / "x.json").exists()
    result = verbalize.run(parser.parse_args([
        "--preset", "tiny", "--projections", "separate,fused", "--decode-attention", "reference,interpret",
        "--torch-device", "none", "--new-tokens", "4", "--reps", "1", "--out", str(tmp_path / "v.json")]))
    entries = result["weights"]
    assert list(entries) == ["float/attention-reference", "float/attention-interpret",
                             "float/fused/attention-reference", "float/fused/attention-interpret"]
    for name in list(entries)[1:]:
        decode = entries[name]["decode_logits_vs_float/attention-reference"]
        assert decode["rows"] == result["batch"] and decode["max_abs_error"] <= 1e-5 * decode["reference_max_abs"]
        assert entries[name]["crossmap"]["projections"] in ("separate", "fused")


@pytest.mark.gpu
@pytest.mark.parametrize("b,k,g,s,h,window", [(128, 4, 7, 192, 128, None), (128, 16, 2, 328, 128, 1024),
                                              (32, 1, 4, 100, 256, 512)])
def test_compiled_kernel_equals_the_definition_on_the_gpu(b, k, g, s, h, window):
    """The 7B, 27B and Gemma-3-270M decode shapes in bfloat16: the Triton-compiled kernel against the definition
    (and "auto" is the kernel)."""
    rng = np.random.default_rng(7)
    q, keys, values, q_index, valid = _random_step(rng, b, k, g, s, h, "bfloat16")
    reference = grouped_attention(q, keys, values, attention_mask(q_index, valid, window), 0.08)
    out = decode_attention(q, keys, values, q_index, valid, scale=0.08, window=window, implementation="pallas")
    assert _close(out, reference) < 2e-2
    auto = decode_attention(q, keys, values, q_index, valid, scale=0.08, window=window)
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(out, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("arch,layer_type,overrides", [
    ("qwen2", "full", {"d_model": 3584, "n_heads": 28, "n_kv_heads": 4, "head_dim": 128}),  # Qwen2.5-7B's heads
    ("gemma3", "sliding", {"d_model": 5376, "n_heads": 32, "n_kv_heads": 16, "head_dim": 128}),  # Gemma-3-27B's
])
@pytest.mark.parametrize("projections,stacked", [("separate", 0), ("fused", 0), ("separate", 3)])
def test_compiled_step_kernel_equals_the_xla_step_on_the_gpu(arch, layer_type, overrides, projections, stacked):
    """The whole-step kernel compiled by Triton, in bfloat16 at the 7B and 27B head shapes, against the XLA layer:
    the output, the written slot and the untouched cache (the aliased cache, or a scanned model's stack of them, is
    written in place on the GPU)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config(arch), **overrides)
    layer, inputs, entry = _one_step(cfg, layer_type, "bfloat16", projections, stacked, seed=11)
    layer.decode_attention = "reference"
    want, want_cache = jax.jit(lambda *a: layer(*a, None, entry))(*inputs)
    layer.decode_attention = "pallas-step"
    got, got_cache = jax.jit(lambda *a: layer(*a, None, entry))(*inputs)
    assert _close(got, want) < 2e-2
    slot = int(inputs[3][0, 0])
    at = (entry,) if stacked else ()
    for old, new, mine in zip(inputs[5], want_cache, got_cache, strict=True):
        new, mine, old = (np.array(a, np.float32) for a in (new, mine, old))
        assert _close(mine[at][..., slot, :], new[at][..., slot, :]) < 1e-2
        mine[(*at, ..., slot, slice(None))] = old[(*at, ..., slot, slice(None))]
        np.testing.assert_array_equal(mine, old)
