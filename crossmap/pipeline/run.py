"""Running the stages of an experiment (see the package docstring)."""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from .. import activations
from ..models import LoadedModel, load_model, load_tokenizer, resolve_model_path
from ..sharding import make_mesh
from .config import STAGES, apply_overrides, fingerprint, load_config, to_dict, validate

# Config sections each stage depends on directly; a stage's fingerprint also covers its inputs'.
_OWN = {
    "map": ("models", "corpus", "pairing", "ridge", "seed"),
    "sae": ("sae",),
    "features": ("features", "controls", "mapping", "evaluate.context_k"),
    "verbalize_source": ("verbalizers.source", "washout"),
    "verbalize_target": ("verbalizers.target", "washout"),
    "evaluate": ("evaluate",),
    "report": (),
}
_INPUTS = {"map": (), "sae": ("map",), "features": ("sae",), "verbalize_source": ("features",),
           "verbalize_target": ("features",), "evaluate": ("verbalize_source", "verbalize_target"),
           "report": ("evaluate",)}


def _section(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _log(msg: str) -> None:
    print(f"[crossmap {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a killed run never leaves a half-written result; on a multi-host run every process
    # writes the same content through its own temporary file onto the shared run directory
    tmp = path.with_suffix(path.suffix + f".tmp{jax.process_index()}")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Run:
    """One experiment run: config, run directory, lazily loaded models, and the stages."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate(config)
        self.config = config
        self.dir = Path(config.run_dir or Path("checkpoints") / config.name).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(dict(config.mesh))
        self._models: dict[str, LoadedModel] = {}
        self._tokenizers: dict[str, Any] = {}
        self._documents: list[str] | None = None
        self._fingerprints: dict[str, str] = {}

    # -- bookkeeping ----------------------------------------------------------------------------
    def fingerprint(self, stage: str) -> str:
        if stage not in self._fingerprints:
            own = [(s, _section(self.config, s)) for s in _OWN[stage]]
            inputs = [self.fingerprint(s) for s in _INPUTS[stage]]
            self._fingerprints[stage] = fingerprint(own, inputs)
        return self._fingerprints[stage]

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def is_done(self, stage: str) -> bool:
        done = self.stage_dir(stage) / "done.json"
        return done.exists() and _load_json(done).get("fingerprint") == self.fingerprint(stage)

    def mark_done(self, stage: str, seconds: float) -> None:
        _save_json(self.stage_dir(stage) / "done.json", {"fingerprint": self.fingerprint(stage), "seconds": seconds})

    def require(self, stage: str) -> None:
        if not self.is_done(stage):
            raise RuntimeError(f"stage {stage!r} has no result for this config in {self.stage_dir(stage)}; "
                               f"run it first (crossmap run ... --only {stage})")

    # -- shared inputs --------------------------------------------------------------------------
    def model(self, side: str) -> LoadedModel:
        if side not in self._models:
            m = self.config.models[side]
            t0 = time.perf_counter()
            _log(f"loading {side} model {m.path} ({m.dtype})")
            self._models[side] = load_model(m.path, dtype=m.dtype, mesh=self.mesh)
            _log(f"loaded {self._models[side].model_id} in {time.perf_counter() - t0:.1f}s")
        return self._models[side]

    def tokenizer(self, side: str):
        """The side's tokenizer, without loading its weights when the model is not already loaded."""
        if side in self._models:
            return self._models[side].tokenizer
        if side not in self._tokenizers:
            self._tokenizers[side] = load_tokenizer(resolve_model_path(self.config.models[side].path))
        return self._tokenizers[side]

    def models_needed(self, stage: str) -> tuple[str, ...]:
        """Which base models a stage runs (not merely their tokenizers or ids)."""
        if stage == "map":
            return ("source", "target")
        side = stage.removeprefix("verbalize_")
        if side in ("source", "target") and self.config.verbalizers[side].kind == "self":
            return (side,)
        return ()

    def release_models(self, keep: tuple[str, ...] = ()) -> None:
        """Drop loaded models not in `keep`, so their device memory is free for what comes next
        (at reference scale the base models and the NLA verbalisers do not fit together)."""
        dropped = [side for side in self._models if side not in keep]
        for side in dropped:
            self._tokenizers[side] = self._models.pop(side).tokenizer
        if dropped:
            gc.collect()
            _log(f"released {' and '.join(dropped)} model weights")

    def documents(self) -> list[str]:
        if self._documents is None:
            c = self.config.corpus
            path = c.path or activations.default_corpus_path()
            self._documents = activations.read_corpus(path, split=c.split, text_field=c.text_field,
                                                      max_documents=c.max_documents or None)
        return self._documents

    def corpus_hash(self) -> str:
        return fingerprint(self.documents())

    # -- stages ---------------------------------------------------------------------------------
    def run(self, only: tuple[str, ...] = (), force: tuple[str, ...] = ()) -> dict:
        for name in list(only) + list(force):
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        timings = {}
        todo = [s for s in STAGES if (not only or s in only) and (not self.is_done(s) or s in force)]
        for stage in STAGES:
            if only and stage not in only:
                continue
            if stage not in todo:
                _log(f"stage {stage}: done (reusing {self.stage_dir(stage)})")
                continue
            # keep only the models this stage or a later one of this invocation runs
            self.release_models(keep=tuple({m for s in todo[todo.index(stage):] for m in self.models_needed(s)}))
            for dep in _INPUTS[stage]:
                self.require(dep)
            _log(f"stage {stage}: running")
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            gc.collect()  # a stage's own models (e.g. an NLA verbaliser) are garbage now: free their memory
            timings[stage] = time.perf_counter() - t0
            self.mark_done(stage, timings[stage])
            _log(f"stage {stage}: finished in {timings[stage]:.1f}s")
        return timings

    def stage_map(self) -> None:
        from .stages import run_map

        run_map(self)

    def stage_sae(self) -> None:
        from .stages import run_sae

        run_sae(self)

    def stage_features(self) -> None:
        from .stages import run_features

        run_features(self)

    def stage_verbalize_source(self) -> None:
        from .stages import run_verbalize

        run_verbalize(self, "source")

    def stage_verbalize_target(self) -> None:
        from .stages import run_verbalize

        run_verbalize(self, "target")

    def stage_evaluate(self) -> None:
        from .stages import run_evaluate

        run_evaluate(self)

    def stage_report(self) -> None:
        from .stages import run_report

        run_report(self)


def run_experiment(config: ml_collections.ConfigDict, only=(), force=()) -> Run:
    run = Run(config)
    run.run(tuple(only), tuple(force))
    return run


def main_from_cli(args, extra: list[str]) -> int:
    config = load_config(args.config)
    apply_overrides(config, extra)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    only = tuple(s for s in args.only.split(",") if s)
    force = tuple(s for s in args.force.split(",") if s)
    run = run_experiment(config, only, force)
    summary = run.dir / "evaluate" / "summary.txt"
    if summary.exists():
        print(summary.read_text().strip())
    report = run.dir / "report" / "report.md"
    if report.exists():
        print(f"report: {report}")
    return 0


__all__ = ["Run", "run_experiment", "main_from_cli"]
