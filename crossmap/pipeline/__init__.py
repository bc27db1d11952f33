"""The config-driven experiment: stages that each write their result under the run directory.

    config.py   the experiment config (every field, its default, overrides, validation)
    context.py  what stages share: config, run directory, mesh, corpus, lazily loaded models
    outputs.py  the typed records stages leave for later stages
    stages.py   the work of each stage and `STAGES`, the one table that declares them
    run.py      the runner: each stage's identity, skipping what is done, the loop over the table

A stage is skipped when its `done.json` holds the fingerprint of the config sections it depends
on (its own and its inputs'); a stage killed midway resumes from its own checkpoints (SAE
training, verbalizer batches) and ends with the numbers an uninterrupted run would give.
"""

from __future__ import annotations

from .config import apply_overrides, base_config, fingerprint, load_config, to_dict, validate
from .run import Run, main_from_cli, run_experiment
from .stages import STAGE_NAMES, STAGES, Stage

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "Run", "apply_overrides", "base_config", "fingerprint", "load_config",
           "main_from_cli", "run_experiment", "to_dict", "validate"]
