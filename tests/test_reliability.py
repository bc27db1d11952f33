"""A run never reuses what its config or inputs no longer justify, never marks a stage done on bad
numbers, has one writer per run directory, and reads nothing corrupt without naming the file.

Numbered as the items of the reliability issue; each test asserts the exact outcome (a recompute,
a refusal naming the change, or an error naming the file or field)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_run import ROOT, TINY, run_numbers, tiny_config

from crossmap.pipeline import Run, run_experiment, validate

_config = tiny_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base")
    run_experiment(_config(run_dir))
    return run_dir


def _copy(base_run, tmp_path, name="copy") -> Path:
    out = tmp_path / name
    shutil.copytree(base_run, out)
    return out


def _explanations(run_dir: Path, side: str = "source") -> dict:
    return json.loads((run_dir / f"verbalize_{side}" / "explanations.json").read_text())


def _plant_stale_chunk(run_dir: Path, side: str = "source") -> None:
    """What a killed run of another config would have left: a finished chunk with other text."""
    path = run_dir / f"verbalize_{side}" / "partial.json"
    partial = json.loads(path.read_text())
    for slot in partial:
        partial[slot]["parsed"] = [["STALE"] * len(s) for s in partial[slot]["parsed"]]
    path.write_text(json.dumps(partial))
    (run_dir / f"verbalize_{side}" / "explanations.json").unlink()
    (run_dir / f"verbalize_{side}" / "done.json").unlink()


# -- 1: partial verbalizer chunks -------------------------------------------------------------------
def test_1_partial_chunks_of_another_config_are_never_reused(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    _plant_stale_chunk(run_dir)
    timings = Run(_config(run_dir, "--config.verbalizers.source.max_new_tokens=5")).execute(only=("verbalize_source",))
    assert set(timings) == {"verbalize_source"}
    text = json.dumps(_explanations(run_dir)["settings"])
    assert "STALE" not in text


def test_1_force_clears_the_stage_partial_state(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    _plant_stale_chunk(run_dir)
    (run_dir / "verbalize_source" / "done.json").write_text("{}")  # as if it had finished
    Run(_config(run_dir)).execute(only=("verbalize_source",), force=("verbalize_source",))
    assert "STALE" not in json.dumps(_explanations(run_dir)["settings"])
    assert _explanations(run_dir)["settings"] == _explanations(base_run)["settings"]


def test_1_resume_only_refuses_naming_what_changed(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    _plant_stale_chunk(run_dir)
    with pytest.raises(RuntimeError, match=r"--resume-only: stage verbalize_source .*\(changed: config "
                                           r"verbalizers\.source"):
        Run(_config(run_dir, "--config.verbalizers.source.max_new_tokens=5")).execute(
            only=("verbalize_source",), resume_only=True)
    # the same config resumes from the chunks it finds
    Run(_config(run_dir)).execute(only=("verbalize_source",), resume_only=True)
    assert "STALE" in json.dumps(_explanations(run_dir)["settings"])


# -- 2: SAE training checkpoints -------------------------------------------------------------------
def test_2_sae_training_never_resumes_from_another_layer_or_learning_rate(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    Run(_config(run_dir, "--config.models.source.layer=1")).execute(only=("map", "sae"))
    sae = json.loads((run_dir / "sae" / "summary.json").read_text())
    assert sae["train"]["resumed_from"] is None
    Run(_config(run_dir, "--config.models.source.layer=1", "--config.sae.lr=0.002")).execute(only=("sae",))
    sae = json.loads((run_dir / "sae" / "summary.json").read_text())
    assert sae["train"]["resumed_from"] is None and sae["train"]["config"]["lr"] == 0.002


# -- 3: corpus and checkpoints changed in place --------------------------------------------------------
def test_3_a_corpus_edited_in_place_or_a_checkpoint_replaced_reruns_the_map(tmp_path):
    from crossmap.data import corpus_texts
    from crossmap.models.tiny import tiny_checkpoint

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()[:120]))
    model = tmp_path / "qwen"
    shutil.copytree(tiny_checkpoint("qwen2"), model)
    run_dir = tmp_path / "run"
    config = lambda: _config(run_dir, f"--config.corpus.path={corpus}", f"--config.models.source.path={model}")
    assert "map" in Run(config()).execute(only=("map",))
    assert Run(config()).execute(only=("map",)) == {}
    corpus.write_text(corpus.read_text().replace("the", "a"))  # edited in place, same path
    assert "map" in Run(config()).execute(only=("map",))
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    time.sleep(0.01)
    save_file(weights, str(model / "model.safetensors"))  # replaced at the same path
    assert "map" in Run(config()).execute(only=("map",))


# -- 4: the GGUF conversion cache -----------------------------------------------------------------
def test_4_gguf_conversions_are_keyed_by_content(tmp_path, monkeypatch):
    from crossmap.models.gguf_files import _gguf_cache_dir, read_gguf

    monkeypatch.setenv("CROSSMAP_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path, byte in ((a, b"\x01"), (b, b"\x00")):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + byte * 1000)  # same name, same size, other content
    assert _gguf_cache_dir(a) != _gguf_cache_dir(b)
    assert _gguf_cache_dir(a) == _gguf_cache_dir(a)
    (tmp_path / "zeros.gguf").write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=r"zeros\.gguf: not a GGUF file"):
        read_gguf(tmp_path / "zeros.gguf")


# -- 5: what `crossmap run` prints at the end --------------------------------------------------------
def test_5_a_partial_run_after_a_config_change_prints_no_old_lift(base_run, tmp_path):
    from crossmap.pipeline.stages import closing_lines

    run_dir = _copy(base_run, tmp_path)
    run = Run(_config(run_dir, "--config.features.n=4"))
    run.execute(only=("map", "sae"))
    assert closing_lines(run, run.is_done) == []
    same = Run(_config(run_dir))
    assert closing_lines(same, same.is_done)[-1] == f"report: {run_dir / 'report' / 'report.md'} (to browse: report.html beside it)"


# -- 6, 7: non-finite activations and outputs -------------------------------------------------------
def _poisoned_checkpoint(tmp_path: Path, arch: str, poison) -> Path:
    from safetensors.numpy import load_file, save_file

    from crossmap.models.tiny import tiny_checkpoint

    out = tmp_path / f"poisoned-{arch}"
    shutil.copytree(tiny_checkpoint(arch), out)
    weights = load_file(str(out / "model.safetensors"))
    poison(weights)
    save_file(weights, str(out / "model.safetensors"))
    return out


def _rare_token(arch: str, n_docs: int = 120) -> int:
    """A token id found in a few of the tiny config's documents (so a NaN embedding row poisons a few
    documents' activations from that token on, not all of them)."""
    from crossmap.data import corpus_texts
    from crossmap.models import load_tokenizer
    from crossmap.models.tiny import tiny_checkpoint

    tok = load_tokenizer(tiny_checkpoint(arch))
    docs_with = {}
    for text in corpus_texts()[:n_docs]:
        for token in set(tok(text[:300])["input_ids"]):
            docs_with[token] = docs_with.get(token, 0) + 1
    return min((t for t, n in docs_with.items() if 2 <= n <= 4), key=lambda t: (docs_with[t], t))


def test_6_nonfinite_pairs_are_left_out_counted_and_past_the_limit_fail(tmp_path):
    token = _rare_token("qwen2")

    def poison(weights):
        weights["model.embed_tokens.weight"][token] = np.nan

    model = _poisoned_checkpoint(tmp_path, "qwen2", poison)
    run_dir = tmp_path / "run"
    run = Run(_config(run_dir, f"--config.models.source.path={model}", "--config.ridge.max_nonfinite_fraction=0.9"))
    run.execute(only=("map",))
    summary = json.loads((run_dir / "map" / "summary.json").read_text())
    assert summary["nonfinite_pairs"] > 0
    assert summary["n_pairs"] == summary["collect"]["n_pairs"] - summary["nonfinite_pairs"]
    kept = np.load(run_dir / "map" / "pairs" / "x.npy")
    assert np.isfinite(kept).all() and np.isfinite(np.load(run_dir / "map" / "pairs" / "y.npy")).all()
    assert np.isfinite(summary["fit"]["heldout_r2"])
    strict = Run(_config(tmp_path / "strict", f"--config.models.source.path={model}",
                         "--config.ridge.max_nonfinite_fraction=0.0"))
    with pytest.raises(RuntimeError, match=r"map: \d+ of \d+ paired activations \(.*%\) were not finite .*"
                                           r"ridge\.max_nonfinite_fraction=0; the stage is not marked done"):
        strict.execute(only=("map",))
    assert not strict.is_done("map")


def test_7_a_nan_lm_head_fails_the_verbalize_stage(base_run, tmp_path):
    def poison(weights):
        weights["lm_head.weight"][:] = np.nan

    model = _poisoned_checkpoint(tmp_path, "qwen2", poison)
    run_dir = _copy(base_run, tmp_path)
    # only the verbalizer's head is broken: the map and everything before it are as they were
    config = _config(run_dir, f"--config.models.source.path={model}")
    run = Run(config)
    run.execute(only=("map", "sae", "features"))
    with pytest.raises(RuntimeError, match=r"verbalize_source: all \d+ explanations of the features \(alpha=0\) "
                                           r"are empty or special tokens only"):
        run.execute(only=("verbalize_source",))
    assert not run.is_done("verbalize_source")


def test_7_overflowed_activations_fail_the_map_stage(tmp_path):
    def poison(weights):
        weights["model.embed_tokens.weight"] *= np.float32(1e36)  # the first norm's square overflows

    model = _poisoned_checkpoint(tmp_path, "qwen2", poison)
    run = Run(_config(tmp_path / "run", f"--config.models.source.path={model}", "--config.ridge.on_nonfinite=ignore"))
    with pytest.raises(ValueError, match=r"ridge solve: the statistics hold non-finite values"):
        run.execute(only=("map",))
    assert not run.is_done("map")


def test_7_check_finite_names_the_stage_and_quantity():
    from crossmap.pipeline.stages import check_finite

    check_finite("sae", {"held-out FVE": 0.8})
    with pytest.raises(RuntimeError, match=r"sae: held-out FVE is not finite \(nan\); the stage is not marked done"):
        check_finite("sae", {"held-out FVE": float("nan")})
    with pytest.raises(RuntimeError, match=r"map: map weights is not finite \(2 of 6 values\)"):
        check_finite("map", {"map weights": np.array([1, np.inf, 2, np.nan, 0, 1.0])})


# -- 8: the ridge and SAE APIs ---------------------------------------------------------------------
def test_8_ridge_refuses_overflowed_statistics_and_bad_weights():
    from crossmap import ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.normal(size=(64, 2)).astype(np.float32)
    stats = ridge.accumulate(ridge.init_stats(4, 2, 1), x * np.float32(1e20), y, fold=0)  # squares overflow f32
    with pytest.raises(ValueError, match=r"the statistics hold non-finite values \(\d+ in sxx"):
        ridge.solve(stats, 1.0)
    for bad in (np.nan, np.inf, -1.0):
        w = np.ones(64, np.float32)
        w[3] = bad
        stats = ridge.accumulate(ridge.init_stats(4, 2, 1), x, y, fold=0, weights=w)
        assert float(stats.skipped_batches) == 1 and float(stats.count[0]) == 0 and float(stats.skipped_rows) == 63
        with pytest.raises(ValueError, match="NaN, infinite or negative weights"):
            ridge.accumulate(ridge.init_stats(4, 2, 1), x, y, fold=0, weights=w, on_nonfinite="raise")


def test_8_train_sae_refuses_nonfinite_input_and_a_loss_gone_nan(tmp_path):
    from crossmap.sae import train_sae

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype(np.float32)
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match="activations hold non-finite values"):
        train_sae(bad, 16, 32, 4, 20, batch_size=64, progress=False)

    def batches(step):  # a huge row arrives mid-stream, after the input scale was fixed
        out = x[(step * 64) % 448:(step * 64) % 448 + 64].copy()
        if step == 12:
            out[0] = 3e38
        return out

    with pytest.raises(ValueError, match=r"the loss is not finite \(.*\) at step 1[3-9]|the loss is not finite \(.*\) "
                                         r"at step 20"):
        train_sae(batches, 16, 32, 4, 20, batch_size=64, progress=False, log_every=1, init_batches=4,
                  ckpt_dir=tmp_path / "ckpt", ckpt_every=10)


# -- 9: standardised ridge and constant columns ------------------------------------------------------
def test_9_standardize_gives_a_constant_column_no_weight_like_scikit_learn():
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from crossmap import ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)).astype(np.float32)
    x[:, 3] = 0.37
    y = (x @ rng.normal(size=(10, 2))).astype(np.float32)
    stats = ridge.accumulate(ridge.init_stats(10, 2, 1), x, y, fold=0)
    ridge_map, _ = ridge.solve(stats, 1.0, standardize=True)
    reference = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x, y)
    moved = x.copy()
    moved[:, 3] = 5.0  # rows where the constant column changes
    np.testing.assert_allclose(np.asarray(ridge.predict(ridge_map, moved)), reference.predict(moved), atol=1e-3)
    assert np.abs(np.asarray(ridge_map.W)[3]).max() < 1e-6


# -- 10: one writer per run directory ----------------------------------------------------------------
def test_10_a_second_run_on_the_same_directory_refuses_and_the_first_finishes(base_run, tmp_path):
    run_dir = tmp_path / "shared"
    cmd = [sys.executable, "-m", "crossmap.cli", "run", "--config", str(TINY), f"--config.run_dir={run_dir}"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lock = run_dir / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.time() < deadline:
        time.sleep(0.1)
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 2
    assert f"is in use by pid {first.pid} on host" in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert "mean lift" in out
    ours = json.loads((run_dir / "evaluate" / "evaluation.json").read_text())["results"]
    theirs = json.loads((base_run / "evaluate" / "evaluation.json").read_text())["results"]
    assert {k: r["summary"] for k, r in ours.items()} == {k: r["summary"] for k, r in theirs.items()}


# -- 11: corrupt outputs -------------------------------------------------------------------------
def test_11_a_byte_flipped_in_the_ridge_map_is_caught_naming_the_file(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    files = json.loads((run_dir / "map" / "done.json").read_text())["files"]
    target = max((f for f in files if f.startswith("ridge_map/")), key=lambda f: (run_dir / "map" / f).stat().st_size)
    data = bytearray((run_dir / "map" / target).read_bytes())
    data[len(data) // 2] ^= 0x40
    (run_dir / "map" / target).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{target}: its content differs .*--force map"):
        Run(_config(run_dir)).execute(only=("sae",), force=("sae",))


@pytest.mark.parametrize("stage,name", [("features", "features.json"), ("map", "pairs/x.npy")])
def test_11_a_truncated_output_is_caught_naming_the_file(base_run, tmp_path, stage, name):
    run_dir = _copy(base_run, tmp_path)
    path = run_dir / stage / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{name}: its content differs .*--force {stage}"):
        Run(_config(run_dir)).execute(only=("verbalize_source",), force=("verbalize_source",))


def test_11_a_truncated_record_names_the_file_and_the_stage(tmp_path):
    from crossmap.pipeline.outputs import MapSummary

    (tmp_path / "map").mkdir()
    (tmp_path / "map" / "summary.json").write_text('{"source_model": "x", "tar')
    with pytest.raises(ValueError, match=r"map/summary\.json: not valid JSON .*rerun the map stage \(--force map\)"):
        MapSummary.load(tmp_path / "map")


# -- 12: everything checkable is checked before any model loads -----------------------------------------
@pytest.mark.parametrize("override,message", [
    ("--config.models.source.layer=99", r"models\.source\.layer=99 is out of range: tiny-qwen2-0 has 4 blocks \(0\.\.3\)"),
    ("--config.models.target.layer=7", r"models\.target\.layer=7 is out of range: tiny-gemma3_text-0 has 7 blocks"),
])
def test_12_a_layer_out_of_range_is_refused_before_any_model_loads(tmp_path, override, message, monkeypatch):
    import crossmap.pipeline.context as context

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(context, "load_model", no_loading)
    with pytest.raises(ValueError, match=message):
        Run(_config(tmp_path, override)).execute()


@pytest.mark.parametrize("override,message", [
    ("--config.ridge.lambdas=()", r"ridge\.lambdas must be one or more numbers"),
    ("--config.ridge.compute_dtype=float16", r"ridge\.compute_dtype must be one of 'float64', 'float32'"),
    ("--config.ridge.lambdas=(1.0,)", None),
    ("--config.ridge.keep_pairs=0", r"ridge\.keep_pairs must be >= 1000"),
    ("--config.corpus.buckets=(0, 64)", r"corpus\.buckets must be positive token lengths"),
    ("--config.corpus.max_length=512", r"corpus\.max_length=512 exceeds the largest of corpus\.buckets"),
    ("--config.verbalizers.target.batch_size=0", r"verbalizers\.target\.batch_size must be an int >= 1"),
    ("--config.sae.steps=0", r"sae\.steps must be an int >= 1"),
    ("--config.evaluate.n_permutations=0", r"evaluate\.n_permutations must be an int >= 1"),
    ("--config.evaluate.context_k=0", r"evaluate\.context_k must be an int >= 1"),
])
def test_12_config_errors_name_the_field_and_allowed_values(tmp_path, override, message):
    c = _config(tmp_path, override)
    if message is None:
        validate(c)
        return
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_12_folds_bools_and_free_form_fields(tmp_path):
    c = _config(tmp_path, "--config.ridge.folds=1", "--config.ridge.lambdas=(1.0,)")
    with pytest.raises(ValueError, match=r"ridge\.folds must be >= 2"):
        validate(c)
    with pytest.raises(ValueError, match=r"--config\.models\.source\.layer: expected an int, got the boolean 'True'"):
        _config(tmp_path, "--config.models.source.layer=True")
    with pytest.raises(ValueError, match="layer must be a block index"):
        c = _config(tmp_path)
        c.models.source.layer = True
        validate(c)
    c = _config(tmp_path, "--config.verbalizers.source.spec.max_new_tokens=5",
                "--config.verbalizers.source.spec.system_prompt=Be brief.")
    assert c.verbalizers.source.spec.to_dict() == {"max_new_tokens": 5, "system_prompt": "Be brief."}
    c = _config(tmp_path, "--config.verbalizers.target.spec={'injection_token': '<concept>'}")
    assert c.verbalizers.target.spec.to_dict() == {"injection_token": "<concept>"}


def test_12_too_many_backgrounds_names_the_field(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    kept = len(np.load(run_dir / "map" / "pairs" / "x.npy", mmap_mode="r"))
    with pytest.raises(ValueError, match=rf"washout\.n_backgrounds={kept + 1} is more than the {kept} paired"):
        Run(_config(run_dir, f"--config.washout.n_backgrounds={kept + 1}")).execute(only=("verbalize_source",))


def test_12_unreadable_corpora_name_the_file_and_line(tmp_path):
    from crossmap.activations import read_corpus

    (tmp_path / "latin1.txt").write_bytes("first line\n\nsecond caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not UTF-8 text \(byte 0xe9"):
        read_corpus(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8 text"):
        read_corpus(tmp_path / "bad.jsonl")


# -- 13: model configs the ports do not implement -----------------------------------------------------
@pytest.mark.parametrize("arch,change,message", [
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e4}}},
     "RoPE scaling on sliding-window layers"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True"),
])
def test_13_unimplemented_model_configs_are_refused(arch, change, message):
    from crossmap.models import config_from_hf, hf_config, tiny_config

    hf = {**hf_config(tiny_config(arch)), **change}
    with pytest.raises(NotImplementedError, match=message):
        config_from_hf(hf, "x")


# -- kills at random points of every stage ------------------------------------------------------------
def test_sigkill_anywhere_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    """SIGKILL at seeded random moments inside every stage (three each) and at named writes (a JSON
    record between its temporary file and its rename, the kept pairs, the ridge map, an SAE
    checkpoint): every resumed run ends with the uninterrupted run's numbers."""
    from crossmap.pipeline import STAGE_NAMES

    rng = np.random.default_rng(1234)
    xla = ["--compile-cache", str(tmp_path / "xla")]

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "crossmap.cli", "run", "--config", str(TINY), f"--config.run_dir={run_dir}", *xla]

    cmd = command(tmp_path / "killed-in-stages")
    kills = []
    # every compiled program is cached (not only those over a second), so the 40-odd runs compile each once
    cached = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    def run_until(stage: str | None, delay: float, failpoint: str | None = None) -> str:
        """Run, and SIGKILL the run `delay` s after `stage` (or a later one) starts, or at `failpoint`;
        returns where the kill landed ('' if the run ended by itself)."""
        env = dict(cached)
        if failpoint:
            env["CROSSMAP_FAILPOINT"] = failpoint
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        landed = ""
        later = STAGE_NAMES[STAGE_NAMES.index(stage):] if stage else ()
        for line in proc.stderr:
            started = [s for s in later if f"stage {s}: running" in line]
            if started:
                time.sleep(delay)
                proc.kill()
                landed = started[0]
                break
        proc.wait(timeout=600)
        if proc.returncode != -signal.SIGKILL:
            return ""
        return landed or failpoint

    for stage in STAGE_NAMES:  # moments inside every stage: 0 s and two seeded delays after it starts
        for delay in (0.0, *rng.uniform(0.05, 0.6, size=2)):
            kills.append(run_until(stage, float(delay)))
    in_stages = cmd
    cmd = command(tmp_path / "killed-in-writes")  # a fresh run, killed at named writes as they come
    for failpoint in ("save_json:4", "save_map:1", "save_pairs:2", "sae_checkpoint:1", "sae_checkpoint:2",
                      "save_json:9"):
        kills.append(run_until(None, 0.0, failpoint))
    landed = [k for k in kills if k]
    assert len(landed) >= 20, kills
    assert set(STAGE_NAMES) <= set(landed), kills  # every stage was killed at least once
    reference = tmp_path / "uninterrupted"
    for run in (in_stages, cmd, command(reference)):
        final = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=600, env=cached)
        assert final.returncode == 0, final.stderr[-3000:]
    assert run_numbers(tmp_path / "killed-in-stages") == run_numbers(reference)
    assert run_numbers(tmp_path / "killed-in-writes") == run_numbers(reference)
