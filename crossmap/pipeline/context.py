"""What every stage reads from its run: the config, the run directory, the mesh, the corpus, and the
base models (loaded once, on first use, and released when no later stage of the invocation runs them)."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from .. import activations
from ..integrity import path_identity
from ..models import LoadedModel, load_model, load_tokenizer, resolve_model_path, scanned
from ..models.attention import KERNELS as DECODE_KERNELS
from ..sharding import make_mesh
from .config import fingerprint, validate


def log(msg: str) -> None:
    print(f"[crossmap {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# verbalizer settings whose kernels have no partitioning rule yet: field -> {value: what to set instead}
ONE_DEVICE_SETTINGS = (
    ("weights", {"int8": "set weights='float'"}),  # models.int8_matmul's kernel
    ("decode_attention", {kernel: "set decode_attention='auto' (XLA's attention on several devices)"
                          for kernel in DECODE_KERNELS}),  # models.attention's kernels
)


class RunContext:
    """One experiment's shared inputs: config, run directory, mesh, corpus and lazily loaded models."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate(config)
        self.config = config
        self.dir = Path(config.run_dir or Path("checkpoints") / config.name).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(dict(config.mesh))
        if self.mesh.size > 1:  # refused before any stage runs, not when the verbalizer loads
            for side in ("source", "target"):
                v = config.verbalizers[side]
                for field, remedy in ONE_DEVICE_SETTINGS:
                    if v[field] in remedy:
                        raise ValueError(f"verbalizers.{side}.{field}='{v[field]}' runs on one device so far, but mesh "
                                         f"{dict(config.mesh)} spans {self.mesh.size} devices: run on one device "
                                         f"(e.g. CUDA_VISIBLE_DEVICES=0) or {remedy[v[field]]}")
        self._models: dict[str, LoadedModel] = {}
        self._tokenizers: dict[str, Any] = {}
        self._documents: list[str] | None = None
        self._corpus_hash: str | None = None

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def model(self, side: str) -> LoadedModel:
        if side not in self._models:
            m = self.config.models[side]
            t0 = time.perf_counter()
            log(f"loading {side} model {m.path} ({m.dtype})")
            lm = load_model(m.path, dtype=m.dtype, mesh=self.mesh)
            # stacked in place: the freshly loaded blocks are this context's alone
            lm.model = scanned(lm.model, m.layers, consume=True)
            self._models[side] = lm
            log(f"loaded {lm.model_id} ({m.layers} blocks) in {time.perf_counter() - t0:.1f}s")
        return self._models[side]

    def tokenizer(self, side: str):
        """The side's tokenizer, without loading its weights when the model is not already loaded."""
        if side in self._models:
            return self._models[side].tokenizer
        if side not in self._tokenizers:
            self._tokenizers[side] = load_tokenizer(resolve_model_path(self.config.models[side].path))
        return self._tokenizers[side]

    def release_models(self, keep: tuple[str, ...] = ()) -> None:
        """Drop loaded models not in `keep`, so their device memory is free for what comes next
        (at reference scale the base models and the NLA verbalizers do not fit together)."""
        dropped = [side for side in self._models if side not in keep]
        for side in dropped:
            self._tokenizers[side] = self._models.pop(side).tokenizer
        if dropped:
            gc.collect()
            log(f"released {' and '.join(dropped)} model weights")

    def documents(self) -> list[str]:
        if self._documents is None:
            c = self.config.corpus
            path = c.path or activations.default_corpus_path()
            self._documents = activations.read_corpus(path, split=c.split, text_field=c.text_field,
                                                      max_documents=c.max_documents or None)
        return self._documents

    def corpus_hash(self) -> str:
        """A hash of the documents' content (an edited corpus changes it, a moved one does not)."""
        if self._corpus_hash is None:
            self._corpus_hash = fingerprint(self.documents())
        return self._corpus_hash

    def model_identity(self, side: str) -> list:
        """The identity of the side's checkpoint files (`integrity.path_identity`)."""
        return path_identity(resolve_model_path(self.config.models[side].path))
