"""Corpora: documents read from .txt or .jsonl files (the shipped corpus by default), and the
assignment of whole documents to cross-validation folds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np

CORPUS_SUFFIXES = (".txt", ".jsonl")
CORPUS_SPLITS = ("blank", "line")  # how a .txt file splits into documents: blank-line blocks or lines


def default_corpus_path() -> Path:
    """Path of the shipped demo corpus (`crossmap/data/corpus.jsonl`; see crossmap/data/README.md)."""
    return Path(str(resources.files("crossmap.data").joinpath("corpus.jsonl")))


def _utf8_error(path: Path, raw: bytes, err: UnicodeDecodeError) -> ValueError:
    line = raw[:err.start].count(b"\n") + 1
    return ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                      "re-encode the corpus as UTF-8")


def _read_txt(path: Path, split: str) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, raw, err) from None
    if split == "line":
        blocks = text.splitlines()
    else:
        # blank-line separated blocks; a "blank" line may hold whitespace
        blocks, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line)
            elif current:
                blocks.append("\n".join(current))
                current = []
        if current:
            blocks.append("\n".join(current))
    for block in blocks:
        if block.strip():
            yield block.strip()


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").split("\n")  # not splitlines(): U+2028 may stand inside a JSON string
    except UnicodeDecodeError as err:
        raise _utf8_error(path, raw, err) from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{line_number}: no text field {text_field!r} (found {fields}); "
                             "pass text_field= to name the right one")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_number}: field {text_field!r} is a {type(text).__name__}, "
                             "expected a string")
        if text.strip():
            yield text


def _read_file(path: Path, split: str, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        return _read_txt(path, split)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    raise ValueError(f"{path}: unsupported corpus file type {path.suffix!r}; expected one of {CORPUS_SUFFIXES}")


def read_corpus(path: str | Path, split: str = "blank", text_field: str = "text",
                max_documents: int | None = None) -> list[str]:
    """Documents of a corpus file or directory, in a deterministic order.

    path: a `.txt` file (documents separated by blank lines, `split="blank"`, or one per line,
    `split="line"`), a `.jsonl` file (one JSON object per line; the document is `record[text_field]`),
    or a directory whose `.txt` / `.jsonl` files (searched recursively) are read in sorted path order.
    Whitespace-only documents are skipped.  At most `max_documents` documents are returned.
    """
    if split not in CORPUS_SPLITS:
        raise ValueError(f"read_corpus: split must be 'blank' or 'line', got {split!r}")
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"read_corpus: max_documents must be positive, got {max_documents}")
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"{path}: directory holds no corpus files ({', '.join(CORPUS_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"corpus path {path} does not exist")
    documents: list[str] = []
    for file in files:
        for document in _read_file(file, split, text_field):
            documents.append(document)
            if max_documents is not None and len(documents) >= max_documents:
                return documents
    if not documents:
        raise ValueError(f"{path}: corpus is empty (no non-blank documents)")
    return documents


def assign_folds(n_documents: int, n_folds: int, seed: int = 0) -> np.ndarray:
    """int32[n_documents] fold of each document: a seeded permutation dealt round-robin (balanced folds)."""
    if n_folds < 1:
        raise ValueError(f"assign_folds: n_folds must be >= 1, got {n_folds}")
    folds = np.empty(n_documents, np.int32)
    folds[np.random.default_rng(seed).permutation(n_documents)] = np.arange(n_documents) % n_folds
    return folds
