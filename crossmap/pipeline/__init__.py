"""The config-driven experiment: stages that each write their result under the run directory.

    map               run both models over the corpus, pair positions, stream ridge statistics, solve
                      with K-fold CV, save the map (orbax) and a capped sample of paired activations
    sae               load a public SAE, or train a TopK SAE on the source activations; feature stats
    features          select features, map their decoder directions, draw controls, context overlap
    verbalize_source  the source verbaliser explains the original directions
    verbalize_target  the target verbaliser explains the mapped directions and the controls
    evaluate          sentence embeddings, lift, permutation p, bootstrap CI, retrieval
    report            report.md / report.json / figures

A stage is skipped when its `done.json` holds the fingerprint of the config sections it depends
on (its own and its inputs'); a stage killed midway resumes from its own checkpoints (SAE
training, verbaliser batches) and ends with the numbers an uninterrupted run would give.
"""

from __future__ import annotations

from .config import STAGES, apply_overrides, base_config, fingerprint, load_config, to_dict, validate
from .run import Run, main_from_cli, run_experiment

__all__ = ["STAGES", "Run", "apply_overrides", "base_config", "fingerprint", "load_config", "main_from_cli",
           "run_experiment", "to_dict", "validate"]
