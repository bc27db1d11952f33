"""What each stage leaves for the stages after it, as typed records instead of dict keys read by name.

A record is a dataclass saved as one JSON file in its stage's directory (`Record.save`) and read
back whole (`Record.load`): a file that is missing, malformed or lacks a field is an error naming
the file and the field, and saying which stage to rerun.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jax

from ..jsonio import load_json, save_json


@dataclass
class Record:
    FILE: ClassVar[str]
    NESTED: ClassVar[dict[str, type[Record]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        # every process of a multi-host run writes the same content through its own temporary file
        return save_json(Path(directory) / self.FILE, self.to_dict(), suffix=str(jax.process_index()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "", stage: str = "") -> Record:
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{source or cls.__name__}: lacks field(s) {missing}; the {stage or 'stage that wrote it'} "
                             f"stage wrote it with another version of crossmap: rerun it (--force {stage or 'STAGE'})")
        values = {n: data[n] for n in names if n in data}
        for name, kind in cls.NESTED.items():
            if isinstance(values.get(name), dict):
                values[name] = kind.from_dict(values[name], f"{source} field {name!r}", stage)
        return cls(**values)

    @classmethod
    def load(cls, directory: str | Path) -> Record:
        path = Path(directory) / cls.FILE
        stage = Path(directory).name  # a stage's records live in the directory named after it
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run the {stage} stage first (--only {stage})")
        try:
            data = load_json(path)
        except ValueError as err:
            raise ValueError(f"{err}; rerun the {stage} stage (--force {stage})") from None
        return cls.from_dict(data, str(path), stage)


@dataclass
class StageDone(Record):
    """done.json: the identity of the result a stage wrote, how long it took, and the checksum of
    every file it wrote (checked before a later stage reads them)."""

    FILE: ClassVar[str] = "done.json"
    fingerprint: str
    seconds: float
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class ActivationNorms(Record):
    FILE: ClassVar[str] = ""
    source_median_norm: float
    target_median_norm: float
    target_mean: list[float]

    def median(self, side: str) -> float:
        """The typical residual-stream norm at the configured layer of `side` ("source" or "target")."""
        return {"source": self.source_median_norm, "target": self.target_median_norm}[side]


@dataclass
class MapSummary(Record):
    """map/summary.json: the fitted map's provenance and quality."""

    FILE: ClassVar[str] = "summary.json"
    NESTED: ClassVar[dict[str, type[Record]]] = {"norms": ActivationNorms}
    source_model: str
    target_model: str
    source_layer: int
    target_layer: int
    corpus_hash: str
    pairing: dict
    n_pairs: int
    n_documents: int
    fit: dict  # ridge.RidgeFit.to_metadata()
    heldout_mean_cosine_pairs: int
    norms: ActivationNorms
    solve_seconds: float
    collect: dict
    kept_per_document: dict
    kept_pairs_for_sae_and_evaluation: int
    nonfinite_pairs: int = 0  # collected pairs left out for a NaN/inf activation (n_pairs excludes them)


@dataclass
class SaeSummary(Record):
    FILE: ClassVar[str] = "summary.json"
    heldout: dict  # sae.evaluate_sae: fve, l0, dead_frac, ...
    heldout_rows: int
    train: dict
    alive_on_corpus: float
    n_features: int


@dataclass
class FeatureSet(Record):
    """features/features.json (the vectors themselves are in directions.npz)."""

    FILE: ClassVar[str] = "features.json"
    features: list[int]
    freq: list[float]
    max_act: list[float]
    mapping: dict
    controls: dict
    context_overlap: dict
    contexts: dict
    target_norm: float | None = None


@dataclass
class ExplanationSet(Record):
    """verbalize_*/explanations.json: per washout setting, the explanations of each group of vectors."""

    FILE: ClassVar[str] = "explanations.json"
    side: str
    model: str
    spec: dict
    prompt: str
    settings: dict  # {"alpha=A": {"features": [[samples]], "features_raw": ..., "controls": ...}}
    seconds: float
    blank: dict = field(default_factory=dict)  # {"alpha=A": {group: [empty or special-only, all]}}
    truncated: dict = field(default_factory=dict)  # {"alpha=A": {group: [no closing tag, all]}}


@dataclass
class RoundTrip(Record):
    """round_trip/round_trip.json (the vectors are in reconstructions.npz, keyed by `reconstruction_key`)."""

    FILE: ClassVar[str] = "round_trip.json"
    reconstructors: dict  # side -> {"model": id, "checkpoint": path, "extraction_layer": K}
    keys: list  # every array in reconstructions.npz
    seconds: float
    explanations_per_second: float | None = None


def reconstruction_key(setting: str, ar_side: str, av_side: str, group: str) -> str:
    """The name in reconstructions.npz of AR_{ar_side}(AV_{av_side}(group)) under one washout setting."""
    return f"{setting}|ar_{ar_side}|av_{av_side}|{group}"


@dataclass
class Evaluation(Record):
    FILE: ClassVar[str] = "evaluation.json"
    primary: str  # the settings key of the configured washout
    results: dict  # settings key -> evaluate.evaluate_explanations result
    context_overlap: dict = field(default_factory=dict)
    round_trip: dict = field(default_factory=dict)  # settings key -> {source_self|target_self|cross: result}
