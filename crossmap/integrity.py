"""What a file or directory is: content hashes, cheap identities, and checksums verified on read.

`file_sha256` hashes content; `cached_sha256` remembers a file's hash by (path, size, mtime) so a
large file is hashed once.  `path_identity` is the identity of a model checkpoint or other input:
small files by content, large ones by size and modification time (a file replaced at the same
path changes it; hashing tens of GB of weights on every run would not pay).
`checksums` / `verify_checksums` record and check what a stage wrote.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .jsonio import load_json, save_json

_BLOCK = 1 << 22


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: str | os.PathLike, cache_file: str | os.PathLike) -> str:
    """The sha256 of `path`, hashed once and remembered in `cache_file` by path, size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = load_json(cache_file)
    except (FileNotFoundError, ValueError):  # none yet, or cut short: hash again
        known = {}
    if key not in known:
        known[key] = file_sha256(path)
        save_json(cache_file, known, suffix=str(os.getpid()))  # concurrent runs: each its own temporary file
    return known[key]


def _files(root: Path, skip: Iterable[str] = ()) -> list[Path]:
    skip = tuple(skip)
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip):
            out.append(path)
    return out


HASHED_UP_TO = 64 << 20  # files up to this size are identified by content, larger ones by size and mtime


def _file_identity(path: Path, name: str) -> list:
    st = path.stat()
    if st.st_size <= HASHED_UP_TO:  # rewritten with the same content (a copied tokenizer): the same identity
        return [name, st.st_size, file_sha256(path)]
    return [name, st.st_size, st.st_mtime_ns]  # weights: a file replaced at the same path changes its mtime


def path_identity(path: str | os.PathLike) -> list:
    """The identity of a file, or of every file below a directory (relative names): its content hash
    for files up to HASHED_UP_TO, else its size and modification time."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    if path.is_file():
        return [_file_identity(path, path.name)]
    return [_file_identity(p, p.relative_to(path).as_posix()) for p in _files(path)]


def checksums(root: str | os.PathLike, skip: Iterable[str] = (),
              ignore: Callable[[Path], bool] = lambda path: False) -> dict[str, str]:
    """{relative path: sha256} of every file below `root` except those under `skip` (relative paths)
    and those `ignore` says are no part of a result (temporary files a kill left behind)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in _files(root, skip) if not ignore(p)}


def verify_checksums(root: str | os.PathLike, recorded: dict[str, str], hint: str = "") -> None:
    """Every recorded file is present with its recorded content; else an error naming the file."""
    root = Path(root)
    for rel, want in recorded.items():
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{path}: missing, though it was written with this result{hint}")
        if file_sha256(path) != want:
            raise ValueError(f"{path}: its content differs from what was written (the file was changed or is "
                             f"corrupt){hint}")
