"""Scanned layers (models.scan): a lax.scan over groups of blocks computes what the unrolled blocks compute.

Oracle: the same model unrolled.  Both run jitted, so each side is one XLA program; XLA fuses a loop body
differently from straight-line code, so hidden states agree to float32 rounding (the bound below), and the
tokens chosen from them are identical.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crossmap.models import init_random, is_quantized, quantized
from crossmap.models.scan import LAYER_LAYOUTS, is_scanned, layer_period, scanned
from crossmap.models.synthetic import tiny_config
from crossmap.verbalize import Injection, generate

# float32 rounding after a few dozen blocks, relative to the largest entry
RELATIVE_BOUND = 2e-5


def gemma_with_groups(n_layers: int = 13):
    """A tiny Gemma 3 with the 5:1 pattern over 13 blocks: two whole groups of six and a tail of one."""
    types = tuple("sliding" if (i + 1) % 6 else "full" for i in range(n_layers))
    return tiny_config("gemma3", n_layers=n_layers, layer_types=types, eos_token_ids=(1,))


def close(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def test_layer_period_is_the_shortest_repeat_of_the_pattern():
    assert layer_period(("full",) * 28) == 1
    gemma_27b = tuple("sliding" if (i + 1) % 6 else "full" for i in range(62))
    assert layer_period(gemma_27b) == 6
    assert layer_period(("sliding", "full") * 3) == 2
    assert layer_period(("full", "sliding", "sliding")) == 3  # no repeat: one group of every block
    assert layer_period(("full",)) == 1


@pytest.mark.parametrize("make", [lambda: tiny_config("qwen2", eos_token_ids=(1,)), gemma_with_groups],
                         ids=["qwen2-period-1", "gemma3-two-groups-and-a-tail"])
def test_scanned_hidden_states_and_logits_equal_the_unrolled_model(make):
    cfg = make()
    model = init_random(cfg, seed=1, dtype="float32")
    scan = scanned(model)
    period = layer_period(cfg.layer_types)
    assert is_scanned(scan) and not is_scanned(model)
    assert (scan.scan_period, scan.scan_groups, len(scan.layers)) == (period, cfg.n_layers // period,
                                                                      cfg.n_layers % period)
    # the unrolled model keeps its own blocks: the stacks are new arrays
    assert model.layers[0].attn.q[...].shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)
    assert scan.layer_stacks[0].attn.q[...].shape == (cfg.n_layers // period, cfg.d_model, cfg.n_heads, cfg.head_dim)
    assert scan.layer_stacks[0].attn.q.get_metadata()["logical"][0] == "layers"
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (3, 12)))
    valid = jnp.asarray(np.arange(12)[None] >= np.array([[0], [3], [5]]))  # left padding, as generate pads
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    # inside the first group; the first block of the second (a whole group scanned, then a partial one); the last
    for layer in sorted({min(3, cfg.n_layers - 1), min(6, cfg.n_layers - 1), cfg.n_layers - 1}):
        f = jax.jit(lambda t, p, v, m, layer=layer: m.hidden(t, p, v, layer=layer))
        want = f(tokens, positions, valid, model)
        got = f(tokens, positions, valid, scan)
        assert close(got, want) < RELATIVE_BOUND, layer
    logits = jax.jit(lambda m: m.logits(tokens, positions, valid))
    want, got = logits(model), logits(scan)
    assert close(got, want) < RELATIVE_BOUND
    np.testing.assert_array_equal(np.asarray(got.argmax(-1)), np.asarray(want.argmax(-1)))


@pytest.mark.parametrize("layer,mode,choice", [
    (4, "replace", {"group_size": 2, "group_weights": [1.0, -0.5]}),  # inside the first group; washout-style groups
    (8, "add", {"temperature": 0.8, "top_p": 0.9, "key": 7}),  # inside the second group; nucleus sampling
    (13, "replace", {}),  # after the tail block; greedy
], ids=["group-washout", "sampled", "greedy-after-tail"])
def test_scanned_generation_chooses_the_unrolled_tokens_with_an_injection(layer, mode, choice):
    """The prompts share a prefix (prefilled once and broadcast) and differ in length (left padding)."""
    cfg = gemma_with_groups()
    model = init_random(cfg, seed=2, dtype="float32")
    scan = scanned(model)
    prefix = list(range(20, 40))
    prompts = [prefix + [3, 4, 5, 6], prefix + [7, 8, 9], prefix + [10, 11, 12, 13, 14], prefix + [15, 16]]
    vectors = np.random.default_rng(3).normal(size=(4, cfg.d_model)).astype(np.float32)
    injection = Injection(vectors, [21, 20, 22, 21], layer=layer, mode=mode)
    a = generate(model, prompts, max_new_tokens=8, injection=injection, return_logits=True, **choice)
    b = generate(scan, prompts, max_new_tokens=8, injection=injection, return_logits=True, **choice)
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.lengths, a.lengths)
    assert close(b.logits, a.logits) < RELATIVE_BOUND


def test_scanned_int8_model_equals_the_unrolled_int8_model():
    """Quantize then scan, or scan then quantize: the same int8 values and scales per block, the same tokens as the
    unrolled int8 model."""
    cfg = gemma_with_groups()
    float_model = init_random(cfg, seed=4, dtype="float32")
    model = quantized(float_model, "int8")
    scan = scanned(model)
    scan_first = quantized(scanned(float_model), "int8")
    assert is_quantized(scan) and scan.layer_stacks[0].mlp.up[...].dtype == jnp.int8
    for stack, other in zip(scan.layer_stacks, scan_first.layer_stacks, strict=True):
        for name in ("q", "o", "q_scale", "o_scale"):
            np.testing.assert_array_equal(np.asarray(getattr(stack.attn, name)[...]),
                                          np.asarray(getattr(other.attn, name)[...]))
        assert other.mlp.down_scale[...].shape == (cfg.n_layers // 6, cfg.d_model)  # [group, out]
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    a = generate(model, prompts, max_new_tokens=8, return_logits=True)
    b = generate(scan, prompts, max_new_tokens=8, return_logits=True)
    c = generate(scan_first, prompts, max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(c.tokens, a.tokens)
    assert close(b.logits, a.logits) < RELATIVE_BOUND and close(c.logits, a.logits) < RELATIVE_BOUND


def test_scanned_refuses_unknown_layouts_and_rescanning():
    model = init_random(tiny_config("qwen2"), seed=0, dtype="float32")
    assert scanned(model, "unrolled") is model
    assert LAYER_LAYOUTS == ("unrolled", "scanned")
    with pytest.raises(ValueError, match="layers must be one of"):
        scanned(model, "stacked")
    scan = scanned(model)
    with pytest.raises(ValueError, match="already scanned"):
        scanned(scan)


def test_a_scanned_cache_is_stacked_by_group_with_the_batch_at_axis_minus_4():
    cfg = gemma_with_groups()
    cache = jax.eval_shape(lambda: scanned(init_random(cfg, seed=0, dtype="float32")).init_cache(3, 40))
    shapes = [k.shape for k, _ in cache]
    assert shapes == [(2, 3, cfg.n_kv_heads, 40, cfg.head_dim)] * 6 + [(3, cfg.n_kv_heads, 40, cfg.head_dim)]


@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_real_shipped_models_scanned_equal_unrolled(shipped_model, name):
    """Gemma-3-270M (18 blocks: three groups of 5 sliding + 1 global) and Qwen2.5-Coder-0.5B (24 blocks, period 1),
    real weights and tokenizers: hidden states at the middle layer (for Gemma a whole group and a partial one) and
    greedy tokens (every block)."""
    lm, _ = shipped_model(name)
    scan = scanned(lm.model)
    cfg = lm.model.config
    ids = lm.tokenizer("The river ran past the mill and into the town, where the")["input_ids"]
    tokens = jnp.asarray([ids])
    positions = jnp.arange(len(ids))[None]
    valid = jnp.ones_like(tokens, bool)
    f = jax.jit(lambda m: m.hidden(tokens, positions, valid, layer=cfg.n_layers // 2))
    assert close(f(scan), f(lm.model)) < RELATIVE_BOUND
    a = generate(lm.model, [ids], max_new_tokens=8, use_model_eos=False)
    b = generate(scan, [ids], max_new_tokens=8, use_model_eos=False)
    np.testing.assert_array_equal(b.tokens, a.tokens)


def test_consume_stacks_in_place_and_frees_the_unrolled_blocks():
    cfg = gemma_with_groups()
    kept = scanned(init_random(cfg, seed=6, dtype="float32"))
    owned = init_random(cfg, seed=6, dtype="float32")
    consumed = scanned(owned, consume=True)
    assert owned.layers[0].attn.q[...].is_deleted() and owned.layers[11].mlp.down[...].is_deleted()
    assert not owned.layers[12].attn.q[...].is_deleted()  # the tail block is the scanned model's own, unchanged
    for a, b in zip(jax.tree.leaves(nnx.state(kept)), jax.tree.leaves(nnx.state(consumed)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_selects_scanned_layers_per_verbalizer(tmp_path):
    """verbalizers.<side>.layers='scanned' over an unrolled model: the side's verbalizer is scanned, the shared model
    stays unrolled (and usable); a layout models.scan does not know is refused naming the field."""
    from crossmap.pipeline import load_config, validate
    from crossmap.pipeline.context import RunContext
    from crossmap.pipeline.stages import build_verbalizer

    c = load_config(Path(__file__).parent.parent / "configs" / "tiny.py")
    c.run_dir = str(tmp_path / "run")
    c.verbalizers.source.layers = "scanned"
    c.verbalizers.source.weights = "int8"
    ctx = RunContext(c)
    verbalizer, lm = build_verbalizer(ctx, "source")
    assert is_scanned(verbalizer.model) and is_quantized(verbalizer.model)
    assert not is_scanned(lm.model) and not lm.model.layers[0].attn.q[...].is_deleted()
    target, _ = build_verbalizer(ctx, "target")
    assert not is_scanned(target.model)
    c.verbalizers.target.layers = "stacked"
    with pytest.raises(ValueError, match="verbalizers.target.layers must be one of '', 'unrolled', 'scanned'"):
        validate(c)


def test_config_scans_a_base_model_for_the_forward_and_its_self_verbalizer(tmp_path):
    """models.<side>.layers='scanned': the model is stacked as it loads; the activation forward (make_hidden_fn, what
    the collection runs) equals the unrolled model's, and the self-verbalizer runs the scanned model (int8 on top);
    asking that self-verbalizer for unrolled blocks is refused before any model loads."""
    from crossmap.models import load_model, make_hidden_fn
    from crossmap.pipeline import load_config, validate
    from crossmap.pipeline.context import RunContext
    from crossmap.pipeline.stages import build_verbalizer

    c = load_config(Path(__file__).parent.parent / "configs" / "tiny.py")
    c.run_dir = str(tmp_path / "run")
    c.models.target.layers = "scanned"
    c.verbalizers.target.weights = "int8"
    ctx = RunContext(c)
    lm = ctx.model("target")
    assert is_scanned(lm.model) and not is_scanned(ctx.model("source").model)
    reference = load_model(c.models.target.path, dtype=c.models.target.dtype).model
    tokens = np.asarray([[5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
    positions, valid = np.arange(8, dtype=np.int32)[None], np.ones((1, 8), bool)
    layer = c.models.target.layer
    got = make_hidden_fn(lm.model, layer)(tokens, positions, valid)
    want = make_hidden_fn(reference, layer)(tokens, positions, valid)
    assert close(got, want) < RELATIVE_BOUND
    verbalizer, _ = build_verbalizer(ctx, "target")
    assert is_scanned(verbalizer.model) and is_quantized(verbalizer.model)
    c.verbalizers.target.layers = "unrolled"
    with pytest.raises(ValueError, match="verbalizers.target.layers='unrolled', but a self-verbalizer runs"):
        validate(c)
    c.verbalizers.target.layers = ""
    c.models.source.layers = "stack"
    with pytest.raises(ValueError, match="models.source.layers must be one of 'unrolled', 'scanned'"):
        validate(c)


def test_missing_gpu_xla_flags_names_each_flag_not_given():
    from crossmap.models.scan import SCANNED_GPU_XLA_FLAGS, missing_gpu_xla_flags

    assert missing_gpu_xla_flags("") == list(SCANNED_GPU_XLA_FLAGS)
    assert missing_gpu_xla_flags(" ".join(SCANNED_GPU_XLA_FLAGS) + " --xla_dump_to=/tmp/x") == []
    assert missing_gpu_xla_flags(SCANNED_GPU_XLA_FLAGS[0]) == list(SCANNED_GPU_XLA_FLAGS[1:])


def test_benches_time_both_layouts_in_one_run_and_refuse_unknown_ones(tmp_path):
    import argparse

    from crossmap.benchmarks import forward, verbalize
    from crossmap.benchmarks.common import layer_layouts

    def args(module, argv):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return parser.parse_args(argv)

    assert verbalize.variant_names({"float": ("float", "auto"), "int8": ("int8", "auto")}, ["unrolled", "scanned"]) \
        == [("float", "float", "unrolled", "separate", "auto", 1, 1),
            ("float/scanned", "float", "scanned", "separate", "auto", 1, 1),
            ("int8", "int8", "unrolled", "separate", "auto", 1, 1),
            ("int8/scanned", "int8", "scanned", "separate", "auto", 1, 1)]
    for bad in ("", "scanned,scanned", "stacked"):
        with pytest.raises(ValueError, match="--layers must list distinct layouts"):
            layer_layouts(bad)
    result = verbalize.run(args(verbalize, ["--preset", "tiny", "--layers", "unrolled,scanned", "--torch-device",
                                            "none", "--new-tokens", "4", "--reps", "1",
                                            "--out", str(tmp_path / "v.json")]))
    scanned_entry = result["weights"]["float/scanned"]
    assert scanned_entry["crossmap"]["layers"] == "scanned" and scanned_entry["compile_vs_float"] > 0
    # each variant takes the weights it transforms and the next one gets them back from the seed: the same tokens
    assert scanned_entry["tokens_vs_float"]["rows_identical"] == 1.0
    assert scanned_entry["logits_vs_float"]["max_abs_error"] <= RELATIVE_BOUND * \
        scanned_entry["logits_vs_float"]["reference_max_abs"]
    out = forward.run(args(forward, ["--model", "tiny-gemma3", "--layer", "5", "--batch", "2", "--seq", "32",
                                     "--layers", "unrolled,scanned", "--repeats", "1", "--no-torch",
                                     "--out", str(tmp_path / "f.json")]))
    compared = out["layers"]["scanned"]["vs_unrolled"]
    assert compared["max_abs_output_difference"] <= RELATIVE_BOUND * compared["output_max_abs"]
    with pytest.raises(ValueError, match="--layers must list distinct layouts"):
        forward.run(args(forward, ["--model", "tiny-gemma3", "--layers", "scan", "--no-torch",
                                   "--out", str(tmp_path / "g.json")]))


def test_a_model_sharded_over_a_mesh_scans_in_place_and_keeps_its_layout():
    """On 4 CPU devices (fsdp 2 x tensor 2): each stack keeps its blocks' sharding with the group axis whole, the
    consumed blocks are freed, and the scanned forward and generation equal the unrolled ones."""
    from conftest import run_with_devices

    result = run_with_devices("""
        import json
        import jax, jax.numpy as jnp, numpy as np
        from crossmap.models import init_random, scanned
        from crossmap.models.synthetic import tiny_config
        from crossmap.sharding import make_mesh
        from crossmap.verbalize import generate
        types = tuple("sliding" if (i + 1) % 6 else "full" for i in range(13))
        cfg = tiny_config("gemma3", n_layers=13, layer_types=types, eos_token_ids=(1,))
        mesh = make_mesh({"fsdp": 2, "tensor": 2})
        reference = init_random(cfg, seed=3, dtype="float32", mesh=mesh)
        owned = init_random(cfg, seed=3, dtype="float32", mesh=mesh)
        spec = str(owned.layers[0].mlp.up[...].sharding.spec)
        scan = scanned(owned, consume=True)
        tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (4, 10)))
        positions = jnp.broadcast_to(jnp.arange(10), (4, 10))
        valid = jnp.ones((4, 10), bool)
        f = jax.jit(lambda m: m.hidden(tokens, positions, valid, layer=12))
        a, b = np.asarray(f(reference)), np.asarray(f(scan))
        prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]
        ga = generate(reference, prompts, max_new_tokens=6, mesh=mesh)
        gb = generate(scan, prompts, max_new_tokens=6, mesh=mesh)
        print(json.dumps({"unrolled_spec": spec, "stacked_spec": str(scan.layer_stacks[0].mlp.up[...].sharding.spec),
                          "freed": bool(owned.layers[0].mlp.up[...].is_deleted()),
                          "relative": float(np.abs(a - b).max() / np.abs(a).max()),
                          "tokens_equal": bool((ga.tokens == gb.tokens).all())}))
    """, n_devices=4)
    assert result["stacked_spec"] == result["unrolled_spec"].replace("P(", "P(None, ", 1)
    assert "fsdp" in result["unrolled_spec"] and result["freed"]
    assert result["relative"] < RELATIVE_BOUND and result["tokens_equal"]


def test_a_scanned_reconstructor_scores_as_the_unrolled_one(tmp_path):
    """reconstructors.<side>.layers: an AR (a truncated backbone with the real Qwen tokenizer, K=3, so four blocks)
    reconstructs the same vectors scanned as unrolled; an unknown layout is refused naming the field."""
    from nla_release import write_release_pair

    from crossmap.nla import Reconstructor
    from crossmap.pipeline import load_config, validate

    _, ar_dir = write_release_pair(tmp_path, "qwen2", layer=3)
    explanations = ["a river past a mill", "the town at night, with its lights", "numbers"]
    unrolled = Reconstructor(ar_dir, dtype="float32").reconstruct(explanations)
    ar = Reconstructor(ar_dir, dtype="float32", layers="scanned")
    assert is_scanned(ar.model) and ar.model.scan_groups == 4
    assert close(ar.reconstruct(explanations), unrolled) < RELATIVE_BOUND
    c = load_config(Path(__file__).parent.parent / "configs" / "tiny.py")
    c.reconstructors.source.layers = "scan"
    with pytest.raises(ValueError, match="reconstructors.source.layers must be one of 'unrolled', 'scanned'"):
        validate(c)
