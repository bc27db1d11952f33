"""The runner: iterates over the stage table (`stages.STAGES`), skipping stages whose result is
already there for the same identity, and reruns only what a change reaches.

A stage's identity covers its config sections, the identities of the stages it reads, and what
it reads from outside the run (corpus content, checkpoint files).  A stage starting under an
identity other than the one its directory was started with clears that directory first, partial
state included (verbalizer chunks, SAE training checkpoints), so nothing of another config is
ever reused; with `resume_only` it refuses instead, saying what changed.  A finished stage
records the checksum of every file it wrote, checked before a later stage reads them.  One
writer per run directory: an advisory lock names its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import shutil
import socket
import time
from pathlib import Path

import jax
import ml_collections

from ..integrity import checksums, verify_checksums
from ..jsonio import is_temporary, load_json, save_json
from .config import apply_overrides, fingerprint, load_config, to_dict, validate_inputs
from .context import RunContext, log
from .outputs import StageDone
from .stages import STAGE_NAMES, STAGES, Stage, closing_lines, stage_named

STARTED = "started.json"  # the identity a stage directory was started with
DONE = StageDone.FILE  # the identity of the finished result, its seconds and its files' checksums
LOCK = ".lock"


def _section(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


class RunDirectoryLocked(RuntimeError):
    """Another process writes this run directory."""


@contextlib.contextmanager
def run_directory_lock(directory: Path):
    """Hold the run directory's advisory lock (released by the OS if the holder dies, so a lock
    left by a killed run is never stale); a second writer is refused, naming the holder."""
    if jax.process_index() != 0:  # multi-host runs: process 0 speaks for all of them
        yield
        return
    path = directory / LOCK
    fh = path.open("a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunDirectoryLocked(f"run directory {directory} is in use by {holder}; wait for it to finish, "
                                     f"or give this run another --config.run_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock


class Run(RunContext):
    """One experiment run: its context plus each stage's identity and the loop over the table."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self._identities: dict[str, dict] = {}
        self._verified: set[str] = set()

    # -- identity -----------------------------------------------------------------------------
    def identity(self, stage: str) -> dict:
        """What a stage's result depends on: config sections, inputs' fingerprints, external reads."""
        if stage not in self._identities:
            declared = stage_named(stage)
            self._identities[stage] = {
                "config": {s: _section(self.config, s) for s in declared.sections},
                "inputs": {s: self.fingerprint(s) for s in declared.inputs},
                "reads": declared.external(self),
            }
        return self._identities[stage]

    def fingerprint(self, stage: str) -> str:
        return fingerprint(self.identity(stage))

    def _record(self, stage: str, name: str) -> dict | None:
        path = self.stage_dir(stage) / name
        if not path.exists():
            return None
        try:
            return load_json(path)
        except ValueError:
            return None  # a record cut short is no record: the stage reruns

    def is_done(self, stage: str) -> bool:
        done = self._record(stage, DONE)
        return done is not None and done.get("fingerprint") == self.fingerprint(stage) and "files" in done

    def require(self, stage: str) -> None:
        """The stage's result exists for this config and its files are as written (checked once)."""
        if not self.is_done(stage):
            raise RuntimeError(f"stage {stage!r} has no result for this config in {self.stage_dir(stage)}; "
                               f"run it first (crossmap run ... --only {stage})")
        if stage not in self._verified:
            verify_checksums(self.stage_dir(stage), self._record(stage, DONE)["files"],
                             hint=f"; rerun that stage: --force {stage}")
            self._verified.add(stage)
            for dep in stage_named(stage).inputs:
                self.require(dep)

    def _changes(self, stage: str, started: dict) -> list[str]:
        now, then = self.identity(stage), started.get("identity") or {}
        changed = [f"config {key}" for key in now["config"] if now["config"][key] != then.get("config", {}).get(key)]
        changed += [f"result of stage {key}" for key in now["inputs"]
                    if now["inputs"][key] != then.get("inputs", {}).get(key)]
        changed += ["input files or corpus"] if now["reads"] != then.get("reads") else []
        return changed or ["the identity record (written by another version of crossmap)"]

    def _start(self, stage: Stage, force: bool, resume_only: bool) -> None:
        """Make the stage directory belong to this identity: kept if it already does, else cleared."""
        directory = self.stage_dir(stage.name)
        started = self._record(stage.name, STARTED)
        current = self.fingerprint(stage.name)
        same = started is not None and started.get("fingerprint") == current
        if directory.exists() and any(directory.iterdir()) and (force or not same):
            if resume_only and not force:
                what = "no record of what it was started with" if started is None else \
                    "changed: " + ", ".join(self._changes(stage.name, started))
                raise RuntimeError(f"--resume-only: stage {stage.name} in {directory} was started under another "
                                   f"identity ({what}); rerun without --resume-only to recompute it")
            log(f"stage {stage.name}: clearing {directory} (" + ("--force" if force else "started under "
                "another identity: " + ", ".join(self._changes(stage.name, started or {}))) + ")")
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_json(directory / STARTED, {"fingerprint": current, "identity": self.identity(stage.name)},
                  suffix=str(jax.process_index()))

    def _finish(self, stage: Stage, seconds: float) -> None:
        directory = self.stage_dir(stage.name)
        files = checksums(directory, skip=(STARTED, DONE, *stage.partial), ignore=is_temporary)
        StageDone(fingerprint=self.fingerprint(stage.name), seconds=seconds, files=files).save(directory)
        self._verified.add(stage.name)  # hashed just now: a later stage of this invocation need not again

    # -- the loop -----------------------------------------------------------------------------
    def execute(self, only: tuple[str, ...] = (), force: tuple[str, ...] = (), resume_only: bool = False) -> dict:
        """Run the stages (all, or `only` these) whose result is missing or stale, or in `force`."""
        for name in list(only) + list(force):
            stage_named(name)  # an unknown name is an error listing the stages
        with run_directory_lock(self.dir):
            validate_inputs(self.config)  # before any model loads or any identity is worked out
            return self._execute(only, force, resume_only)

    def _execute(self, only: tuple[str, ...], force: tuple[str, ...], resume_only: bool) -> dict[str, float]:
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
            self._start(stage, force=stage.name in force, resume_only=resume_only)
            log(f"stage {stage.name}: running")
            t0 = time.perf_counter()
            stage.work(self)
            gc.collect()  # a stage's own models (e.g. an NLA verbalizer) are garbage now: free their memory
            timings[stage.name] = time.perf_counter() - t0
            self._finish(stage, timings[stage.name])
            log(f"stage {stage.name}: finished in {timings[stage.name]:.1f}s")
        return timings


def run_experiment(config: ml_collections.ConfigDict, only=(), force=(), resume_only: bool = False) -> Run:
    run = Run(config)
    run.execute(tuple(only), tuple(force), resume_only)
    return run


def main_from_cli(args, extra: list[str]) -> int:
    config = load_config(args.config)
    apply_overrides(config, extra)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    only = tuple(s for s in args.only.split(",") if s)
    force = tuple(s for s in args.force.split(",") if s)
    run = run_experiment(config, only, force, resume_only=getattr(args, "resume_only", False))
    for line in closing_lines(run, run.is_done):
        print(line)
    return 0


__all__ = ["Run", "RunDirectoryLocked", "STAGE_NAMES", "run_experiment", "main_from_cli", "run_directory_lock"]
