"""Explain vectors with a released AV (and score them with its AR), as a tool of its own.

    crossmap explain --verbalizer /ckpt/nla-qwen2.5-7b-L20-av --reconstructor /ckpt/nla-qwen2.5-7b-L20-ar \\
        --vectors acts.parquet --out explanations.jsonl

or from Python, on vectors already in memory:

    av = load_nla_verbalizer(av_dir, mesh=mesh); ar = Reconstructor(ar_dir, mesh=mesh)
    rows = explain_vectors(av.verbalizer, vectors, reconstructor=ar, n_samples=2)

This is what the authors' inference client does against an SGLang server, done in-process on a mesh.
Vectors come from a .npy file ([N, d] or [d]), a .safetensors file (its one tensor, or the one named
`activation_vector` or `vectors`) or a parquet file (the `activation_vector` list column, as the
authors' client reads it).  Each JSONL row is one sample of one vector: `index`, `sample`, `raw` (the
generated text, special tokens kept), `explanation`, `truncated` and, with an AR, `round_trip_cos`.

A killed run continues where it stopped: rows are appended a chunk of vectors at a time and
flushed, and a rerun skips the vectors whose samples are all there (a torn last line is dropped).
The settings and the identities of the checkpoints and the vectors file are kept beside the output
(`<out>.run.json`); a rerun with anything different refuses to mix results unless told to start over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..integrity import file_sha256, path_identity
from ..jsonio import save_json

VECTOR_SUFFIXES = (".npy", ".safetensors", ".parquet")
ACTIVATION_COLUMN = "activation_vector"  # the release's parquet column
SAFETENSORS_NAMES = ("activation_vector", "vectors")


def read_vectors(path: str | os.PathLike) -> np.ndarray:
    """[N, d] float32 vectors from a .npy, .safetensors or parquet file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vectors file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".safetensors":
        from ..models.checkpoint_files import iter_safetensors_file

        tensors = dict(iter_safetensors_file(path))
        named = [n for n in SAFETENSORS_NAMES if n in tensors]
        if named:
            array = tensors[named[0]]
        elif len(tensors) == 1:
            array = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path}: holds tensors {sorted(tensors)}; name the vectors {SAFETENSORS_NAMES[0]!r} or "
                             "keep one tensor in the file")
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if ACTIVATION_COLUMN not in table.column_names:
            raise ValueError(f"{path}: no {ACTIVATION_COLUMN!r} column (columns: {table.column_names})")
        column = table.column(ACTIVATION_COLUMN).combine_chunks()
        lengths = {len(v) for v in column.to_pylist()[:1]} if len(column) else set()
        flat = column.flatten().to_numpy(zero_copy_only=False)
        width = lengths.pop() if lengths else 0
        if len(column) and flat.size != len(column) * width:
            raise ValueError(f"{path}: column {ACTIVATION_COLUMN!r} holds vectors of different lengths")
        array = flat.reshape(len(column), width)
    else:
        raise ValueError(f"{path}: unknown vectors format {suffix!r}; expected one of {VECTOR_SUFFIXES}")
    array = np.asarray(array, np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path}: expected vectors of shape [N, d] (or one [d]), got {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise ValueError(f"{path}: vector {int(bad[0])} contains NaN or inf ({bad.size} such rows)")
    return array


def explain_vectors(verbalizer, vectors: np.ndarray, *, reconstructor=None, n_samples: int = 1,
                    max_new_tokens: int | None = None, temperature: float | None = None, seed: int = 0,
                    batch_size: int = 64, first_index: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """One row per vector and sample (see the module docstring); `verbalizer` is a crossmap Verbalizer,
    `reconstructor` an optional `Reconstructor` whose round-trip cosine is added to every row."""
    explanations = verbalizer.explain(vectors, n_samples=n_samples, max_new_tokens=max_new_tokens,
                                      temperature=temperature, seed=seed, batch_size=batch_size, progress=progress)
    rows = [{"index": first_index + e.index, "sample": s, "raw": e.raw[s], "explanation": e.parsed[s],
             "truncated": bool(e.truncated[s])} for e in explanations for s in range(n_samples)]
    if reconstructor is not None:
        originals = np.repeat(np.asarray(vectors, np.float32), n_samples, axis=0)
        cos = reconstructor.score([r["explanation"] for r in rows], originals)
        for row, c in zip(rows, cos, strict=True):
            row["round_trip_cos"] = float(c)
    return rows


def _completed(out: Path, n_samples: int) -> tuple[set[int], int]:
    """Indices whose samples are all in `out`, and the byte length up to the last of them: a vector's
    rows are written together, so anything after that (a torn line, a vector cut between samples) is
    what a kill left unfinished."""
    if not out.exists():
        return set(), 0
    counts: dict[int, int] = {}
    done: set[int] = set()
    offset = good = 0
    with out.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                index = int(json.loads(line)["index"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break
            offset += len(line)
            counts[index] = counts.get(index, 0) + 1
            if counts[index] == n_samples:
                done.add(index)
                good = offset
    return done, good


def explain_to_jsonl(verbalizer: str | os.PathLike, vectors: str | os.PathLike, out: str | os.PathLike, *,
                     reconstructor: str | os.PathLike | None = None, n_samples: int = 1,
                     max_new_tokens: int | None = None, temperature: float | None = None, seed: int = 0,
                     dtype: str = "bfloat16", batch_size: int = 64, chunk: int = 256, mesh=None,
                     restart: bool = False, progress: bool = True) -> dict[str, Any]:
    """The `crossmap explain` command: explain every vector of a file into a resumable JSONL file."""
    from .reconstructor import Reconstructor
    from .verbalizer import load_nla_verbalizer

    out = Path(out)
    data = read_vectors(vectors)
    identity = {"verbalizer": path_identity(verbalizer), "reconstructor": path_identity(reconstructor)
                if reconstructor else None, "vectors": [str(Path(vectors).name), file_sha256(vectors)],
                "n_samples": int(n_samples), "max_new_tokens": max_new_tokens, "temperature": temperature,
                "seed": int(seed), "dtype": dtype}
    identity = json.loads(json.dumps(identity))  # as it reads back from the run file (tuples become lists)
    run_file = out.with_name(out.name + ".run.json")
    if out.exists() or run_file.exists():
        previous = json.loads(run_file.read_text()) if run_file.exists() else None
        if previous != identity and not restart:
            changed = sorted(k for k in identity if (previous or {}).get(k) != identity[k])
            raise ValueError(f"{out} holds explanations made with other settings or inputs (changed: "
                             f"{', '.join(changed) or 'no record of them'}); pass --restart to start over, or "
                             "choose another --out")
        if restart:
            out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(run_file, identity)
    done, whole = _completed(out, n_samples)
    if out.exists() and out.stat().st_size != whole:
        with out.open("r+b") as fh:  # a kill mid-line: drop the torn tail
            fh.truncate(whole)
    todo = [i for i in range(len(data)) if i not in done]
    summary = {"out": str(out), "vectors": len(data), "already_done": len(done), "explained": 0, "truncated": 0}
    if not todo:
        return summary
    av = load_nla_verbalizer(verbalizer, dtype=dtype, mesh=mesh)
    ar = Reconstructor(reconstructor, dtype=dtype, mesh=mesh) if reconstructor else None
    if data.shape[1] != av.meta.d_model:
        raise ValueError(f"{vectors}: vectors are {data.shape[1]} wide, but the verbalizer's d_model is "
                         f"{av.meta.d_model} ({av.meta.path})")
    bar = tqdm(total=len(todo), desc="explain", unit="vector", disable=not progress)
    with out.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), chunk):
            index = np.asarray(todo[start:start + chunk])
            runs = _contiguous(index)
            for first, last in runs:
                rows = explain_vectors(av.verbalizer, data[first:last + 1], reconstructor=ar, n_samples=n_samples,
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       seed=seed * 1_000_003 + first, batch_size=batch_size, first_index=first)
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    summary["truncated"] += row["truncated"]
                fh.flush()
                os.fsync(fh.fileno())
                summary["explained"] += last - first + 1
                bar.update(last - first + 1)
    bar.close()
    return summary


def _contiguous(index: Sequence[int]) -> list[tuple[int, int]]:
    """Runs of consecutive indices as (first, last) pairs."""
    runs: list[tuple[int, int]] = []
    for i in index:
        i = int(i)
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
