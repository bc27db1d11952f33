"""safetensors read and written with numpy (oracle: the safetensors package and transformers), and
random checkpoints at a config's shapes that both transformers and crossmap load."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hf_oracle import hf_config_dict, hf_forward

from crossmap.models import load_model, tiny_config, write_random_checkpoint
from crossmap.models.checkpoint_files import iter_safetensors_file, write_safetensors


def test_reader_matches_the_safetensors_package_for_every_dtype(tmp_path):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    tensors = {"w_bf16": torch.randn(3, 5, dtype=torch.bfloat16), "w_f32": torch.randn(4, dtype=torch.float32),
               "w_f16": torch.randn(2, 2, 2, dtype=torch.float16),
               "ids": torch.as_tensor(rng.integers(0, 99, 7)), "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    ours = dict(iter_safetensors_file(tmp_path / "t.safetensors"))
    assert set(ours) == set(tensors)
    assert ours["w_bf16"].dtype == ml_dtypes.bfloat16
    for name, t in tensors.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        np.testing.assert_array_equal(ours[name].astype(want.dtype), want, err_msg=name)
        assert ours[name].shape == tuple(t.shape)


def test_writer_is_read_back_by_the_safetensors_package(tmp_path):
    import torch
    from safetensors.torch import load_file

    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 7)).astype(ml_dtypes.bfloat16)
    b = rng.standard_normal(11).astype(np.float32)
    values = {"a": a, "b": b}
    # produce() may hand over a tensor in any number of flat chunks
    nbytes = write_safetensors(tmp_path / "w.safetensors", [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)],
                               lambda name: np.array_split(values[name].reshape(-1), 3))
    assert nbytes == a.nbytes + b.nbytes
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back["a"].dtype == torch.bfloat16
    np.testing.assert_array_equal(back["a"].float().numpy(), a.astype(np.float32))
    np.testing.assert_array_equal(back["b"].numpy(), b)
    with pytest.raises(ValueError, match=r"produce\('a'\) gave 41 values"):
        write_safetensors(tmp_path / "x.safetensors", [("a", a.shape, a.dtype)], lambda name: [a.reshape(-1)[:41]])
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_file_names_file_and_tensor(tmp_path):
    a = np.ones((64, 64), np.float32)
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, [("a", a.shape, a.dtype)], lambda name: [a])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors: file is truncated.*'a'"):
        list(iter_safetensors_file(path))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        list(iter_safetensors_file(tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_random_checkpoint_loads_in_transformers_and_crossmap_alike(arch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    hf = hf_config_dict(cfg)
    out = write_random_checkpoint(hf, tmp_path / arch, dtype="float32", std=0.1, shard_bytes=40_000,
                                  progress=False)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 10
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    oracle, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True,
                                                        attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_model(out, with_tokenizer=False)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    positions = np.tile(np.arange(9, dtype=np.int32), (2, 1))
    valid = np.ones((2, 9), bool)
    hs, _ = hf_forward(oracle.eval(), tokens, positions, valid)
    mine = np.asarray(ours.model.hidden(tokens, positions, valid, layer=1))
    assert np.max(np.abs(mine - hs[2])) / np.max(np.abs(hs[2])) < 1e-4
    # a second call finds the finished directory and leaves it alone
    stamp = (out / "config.json").stat().st_mtime_ns
    write_random_checkpoint(hf, out, dtype="float32", std=0.1, shard_bytes=40_000, progress=False)
    assert (out / "config.json").stat().st_mtime_ns == stamp


def test_multimodal_gemma_layout_loads_the_same_decoder(tmp_path):
    cfg = tiny_config("gemma3_text")
    hf = hf_config_dict(cfg)
    text = write_random_checkpoint(hf, tmp_path / "text", dtype="bfloat16", progress=False)
    multi = write_random_checkpoint(hf, tmp_path / "multi", dtype="bfloat16", multimodal=True, progress=False)
    conf = json.loads((multi / "config.json").read_text())
    assert conf["model_type"] == "gemma3" and conf["text_config"]["hidden_size"] == cfg.d_model
    names = json.loads((multi / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.startswith("vision_tower.") for n in names)
    assert all(n.startswith(("language_model.model.", "language_model.lm_head", "vision_tower."))
               for n in names)
    a = load_model(text, with_tokenizer=False, dtype="bfloat16").model
    b = load_model(multi, with_tokenizer=False, dtype="bfloat16").model
    np.testing.assert_array_equal(np.asarray(a.layers[1].mlp.down[...]), np.asarray(b.layers[1].mlp.down[...]))
    with pytest.raises(ValueError, match="multimodal layout is for Gemma 3 only"):
        write_random_checkpoint(hf_config_dict(tiny_config("qwen2")), tmp_path / "q", multimodal=True)
