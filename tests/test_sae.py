"""Tests for crossmap.sae: readers of public formats, TopK training, feature statistics, selection,
direction mapping.  Oracles are numpy re-implementations of each format's maths and brute force."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_np

from crossmap.sae import (
    ArrayBatches,
    control_directions,
    decode,
    decoder_directions,
    detect_format,
    encode,
    encode_selected,
    evaluate_sae,
    feature_contexts,
    feature_stats,
    format_context,
    load_sae,
    make_sae,
    map_directions,
    parse_hook,
    random_directions,
    save_sae_lens,
    select_features,
    train_sae,
)
from tests.conftest import run_with_devices

D, N = 16, 48  # tiny SAE widths for the reader tests


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Compare against numpy at float32 accuracy also on GPUs, whose default matmul is TF32."""
    with jax.default_matmul_precision("float32"):
        yield


# ----------------------------------------------------------------------------- numpy references
def np_relu_sae(x, W_enc, b_enc, b_dec, sub_b_dec=True):
    return np.maximum((x - b_dec * sub_b_dec) @ W_enc + b_enc, 0.0)


def np_topk_sae(x, W_enc, b_enc, b_dec, k, sub_b_dec=True):
    """SAE-Lens: top-k of the pre-activations, then ReLU."""
    pre = (x - b_dec * sub_b_dec) @ W_enc + b_enc
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), axis=1)
    return z


def np_sparsify(x, enc_w, enc_b, b_dec, k):
    """sparsify: ReLU(encoder(x - b_dec)), then keep the k largest."""
    post = np.maximum((x - b_dec) @ enc_w.T + enc_b, 0.0)
    z = np.zeros_like(post)
    top = np.argsort(-post, axis=1)[:, :k]
    np.put_along_axis(z, top, np.take_along_axis(post, top, 1), axis=1)
    return z


def np_jumprelu(x, W_enc, b_enc, threshold):
    """Gemma Scope: pre * (pre > threshold), no b_dec subtraction."""
    pre = x @ W_enc + b_enc
    return np.where(pre > threshold, np.maximum(pre, 0), 0.0)


def rand_weights(seed=0, d=D, n=N):
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.standard_normal((d, n)).astype(np.float32) / np.sqrt(d),
            "b_enc": (rng.standard_normal(n) * 0.3).astype(np.float32),
            "W_dec": rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d),
            "b_dec": (rng.standard_normal(d) * 0.5).astype(np.float32),
            "threshold": rng.uniform(0.05, 0.6, n).astype(np.float32)}


def x_batch(seed=1, rows=32, d=D):
    return np.random.default_rng(seed).standard_normal((rows, d)).astype(np.float32)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def assert_codec(sae, x, z_ref, w):
    z = np.asarray(encode(sae, x))
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(decode(sae, z_ref)), z_ref @ w["W_dec"] + w["b_dec"],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- readers
def test_sae_lens_standard_pre6(tmp_path):
    w = rand_weights(0)
    d = tmp_path / "blocks.3.hook_resid_post"
    write_json(d / "cfg.json", {"d_in": D, "d_sae": N, "hook_name": "blocks.3.hook_resid_post",
                                "hook_layer": 3, "model_name": "tiny-model", "architecture": "standard",
                                "activation_fn_str": "relu", "apply_b_dec_to_input": True,
                                "normalize_activations": "none", "dtype": "float32"})
    st_np.save_file({k: v for k, v in w.items() if k != "threshold"}, str(d / "sae_weights.safetensors"))
    assert detect_format(d) == ("sae_lens", d)
    sae = load_sae(d, d_model=D, layer=3)
    assert (sae.activation, sae.layer, sae.model_id, sae.source_format) == ("relu", 3, "tiny-model", "sae_lens")
    x = x_batch()
    assert_codec(sae, x, np_relu_sae(x, w["W_enc"], w["b_enc"], w["b_dec"]), w)


@pytest.mark.parametrize("style", ["v6", "pre6"])
def test_sae_lens_topk(tmp_path, style):
    w = rand_weights(1)
    k = 5
    if style == "v6":
        cfg = {"architecture": "topk", "d_in": D, "d_sae": N, "k": k, "apply_b_dec_to_input": True,
               "normalize_activations": "none",
               "metadata": {"hook_name": "blocks.7.hook_resid_post", "model_name": "m", "sae_lens_version": "6.3.0"}}
    else:
        cfg = {"d_in": D, "d_sae": N, "hook_point": "blocks.7.hook_resid_post", "model_name": "m",
               "activation_fn_str": "topk", "activation_fn_kwargs": {"k": k}}
    write_json(tmp_path / "cfg.json", cfg)
    # stored in bfloat16, as many published SAEs are: the reader must upcast
    bf = {n: w[n].astype(ml_dtypes.bfloat16) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    st_np.save_file(bf, str(tmp_path / "sae_weights.safetensors"))
    w = {n: a.astype(np.float32) for n, a in bf.items()}
    sae = load_sae(tmp_path / "sae_weights.safetensors", d_model=D, layer=7)
    assert (sae.activation, sae.k, sae.layer) == ("topk", k, 7)
    x = x_batch()
    z_ref = np_topk_sae(x, w["W_enc"], w["b_enc"], w["b_dec"], k)
    assert ((z_ref > 0).sum(1) <= k).all()
    assert_codec(sae, x, z_ref, w)
    # any leading shape: [B, T, d] -> [B, T, n]
    np.testing.assert_allclose(np.asarray(encode(sae, x.reshape(4, 8, D))), z_ref.reshape(4, 8, N), atol=1e-5)
    # the chosen columns only (what the features stage copies to the host), in the order asked
    chosen = np.array([N - 1, 3, 0, 3])
    np.testing.assert_allclose(np.asarray(encode_selected(sae, x, chosen)), z_ref[:, chosen], atol=1e-5)


def test_sae_lens_jumprelu_and_resid_pre(tmp_path):
    w = rand_weights(2)
    write_json(tmp_path / "cfg.json", {"architecture": "jumprelu", "d_in": D, "d_sae": N,
                                       "hook_name": "blocks.6.hook_resid_pre", "apply_b_dec_to_input": False})
    st_np.save_file(w, str(tmp_path / "sae_weights.safetensors"))
    sae = load_sae(tmp_path, layer=5)  # resid_pre of block 6 is the output of block 5
    assert sae.activation == "jumprelu" and sae.layer == 5
    x = x_batch()
    assert_codec(sae, x, np_jumprelu(x, w["W_enc"], w["b_enc"], w["threshold"]), w)


def test_gemma_scope_npz_layer_and_model_from_path(tmp_path):
    w = rand_weights(3)
    d = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **w)
    assert detect_format(d)[0] == "gemma_scope"
    sae = load_sae(d, d_model=D, layer=20)
    assert (sae.layer, sae.model_id, sae.activation, sae.apply_b_dec_to_input) == (
        20, "google/gemma-2-2b", "jumprelu", False)
    x = x_batch()
    z_ref = np_jumprelu(x, w["W_enc"], w["b_enc"], w["threshold"])
    assert 0 < (z_ref > 0).mean() < 1
    assert_codec(sae, x, z_ref, w)


def test_gemma_scope_2_safetensors_lowercase(tmp_path):
    w = rand_weights(4)
    d = tmp_path / "gemma-scope-2-270m-pt" / "resid_post" / "layer_5_width_16k_l0_small"
    d.mkdir(parents=True)
    st_np.save_file({"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
                     "threshold": w["threshold"]}, str(d / "params.safetensors"))
    sae = load_sae(d / "params.safetensors", d_model=D, layer=5)
    assert (sae.layer, sae.model_id) == (5, "google/gemma-3-270m-pt")
    x = x_batch()
    assert_codec(sae, x, np_jumprelu(x, w["W_enc"], w["b_enc"], w["threshold"]), w)
    # explicit layer for a directory whose name says nothing
    plain = tmp_path / "somewhere"
    plain.mkdir()
    np.savez(plain / "params.npz", **w)
    with pytest.raises(ValueError, match="unknown"):
        load_sae(plain, layer=5)
    assert load_sae(plain, layer=5, sae_layer=5, model_id="x").layer == 5


def test_sparsify_and_run_directory(tmp_path):
    run = tmp_path / "run"
    k, n = 3, 4 * D  # num_latents = 0 -> d_in * expansion_factor
    refs = {}
    for layer in (4, 5):
        rng = np.random.default_rng(layer)
        t = {"encoder.weight": rng.standard_normal((n, D)).astype(np.float32) / 4,
             "encoder.bias": (rng.standard_normal(n) * 0.2).astype(np.float32),
             "W_dec": rng.standard_normal((n, D)).astype(np.float32) / 4,
             "b_dec": rng.standard_normal(D).astype(np.float32)}
        write_json(run / f"layers.{layer}" / "cfg.json", {"expansion_factor": 4, "normalize_decoder": True,
                                                          "num_latents": 0, "k": k, "multi_topk": False,
                                                          "skip_connection": False, "d_in": D})
        st_np.save_file(t, str(run / f"layers.{layer}" / "sae.safetensors"))
        refs[layer] = t
    write_json(run / "config.json", {"model": "Qwen/Qwen2.5-Coder-0.5B-Instruct"})
    sae = load_sae(run, d_model=D, layer=4)  # picks layers.4 among the run's hookpoints
    assert (sae.layer, sae.k, sae.hook_name, sae.source_format, sae.model_id) == (
        4, k, "layers.4", "sparsify", "Qwen/Qwen2.5-Coder-0.5B-Instruct")
    t = refs[4]
    x = x_batch()
    z_ref = np_sparsify(x, t["encoder.weight"], t["encoder.bias"], t["b_dec"], k)
    assert_codec(sae, x, z_ref, {"W_dec": t["W_dec"], "b_dec": t["b_dec"]})
    with pytest.raises(ValueError, match="holds 2 SAEs"):
        load_sae(run)
    # the format can be named explicitly, and must be a known one
    assert load_sae(run / "layers.5", format="sparsify").layer == 5
    with pytest.raises(ValueError, match="unknown format"):
        load_sae(run / "layers.5", format="dictionary_learning")


def test_width_and_layer_checks(tmp_path):
    w = rand_weights(5)
    write_json(tmp_path / "cfg.json", {"d_in": D, "d_sae": N, "hook_name": "blocks.2.hook_resid_post"})
    st_np.save_file({k: v for k, v in w.items() if k != "threshold"}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=rf"{tmp_path.name}.*d_model={D}.*W_dec \({N}, {D}\).*d_model=896"):
        load_sae(tmp_path, d_model=896)
    with pytest.raises(ValueError, match="block 2.*block 9.*allow_layer_mismatch"):
        load_sae(tmp_path, d_model=D, layer=9)
    with pytest.warns(UserWarning, match="block 2.*block 9"):
        sae = load_sae(tmp_path, d_model=D, layer=9, allow_layer_mismatch=True)
    assert sae.layer == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae(tmp_path, d_model=D, layer=2)  # matching layer: no warning
    # a non-residual hook is not a block output
    write_json(tmp_path / "cfg.json", {"d_in": D, "d_sae": N, "hook_name": "blocks.2.hook_mlp_out"})
    with pytest.raises(ValueError, match="hook_mlp_out"):
        load_sae(tmp_path, layer=2)
    # inconsistent cfg vs weights names the file
    write_json(tmp_path / "cfg.json", {"d_in": D + 1, "d_sae": N, "hook_name": "blocks.2.hook_resid_post"})
    with pytest.raises(ValueError, match="d_in=17"):
        load_sae(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no SAE files"):
        load_sae(tmp_path / "empty")


@pytest.mark.parametrize("hook,expected", [
    ("blocks.20.hook_resid_post", (20, "resid")), ("blocks.20.hook_resid_pre", (19, "resid")),
    ("layers.20", (20, "resid")), ("model.layers.3", (3, "resid")), ("hook_embed", (-1, "resid")),
    ("blocks.4.hook_mlp_out", (4, "other")), ("blocks.4.attn.hook_z", (4, "other")), ("mystery", (None, "")),
])
def test_parse_hook(hook, expected):
    assert parse_hook(hook) == expected


# ----------------------------------------------------------------------------- training
def sparse_synthetic(n_rows, d=128, m=256, per_row=4, seed=0):
    """Rows = sums of `per_row` of m unit directions with coefficients in [0.5, 2], plus an offset."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((m, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n_rows, m)), axis=1)[:, :per_row]
    coef = rng.uniform(0.5, 2.0, (n_rows, per_row))
    x = np.einsum("nk,nkd->nd", coef, dictionary[idx]) + 0.3
    return x.astype(np.float32), dictionary


@pytest.fixture(scope="module")
def trained():
    # d=128 (not 64) so a linear encoder separates the 256 ground-truth directions well enough
    # for FVE > 0.9 at k=8 in a few hundred steps; the dictionary has as many latents as truths.
    x, dictionary = sparse_synthetic(20000)
    sae, metrics = train_sae(x[:16000], d_model=128, n_features=256, k=8, steps=400, lr=1e-2, batch_size=256,
                             seed=0, dead_tokens=2000, layer=11, model_id="synthetic", progress=False)
    return sae, metrics, x[16000:], dictionary


def test_training_recovers_sparse_dictionary(trained):
    sae, metrics, held_out, dictionary = trained
    ev = evaluate_sae(sae, held_out)
    assert ev["fve"] > 0.9, ev
    assert 7.0 < ev["l0"] <= 8.0  # top-k values that are negative are cut by the ReLU
    assert ev["dead_frac"] < 0.1 and metrics["dead_frac"] < 0.1
    # most ground-truth directions are found by some decoder row
    cos = np.abs(np.asarray(decoder_directions(sae, unit=True)) @ dictionary.T).max(0)
    assert (cos > 0.9).mean() > 0.75
    # decoder rows are unit norm in the normalised space the SAE trains in
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec), axis=1), 1.0, atol=1e-5)
    # the scale makes E||x * s||^2 = d_model on the training data
    assert float(sae.input_scale) ** 2 * np.mean(np.sum(held_out**2, 1)) == pytest.approx(128, rel=0.05)
    assert metrics["history"][-1]["step"] == 400 and metrics["final"]["fve"] > 0.85
    assert (sae.layer, sae.hook_name, sae.k) == (11, "blocks.11.hook_resid_post", 8)


def test_save_sae_lens_round_trip(trained, tmp_path):
    sae, _, held_out, _ = trained
    save_sae_lens(sae, tmp_path)
    back = load_sae(tmp_path, d_model=128, layer=11)
    x = held_out[:64]
    np.testing.assert_allclose(np.asarray(encode(back, x)), np.asarray(encode(sae, x)), rtol=1e-4, atol=1e-5)
    z = np.asarray(encode(sae, x))
    np.testing.assert_allclose(np.asarray(decode(back, z)), np.asarray(decode(sae, z)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(back.W_dec), axis=1), 1.0, atol=1e-5)
    assert (back.k, back.layer, back.model_id) == (8, 11, "synthetic")
    # what another SAE-Lens reader sees: plain topk maths on raw activations, no crossmap scale
    t = st_np.load_file(str(tmp_path / "sae_weights.safetensors"))
    z_ref = np_topk_sae(x, t["W_enc"], t["b_enc"], t["b_dec"], 8)
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(decode(sae, z)), z @ t["W_dec"] + t["b_dec"], rtol=1e-4, atol=1e-4)


def test_resume_is_bitwise_identical(tmp_path):
    x, _ = sparse_synthetic(3000, d=32, m=64)
    source = ArrayBatches(x, batch_size=128, seed=3)
    kw = dict(d_model=32, n_features=64, k=4, steps=20, lr=5e-3, batch_size=128, seed=1, dead_tokens=256,
              init_batches=4, ckpt_every=5, log_every=5, progress=False)
    straight, m_straight = train_sae(source, **kw)

    class Preempted(Exception):
        pass

    def preempted_at_12(step):
        if step == 12:
            raise Preempted
        return source(step)

    with pytest.raises(Preempted):
        train_sae(preempted_at_12, ckpt_dir=tmp_path, **kw)  # checkpoints at 5 and 10
    resumed, m_resumed = train_sae(source, ckpt_dir=tmp_path, **kw)
    assert m_resumed["resumed_from"] == 10
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale"):
        assert np.array_equal(np.asarray(getattr(straight, name)), np.asarray(getattr(resumed, name))), name
    assert m_resumed["history"] == m_straight["history"]
    with pytest.raises(ValueError, match="different settings"):
        train_sae(source, ckpt_dir=tmp_path, **{**kw, "k": 5})


def test_array_batches_stream():
    data = np.arange(10, dtype=np.float32)[:, None]
    src = ArrayBatches(data, batch_size=4, seed=0)
    first_epoch = np.concatenate([src(0), src(1), src(2)[:2]])[:, 0]
    assert sorted(first_epoch) == list(range(10))  # each row once per epoch
    assert np.array_equal(src(1), ArrayBatches(data, 4, 0)(1))  # depends only on (data, bs, seed, step)
    assert not np.array_equal(src(7), ArrayBatches(data, 4, 1)(7))


def test_sharded_training_matches_single_device():
    out = run_with_devices("""
        import json, numpy as np
        from crossmap.sharding import make_mesh
        from crossmap.sae import train_sae
        x = np.random.default_rng(0).standard_normal((2048, 16)).astype(np.float32)
        kw = dict(d_model=16, n_features=32, k=4, steps=10, lr=1e-2, batch_size=64, seed=0, progress=False)
        a, _ = train_sae(x, **kw)
        b, mb = train_sae(x, mesh=make_mesh(), **kw)
        print(json.dumps({"diff": float(np.abs(np.asarray(a.W_dec) - np.asarray(b.W_dec)).max()),
                          "fve": mb["final"]["fve"]}))
    """)
    assert out["diff"] < 1e-4 and np.isfinite(out["fve"])


# ----------------------------------------------------------------------------- feature statistics
def test_feature_stats_matches_brute_force():
    w = rand_weights(6, d=D, n=N)
    w["b_enc"] = w["b_enc"] - 0.3
    w["b_enc"][0] = -100.0  # feature 0 never fires
    sae = make_sae(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], activation="relu")
    rng = np.random.default_rng(7)
    batches, all_x, all_doc, all_pos = [], [], [], []
    for b, rows in enumerate([50, 130, 7, 64]):  # ragged batches, chunk of 64 rows: padding + merges
        x = rng.standard_normal((rows, D)).astype(np.float32)
        doc = np.full(rows, b * 10) + rng.integers(0, 3, rows)
        pos = np.arange(rows)
        batches.append((x, doc, pos))
        all_x.append(x), all_doc.append(doc), all_pos.append(pos)
    x, doc, pos = np.concatenate(all_x), np.concatenate(all_doc), np.concatenate(all_pos)
    top_k = 5
    stats = feature_stats(sae, iter(batches), top_k=top_k, chunk_rows=64, progress=False)

    z = np_relu_sae(x, w["W_enc"], w["b_enc"], w["b_dec"])
    fired = z > 0
    assert stats.n_tokens == len(x)
    np.testing.assert_array_equal(stats.count, fired.sum(0))
    np.testing.assert_allclose(stats.max_act, z.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.freq, fired.mean(0))
    mean_ref = np.where(fired.any(0), z.sum(0) / np.maximum(fired.sum(0), 1), 0)
    np.testing.assert_allclose(stats.mean_act, mean_ref, rtol=1e-4, atol=1e-6)
    for f in range(N):
        order = np.argsort(-z[:, f], kind="stable")[:top_k]
        order = order[z[order, f] > 0]
        m = len(order)
        np.testing.assert_allclose(stats.top_acts[f, :m], z[order, f], rtol=1e-5, atol=1e-6)
        assert list(zip(stats.top_doc[f, :m], stats.top_pos[f, :m], strict=True)) == list(
            zip(doc[order], pos[order], strict=True))
        assert (stats.top_doc[f, m:] == -1).all()
    assert stats.count[0] == 0 and stats.mean_act[0] == 0 and (stats.top_doc[0] == -1).all()
    assert stats.count[1:].min() > 0


def test_format_and_feature_contexts():
    toks = ["The", " cat", " sat", " on", " the", " mat", "\n"]
    assert format_context(toks, 1, left=1, right=1) == "The «cat» sat..."
    assert format_context(toks, 3, left=1, right=1) == "... sat «on» the..."
    assert format_context(toks, 5, left=1, right=5) == "... the «mat»\\n"
    with pytest.raises(IndexError):
        format_context(toks, 7)
    w = rand_weights(8)
    sae = make_sae(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], activation="relu")
    docs = {0: toks, 1: toks[::-1]}
    x = x_batch(rows=14)
    stats = feature_stats(sae, [(x, np.repeat([0, 1], 7), np.tile(np.arange(7), 2))], top_k=3, progress=False)
    f = int(np.argmax(stats.count))
    ctx = feature_contexts(stats, f, docs.__getitem__, n=2, left=2, right=1)
    assert len(ctx) == min(2, stats.count[f]) and ctx[0]["act"] >= ctx[-1]["act"]
    assert ctx[0]["text"] == format_context(docs[ctx[0]["doc"]], ctx[0]["pos"], 2, 1)
    assert "«" in ctx[0]["text"]
    for c in ctx:  # the unmarked pieces: the activating token itself, and the window around it
        tokens = docs[c["doc"]]
        assert c["token"] == tokens[c["pos"]]
        window = "".join(tokens[max(0, c["pos"] - 2):c["pos"] + 2])
        assert (c["left"] + c["token"] + c["right"]).strip(".") == window.strip(".")


# ----------------------------------------------------------------------------- selection
def make_stats_dict():
    freq = np.array([0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.0, 0.003, 0.2, 0.04])
    max_act = np.array([0.0, 5.0, 3.0, 9.0, 1.0, 9.0, 0.0, 7.0, 2.0, 4.0])
    return {"freq": freq, "max_act": max_act}


def test_select_features():
    stats = make_stats_dict()
    assert select_features(stats, "explicit", indices=[3, 1]).tolist() == [3, 1]
    with pytest.raises(ValueError, match="outside"):
        select_features(stats, "explicit", indices=[10])
    a = select_features(stats, "random", 3, seed=4, min_freq=0.001, max_freq=0.05)
    assert a.tolist() == select_features(stats, "random", 3, seed=4, min_freq=0.001, max_freq=0.05).tolist()
    band = {1, 2, 3, 4, 7, 9}  # alive, frequency in [0.001, 0.05]
    draws = {tuple(select_features(stats, "random", 3, seed=s, min_freq=0.001, max_freq=0.05)) for s in range(30)}
    assert len(draws) > 1 and all(set(d) <= band and len(set(d)) == 3 for d in draws)
    assert set().union(*draws) == band
    # top by max activation: ties (3 and 5 at 9.0) by index; dead features never eligible
    assert select_features(stats, "top_max_act", 3).tolist() == [3, 5, 7]
    assert select_features(stats, "top_max_act", 2, max_freq=0.05, exclude=[3]).tolist() == [7, 1]
    with pytest.raises(ValueError, match=r"only 2 features are eligible.*n=3.*2 dead"):
        select_features(stats, "random", 3, min_freq=0.1, max_freq=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        select_features(stats, "best", 3)


# ----------------------------------------------------------------------------- directions
def test_map_directions_and_controls():
    rng = np.random.default_rng(9)
    dirs, W = rng.standard_normal((5, 12)), rng.standard_normal((12, 7))
    mapped, rec = map_directions(dirs, W, "unit")
    ref = dirs @ W
    np.testing.assert_allclose(mapped, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(rec["mapped_norm"], np.linalg.norm(ref, axis=1))
    np.testing.assert_allclose(rec["scale"] * rec["mapped_norm"], 1.0)
    mapped, rec = map_directions(dirs, W, "target_norm", target_norm=42.0)
    np.testing.assert_allclose(mapped, 42.0 * ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError, match="target_norm"):
        map_directions(dirs, W, "target_norm")
    with pytest.raises(ValueError, match=r"\(5, 12\).*\(7, 12\)"):
        map_directions(dirs, W.T)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        map_directions(np.stack([dirs[0], np.zeros(12)]), W)

    r = random_directions(4, 12, seed=3)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(r, random_directions(4, 12, seed=3)) and not np.array_equal(r, random_directions(4, 12, 4))
    src, rec = control_directions(4, "source", W=W, seed=3, scale_policy="target_norm", target_norm=2.0)
    np.testing.assert_allclose(src, map_directions(r, W, "target_norm", 2.0)[0], rtol=1e-6)
    assert (rec["mode"], rec["d_in"], rec["d_out"], rec["seed"]) == ("source", 12, 7, 3)
    tgt, rec = control_directions(4, "target", d_out=7, seed=3, scale_policy="target_norm", target_norm=2.0)
    np.testing.assert_allclose(tgt, 2.0 * random_directions(4, 7, seed=3), rtol=1e-6)
    assert rec["mode"] == "target"
    with pytest.raises(ValueError, match="W"):
        control_directions(4, "source", d_in=12, d_out=7)


def test_decoder_directions_raw_space():
    w = rand_weights(10)
    sae = make_sae(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], activation="topk", k=4, input_scale=2.0)
    rows = np.asarray(decoder_directions(sae))
    np.testing.assert_allclose(rows, w["W_dec"] / 2.0, rtol=1e-6)
    # one unit of feature i moves the reconstruction by exactly its raw-space row
    z = np.zeros((1, N), np.float32)
    z[0, 3] = 1.0
    np.testing.assert_allclose(np.asarray(decode(sae, z) - decode(sae, 0 * z))[0], rows[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(decoder_directions(sae, unit=True)), axis=1), 1.0,
                               rtol=1e-6)
    # a pytree whose leaves are the arrays (threshold None), metadata static: passes through jit
    assert len(jax.tree.leaves(sae)) == 5
    assert float(jax.jit(lambda s: s.input_scale * s.k)(sae)) == 8.0
