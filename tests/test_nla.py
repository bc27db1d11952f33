"""The released NLA contract: crossmap against the published recipe in PyTorch, on release-layout
checkpoints sized to the real shipped tokenizers, and a clear error for every way an input can be wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from nla_release import MARKERS, TorchAR, TorchAV, write_release_pair, write_sidecar

from crossmap.nla import Reconstructor, explain_to_jsonl, load_nla_verbalizer, read_nla_meta, read_vectors
from crossmap.nla.explain import explain_vectors
from crossmap.verbalize import Injection, generate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ARCHS = ("qwen2", "gemma3")


@pytest.fixture(scope="session")
def release(tmp_path_factory):
    """{arch: (AV dir, AR dir)}, written once per session."""
    root = tmp_path_factory.mktemp("nla-release")
    return {arch: write_release_pair(root, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def loaded(release):
    return {arch: (load_nla_verbalizer(av, dtype="float32"), Reconstructor(ar, dtype="float32", batch_size=4))
            for arch, (av, ar) in release.items()}


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_sidecar(directory, edit):
    meta = yaml.safe_load((directory / "nla_meta.yaml").read_text(encoding="utf-8"))
    edit(meta)
    write_sidecar(directory, meta)


# ------------------------------------------------------------------------------------------ known answers
def test_the_real_tokenizers_pin_the_published_marker_ids(loaded):
    qwen, gemma = loaded["qwen2"][0].meta, loaded["gemma3"][0].meta
    assert (qwen.injection_char, qwen.injection_token_id) == ("\u320e", 149705)
    assert (qwen.injection_left_neighbor_id, qwen.injection_right_neighbor_id) == (29, 522)  # '>' and '</'
    assert (gemma.injection_char, gemma.injection_token_id) == ("\u321c", 246566)
    assert loaded["qwen2"][1].meta.critic_suffix_ids == (1318, 29, 366, 1708, 29)  # 'text> <summary>'
    assert loaded["qwen2"][1].meta.extraction_layer == 1


def test_pick_marker_finds_the_release_markers_and_write_nla_meta_round_trips(loaded, tmp_path):
    from crossmap.nla.meta import pick_marker, write_nla_meta

    for arch in ARCHS:
        av = loaded[arch][0]
        tokenizer = av.verbalizer.tokenizer
        assert pick_marker(tokenizer) == MARKERS[arch]  # the authors' scan gives their own choice
        write_nla_meta(tmp_path, role="av", tokenizer=tokenizer, d_model=64, injection_char=MARKERS[arch],
                       injection_scale=av.meta.injection_scale, extraction_layer=1)
        written = read_nla_meta(tmp_path, role="av")
        for field in ("injection_char", "injection_token_id", "injection_left_neighbor_id",
                      "injection_right_neighbor_id", "av_template", "injection_scale"):
            assert getattr(written, field) == getattr(av.meta, field), (arch, field)
        assert written.critic_suffix_ids == loaded[arch][1].meta.critic_suffix_ids


# ------------------------------------------------------------------------------------------ the oracle
@pytest.mark.parametrize("arch", ARCHS)
def test_verbalizer_matches_the_published_recipe(arch, release, loaded):
    av = loaded[arch][0]
    oracle = TorchAV(release[arch][0])
    ids = oracle.prompt_ids()
    prompt = av.verbalizer.prompt
    assert list(prompt.token_ids) == ids
    assert ids.count(av.meta.injection_token_id) == 1 and prompt.marker_index == oracle.slot(ids)
    if arch == "gemma3":
        assert ids[0] == 2 and ids[1] != 2  # the template's own BOS, once
    vector = np.random.default_rng(3).standard_normal(av.meta.d_model).astype(np.float32) * 37.0
    scaled = av.verbalizer.scale_vectors(vector[None])
    _, embeds = oracle.injected_embeddings(vector)
    np.testing.assert_allclose(scaled[0], embeds[0, prompt.marker_index].numpy(), rtol=1e-6, atol=1e-6)
    assert np.linalg.norm(scaled[0]) == pytest.approx(av.meta.injection_scale, rel=1e-6)
    res = generate(av.verbalizer.model, [list(prompt.token_ids)], max_new_tokens=6, use_model_eos=False,
                   injection=Injection(scaled, [prompt.marker_index]), return_logits=True)
    first, tokens = oracle.greedy(vector, 6)
    np.testing.assert_allclose(res.logits[0, 0], first, atol=2e-5 * max(1.0, np.abs(first).max()))
    assert res.tokens[0].tolist() == tokens
    # the injection is what drives the output: another vector changes the first-step logits
    other = generate(av.verbalizer.model, [list(prompt.token_ids)], max_new_tokens=1, use_model_eos=False,
                     injection=Injection(av.verbalizer.scale_vectors(-vector[None]), [prompt.marker_index]),
                     return_logits=True)
    assert np.abs(other.logits[0, 0] - first).max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstructor_matches_the_published_recipe(arch, release, loaded):
    ar = loaded[arch][1]
    oracle = TorchAR(release[arch][1])
    texts = ["The word 'bank' as a river's edge.", "code: def f(x): return x", "\u4e2d\u6587 text", "a"]
    ours = ar.reconstruct(texts)
    theirs = np.stack([oracle.reconstruct(t) for t in texts])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
    cos = ar.score(texts, theirs)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_explain_parses_and_counts_truncation(loaded):
    av = loaded["qwen2"][0]
    spec = av.verbalizer.spec
    assert spec.max_new_tokens == 200 and spec.temperature == 0.7 and not spec.skip_special_tokens
    assert spec.parse("x <explanation>\n a b \n</explanation> y") == "a b"
    assert not spec.is_truncated("<explanation>a</explanation>") and spec.is_truncated("<explanation>a")
    out = av.verbalizer.explain(np.ones((2, av.meta.d_model), np.float32), max_new_tokens=4, temperature=0.0,
                                progress=False)
    assert [e.truncated for e in out] == [[True], [True]]  # a random model writes no tags in 4 tokens
    assert out[0].parsed == [out[0].raw[0].strip()]


# ------------------------------------------------------------------------------------------ bad inputs
def test_missing_sidecar_wrong_kind_role_and_fields(release, tmp_path):
    av_dir, ar_dir = release["qwen2"]
    bare = _copy(av_dir, tmp_path, "bare")
    (bare / "nla_meta.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="no nla_meta.yaml"):
        load_nla_verbalizer(bare, dtype="float32")
    cases = [
        (lambda m: m.update(kind="nla_dataset"), "field 'kind'"),
        (lambda m: m.pop("d_model"), "field 'd_model' is missing"),
        (lambda m: m["extraction"].update(injection_scale=None), "field 'extraction.injection_scale'"),
        (lambda m: m["tokens"].pop("injection_token_id"), "field 'tokens.injection_token_id' is missing"),
        (lambda m: m["prompt_templates"].update(av="Explain <concept>X</concept>"), "'{injection_char}'"),
        (lambda m: m["prompt_templates"].update(av="{injection_char} and {other}"), "does not format"),
        (lambda m: m.update(schema_version=9), "field 'schema_version'"),
    ]
    for i, (edit, message) in enumerate(cases):
        broken = _copy(av_dir, tmp_path, f"broken{i}")
        _edit_sidecar(broken, edit)
        with pytest.raises(ValueError, match=message) as err:
            read_nla_meta(broken, role="av")
        assert str(broken / "nla_meta.yaml") in str(err.value)
    with pytest.raises(ValueError, match="field 'role'.*given as a verbalizer"):
        read_nla_meta(ar_dir, role="av")
    with pytest.raises(ValueError, match="field 'role'.*given as a reconstructor"):
        Reconstructor(av_dir, dtype="float32")
    old = _copy(av_dir, tmp_path, "old-names")  # schema 1 / training names are read too
    _edit_sidecar(old, lambda m: (m.update(role="actor"), m["prompt_templates"].update(
        actor=m["prompt_templates"].pop("av"), critic=m["prompt_templates"].pop("ar"))))
    assert read_nla_meta(old, role="av").av_template == read_nla_meta(av_dir).av_template


def test_d_model_and_tokenizer_mismatches(release, tmp_path):
    av_dir, _ = release["qwen2"]
    wide = _copy(av_dir, tmp_path, "wide")
    _edit_sidecar(wide, lambda m: m.update(d_model=3584))
    with pytest.raises(ValueError, match="field 'd_model' is 3584, but the model .* is 64 wide"):
        load_nla_verbalizer(wide, dtype="float32")
    other_char = _copy(av_dir, tmp_path, "char")
    _edit_sidecar(other_char, lambda m: m["tokens"].update(injection_token_id=149706))
    with pytest.raises(ValueError, match="tokens.injection_token_id' is 149706, but the checkpoint's tokenizer"):
        load_nla_verbalizer(other_char, dtype="float32")
    gemma_char = _copy(av_dir, tmp_path, "gemma-char")  # Gemma's marker on Qwen's tokenizer: several tokens
    _edit_sidecar(gemma_char, lambda m: m["tokens"].update(injection_char=MARKERS["gemma3"]))
    with pytest.raises(ValueError, match="encodes tokens.injection_char"):
        load_nla_verbalizer(gemma_char, dtype="float32")
    neighbour = _copy(av_dir, tmp_path, "neighbour")
    _edit_sidecar(neighbour, lambda m: m["tokens"].update(injection_right_neighbor_id=29))
    with pytest.raises(ValueError, match=r"0 injection slots.*neighbours \(29, 29\)"):
        load_nla_verbalizer(neighbour, dtype="float32")
    drift = _copy(av_dir, tmp_path, "drift")  # a template whose marker is no longer inside <concept> tags
    _edit_sidecar(drift, lambda m: m["prompt_templates"].update(av="Explain: {injection_char}"))
    with pytest.raises(ValueError, match="0 injection slots"):
        load_nla_verbalizer(drift, dtype="float32")


def test_reconstructor_bad_head_layer_and_suffix(release, tmp_path):
    from safetensors.numpy import save_file

    _, ar_dir = release["qwen2"]
    head = _copy(ar_dir, tmp_path, "head")
    save_file({"weight": np.zeros((64, 32), np.float32)}, str(head / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"value_head.safetensors: tensor 'weight' has shape \(64, 32\).*\(64, 64\)"):
        Reconstructor(head, dtype="float32")
    (head / "value_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="value_head.safetensors: missing"):
        Reconstructor(head, dtype="float32")
    layer = _copy(ar_dir, tmp_path, "layer")
    _edit_sidecar(layer, lambda m: m.update(extraction_layer_index=20))
    with pytest.raises(ValueError, match="K=20, so the truncated backbone must have K\\+1=21 blocks"):
        Reconstructor(layer, dtype="float32")
    suffix = _copy(ar_dir, tmp_path, "suffix")
    _edit_sidecar(suffix, lambda m: m["tokens"].update(critic_suffix_ids=[1318, 29, 366, 1708, 30]))
    ar = Reconstructor(suffix, dtype="float32")
    with pytest.raises(ValueError, match="explanation 0 ends with tokens .*critic_suffix_ids"):
        ar.reconstruct(["hello"])


# ------------------------------------------------------------------------------------------ explain tool
def test_read_vectors_formats(tmp_path):
    from safetensors.numpy import save_file

    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", v)
    save_file({"activation_vector": v, "other": v[:1]}, str(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.npy"), v)
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.safetensors"), v)
    save_file({"x": v, "y": v}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="b.safetensors: holds tensors"):
        read_vectors(tmp_path / "b.safetensors")
    bad = v.copy()
    bad[1, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="bad.npy: vector 1 contains NaN"):
        read_vectors(tmp_path / "bad.npy")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"activation_vector": [list(map(float, r)) for r in v], "id": [0, 1, 2]}),
                   tmp_path / "a.parquet")
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.parquet"), v)
    pq.write_table(pa.table({"vec": [[1.0]]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="no 'activation_vector' column"):
        read_vectors(tmp_path / "b.parquet")


def test_explain_jsonl_resumes_and_refuses_other_settings(release, loaded, tmp_path):
    av_dir, ar_dir = release["qwen2"]
    vectors = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    out = tmp_path / "e.jsonl"
    kwargs = dict(reconstructor=ar_dir, n_samples=2, max_new_tokens=3, temperature=0.0, dtype="float32",
                  chunk=2, progress=False)
    first = explain_to_jsonl(av_dir, tmp_path / "v.npy", out, **kwargs)
    assert first["explained"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and {tuple(sorted(r)) for r in rows} == {
        ("explanation", "index", "raw", "round_trip_cos", "sample", "truncated")}
    # the same as the Python call on the loaded pair
    direct = explain_vectors(loaded["qwen2"][0].verbalizer, vectors, reconstructor=loaded["qwen2"][1], n_samples=2,
                             max_new_tokens=3, temperature=0.0)
    assert [r["raw"] for r in direct] == [r["raw"] for r in rows]
    np.testing.assert_allclose([r["round_trip_cos"] for r in direct], [r["round_trip_cos"] for r in rows],
                               atol=1e-5)
    # a kill: vector 3 cut between its samples, a torn line after it, vector 4 never written; the rerun
    # drops the unfinished rows and explains exactly vectors 3 and 4 again
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:10])
    again = explain_to_jsonl(av_dir, tmp_path / "v.npy", out, **kwargs)
    assert (again["already_done"], again["explained"]) == (3, 2)
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert resumed == rows
    with pytest.raises(ValueError, match="changed: max_new_tokens"):
        explain_to_jsonl(av_dir, tmp_path / "v.npy", out, **{**kwargs, "max_new_tokens": 4})
    with pytest.raises(ValueError, match="vectors are 4 wide, but the verbalizer's d_model is 64"):
        np.save(tmp_path / "narrow.npy", vectors[:, :4])
        explain_to_jsonl(av_dir, tmp_path / "narrow.npy", tmp_path / "n.jsonl", **kwargs)


def test_explain_command_line(release, tmp_path):
    av_dir, _ = release["gemma3"]
    np.save(tmp_path / "v.npy", np.ones((2, 64), np.float32))
    run = subprocess.run([sys.executable, "-m", "crossmap.cli", "explain", "--verbaliser", str(av_dir), "--vectors",
                          str(tmp_path / "v.npy"), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2",
                          "--dtype", "float32", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "2 vectors explained now" in run.stdout and len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    bad = subprocess.run([sys.executable, "-m", "crossmap.cli", "explain", "--verbalizer", str(tmp_path),
                          "--vectors", str(tmp_path / "v.npy"), "--out", str(tmp_path / "p.jsonl")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "no nla_meta.yaml" in bad.stderr


# ------------------------------------------------------------------------------------------ the pipeline
def test_paper_config_runs_end_to_end_with_released_avs_and_ars(release, tmp_path):
    """configs/paper.py with only the paths changed (plus the sizes a CPU needs), on release-layout
    checkpoints: both NLA verbalizers and both reconstructors; the round trips reach the evaluation,
    the summary and the report."""
    from crossmap.pipeline import apply_overrides, load_config, run_experiment

    (qwen_av, qwen_ar), (gemma_av, gemma_ar) = release["qwen2"], release["gemma3"]
    paths = [f"--config.models.source.path={qwen_av}", f"--config.models.target.path={gemma_av}",
             f"--config.verbalizers.source.checkpoint={qwen_av}", f"--config.verbalizers.target.checkpoint={gemma_av}",
             f"--config.reconstructors.source.checkpoint={qwen_ar}",
             f"--config.reconstructors.target.checkpoint={gemma_ar}", "--config.sae.path=",
             f"--config.run_dir={tmp_path / 'run'}"]
    sizes = ["--config.mesh.tensor=1", "--config.models.source.layer=1", "--config.models.target.layer=1",
             "--config.models.source.dtype=float32", "--config.models.target.dtype=float32",
             "--config.corpus.max_documents=40", "--config.corpus.max_length=64", "--config.corpus.buckets=(32, 64)",
             "--config.corpus.batch_size=8", "--config.ridge.folds=3", "--config.ridge.lambdas=(0.1, 10.0)",
             "--config.ridge.keep_pairs=4000", "--config.sae.n_features=64", "--config.sae.k=4",
             "--config.sae.steps=30", "--config.sae.batch_size=256", "--config.features.n=4",
             "--config.features.min_freq=0.0", "--config.features.max_freq=1.0", "--config.controls.n=4"]
    for side in ("source", "target"):
        sizes += [f"--config.verbalizers.{side}.max_new_tokens=4", f"--config.verbalizers.{side}.n_samples=1",
                  f"--config.verbalizers.{side}.dtype=float32", f"--config.verbalizers.{side}.batch_size=8",
                  f"--config.reconstructors.{side}.dtype=float32"]
    sizes += ["--config.washout.n_backgrounds=2", "--config.evaluate.n_permutations=200",
              "--config.evaluate.n_bootstrap=200", "--config.evaluate.context_k=5"]
    config = load_config("configs/paper.py")
    apply_overrides(config, paths + sizes)
    run = run_experiment(config)
    assert run.is_done("report")
    src = json.loads((tmp_path / "run" / "verbalize_source" / "explanations.json").read_text())
    assert set(src["settings"]["alpha=0"]) == {"features", "features_raw", "controls", "controls_raw"}
    assert src["spec"]["injection_token_id"] == 149705 and src["spec"]["max_new_tokens"] == 200
    evaluation = json.loads((tmp_path / "run" / "evaluate" / "evaluation.json").read_text())
    assert set(evaluation["round_trip"]) == {"alpha=0", "alpha=0.5"}
    trips = evaluation["round_trip"]["alpha=0"]
    assert set(trips) == {"source_self", "target_self", "cross"}
    for result in trips.values():
        s = result["summary"]
        assert 0 < s["p_value"] <= 1 and s["lift_ci"][0] <= s["mean_lift"] <= s["lift_ci"][1]
        assert len(result["per_feature"]["matched"]) == 4 and result["n_controls"] == 4
    # the matched cosines are the reconstructor's own: recompute one with the oracle
    explanation = json.loads((tmp_path / "run" / "verbalize_target" / "explanations.json").read_text())[
        "settings"]["alpha=0"]["features"][0][0]
    mapped = np.load(tmp_path / "run" / "features" / "directions.npz")["mapped"][0]
    reference = TorchAR(gemma_ar).reconstruct(explanation)
    cos = float(reference @ mapped / (np.linalg.norm(reference) * np.linalg.norm(mapped)))
    assert trips["target_self"]["per_feature"]["matched"][0] == pytest.approx(cos, abs=1e-4)
    summary = (tmp_path / "run" / "evaluate" / "summary.txt").read_text()
    assert "round trip, cross (AR_source(AV_target(M f)) vs f)" in summary and "truncated explanations" in summary
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Round trip (reconstructor cosine" in report and "round trip target self" in report
