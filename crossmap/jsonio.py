"""JSON on disk, one way for the whole package: plain types out, atomic writes, errors that name the file.

The ridge map's metadata, every stage's records, the report and the benchmarks all go through
`to_jsonable`, so a value means the same wherever it is written: numpy and jax arrays become lists,
numpy scalars Python numbers, NaN and inf None (JSON has neither), paths strings, mapping keys
strings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .failpoints import failpoint


def to_jsonable(obj: Any, *, strict: bool = True) -> Any:
    """`obj` as plain JSON types (recursively).

    strict: a value of a type with no JSON form is a TypeError naming the type; with
    strict=False it becomes its repr() (for reports, which must never fail on one odd value).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, strict=strict) for k, v in obj.items()}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict, stage records
        return to_jsonable(obj.to_dict(), strict=strict)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, strict=strict) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        return to_jsonable(np.asarray(obj).tolist(), strict=strict)
    if strict:
        raise TypeError(f"a value of type {type(obj).__name__} has no JSON form: {obj!r}")
    return repr(obj)


def dumps(obj: Any, *, strict: bool = True, indent: int | None = 2, sort_keys: bool = False) -> str:
    return json.dumps(to_jsonable(obj, strict=strict), indent=indent, sort_keys=sort_keys, allow_nan=False)


def temporary_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """Where `save_json` writes before its rename (a kill can leave such a file behind; it is no result)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{suffix}")


def is_temporary(path: str | os.PathLike) -> bool:
    name = Path(path).name
    stem, dot, rest = name.rpartition(".tmp")
    return bool(dot) and stem.endswith(".json") and (rest == "" or rest.isdigit())


def save_json(path: str | os.PathLike, obj: Any, *, strict: bool = True, suffix: str = "") -> Path:
    """Write `obj` to `path` atomically: a killed process never leaves half a file under the name.

    suffix: distinguishes the temporary file of concurrent writers of the same content (on a
    multi-host run every process writes the shared run directory through its own temporary file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix)
    tmp.write_text(dumps(obj, strict=strict), encoding="utf-8")
    failpoint("save_json")  # a kill here leaves the temporary file, never half a record under the name
    tmp.replace(path)
    return path


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
