"""GGUF files: read and dequantise them (the gguf package, no torch), and convert them once into a
HF-layout checkpoint directory that crossmap and transformers both load."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..integrity import cached_sha256
from .registry import gguf_architecture_for, hf_config
from .shipped import cache_dir, env_offline

# GGUF tensor names -> HF names (per block names after "blk.N.")
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

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


def read_gguf(path: Path) -> tuple[dict, Callable[[], Iterator[tuple[str, np.ndarray]]]]:
    """(metadata dict, tensor iterator factory) of a GGUF file, dequantised with `gguf` (no torch)."""
    import gguf

    with Path(path).open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the gguf package's own errors: say which file
        raise ValueError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from err
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


def _gguf_cache_dir(path: Path) -> Path:
    """Where the conversion of `path` is kept: named by the file's content hash (hashed once, then
    remembered by path, size and mtime), so another file of the same name and size is never
    taken for it."""
    digest = cached_sha256(path, cache_dir() / "converted" / "sha256-by-path.json")
    return cache_dir() / "converted" / f"{path.stem}-{digest[:16]}"


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF file into a HF-layout directory (config.json, model.safetensors, tokenizer).

    The result is cached (by the file's content hash) so later loads are a plain safetensors read;
    transformers can load the directory too.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    out = Path(out_dir) if out_dir else _gguf_cache_dir(path)
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    meta, tensors = read_gguf(path)
    module = gguf_architecture_for(meta.get("general.architecture"), str(path))
    hf = module.hf_config_from_gguf(meta)
    arrays: dict[str, np.ndarray] = {}
    for name, arr in tensors():
        hf_name = gguf_name_to_hf(name, module.GGUF_ARCH)
        if hf_name is None:
            raise ValueError(f"{path}: unrecognised GGUF tensor {name!r}")
        arrays[hf_name] = arr
    hf["vocab_size"] = int(arrays["model.embed_tokens.weight"].shape[0])
    hf["tie_word_embeddings"] = "lm_head.weight" not in arrays
    cfg = module.config_from_hf(hf, path.stem)
    for hf_name in list(arrays):
        arrays[hf_name] = np.ascontiguousarray(module.fix_gguf_tensor(hf_name, arrays[hf_name], cfg))
    hf = {**hf_config(cfg), "torch_dtype": "float32"}
    save_file(arrays, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    del arrays
    tok = _tokenizer_from_gguf(path)
    tok.save_pretrained(str(out))
    (out / ".complete").write_text(str(path))
    return out


def _tokenizer_from_gguf(path: Path):
    env_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


