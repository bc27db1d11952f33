"""safetensors files read and written with numpy alone, and random checkpoints at real shapes.

Reading memory-maps each file and views every tensor in place (bfloat16 through ml_dtypes), so a
bf16 checkpoint is never routed through an accelerator or copied whole on the host: the loader
converts and places one tensor at a time.  Writing streams tensors one at a time behind a header
computed from their shapes, which is how `write_random_checkpoint` makes a 27B-shaped checkpoint
without holding it in memory.  Random checkpoints let the reference-scale configs be run end to
end (loading, sharding, the whole pipeline) where the real weights are not at hand.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype names <-> numpy dtypes
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict, byte offset where tensor data starts) of a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({err})") from None
    return header, 8 + n


def iter_safetensors_file(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, read-only array) for every tensor of one file, viewed in a memory map.

    A file cut short (an interrupted download or copy) is an error naming the file and tensor.
    """
    path = Path(path)
    header, start = read_header(path)
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info.get("dtype")
        if dtype_name not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which crossmap cannot read "
                             f"(readable: {', '.join(_DTYPES)})")
        dtype = np.dtype(_DTYPES[dtype_name])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape {shape} and dtype "
                             f"{dtype_name} need {math.prod(shape) * dtype.itemsize}")
        if start + end > size:
            raise ValueError(f"{path}: file is truncated ({size} bytes; tensor {name!r} ends at byte {start + end})")
        yield name, data[start + begin:start + end].view(dtype).reshape(shape)


def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], str | np.dtype]],
                      produce: Callable[[str], Iterator[np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file tensor by tensor; returns the bytes of tensor data written.

    entries: (name, shape, dtype) in file order.  produce(name) yields that tensor's values as
    flat chunks in C order (any number of them; together exactly the tensor's size), so nothing
    larger than a chunk need exist in memory.  The file appears under its name only when whole.
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype in entries:
            want, got = math.prod(shape), 0
            for chunk in produce(name):
                chunk = np.ascontiguousarray(chunk, dtype=dtype).reshape(-1)
                fh.write(chunk.view(np.uint8).data)
                got += chunk.size
            if got != want:
                raise ValueError(f"{path}: produce({name!r}) gave {got} values for shape {shape} ({want} expected)")
    tmp.replace(path)
    return offset


# -- random checkpoints ----------------------------------------------------------------------------

def _hf_text_config(hf: dict) -> dict:
    return {**hf["text_config"], "model_type": "gemma3_text"} if hf.get("model_type") == "gemma3" else hf


def write_random_checkpoint(hf_config: dict, out_dir: str | os.PathLike, *, dtype: str = "bfloat16", seed: int = 0,
                            std: float = 0.02, shard_bytes: int = 4 << 30, multimodal: bool = False,
                            progress: bool = True) -> Path:
    """A HF-layout checkpoint of random weights at the shapes `hf_config` (a config.json dict) implies.

    Sharded like a hub checkpoint (model-0000K-of-0000N.safetensors + index.json) and loadable by
    transformers as well as crossmap.  Matrices and embeddings are N(0, std); norm weights sit at
    their identity (1, or 0 for Gemma's (1 + w) norms) plus N(0, std) noise.  Values come from
    one random pool read at a random offset per tensor, so writing runs at disk speed.
    `multimodal` (Gemma 3 only) writes the layout of the released -it checkpoints: a `gemma3`
    config with the decoder under `text_config`, tensors under `language_model.`, and a stand-in
    vision tensor that a text-only loader must skip.  Finished directories carry `.complete` and
    are reused.
    """
    from tqdm.auto import tqdm

    from . import architecture_for, config_from_hf
    from .loading import hf_shapes

    out = Path(out_dir)
    text_hf = _hf_text_config(hf_config)
    if multimodal and text_hf.get("model_type") != "gemma3_text":
        raise ValueError(f"multimodal layout is for Gemma 3 only, not model_type {text_hf.get('model_type')!r}")
    cfg = config_from_hf(text_hf, out.name)
    shapes = hf_shapes(cfg, architecture_for(cfg.model_type).NORM_NAMES)
    prefix = "language_model." if multimodal else ""
    entries = [(prefix + name, shape, dtype) for name, shape in shapes.items()]
    if multimodal:
        entries.append(("vision_tower.vision_model.post_layernorm.weight", (1152,), dtype))
    config = dict(hf_config)
    if multimodal and config.get("model_type") != "gemma3":
        config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                  "text_config": {k: v for k, v in text_hf.items() if k != "architectures"}}
    config["torch_dtype"] = str(np.dtype(dtype))  # "bfloat16" too, once ml_dtypes is imported
    marker = out / ".complete"
    stamp = json.dumps({"config": config, "seed": seed, "std": std, "dtype": dtype}, sort_keys=True)
    if marker.exists() and marker.read_text() == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * std).astype(dtype)  # 16M values

    shape_of = {name: shape for name, shape, _ in entries}

    def produce(name: str) -> Iterator[np.ndarray]:
        n = math.prod(shape_of[name])
        if name.endswith("norm.weight"):
            base = 0.0 if cfg.norm_plus_one else 1.0
            yield (base + rng.standard_normal(n, dtype=np.float32) * std).astype(dtype)
            return
        at = int(rng.integers(len(pool)))
        while n > 0:
            piece = pool[at:at + n]
            yield piece
            n -= piece.size
            at = 0

    # Group tensors into shards of about shard_bytes, in file order.
    shards: list[list] = [[]]
    size = 0
    itemsize = np.dtype(dtype).itemsize
    for entry in entries:
        nbytes = math.prod(entry[1]) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    total = sum(math.prod(e[1]) * itemsize for e in entries)
    weight_map = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress)
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        bar.update(write_safetensors(out / fname, shard, produce))
        weight_map.update({e[0]: fname for e in shard})
    bar.close()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(stamp)
    return out
