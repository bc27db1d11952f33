"""The runner: iterates over the stage table (`stages.STAGES`), skipping stages whose result is
already there for the same identity, and reruns only what a config change reaches."""

from __future__ import annotations

import gc
import json
import time

import ml_collections

from .config import apply_overrides, fingerprint, load_config, to_dict
from .context import RunContext, log
from .outputs import StageDone
from .stages import STAGE_NAMES, STAGES, closing_lines, stage_named


def _section(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


class Run(RunContext):
    """One experiment run: its context plus each stage's identity and the loop over the table."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self._fingerprints: dict[str, str] = {}

    def fingerprint(self, stage: str) -> str:
        """The identity of a stage's result: its config sections and its inputs' identities."""
        if stage not in self._fingerprints:
            declared = stage_named(stage)
            own = [(s, _section(self.config, s)) for s in declared.sections]
            inputs = [self.fingerprint(s) for s in declared.inputs]
            self._fingerprints[stage] = fingerprint(own, inputs)
        return self._fingerprints[stage]

    def is_done(self, stage: str) -> bool:
        done = self.stage_dir(stage) / StageDone.FILE
        return done.exists() and StageDone.load(self.stage_dir(stage)).fingerprint == self.fingerprint(stage)

    def mark_done(self, stage: str, seconds: float) -> None:
        StageDone(fingerprint=self.fingerprint(stage), seconds=seconds).save(self.stage_dir(stage))

    def require(self, stage: str) -> None:
        if not self.is_done(stage):
            raise RuntimeError(f"stage {stage!r} has no result for this config in {self.stage_dir(stage)}; "
                               f"run it first (crossmap run ... --only {stage})")

    def run(self, only: tuple[str, ...] = (), force: tuple[str, ...] = ()) -> dict[str, float]:
        """Run the stages (all, or `only` these) whose result is missing or stale, or in `force`."""
        for name in list(only) + list(force):
            stage_named(name)  # an unknown name is an error listing the stages
        timings = {}
        todo = [s for s in STAGES if (not only or s.name in only) and (not self.is_done(s.name) or s.name in force)]
        for stage in STAGES:
            if only and stage.name not in only:
                continue
            if stage not in todo:
                log(f"stage {stage.name}: done (reusing {self.stage_dir(stage.name)})")
                continue
            # keep only the models this stage or a later one of this invocation runs
            later = todo[todo.index(stage):]
            self.release_models(keep=tuple({m for s in later for m in s.models(self.config)}))
            for dep in stage.inputs:
                self.require(dep)
            log(f"stage {stage.name}: running")
            self.stage_dir(stage.name).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            stage.run(self)
            gc.collect()  # a stage's own models (e.g. an NLA verbalizer) are garbage now: free their memory
            timings[stage.name] = time.perf_counter() - t0
            self.mark_done(stage.name, timings[stage.name])
            log(f"stage {stage.name}: finished in {timings[stage.name]:.1f}s")
        return timings


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
    for line in closing_lines(run):
        print(line)
    return 0


__all__ = ["Run", "STAGE_NAMES", "run_experiment", "main_from_cli"]
