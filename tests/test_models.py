"""Ports against transformers' PyTorch models (the oracle), loading, sharding and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import build_hf_model, hf_forward

from crossmap.models import init_random, load_model, tiny_config

ARCHS = ["llama", "qwen2", "gemma3_text"]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def _batch(vocab, lengths, total, left=False, seed=0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = rng.integers(0, vocab, size=(b, total)).astype(np.int32)
    valid = np.zeros((b, total), bool)
    positions = np.zeros((b, total), np.int32)
    for i, n in enumerate(lengths):
        sl = slice(total - n, total) if left else slice(0, n)
        valid[i, sl] = True
        positions[i, sl] = np.arange(n)
    return tokens, positions, valid


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    cfg = tiny_config(request.param)
    hf = build_hf_model(cfg)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    lm = load_model(path, with_tokenizer=False)
    return cfg, hf, lm


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_hidden_and_logits_match_transformers(pair, left):
    cfg, hf, lm = pair
    # 12 tokens: longer than Gemma's tiny sliding window (5), so local layers really slide.
    tokens, positions, valid = _batch(cfg.vocab_size, [12, 7, 3], 12, left=left)
    hs, logits = hf_forward(hf, tokens, positions, valid)
    for layer in (0, cfg.n_layers // 2, cfg.n_layers - 2):
        ours = np.asarray(lm.model.hidden(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid),
                                          layer=layer))
        assert _rel(ours[valid], hs[layer + 1][valid]) < 1e-4, f"layer {layer}"
    ours_logits = np.asarray(lm.model.logits(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid)))
    assert _rel(ours_logits[valid], logits[valid]) < 1e-4


def test_truncated_forward_runs_only_requested_blocks(pair):
    cfg, _, lm = pair
    tokens, positions, valid = _batch(cfg.vocab_size, [6], 6)
    # Poison the blocks after layer 1: the truncated forward must not touch them.
    import jax

    from crossmap.models import make_hidden_fn

    fn = make_hidden_fn(lm.model, 1)
    jaxpr = jax.make_jaxpr(lambda t: lm.model.hidden(t, positions, valid, layer=1))(tokens)
    n_dots = sum(1 for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general")
    full = jax.make_jaxpr(lambda t: lm.model.logits(t, positions, valid))(tokens)
    n_full = sum(1 for e in full.jaxpr.eqns if e.primitive.name == "dot_general")
    per_block = (n_full - 1) // cfg.n_layers
    assert n_dots == 2 * per_block  # blocks 0 and 1 only, no LM head
    assert np.allclose(np.asarray(fn(tokens, positions, valid)),
                       np.asarray(lm.model.hidden(tokens, positions, valid, layer=1)), atol=1e-6)


def test_layer_out_of_range(pair):
    cfg, _, lm = pair
    tokens, positions, valid = _batch(cfg.vocab_size, [4], 4)
    with pytest.raises(IndexError, match=f"layer {cfg.n_layers} out of range"):
        lm.model.hidden(tokens, positions, valid, layer=cfg.n_layers)


def test_checkpoint_shape_mismatch_names_tensor(tmp_path):
    cfg = tiny_config("llama")
    hf = build_hf_model(cfg)
    hf.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        load_model(tmp_path, with_tokenizer=False)


def test_missing_shard_and_unknown_type_and_dtype(tmp_path):
    cfg = tiny_config("qwen2")
    build_hf_model(cfg).save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    with pytest.raises(ValueError, match="unsupported|not supported"):
        load_model(tmp_path, with_tokenizer=False, dtype="int8")
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        load_model(tmp_path, with_tokenizer=False)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        load_model(tmp_path, with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_model(tmp_path / "no-such-dir")


def test_bf16_load_is_close(pair, tmp_path):
    cfg, hf, lm = pair
    path = lm.path
    lm16 = load_model(path, with_tokenizer=False, dtype="bfloat16")
    tokens, positions, valid = _batch(cfg.vocab_size, [8, 8], 8)
    a = np.asarray(lm.model.hidden(tokens, positions, valid, layer=1))
    b = np.asarray(lm16.model.hidden(tokens, positions, valid, layer=1)).astype(np.float32)
    assert lm16.model.embed[...].dtype == jnp.bfloat16
    assert _rel(b, a) < 0.05


def test_random_init_on_mesh_matches_shapes():
    from crossmap.sharding import make_mesh

    cfg = tiny_config("gemma3_text")
    model = init_random(cfg, mesh=make_mesh(), dtype="bfloat16")
    assert model.layers[0].attn.q[...].shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)
    assert model.layers[0].attn.q[...].dtype == jnp.bfloat16


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.x's "llama3" RoPE scaling (every released Llama-3.3 NLA needs it): an original context of
    64 puts the tiny model's frequencies in all three bands (kept, blended, stretched), and positions
    reach 300, where the stretch matters."""
    cfg = tiny_config("llama", rope_llama3=(8.0, 1.0, 4.0, 64))
    hf = build_hf_model(cfg)
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    hf.save_pretrained(tmp_path)
    lm = load_model(tmp_path, with_tokenizer=False)
    assert lm.config.rope_llama3 == (8.0, 1.0, 4.0, 64)
    tokens, positions, valid = _batch(cfg.vocab_size, [300, 41], 300)
    _, logits = hf_forward(hf, tokens, positions, valid)
    ours = np.asarray(lm.model.logits(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid)))
    assert _rel(ours[valid], logits[valid]) < 1e-4
    plain = load_model(tmp_path, with_tokenizer=False, config_overrides={"rope_llama3": None})
    unscaled = np.asarray(plain.model.logits(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid)))
    assert _rel(unscaled[valid], logits[valid]) > 1e-2  # the scaling is not a no-op at these positions


def test_gelu_gate_rounds_once_like_transformers_in_bf16():
    """Gemma's GELU on a bf16 gate product: computed in float32 and rounded once, as PyTorch computes
    transformers' gelu_pytorch_tanh on bf16. Both use their own tanh, so a few entries land one bf16 step apart
    (more in the far negative tail, where 1 + tanh cancels and GELU is below 1e-5); GELU written in bf16 (the form
    XLA folds into a cuBLASLt epilogue) differs on about 40% of them, by up to 0.016."""
    import torch

    from crossmap.models.layers import gate_activation

    gate = np.random.default_rng(0).normal(size=(64, 512)).astype(np.float32) * 3
    ref = torch.nn.functional.gelu(torch.tensor(gate).bfloat16(), approximate="tanh").float().numpy()
    bf16 = jnp.asarray(gate, jnp.bfloat16)
    ours = np.asarray(jax.jit(gate_activation, static_argnums=1)(bf16, "gelu_tanh"))
    assert ours.dtype == jnp.bfloat16
    ours = ours.astype(np.float32)
    apart = ours != ref
    assert apart.mean() < 0.05, apart.mean()
    step = np.abs(ref) * 2.0 ** -7  # at least one bf16 step at |ref| (8 significant bits)
    assert np.all(np.abs(ours - ref) <= np.maximum(step, 1e-5))
    np.testing.assert_array_equal(np.asarray(gate_activation(bf16, "silu")), np.asarray(jax.nn.silu(bf16)))


def test_through_block_keeps_each_blocks_type_and_refuses_a_layer_out_of_range():
    cfg = tiny_config("gemma3")  # sliding and full blocks
    cut = cfg.through_block(5, tie_embeddings=True)
    assert cut.n_layers == 6 and cut.layer_types == cfg.layer_types[:6] and cut.tie_embeddings
    assert cut.forward_flops_per_token(64, with_head=False) == cfg.forward_flops_per_token(64, upto_layer=5,
                                                                                          with_head=False)
    for layer in (cfg.n_layers, -1):
        with pytest.raises(ValueError, match=rf"layer {layer} is out of range for .* which has {cfg.n_layers} "
                                             rf"blocks \(0\.\.{cfg.n_layers - 1}\)"):
            cfg.through_block(layer)
