"""The checkpoint file formats of HF directories: safetensors files (and their index) and config.json.

Reading checks a file's whole header first (a truncated file is an error naming the file and the
tensor), then reads one tensor at a time through the safetensors package, bfloat16 through
ml_dtypes: the loader converts and places each tensor before the next is read, and nothing passes
through an accelerator on its way to the mesh.  Writing streams tensors one at a time behind a
header computed from their shapes, so a 27B-shaped random checkpoint (`synthetic`) is written
without being held in memory.
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
    """Yield (name, array) for every tensor of one file, one tensor in memory at a time.

    The header is checked whole first, so a file cut short (an interrupted download or copy) is an
    error naming the file and the first tensor that does not fit, before anything is read; tensors
    are then read by the safetensors package (bfloat16 through ml_dtypes).
    """
    from safetensors import safe_open

    path = Path(path)
    header, start = read_header(path)
    size = path.stat().st_size
    names = []
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
        names.append(name)
    try:
        with safe_open(str(path), framework="np") as fh:
            for name in names:
                yield name, fh.get_tensor(name)
    except Exception as err:  # the package's own error type; say which file it was
        if isinstance(err, (ValueError, OSError)) and str(path) in str(err):
            raise
        raise ValueError(f"{path}: cannot be read as safetensors ({err})") from err


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


def write_sharded_safetensors(directory: Path, entries: list[tuple[str, tuple[int, ...], str | np.dtype]],
                              produce: Callable[[str], Iterator[np.ndarray]], shard_bytes: int,
                              on_shard: Callable[[int], None] | None = None) -> int:
    """A hub-style sharded checkpoint: model-0000K-of-0000N.safetensors of about `shard_bytes` each, in
    `entries`' order, and model.safetensors.index.json.  on_shard(bytes) after each file; returns the total."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        written = write_safetensors(directory / fname, shard, produce)
        total += written
        if on_shard is not None:
            on_shard(written)
        weight_map.update({e[0]: fname for e in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


# safetensors files that sit beside a model's weights without being part of them: an NLA
# reconstructor's head (read by crossmap.nla), a LoRA adapter
NOT_MODEL_WEIGHTS = ("value_head.safetensors", "adapter_model.safetensors")


def iter_safetensors(directory: Path) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (name, array, file) one tensor at a time from a HF checkpoint directory.

    Arrays are read-only views of memory-mapped files (see `checkpoint_files`): bf16 stays bf16
    on the host and nothing passes through an accelerator on its way to the mesh.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in NOT_MODEL_WEIGHTS)
        if not files:
            raise FileNotFoundError(f"no *.safetensors files (and no model.safetensors.index.json) in {directory}")
    for fname in files:
        for name, array in iter_safetensors_file(directory / fname):
            yield name, array, fname


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
