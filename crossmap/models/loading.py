"""Read checkpoints (HF safetensors directories, GGUF files) tensor by tensor onto the mesh.

The model is first built abstractly (`nnx.eval_shape`: no memory), then each checkpoint tensor
is read, converted to crossmap's layout on the host, and `device_put` straight to its target
sharding, so a 27B model never sits in host RAM twice.  Every parameter must be filled exactly
once with the shape the config implies; anything else is an error naming the tensor and file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .. import sharding as shd
from .config import SUPPORTED_DTYPES, ModelConfig
from .layers import Transformer

# GGUF tensor names -> HF names (per block names after "blk.N.")
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Prefixes under which multimodal checkpoints keep their text decoder
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_SKIP_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def check_dtype(dtype) -> jnp.dtype:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {SUPPORTED_DTYPES}")
    return jnp.dtype(name)


def gguf_name_to_hf(name: str, gguf_arch: str) -> str | None:
    """HF tensor name of a GGUF tensor (None for tensors crossmap does not use)."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, idx, short = stem.split(".", 2)
        if short == "ffn_norm":  # llama/qwen2: the pre-MLP norm; gemma3: pre-feedforward norm
            hf = "pre_feedforward_layernorm" if gguf_arch == "gemma3" else "post_attention_layernorm"
        else:
            hf = _GGUF_BLOCK_NAMES.get(short)
        return None if hf is None else f"model.layers.{idx}.{hf}.{kind}"
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{kind}"
    return None


def hf_param_table(cfg: ModelConfig, norm_names: dict[str, str]) -> dict[str, tuple[tuple, Callable]]:
    """HF tensor name -> (path of our parameter, converter from HF layout to ours)."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same = lambda w: w
    table = {"model.embed_tokens.weight": (("embed",), same), "model.norm.weight": (("final_norm", "weight"), same)}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = (("lm_head",), lambda w: w.T)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        table.update({
            p + "self_attn.q_proj.weight": (("layers", i, "attn", "q"), lambda w: w.T.reshape(d, n, h)),
            p + "self_attn.k_proj.weight": (("layers", i, "attn", "k"), lambda w: w.T.reshape(d, k, h)),
            p + "self_attn.v_proj.weight": (("layers", i, "attn", "v"), lambda w: w.T.reshape(d, k, h)),
            p + "self_attn.o_proj.weight": (("layers", i, "attn", "o"), lambda w: w.T.reshape(n, h, d)),
            p + "mlp.gate_proj.weight": (("layers", i, "mlp", "gate"), lambda w: w.T),
            p + "mlp.up_proj.weight": (("layers", i, "mlp", "up"), lambda w: w.T),
            p + "mlp.down_proj.weight": (("layers", i, "mlp", "down"), lambda w: w.T),
        })
        if cfg.qkv_bias:
            table[p + "self_attn.q_proj.bias"] = (("layers", i, "attn", "q_bias"), lambda w: w.reshape(n, h))
            table[p + "self_attn.k_proj.bias"] = (("layers", i, "attn", "k_bias"), lambda w: w.reshape(k, h))
            table[p + "self_attn.v_proj.bias"] = (("layers", i, "attn", "v_bias"), lambda w: w.reshape(k, h))
        if cfg.qk_norm:
            table[p + "self_attn.q_norm.weight"] = (("layers", i, "attn", "q_norm", "weight"), same)
            table[p + "self_attn.k_norm.weight"] = (("layers", i, "attn", "k_norm", "weight"), same)
        for hf_norm, ours in norm_names.items():
            table[p + hf_norm + ".weight"] = (("layers", i, ours, "weight"), same)
    return table


def hf_shapes(cfg: ModelConfig, norm_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> its shape in a HF checkpoint of this config (the names of `hf_param_table`)."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    by_suffix = {"q_proj.weight": (n * h, d), "k_proj.weight": (k * h, d), "v_proj.weight": (k * h, d),
                 "o_proj.weight": (d, n * h), "q_proj.bias": (n * h,), "k_proj.bias": (k * h,),
                 "v_proj.bias": (k * h,), "gate_proj.weight": (cfg.d_ff, d), "up_proj.weight": (cfg.d_ff, d),
                 "down_proj.weight": (d, cfg.d_ff), "q_norm.weight": (h,), "k_norm.weight": (h,)}
    top = {"model.embed_tokens.weight": (cfg.vocab_size, d), "lm_head.weight": (cfg.vocab_size, d)}
    shapes = {}
    for name in hf_param_table(cfg, norm_names):
        suffix = ".".join(name.rsplit(".", 2)[-2:])
        shapes[name] = top.get(name) or by_suffix.get(suffix) or (d,)  # the rest are d-wide norms
    return shapes


def canonical_hf_name(name: str) -> str | None:
    """Strip multimodal wrappers; None for tensors that are not part of the text decoder."""
    if name.startswith(_SKIP_PREFIXES):
        return None
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def iter_safetensors(directory: Path) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (name, array, file) one tensor at a time from a HF checkpoint directory.

    Arrays are read-only views of memory-mapped files (see `checkpoint_files`): bf16 stays bf16
    on the host and nothing passes through an accelerator on its way to the mesh.
    """
    from .checkpoint_files import iter_safetensors_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files (and no model.safetensors.index.json) in {directory}")
    for fname in files:
        for name, array in iter_safetensors_file(directory / fname):
            yield name, array, fname


def read_gguf(path: Path) -> tuple[dict, Callable[[], Iterator[tuple[str, np.ndarray]]]]:
    """(metadata dict, tensor iterator factory) of a GGUF file, dequantised with `gguf` (no torch)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue  # large vocabulary arrays: the tokenizer reads them itself
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            continue

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for t in reader.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            shape = tuple(reversed([int(x) for x in t.shape]))  # GGUF lists dims innermost first
            yield t.name, np.asarray(arr, dtype=np.float32).reshape(shape)

    return meta, tensors


def place_weights(cfg: ModelConfig, norm_names: dict[str, str], tensors: Iterator[tuple[str, np.ndarray, str]],
                  *, dtype, mesh: Mesh | None, rules: dict | None, source: str) -> Transformer:
    """Build the model abstractly and fill it from (hf_name, array, file) triples."""
    dtype = check_dtype(dtype)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    table = hf_param_table(cfg, norm_names)
    filled: dict[tuple, jax.Array] = {}
    for raw_name, array, fname in tensors:
        name = canonical_hf_name(raw_name)
        if name is None or name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in table:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # some tied checkpoints store a copy anyway
            raise ValueError(f"{source}/{fname}: unexpected tensor {raw_name!r} for a {cfg.model_type} model "
                             f"with {cfg.n_layers} layers (config and checkpoint disagree)")
        path, convert = table[name]
        var = flat[path]
        expected = tuple(var.get_value().shape)
        try:
            value = convert(array)
        except ValueError:
            value = None
        if value is None or tuple(value.shape) != expected:
            raise ValueError(f"{source}/{fname}: tensor {raw_name!r} has shape {tuple(array.shape)}, which does "
                             f"not fit the shape {expected} the config implies")
        if path in filled:
            raise ValueError(f"{source}/{fname}: tensor {raw_name!r} appears twice")
        # ml_dtypes gives numpy a bfloat16, so the cast happens on the host, once per tensor.
        value = np.asarray(value).astype(dtype)
        if mesh is not None:
            logical = var.get_metadata().get("logical")
            filled[path] = jax.device_put(value, shd.sharding_for(mesh, logical, value.shape, rules))
        else:
            filled[path] = jnp.asarray(value)
    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} parameter(s) the config needs, e.g. "
                         f"{missing[:5]} (a missing shard, or a config that does not match the weights)")
    for path, value in filled.items():
        flat[path].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def env_offline() -> None:
    """crossmap never reaches a model hub: make transformers fail fast instead of hanging."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
