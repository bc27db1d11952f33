"""The config-driven pipeline on tiny random models: end to end, stage skipping, resume after a
kill gives the numbers of an uninterrupted run, config overrides and errors, the CLI."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import ROOT, TINY, run_numbers, tiny_config

from crossmap.pipeline import apply_overrides, load_config, run_experiment, validate

_config = tiny_config


def _numbers(run_dir: Path) -> dict:
    numbers = run_numbers(run_dir)
    return {"summary": numbers["summary"], "src": numbers["src"], "tgt": numbers["tgt"],
            "r2": numbers["fit"]["heldout_r2"], "lambda": numbers["fit"]["lambda"], "fve": numbers["sae"]["fve"]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    run = run_experiment(_config(run_dir))
    return run_dir, run


def test_full_run_writes_every_stage_and_report(full_run):
    run_dir, _ = full_run
    for stage in ("map", "sae", "features", "verbalize_source", "verbalize_target", "evaluate", "report"):
        assert (run_dir / stage / "done.json").exists(), stage
    report = (run_dir / "report" / "report.md").read_text()
    assert "mean lift" in report.splitlines()[2]
    assert (run_dir / "report" / "figures" / "similarity_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    numbers = _numbers(run_dir)
    assert set(numbers["summary"]) == {"alpha=0", "alpha=0.5"}  # washout off and on, same features
    n = len(json.loads((run_dir / "features" / "features.json").read_text())["features"])
    assert len(numbers["src"]["alpha=0"]["features"]) == n == len(numbers["tgt"]["alpha=0.5"]["features"])
    # the headline table has the embedding lift under both settings; the page lists every feature with its
    # explanations and highlighted top contexts
    assert "| embedding lift |" in report.split("## Cross-model result")[1].split("\n## ")[0]
    page = (run_dir / "report" / "report.html").read_text()
    assert page.count('<tr class="feature"') == n and page.count("<mark>") >= n
    first = numbers["src"]["alpha=0"]["features"][0][0]
    assert html.escape(first) in page
    kept = json.loads((run_dir / "map" / "kept_per_document.json").read_text())["kept"]
    summary = json.loads((run_dir / "map" / "summary.json").read_text())
    assert len(kept) == summary["n_documents"] and sum(kept) == summary["n_pairs"]
    # the map stage kept the ridge map with its metadata
    from crossmap.ridge import MetadataMismatchError, load_map

    ridge_map, meta = load_map(run_dir / "map" / "ridge_map", expect={"source_layer": 2, "target_layer": 4})
    assert meta["source_model"] == "tiny-qwen2-0" and ridge_map.W.shape == (64, 64)
    with pytest.raises(MetadataMismatchError, match="target_layer"):
        load_map(run_dir / "map" / "ridge_map", expect={"target_layer": 5})


def test_finished_stages_are_skipped_and_changed_config_reruns_only_downstream(full_run, tmp_path):
    import shutil

    from crossmap.pipeline import STAGE_NAMES, Run

    run_dir = tmp_path / "copy"
    shutil.copytree(full_run[0], run_dir)  # the shared run stays as it was for the other tests
    done = {s: (run_dir / s / "done.json").read_text() for s in STAGE_NAMES}
    assert Run(_config(run_dir)).execute() == {}  # nothing ran
    rerun = Run(_config(run_dir, "--config.evaluate.n_bootstrap=300"))
    assert set(rerun.execute()) == {"evaluate", "report"}  # exactly the changed stage and what reads it
    for stage in STAGE_NAMES:
        same = (run_dir / stage / "done.json").read_text() == done[stage]
        assert same == (stage not in ("evaluate", "report")), stage
    assert rerun.is_done("evaluate") and not Run(_config(run_dir)).is_done("evaluate")
    evaluation = json.loads((run_dir / "evaluate" / "evaluation.json").read_text())
    assert evaluation["results"]["alpha=0"]["summary"]["n_bootstrap"] == 300


def test_washout_pass_does_not_shrink_the_chunks_of_the_bare_pass(full_run, tmp_path):
    """With washout first (alpha=0.5) and the bare comparison second, the bare pass explains
    batch_size vectors a chunk, not the washout pass's batch_size / (2 x n_backgrounds)."""
    import shutil

    from crossmap.pipeline.stages import verbalize_chunk

    assert verbalize_chunk(8, 1, 0) == 8 and verbalize_chunk(8, 1, 2) == 2 and verbalize_chunk(8, 2, 2) == 1
    run_dir = tmp_path / "washout-first"
    shutil.copytree(full_run[0], run_dir, ignore=shutil.ignore_patterns("verbalize_*"))  # no chunk kept
    run_experiment(_config(run_dir, "--config.washout.alpha=0.5", "--config.washout.compare=true"),
                   only=("verbalize_source",))
    slots = json.loads((run_dir / "verbalize_source" / "partial.json").read_text())
    assert sorted(s for s in slots if s.startswith("alpha=0/features/")) == ["alpha=0/features/0"]
    assert sorted(s for s in slots if s.startswith("alpha=0.5/features/")) == [
        "alpha=0.5/features/0", "alpha=0.5/features/2", "alpha=0.5/features/4"]


def test_killed_run_resumes_to_the_same_numbers(full_run, tmp_path):
    full_dir, _ = full_run
    run_dir = tmp_path / "resumed"
    # "killed" after the SAE stage, and midway through the target verbalizer: only some chunks done
    run_experiment(_config(run_dir), only=("map", "sae", "features", "verbalize_source"))
    partial_cfg = _config(run_dir, "--config.verbalizers.target.batch_size=2")
    with pytest.raises(RuntimeError):
        run_experiment(partial_cfg, only=("evaluate",))  # inputs missing: a clear error
    c = _config(run_dir)
    from crossmap.pipeline.run import Run
    from crossmap.pipeline.stages import run_verbalize

    r = Run(c)
    run_verbalize(r, "target")  # finish once, then drop half the chunks as a kill would leave them
    partial = json.loads((run_dir / "verbalize_target" / "partial.json").read_text())
    kept = dict(list(partial.items())[: len(partial) // 2])
    (run_dir / "verbalize_target" / "partial.json").write_text(json.dumps(kept))
    (run_dir / "verbalize_target" / "explanations.json").unlink()
    run_experiment(c)
    assert _numbers(run_dir) == _numbers(full_dir)


def test_config_errors_name_the_field(tmp_path):
    c = load_config(TINY)
    with pytest.raises(KeyError, match="ridge.foldz"):
        apply_overrides(c, ["--config.ridge.foldz=3"])
    with pytest.raises(ValueError, match="ridge.folds"):
        apply_overrides(c, ["--config.ridge.folds=three"])
    c = load_config(TINY)
    apply_overrides(c, ["--config.ridge.folds=1"])
    with pytest.raises(ValueError, match="ridge.folds=1 cannot choose among 3 ridge.lambdas"):
        validate(c)
    c = load_config(TINY)
    apply_overrides(c, ["--config.verbalizers.source.n_samples=3"])
    with pytest.raises(ValueError, match="temperature"):
        validate(c)
    c = load_config(TINY)
    apply_overrides(c, ["--config.features.method=explicit"])
    with pytest.raises(ValueError, match="features.indices"):
        validate(c)


def test_cli_help_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "crossmap.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "ridge map" in out.stdout and "bench" in out.stdout
    out = subprocess.run([sys.executable, "-m", "crossmap.cli", "run", "--help"], capture_output=True, text=True)
    assert "--config.FIELD=VALUE" in out.stdout
    out = subprocess.run([sys.executable, "-m", "crossmap.cli", "run", "--config", str(TINY),
                          "--config.ridge.nope=1"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown field 'ridge.nope'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "crossmap.cli", "run", "--config", str(tmp_path / "none.py")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "none.py" in out.stderr


def test_configs_load_and_validate():
    for name in ("demo", "paper", "tiny", "sae_check"):
        c = load_config(ROOT / "configs" / f"{name}.py")
        validate(c)
    sae_check = load_config(ROOT / "configs" / "sae_check.py")
    assert sae_check.models.source.path == "shipped:smollm2-135m-instruct" and sae_check.models.source.layer == 15
    paper = load_config(ROOT / "configs" / "paper.py")
    assert paper.models.source.layer == 20 and paper.models.target.layer == 41 and paper.features.n == 45


def test_launch_script_runs_the_pipeline_on_a_data_by_tensor_mesh(full_run, tmp_path):
    """launch/gpu_node.sh as a user runs it, on 8 forced CPU devices as a 2 (data) x 4 (tensor) mesh:
    every stage completes and the ridge map matches the single-device run."""
    import os

    cache = tmp_path / "xla-cache"  # the persistent compile cache, kept for every program here
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               CROSSMAP_COMPILE_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    run_dir = tmp_path / "mesh"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_node.sh"), str(TINY), f"--config.run_dir={run_dir}",
                           "--config.mesh.data=2", "--config.mesh.tensor=4"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean lift" in proc.stdout and "report:" in proc.stdout
    sharded, single = _numbers(run_dir), _numbers(full_run[0])
    assert sharded["lambda"] == single["lambda"]
    assert abs(sharded["r2"] - single["r2"]) < 1e-4
    assert abs(sharded["fve"] - single["fve"]) < 0.02
    assert len(list(cache.glob("*-cache"))) > 10, "compiled programs were not kept in the compile cache"


def test_paper_style_run_with_public_sae_and_nla_verbalizer(full_run, tmp_path, capfd):
    """The paths configs/paper.py takes: an SAE read from a public format (SAE-Lens) and a target NLA
    verbalizer read from its checkpoint directory with an nla_meta.yaml of the release's schema.  Base
    models are released once no later stage runs them, so an NLA verbalizer never shares memory with them."""
    import shutil

    from crossmap.models import load_tokenizer
    from crossmap.models.tiny import tiny_checkpoint
    from crossmap.nla.meta import RELEASE_AV_TEMPLATE, pick_marker, write_nla_meta

    # a qwen2-architecture verbalizer as wide as the tiny Gemma target (the tiny Gemma tokenizer's chat turns
    # are not in its small vocabulary, so its chat prompt would be <unk> tokens)
    nla = tmp_path / "nla-tiny-qwen"
    shutil.copytree(tiny_checkpoint("qwen2"), nla)
    tokenizer = load_tokenizer(nla)
    marker = pick_marker(tokenizer)
    write_nla_meta(nla, role="av", tokenizer=tokenizer, d_model=64, injection_char=marker, injection_scale=3.0,
                   extraction_layer=2)
    run_dir = tmp_path / "paper-style"
    c = _config(run_dir, f"--config.sae.path={full_run[0] / 'sae' / 'sae_lens'}",
                "--config.verbalizers.target.kind=nla", f"--config.verbalizers.target.checkpoint={nla}",
                "--config.verbalizers.target.max_new_tokens=5", "--config.washout.compare=false",
                "--config.verbalizers.target.scale=embedding")
    run = run_experiment(c)
    assert run.is_done("report")
    log = capfd.readouterr().err
    order = [log.index(s) for s in ("stage map: finished", "released target model weights", "stage sae: running",
                                    "stage verbalize_source: finished", "released source model weights",
                                    "stage verbalize_target: running")]
    assert order == sorted(order), log
    assert run._models == {}
    explanations = json.loads((run_dir / "verbalize_target" / "explanations.json").read_text())
    assert RELEASE_AV_TEMPLATE.split("\n")[0] in explanations["prompt"]
    assert explanations["spec"]["injection_token"] == marker and explanations["spec"]["injection_scale"] == 3.0
    assert explanations["spec"]["scale_policy"] == "embedding"  # the config's override of the sidecar's norm
    assert explanations["truncated"]["alpha=0"]["features"][0] > 0  # a random model writes no closing tag
    sae = json.loads((run_dir / "sae" / "summary.json").read_text())
    assert sae["train"] == {"loaded_from": str(full_run[0] / "sae" / "sae_lens")}
    single = json.loads((full_run[0] / "sae" / "summary.json").read_text())
    assert sae["n_features"] == single["n_features"]


def test_bench_paper_runs_the_paper_config_on_written_checkpoints(tmp_path):
    """`crossmap bench paper` at tiny shapes: random checkpoints (Gemma in the multimodal layout), NLA
    verbalizer directories and an SAE-Lens SAE written to disk, then configs/paper.py with only paths
    changed (plus the size overrides a CPU needs); a second call reuses everything."""
    from crossmap.cli import main
    from crossmap.models.tiny import tiny_checkpoint

    src, tgt = tiny_checkpoint("qwen2"), tiny_checkpoint("gemma3_text")
    shapes = {}
    for name, d in (("tiny-qwen2", src), ("tiny-gemma3", tgt)):  # shape configs, as in configs/models/
        shapes[name] = tmp_path / f"{name}.json"
        shapes[name].write_text((d / "config.json").read_text())
    shrink = ["--config.mesh.tensor=1", "--config.models.source.layer=2", "--config.models.target.layer=4",
              "--config.corpus.max_documents=60", "--config.corpus.max_length=64", "--config.corpus.buckets=(32, 64)",
              "--config.corpus.batch_size=16", "--config.ridge.folds=3", "--config.ridge.keep_pairs=5000",
              "--config.features.n=3", "--config.controls.n=3", "--config.features.min_freq=0.0",
              "--config.verbalizers.source.max_new_tokens=3", "--config.verbalizers.target.max_new_tokens=3",
              "--config.verbalizers.source.n_samples=1", "--config.verbalizers.target.n_samples=1",
              "--config.washout.n_backgrounds=2", "--config.evaluate.n_permutations=200",
              "--config.evaluate.n_bootstrap=200", "--config.evaluate.context_k=5"]
    out = tmp_path / "paper.json"
    argv = ["bench", "paper", "--source-model", str(shapes["tiny-qwen2"]), "--target-model", str(shapes["tiny-gemma3"]),
            "--source-tokenizer", str(src), "--target-tokenizer", str(tgt), "--workdir", str(tmp_path / "w"),
            "--sae-features", "64", "--sae-k", "4", "--out", str(out)] + [f"--override={o}" for o in shrink]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["stages"]) == ["map", "sae", "features", "verbalize_source", "verbalize_target",
                                      "round_trip", "evaluate", "report"]
    assert not any(s.get("resumed") for s in result["stages"].values())
    # only paths were changed on top of the size overrides
    assert all(o.split("=")[0].endswith((".path", ".checkpoint", ".run_dir")) for o in result["overrides"][:8])
    w = tmp_path / "w"
    assert json.loads((w / "tiny-gemma3" / "config.json").read_text())["model_type"] == "gemma3"
    assert (w / "tiny-gemma3" / "chat_template.jinja").exists()  # the base tokenizer got the -it turns
    explanations = json.loads((w / "run" / "verbalize_target" / "explanations.json").read_text())
    assert "<concept>" in explanations["prompt"] and explanations["spec"]["injection_scale"] == 60000.0
    assert set(result["lift"]) == {"alpha=0", "alpha=0.5"}
    assert main(argv) == 0
    assert all(s["resumed"] for s in json.loads(out.read_text())["stages"].values())


def test_bench_paper_gives_a_gemma_tokenizer_without_template_the_it_turns(tmp_path):
    from transformers import AutoTokenizer

    from crossmap.benchmarks.paper import GEMMA_TURNS, _copy_tokenizer
    from crossmap.models.tiny import tiny_checkpoint

    bare = tmp_path / "bare"
    bare.mkdir()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("gemma3_text"))
    tok.chat_template = None
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "ckpt").mkdir()
    _copy_tokenizer(bare, tmp_path / "ckpt", GEMMA_TURNS)
    text = AutoTokenizer.from_pretrained(tmp_path / "ckpt").apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        _copy_tokenizer(tmp_path / "ckpt" / "..", tmp_path / "ckpt", None)


def test_kept_pairs_are_memory_mapped_and_old_runs_still_load(full_run, tmp_path):
    import shutil

    import numpy as np

    from crossmap.pipeline.run import Run
    from crossmap.pipeline.stages import load_pairs

    run_dir, run = full_run
    pairs = load_pairs(run)
    assert isinstance(pairs["x"], np.memmap) and not pairs["x"].flags.writeable
    assert pairs["x"].shape[0] == pairs["y"].shape[0] == pairs["fold"].shape[0] > 0
    old = tmp_path / "old"  # a run written before pairs/*.npy: map/pairs.npz
    shutil.copytree(run_dir / "map", old / "map")
    shutil.rmtree(old / "map" / "pairs")
    np.savez(old / "map" / "pairs.npz", **{k: np.asarray(v) for k, v in pairs.items()})
    again = load_pairs(Run(_config(old)))
    assert set(again) == set(pairs) and all(np.array_equal(again[k], pairs[k]) for k in pairs)
