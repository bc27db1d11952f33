"""The same forward on 8 forced CPU devices, sharded over data, fsdp and tensor axes, gives the
numbers of one device; sharding rules and mesh construction reject bad input."""

from __future__ import annotations

import pytest
from conftest import run_with_devices
from jax.sharding import PartitionSpec as P

from crossmap import sharding as shd


def test_logical_rules_map_names_to_mesh_axes():
    assert shd.logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert shd.logical_to_spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    # a mesh axis is used once per array
    assert shd.logical_to_spec(("mlp", "vocab")) == P("tensor", None)


def test_batch_axes_and_shards_follow_the_rules():
    from types import SimpleNamespace

    def mesh(data, fsdp, tensor):  # only the axis sizes matter here
        return SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})

    assert shd.batch_axes(mesh(2, 1, 4)) == ("data",) and shd.batch_shards(mesh(2, 1, 4)) == 2
    assert shd.batch_axes(mesh(2, 2, 2)) == ("data", "fsdp") and shd.batch_shards(mesh(2, 2, 2)) == 4
    assert shd.batch_axes(mesh(1, 1, 8)) == () and shd.batch_shards(mesh(1, 1, 8)) == 1
    assert shd.batch_shards(None) == 1
    # a config that moves the batch onto the tensor axis is obeyed
    assert shd.batch_shards(mesh(2, 1, 4), dict(shd.LOGICAL_RULES, batch="tensor")) == 4


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="unknown axis"):
        shd.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="multiply to"):
        shd.make_mesh({"data": 3, "tensor": 1}, devices=[object()] * 2)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_sharded_forward_equals_single_device(arch):
    out = run_with_devices(f"""
        import json, jax, numpy as np
        from crossmap.models import init_random, tiny_config, make_hidden_fn, shard_model
        from crossmap.sharding import make_mesh
        assert len(jax.devices()) == 8
        cfg = tiny_config("{arch}")
        model = init_random(cfg, seed=3)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
        valid = np.ones((8, 12), bool); valid[3, 7:] = False
        positions = np.broadcast_to(np.arange(12, dtype=np.int32), (8, 12))
        single = np.asarray(make_hidden_fn(model, 2)(tokens, positions, valid))
        logits1 = np.asarray(model.logits(tokens, positions, valid))
        mesh = make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
        sharded_model = shard_model(model, mesh)
        q = sharded_model.layers[0].attn.q[...]
        fn = make_hidden_fn(sharded_model, 2, mesh=mesh)
        h = fn(tokens, positions, valid)
        logits8 = jax.jit(lambda t, p, v: sharded_model.logits(t, p, v))(tokens, positions, valid)
        print(json.dumps({{
            "hidden_err": float(np.abs(np.asarray(h) - single).max() / np.abs(single).max()),
            "logit_err": float(np.abs(np.asarray(logits8) - logits1).max() / np.abs(logits1).max()),
            "param_spec": str(q.sharding.spec), "out_spec": str(h.sharding.spec),
            "n_shards": len(h.addressable_shards)}}))
    """)
    assert out["hidden_err"] < 1e-5 and out["logit_err"] < 1e-5
    assert out["param_spec"] == str(P("fsdp", "tensor", None))
    assert "data" in out["out_spec"] and out["n_shards"] == 8


def test_mesh_zero_means_devices_per_host():
    out = run_with_devices("""
        import json
        from crossmap.sharding import make_mesh
        mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 0})
        print(json.dumps(dict(mesh.shape)))
    """)
    assert out == {"data": 1, "fsdp": 1, "tensor": 8}


def test_random_init_straight_onto_mesh():
    out = run_with_devices("""
        import json
        from crossmap.models import init_random, tiny_config
        from crossmap.sharding import make_mesh
        mesh = make_mesh({"fsdp": 2, "tensor": 4})
        model = init_random(tiny_config("llama"), mesh=mesh, dtype="bfloat16")
        w = model.layers[1].mlp.gate[...]
        print(json.dumps({"spec": str(w.sharding.spec), "shard": list(w.addressable_shards[0].data.shape)}))
    """)
    assert out["spec"] == str(P("fsdp", "tensor"))
    assert out["shard"] == [32, 32]
