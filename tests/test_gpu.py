"""Reference-scale shapes on the GPU (skipped on CPU): Qwen2.5-7B and Gemma-3-27B configs with random
bf16 weights placed straight on the device, truncated forward at the paper's layers, full logits,
fused cuDNN attention against the explicit-mask path."""

from __future__ import annotations

import gc

import numpy as np
import pytest

pytestmark = pytest.mark.gpu



def _model(name):
    from crossmap.models import config_from_hf, init_random, shape_config
    from crossmap.sharding import make_mesh

    cfg = config_from_hf(shape_config(name)[0], name)
    return cfg, init_random(cfg, seed=0, dtype="bfloat16", mesh=make_mesh())


def _batch(cfg, b, t):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    valid = np.ones((b, t), bool)
    valid[1, t // 2:] = False  # a padded row
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return tokens, positions, valid


@pytest.mark.parametrize("name,layer", [("qwen2.5-7b-instruct", 20), ("gemma-3-27b-it", 41)])
def test_reference_scale_shapes_and_attention_paths(name, layer):
    import jax
    import jax.numpy as jnp

    from crossmap.models import make_hidden_fn

    cfg, model = _model(name)
    assert abs(cfg.param_count() - model_param_count(model)) == 0
    tokens, positions, valid = _batch(cfg, 2, 1152)  # longer than Gemma's 1024-token window
    h_xla = make_hidden_fn(model, layer)(tokens, positions, valid)
    assert h_xla.shape == (2, tokens.shape[1], cfg.d_model) and h_xla.dtype == jnp.bfloat16
    model.attention_impl = "cudnn"
    h_cudnn = make_hidden_fn(model, layer)(tokens, positions, valid)
    a = np.asarray(h_xla, np.float32)[valid]
    b = np.asarray(h_cudnn, np.float32)[valid]
    assert np.isfinite(a).all() and np.isfinite(b).all()
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel < 3e-2, f"cudnn vs xla attention differ by {rel:.3g}"
    model.attention_impl = None
    from flax import nnx

    graphdef, state = nnx.split(model)  # parameters as jit arguments, never as baked-in constants
    logits = jax.jit(lambda s, t, p, v: nnx.merge(graphdef, s).logits(t, p, v))(
        state, tokens[:, :64], positions[:, :64], valid[:, :64])
    assert logits.shape == (2, 64, cfg.vocab_size) and np.isfinite(np.asarray(logits[0])).all()
    model = h_xla = h_cudnn = logits = None  # free the device before the next size
    gc.collect()


def model_param_count(model) -> int:
    from flax import nnx

    return sum(int(np.prod(v.shape)) for v in jax_leaves(nnx.state(model, nnx.Param)))


def jax_leaves(state):
    import jax

    return jax.tree_util.tree_leaves(state)
