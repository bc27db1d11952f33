"""NLA checkpoints stored as LoRA adapters over a base model: the compact form crossmap ships and exports.

A directory holds `nla_meta.yaml` (the release's sidecar, unchanged), `adapter_model.safetensors` and
`adapter_config.json` (PEFT's layout, `lora.save_adapter_file`), for an AR its `value_head.safetensors`,
and `crossmap_nla.json`, the manifest:

    {"base": "shipped:qwen2.5-coder-0.5b-instruct",      # what `models.load_model` loads
     "sha256": {"adapter_model.safetensors": "...", ...},  # every file above, checked at load
     "trained_by": "crossmap train-nla --config ...", ...}  # provenance, kept as given

Loading merges the adapters into the base weights (W + (alpha / r) A B, float32, then the requested
dtype) and, for an AR, keeps blocks 0..K of the sidecar's extraction layer: the same weights a merged
release-layout export holds, from a few megabytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ..integrity import file_sha256
from ..jsonio import load_json
from ..models import LoadedModel, Transformer, load_model
from .lora import ADAPTER_FILE, merge_adapters, read_adapter_file

MANIFEST = "crossmap_nla.json"


def is_adapted(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest, with every listed file's sha256 checked (an error names the file and both hashes)."""
    directory = Path(directory)
    path = directory / MANIFEST
    manifest = load_json(path)
    base = manifest.get("base")
    hashes = manifest.get("sha256")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: field 'base' must name the base model (a directory, a .gguf or shipped:<name>)")
    if not isinstance(hashes, dict) or ADAPTER_FILE not in hashes:
        raise ValueError(f"{path}: field 'sha256' must give the hash of each file, {ADAPTER_FILE} included")
    for name, want in sorted(hashes.items()):
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{path}: lists {name}, which is missing")
        got = file_sha256(file)
        if got != want:
            raise ValueError(f"{file}: sha256 is {got}, but {path} records {want}: the file changed or is damaged")
    return manifest


def truncated(model: Transformer, layer: int) -> tuple[Transformer, dict]:
    """(abstract model, params) of blocks 0..layer with the embeddings and no LM head: an AR's backbone."""
    cfg = model.config
    cfg_ar = cfg.through_block(layer, tie_embeddings=True)
    abstract = nnx.eval_shape(lambda: Transformer(cfg_ar, dtype=model.embed[...].dtype, rngs=nnx.Rngs(0)))
    full = nnx.to_pure_dict(nnx.split(model)[1])
    params = {"embed": full["embed"], "final_norm": full["final_norm"],
              "layers": {i: full["layers"][i] for i in range(layer + 1)}}
    return abstract, params


def load_adapted(directory: str | os.PathLike, *, role: str, layer: int | None, dtype: str = "bfloat16",
                 mesh: Mesh | None = None, rules: dict | None = None) -> LoadedModel:
    """The base model with the directory's adapters merged (an AR: truncated to blocks 0..layer)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    base = load_model(manifest["base"], dtype="float32", mesh=mesh, rules=rules)
    params = nnx.to_pure_dict(nnx.split(base.model)[1])
    adapters, alpha = read_adapter_file(directory, params)
    merged = merge_adapters(params, adapters, alpha)
    model = nnx.merge(nnx.split(base.model)[0], jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), merged))
    cfg = base.config
    if role == "ar":
        if layer is None:
            raise ValueError(f"{directory}: an AR needs the sidecar's extraction layer")
        abstract, ar_params = truncated(model, layer)
        model, cfg = nnx.merge(nnx.split(abstract)[0], ar_params), abstract.config
    return LoadedModel(model=model, tokenizer=base.tokenizer, config=cfg, model_id=f"{base.model_id}+{directory.name}",
                       path=str(directory))


SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "nla"


def shipped_nla_names() -> list[str]:
    """The NLA pairs shipped with crossmap (adapters over the shipped small models), by directory name."""
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / MANIFEST).is_file()) if SHIPPED_DIR.is_dir() else []


def shipped_nla(name: str) -> Path:
    """The directory of a shipped NLA, e.g. shipped_nla("gemma-3-270m-L9-av")."""
    names = shipped_nla_names()
    if name not in names:
        raise ValueError(f"no shipped NLA named {name!r}; crossmap ships {names}")
    return SHIPPED_DIR / name
