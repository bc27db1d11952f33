"""Generation engine and verbalizers against transformers (the oracle) and full recomputation.

Tiny random models (paired with a transformers copy of the same weights) keep the default run fast;
tests on the real shipped models are marked slow.  Calls share shapes (batch bucket 4, prompt
bucket 16, N_NEW new tokens, one stop id) so most reuse one compiled program.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_with_devices
from hf_oracle import build_hf_model

from crossmap.models import load_model, tiny_config
from crossmap.verbalize import (
    Injection,
    Verbalizer,
    VerbalizerSpec,
    WashoutConfig,
    build_prompt,
    generate,
    self_verbalizer_spec,
    shared_prefix_length,
    top_p_filter,
)

N_NEW = 20
PROMPT_LENGTHS = (7, 3, 12)
_BUILT: dict = {}


def _pair(arch: str, tmp_path_factory):
    """(cfg, hf model, crossmap LoadedModel) with identical random weights, built once per session."""
    if arch not in _BUILT:
        import torch

        cfg = tiny_config(arch)
        hf = build_hf_model(cfg)
        with torch.no_grad():  # smaller embeddings: with a tied head, big ones make every model repeat its input
            hf.model.embed_tokens.weight.mul_(0.1)
        path = tmp_path_factory.mktemp(arch)
        hf.save_pretrained(path)
        _BUILT[arch] = (cfg, hf, load_model(path, with_tokenizer=False))
    return _BUILT[arch]


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _pair("llama", tmp_path_factory)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(8, vocab, n).tolist() for n in lengths]


def _hf_generate(hf, *, input_ids=None, inputs_embeds=None, stop: int, n_new: int = N_NEW) -> np.ndarray:
    """transformers' greedy generate for ONE prompt (no padding); returns the new tokens only."""
    import torch

    with torch.no_grad():
        if inputs_embeds is not None:
            mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
            out = hf.generate(inputs_embeds=inputs_embeds, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                              eos_token_id=stop, pad_token_id=0)
            return out[0].numpy()  # decoder-only with embeds: only the new tokens come back
        ids = torch.as_tensor([input_ids], dtype=torch.long)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                          eos_token_id=stop, pad_token_id=0)
        return out[0, len(input_ids):].numpy()


def _assert_same_as_hf(ours_tokens: np.ndarray, ours_length: int, ref: np.ndarray, what: str):
    assert ours_length == len(ref), f"{what}: generated {ours_length} tokens, transformers {len(ref)}"
    np.testing.assert_array_equal(ours_tokens[:ours_length], ref, err_msg=what)
    assert (ours_tokens[ours_length:] == 0).all(), f"{what}: slots after the stop token must hold pad"


# ---------------------------------------------------------------------------------------------
# engine vs transformers and vs full recomputation

@pytest.fixture(scope="module")
def greedy_run(pair):
    """Greedy generation of a ragged batch, with a stop token that really stops row 0."""
    cfg, hf, lm = pair
    prompts = _prompts(cfg.vocab_size)
    kw = dict(max_new_tokens=N_NEW, use_model_eos=False, pad_id=0, return_logits=True, batch_size_bucket=4)
    first = generate(lm.model, prompts, stop_token_ids=[0], **kw)
    stop = int(first.tokens[0, 4])  # row 0's fifth token: with it as a stop id, row 0 ends there
    res = generate(lm.model, prompts, stop_token_ids=[stop], **kw)
    alone = [generate(lm.model, [p], stop_token_ids=[stop], **kw) for p in prompts]
    return cfg, hf, lm, prompts, stop, res, alone


def test_greedy_generation_matches_transformers(greedy_run):
    cfg, hf, _, prompts, stop, res, _ = greedy_run
    assert res.stopped[0] and res.lengths[0] <= 5
    assert len(set(res.tokens[1].tolist())) > 3, "degenerate model: generation repeats one token"
    for i, p in enumerate(prompts):
        ref = _hf_generate(hf, input_ids=p, stop=stop)
        _assert_same_as_hf(res.tokens[i], int(res.lengths[i]), ref, f"{cfg.model_type} prompt {i}")
        assert res.stopped[i] == (ref[-1] == stop)


def test_ragged_left_padded_batch_equals_each_prompt_alone(greedy_run):
    *_, res, alone = greedy_run
    for i, a in enumerate(alone):
        np.testing.assert_array_equal(res.tokens[i], a.tokens[0])
        n = int(a.lengths[0])  # after its stop token a row's logits are not used (alone: never computed)
        np.testing.assert_allclose(res.logits[i, :n], a.logits[0, :n], rtol=1e-4, atol=1e-4)


def test_kv_cache_decode_equals_full_recomputation(greedy_run):
    """Logits of every decode step (KV cache) == a full forward over prompt + generated prefix, ours
    and transformers'; the gemma model's sliding window (5) is passed long before step 20."""
    import torch

    cfg, hf, lm, prompts, _, res, _ = greedy_run
    # prompt + generated tokens, RIGHT padded: causal attention keeps the padding out of earlier positions
    seqs = [p + res.tokens[i, :int(res.lengths[i]) - 1].tolist() for i, p in enumerate(prompts)]
    total = max(map(len, seqs))
    batch = np.zeros((len(seqs), total), np.int32)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    positions = np.broadcast_to(np.arange(total, dtype=np.int32), batch.shape)
    ours = np.asarray(lm.model.logits(jnp.asarray(batch), positions, np.ones_like(batch, bool)))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(batch, dtype=torch.long)).logits.numpy()
    for i, p in enumerate(prompts):
        n = int(res.lengths[i])
        for full in (ours[i], ref[i]):
            full = full[len(p) - 1:len(p) - 1 + n]
            np.testing.assert_allclose(res.logits[i, :n], full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    if cfg.sliding_window:
        assert max(len(p) for p in prompts) + N_NEW > 3 * cfg.sliding_window


def test_embedding_injection_matches_transformers_inputs_embeds(pair):
    import torch

    cfg, hf, lm = pair
    prompt = _prompts(cfg.vocab_size, lengths=(9,), seed=1)[0]
    marker = 4
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.as_tensor([prompt]))  # gemma: already times sqrt(d)
    rng = np.random.default_rng(2)
    vec = rng.normal(size=cfg.d_model).astype(np.float32)
    vec *= 2.0 * float(embeds[0].norm(dim=-1).mean()) / np.linalg.norm(vec)
    res = generate(lm.model, [prompt], max_new_tokens=N_NEW, stop_token_ids=[0], use_model_eos=False, pad_id=0,
                   injection=Injection(vec[None], [marker]), return_logits=True, batch_size_bucket=4)
    embeds[0, marker] = torch.as_tensor(vec)
    ref = _hf_generate(hf, inputs_embeds=embeds, stop=0)
    _assert_same_as_hf(res.tokens[0], int(res.lengths[0]), ref, f"{cfg.model_type} with injection")
    plain = generate(lm.model, [prompt], max_new_tokens=N_NEW, stop_token_ids=[0], use_model_eos=False, pad_id=0,
                     return_logits=True, batch_size_bucket=4)
    assert not np.array_equal(plain.tokens, res.tokens), "injection changed nothing"


def test_shared_prompt_prefix_is_prefilled_once_with_the_same_result(pair):
    """Rows with one prompt and different injected vectors (a verbalizer's batch): the prefix before the
    marker is prefilled once and broadcast.  Same tokens and logits as prefilling every row, the first
    row equals transformers with inputs_embeds, and a layer injection (replace) is unchanged too."""
    import torch

    cfg, hf, lm = pair
    prompt = _prompts(cfg.vocab_size, lengths=(24,), seed=5)[0]
    marker = 22  # prompt bucket 32: 8 pad slots, the marker at slot 30; the shared prefix is 16 slots
    vecs = np.random.default_rng(6).normal(size=(3, cfg.d_model)).astype(np.float32)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.as_tensor([prompt]))
    vecs *= 2.0 * float(embeds[0].norm(dim=-1).mean()) / np.linalg.norm(vecs, axis=1, keepdims=True)
    tokens = np.zeros((4, 32), np.int32)
    tokens[:, 8:] = prompt
    valid = tokens > -1
    valid[:, :8] = False
    assert shared_prefix_length(tokens, valid, np.full(4, 8 + marker)) == 16
    kw = dict(max_new_tokens=N_NEW, stop_token_ids=[0], use_model_eos=False, pad_id=0, return_logits=True,
              batch_size_bucket=4)
    for injection in (Injection(vecs, [marker] * 3), Injection(vecs * 0.2, [marker] * 3, layer=2, mode="replace")):
        shared = generate(lm.model, [prompt] * 3, injection=injection, **kw)
        full = generate(lm.model, [prompt] * 3, injection=injection, share_prefix=False, **kw)
        np.testing.assert_array_equal(shared.tokens, full.tokens)
        np.testing.assert_allclose(shared.logits, full.logits, rtol=1e-5, atol=1e-5 * np.abs(full.logits).max())
        assert len({tuple(t) for t in shared.tokens}) > 1, "the injected vectors changed nothing"
        if injection.layer == 0:
            embeds[0, marker] = torch.as_tensor(vecs[0])
            ref = _hf_generate(hf, inputs_embeds=embeds, stop=0)
            _assert_same_as_hf(shared.tokens[0], int(shared.lengths[0]), ref, f"{cfg.model_type} shared prefix")


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_layer_injection_matches_transformers_hook(llama, mode):
    """Injection after block k (layer = k + 1) == transformers with a forward hook on block k that
    edits the residual at the marker during prefill only."""
    import torch

    cfg, hf, lm = llama
    prompt, marker, layer = _prompts(cfg.vocab_size, lengths=(9,), seed=3)[0], 5, 2
    vec = np.random.default_rng(4).normal(size=cfg.d_model).astype(np.float32) * 0.5

    def hook(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[1] > 1:  # prefill only
            hidden = hidden.clone()
            v = torch.as_tensor(vec)
            hidden[:, marker] = v if mode == "replace" else hidden[:, marker] + v
        return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

    handle = hf.model.layers[layer - 1].register_forward_hook(hook)
    try:
        ref = _hf_generate(hf, input_ids=prompt, stop=0)
    finally:
        handle.remove()
    res = generate(lm.model, [prompt], max_new_tokens=N_NEW, stop_token_ids=[0], use_model_eos=False, pad_id=0,
                   injection=Injection(vec[None], [marker], layer=layer, mode=mode), batch_size_bucket=4)
    _assert_same_as_hf(res.tokens[0], int(res.lengths[0]), ref, f"layer-{layer} {mode}")


@pytest.mark.parametrize("arity", [2, 4, 5, 16])
@pytest.mark.parametrize("vocab,spread", [(50, 3.0), (50_000, 0.3), (50_000, 8.0)],
                         ids=["small", "flat-wide", "peaked-wide"])
def test_top_p_filter_matches_numpy(vocab, spread, arity):
    """Against the sort-and-cumsum definition, with real-vocabulary widths: nearly flat rows (the
    nucleus covers most of the vocabulary) and peaked ones (a handful of tokens), ties included;
    for plain bisection (arity 2), the default 4-way search, an arity that does not divide the
    range evenly, and a wide one."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, vocab)).astype(np.float32) * spread
    logits[:, 1] = logits[:, 0]  # a tie
    for p in (0.05, 0.5, 0.9, 1.0):
        ours = np.asarray(top_p_filter(jnp.asarray(logits), p, arity=arity))
        for row, out in zip(logits, ours, strict=True):
            order = np.argsort(-row)
            probs = np.exp(row[order] - row.max())
            probs /= probs.sum()
            n_keep = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
            kept = set(order[:min(n_keep, len(row))].tolist()) if p < 1 else set(range(len(row)))
            assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept, f"top_p={p}"
            np.testing.assert_array_equal(out[list(kept)], row[list(kept)])


@pytest.mark.parametrize("every", [3, 8, 64])
def test_testing_for_stops_every_few_steps_generates_the_same(greedy_run, every):
    """The stop test once every `every` steps (whole chunks of a fixed trip count, then the rest one at a time):
    the same tokens, lengths, stop flags and logits as a test every step, whether no row, one row or every row
    stops early, and for chunks that do not divide the steps (19 here) or exceed them."""
    cfg, _, lm, prompts, stop, res, _ = greedy_run
    kw = dict(max_new_tokens=N_NEW, use_model_eos=False, pad_id=0, return_logits=True, batch_size_bucket=4)
    never = generate(lm.model, prompts, stop_token_ids=[cfg.vocab_size - 1], **kw)
    all_stop = [int(t) for t in never.tokens[:, 2]]  # every row's third token: each stops by then
    early = generate(lm.model, prompts, stop_token_ids=all_stop, **kw)
    assert early.stopped.all() and early.lengths.max() <= 3 and not never.stopped.any()
    for ids, want in (([stop], res), ([cfg.vocab_size - 1], never), (all_stop, early)):
        got = generate(lm.model, prompts, stop_token_ids=ids, stop_check_every=every, **kw)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.stopped, want.stopped)
        for i, n in enumerate(want.lengths):
            np.testing.assert_array_equal(got.logits[i, :n], want.logits[i, :n])
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="stop_check_every must be an int >= 1"):
            generate(lm.model, prompts, stop_check_every=bad, **kw)


def test_generate_rejects_bad_input(llama):
    cfg, _, lm = llama
    with pytest.raises(ValueError, match="prompt 1 has token id 128 outside the vocabulary"):
        generate(lm.model, [[1, 2], [3, 128]])
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty"):
        generate(lm.model, [[]])
    with pytest.raises(ValueError, match=r"injection.vectors has shape \(1, 3\), expected \(1, 64\)"):
        generate(lm.model, [[1, 2]], injection=Injection(np.ones((1, 3)), [0]))
    bad = np.ones((2, cfg.d_model), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="injection.vectors row 1 contains NaN"):
        generate(lm.model, [[1, 2], [3, 4]], injection=Injection(bad, [0, 0]))
    with pytest.raises(ValueError, match=r"injection.positions\[0\]=5 is outside prompt 0"):
        generate(lm.model, [[1, 2]], injection=Injection(np.ones((1, cfg.d_model)), [5]))
    with pytest.raises(ValueError, match="group_size=2"):
        generate(lm.model, [[1, 2]] * 3, group_size=2)


# ---------------------------------------------------------------------------------------------
# verbalizer: prompts, specs, explain, washout

def _tiny_tokenizer():
    """A 128-token word-level HF tokenizer with BOS, special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<concept>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = ["cat", "->", "hello", "1135", "?", "What", "does", '"', "X", "mean", "Answer", "in", "one", "short",
             "sentence", ".", "<", ">", "explanation", "/", "Explain", ":", "multi"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    while len(vocab) < 128:
        vocab[f"w{len(vocab)}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", additional_special_tokens=specials[4:])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer()


CHAT_SPEC = dict(injection_token="<concept>", prompt_template="Explain : {marker} . Answer in one short sentence",
                 use_chat_template=True, max_new_tokens=N_NEW, explanation_regex=r"<explanation>(.*?)</explanation>")


def test_build_prompt_locates_marker(tokenizer):
    p = build_prompt(tokenizer, VerbalizerSpec(**CHAT_SPEC))
    assert p.token_ids[p.marker_index] == tokenizer.convert_tokens_to_ids("<concept>")
    assert p.token_ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")  # chat text: no extra BOS
    assert p.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    # raw base preset: BOS added, marker "?" is the last "?" even though the text has none other
    base = build_prompt(tokenizer, self_verbalizer_spec("base"))
    assert base.token_ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(base.token_ids[base.marker_index]) == "?"
    assert tokenizer.convert_ids_to_tokens(list(base.token_ids[base.marker_index:])) == ["?", "->"]
    # the marker text may also occur elsewhere in the prompt: the placeholder decides
    spec = VerbalizerSpec(injection_token="?", prompt_template="? cat ? {marker} hello ?", use_chat_template=False)
    p = build_prompt(tokenizer, spec)
    assert p.marker_index == 4 and tokenizer.convert_ids_to_tokens(p.token_ids[5]) == "hello"
    # a template without {marker} uses the first literal injection token
    p = build_prompt(tokenizer, VerbalizerSpec(injection_token="<concept>", prompt_template="cat <concept> hello",
                                               use_chat_template=False))
    assert p.marker_index == 2
    # multi-token markers: the last token by default, an error on request
    spec = VerbalizerSpec(injection_token="cat hello", prompt_template="What {marker} ?", use_chat_template=False)
    assert build_prompt(tokenizer, spec).marker_index == 3
    with pytest.raises(ValueError, match=r"spans 2 tokens"):
        build_prompt(tokenizer, spec.replace(multi_token_marker="error"))


def test_bad_prompts_and_specs_are_named(tokenizer):
    with pytest.raises(ValueError, match=r"exactly one '\{marker\}' placeholder.*found 0"):
        build_prompt(tokenizer, VerbalizerSpec(prompt_template="no marker here", use_chat_template=False))
    with pytest.raises(ValueError, match="found 2"):
        build_prompt(tokenizer, VerbalizerSpec(prompt_template="{marker} {marker}", use_chat_template=False))
    with pytest.raises(ValueError, match="cannot encode injection_token 'zebra'"):
        build_prompt(tokenizer, VerbalizerSpec(injection_token="zebra", prompt_template="cat {marker}",
                                               use_chat_template=False))
    no_chat = _tiny_tokenizer()
    no_chat.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(no_chat, VerbalizerSpec(**CHAT_SPEC))
    with pytest.raises(ValueError, match="no chat template"):
        self_verbalizer_spec("chat", no_chat)
    assert self_verbalizer_spec("auto", no_chat).use_chat_template is False
    with pytest.raises(ValueError, match=r"scale_policy 'fixed' needs a positive injection_scale"):
        VerbalizerSpec(scale_policy="fixed")
    with pytest.raises(ValueError, match=r"injection_mode must be one of.*'swap'"):
        VerbalizerSpec(injection_mode="swap")
    with pytest.raises(ValueError, match=r"unknown VerbalizerSpec field\(s\) \['colour'\]"):
        VerbalizerSpec().replace(colour=1)


def test_parse_and_truncate():
    spec = VerbalizerSpec(stop_strings=("\n\n", "</s>"))
    assert spec.parse("x <explanation> a cat\n</explanation> y") == "a cat"
    assert spec.parse("  no tags here ") == "no tags here"
    # truncated (no closing tag): what follows the opening tag, not the tag itself
    assert spec.parse("<explanation>\n \"a cat sat on") == '"a cat sat on'
    assert spec.replace(explanation_regex=r"Meaning: \w+").parse("no meaning") == "no meaning"
    assert spec.truncate("one line\n\nsecond</s>") == "one line"
    assert spec.replace(explanation_regex=None).parse(" <explanation>k</explanation>") == "<explanation>k</explanation>"
    assert spec.replace(explanation_regex=r"Meaning: \w+").parse("so Meaning: cats.") == "Meaning: cats"


def test_verbalizer_rejects_bad_vectors(llama, tokenizer):
    cfg, _, lm = llama
    v = Verbalizer(lm.model, tokenizer, VerbalizerSpec(**CHAT_SPEC))
    with pytest.raises(ValueError, match=r"vectors must have shape \[N, 64\].*got \(2, 65\)"):
        v.explain(np.ones((2, 65)))
    bad = np.ones((3, cfg.d_model))
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"vectors\[2\] contains NaN or inf"):
        v.explain(bad)
    with pytest.raises(ValueError, match=r"vectors\[0\] is all zeros"):
        v.explain(np.zeros((1, cfg.d_model)))
    with pytest.raises(ValueError, match="d_model=32"):
        Verbalizer(lm.model, tokenizer, VerbalizerSpec(**CHAT_SPEC, d_model=32))
    with pytest.raises(ValueError, match="washout needs backgrounds"):
        v.explain(np.ones((1, cfg.d_model)), washout=WashoutConfig())
    with pytest.raises(ValueError, match=r"n_backgrounds=4 but only 2"):
        v.explain(np.ones((1, cfg.d_model)), washout=WashoutConfig(n_backgrounds=4),
                  backgrounds=np.ones((2, cfg.d_model)))
    bg = np.ones((2, cfg.d_model))
    bg[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"backgrounds row 1 \(for vector 0\) contains NaN"):
        v.explain(np.ones((1, cfg.d_model)), washout=WashoutConfig(n_backgrounds=2), backgrounds=bg)


def test_explain_equals_generate_with_scaled_injection(llama, tokenizer):
    cfg, _, lm = llama
    v = Verbalizer(lm.model, tokenizer, VerbalizerSpec(**CHAT_SPEC))
    vectors = np.random.default_rng(5).normal(size=(3, cfg.d_model)).astype(np.float32)
    out = v.explain(vectors, n_samples=2, batch_size=8, progress=False)
    # oracle: the vector scaled to the vocabulary's mean embedding norm, injected by hand
    table = np.asarray(lm.model.embed[...])
    target = np.linalg.norm(table, axis=1).mean()
    scaled = vectors / np.linalg.norm(vectors, axis=1, keepdims=True) * target
    ref = generate(lm.model, [list(v.prompt.token_ids)] * 3, max_new_tokens=N_NEW,
                   stop_token_ids=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
                   injection=Injection(scaled, [v.prompt.marker_index] * 3))
    assert [e.index for e in out] == [0, 1, 2]
    for i, e in enumerate(out):
        assert e.tokens[0] == e.tokens[1]  # greedy: both samples equal
        n = int(ref.lengths[i])
        assert e.tokens[0] == ref.tokens[i, :n].tolist() and e.stopped[0] == bool(ref.stopped[i])
        text_ids = e.tokens[0][:-1] if e.stopped[0] else e.tokens[0]
        assert e.raw[0] == tokenizer.decode(text_ids) and e.parsed[0] == e.raw[0].strip()


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(llama, tokenizer):
    cfg, _, lm = llama
    v = Verbalizer(lm.model, tokenizer, VerbalizerSpec(**CHAT_SPEC, stop_strings_as_tokens=False))
    vectors = np.random.default_rng(6).normal(size=(3, cfg.d_model))
    kw = dict(n_samples=2, batch_size=8, progress=False)
    greedy = v.explain(vectors, **kw)
    nucleus_of_one = v.explain(vectors, temperature=1.0, top_p=1e-6, seed=0, **kw)
    assert [e.tokens for e in greedy] == [e.tokens for e in nucleus_of_one]
    a = v.explain(vectors, temperature=1.0, top_p=0.95, seed=0, **kw)
    b = v.explain(vectors, temperature=1.0, top_p=0.95, seed=0, **kw)
    c = v.explain(vectors, temperature=1.0, top_p=0.95, seed=1, **kw)
    assert [e.tokens for e in a] == [e.tokens for e in b]
    assert [e.tokens for e in a] != [e.tokens for e in c]
    assert any(e.tokens[0] != e.tokens[1] for e in a), "samples of one vector should differ"


def _teacher_forced_logits(model, prompt, marker, rows):
    """Logits of one full (cache-free) forward over prompt + generated for every (vector, generated)
    in `rows`, the vector replacing the marker's embedding; per row, the positions that predicted
    each generated token.  Rows are right padded: causal attention keeps padding out of them."""
    seqs = [list(prompt) + list(gen[:-1]) for _, gen in rows]
    total = max(map(len, seqs))
    tokens = jnp.asarray([s + [0] * (total - len(s)) for s in seqs], jnp.int32)
    x = model.embed_tokens(tokens).at[:, marker].set(jnp.asarray(np.stack([v for v, _ in rows]), jnp.float32))
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), tokens.shape)
    hidden, _ = model.run(x, positions, jnp.ones(tokens.shape, bool))
    logits = np.asarray(model.head(hidden))
    return [logits[i, len(prompt) - 1:len(prompt) - 1 + len(gen)] for i, (_, gen) in enumerate(rows)]


def test_washout(llama, tokenizer):
    cfg, _, lm = llama
    v = Verbalizer(lm.model, tokenizer, VerbalizerSpec(**CHAT_SPEC))
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(3, cfg.d_model)).astype(np.float32)
    bgs = rng.normal(size=(2, cfg.d_model)).astype(np.float32) * 3
    kw = dict(batch_size=8, progress=False)
    # alpha = 0 with one background is plain generation on background + direction (|direction| = |background|)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    plain = v.explain(bgs[0] + np.linalg.norm(bgs[0]) * unit, **kw)
    washed = v.explain(vectors, washout=WashoutConfig(alpha=0.0, n_backgrounds=1), backgrounds=bgs, **kw)
    assert [e.tokens for e in plain] == [e.tokens for e in washed]
    # alpha > 0: each chosen token is the argmax of mean(direction rows) - alpha * mean(background rows),
    # checked by full forwards of each row on its own
    alpha = 0.7
    washed = v.explain(vectors, washout=WashoutConfig(alpha=alpha, n_backgrounds=2), backgrounds=bgs, **kw)
    target = np.linalg.norm(np.asarray(lm.model.embed[...]), axis=1).mean()

    def scale(x):
        return x / np.linalg.norm(x) * target

    rows = []  # per vector: 2 direction-plus-background rows, then 2 background rows
    for i, e in enumerate(washed):
        rows += [(scale(b + np.linalg.norm(b) * unit[i]), e.tokens[0]) for b in bgs]
        rows += [(scale(b), e.tokens[0]) for b in bgs]
    logits = _teacher_forced_logits(lm.model, v.prompt.token_ids, v.prompt.marker_index, rows)
    differs = False
    for i, e in enumerate(washed):
        with_dir, alone = logits[4 * i:4 * i + 2], logits[4 * i + 2:4 * i + 4]
        combined = np.mean(with_dir, axis=0) - alpha * np.mean(alone, axis=0)
        np.testing.assert_array_equal(combined.argmax(-1), e.tokens[0])
        differs |= not np.array_equal(np.mean(with_dir, axis=0).argmax(-1), e.tokens[0])
    assert differs, "washout never changed a token: the test would pass without the subtraction"


def test_sharded_on_8_devices_equals_one_device():
    code = """
    import json
    import numpy as np
    from crossmap.models import init_random, shard_model, tiny_config
    from crossmap.sharding import make_mesh
    from crossmap.verbalize import Injection, generate

    cfg = tiny_config("llama", n_layers=2)
    model = init_random(cfg, seed=1)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]] * 2
    vec = np.random.default_rng(0).normal(size=(6, cfg.d_model)).astype(np.float32) * 2
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, key=3, stop_token_ids=[0], pad_id=0,
              injection=Injection(vec, [1, 0, 2, 1, 0, 2]), return_logits=True, batch_size_bucket=8)
    single = generate(model, prompts, **kw)
    mesh = make_mesh({"data": 4, "tensor": 2})
    multi = generate(shard_model(model, mesh), prompts, mesh=mesh, **kw)
    print(json.dumps({"same_tokens": bool((single.tokens == multi.tokens).all()),
                      "same_lengths": bool((single.lengths == multi.lengths).all()),
                      "distinct": len(set(single.tokens.ravel().tolist())),
                      "logit_err": float(np.abs(single.logits - multi.logits).max() / np.abs(single.logits).max())}))
    """
    out = run_with_devices(code)
    assert out["same_tokens"] and out["same_lengths"] and out["distinct"] > 5
    assert out["logit_err"] < 1e-5


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.7", "--top-p", "0.95"]], ids=["greedy", "nucleus"])
def test_benchmark_tiny_preset(tmp_path, sampling):
    from crossmap.benchmarks import verbalize as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    # the decode step is (full call - 1-token call) / (new tokens - 1): 96 tokens and the median of 3 calls keep
    # that difference above a loaded CPU's timing noise (8 tokens once measured it below zero)
    result = bench.run(parser.parse_args(["--preset", "tiny", "--reps", "3", "--new-tokens", "96",
                                         "--out", str(out), *sampling]))
    assert result["sampling"] == ("greedy" if not sampling else {"temperature": 0.7, "top_p": 0.95})
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    ours = result["crossmap"]
    assert ours["decode_step_s"] > 0 and ours["explanations_per_s"] > 0 and ours["new_tokens"] == result["new_tokens"]
    assert result["floor"]["step_s"] > 0 and result["floor"]["copy_bandwidth_GBps"] > 0
    # the floor's bandwidth is the higher of the two copy probes, both kept beside it
    probe = result["copy_probe"]
    assert probe["chain"] > 1 and probe["gb_per_s_one_copy"] > 0 and probe["gb_per_s_chained"] > 0
    assert result["floor"]["copy_bandwidth_GBps"] == pytest.approx(
        max(probe["gb_per_s_one_copy"], probe["gb_per_s_chained"]))
    assert result["transformers"]["explanations_per_s"] > 0 and result["speedup_vs_transformers"] > 0


def test_benchmark_times_stop_tests_every_few_steps_beside_every_step(tmp_path):
    """bench verbalize --stop-check-every 1,5: both variants timed in one run, recorded as such, with the same tokens;
    a bad list is refused naming the flag before anything runs."""
    from crossmap.benchmarks import verbalize as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for bad in ("0", "4,4", "x", ""):
        with pytest.raises(ValueError, match="--stop-check-every must list distinct integers >= 1"):
            bench.run(parser.parse_args(["--preset", "tiny", "--stop-check-every", bad, "--out", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()
    result = bench.run(parser.parse_args(["--preset", "tiny", "--stop-check-every", "1,5", "--torch-device", "none",
                                          "--new-tokens", "12", "--reps", "1", "--no-logit-error",
                                          "--out", str(tmp_path / "v.json")]))
    variants = result["weights"]
    assert list(variants) == ["float", "float/stop-check-5"]
    assert [v["crossmap"]["stop_check_every"] for v in variants.values()] == [1, 5]
    assert variants["float/stop-check-5"]["tokens_vs_float"] == {"agreement": 1.0, "rows_identical": 1.0}


def test_decode_parts_benchmark_counts_each_parts_bytes(tmp_path):
    """bench decode-parts on the tiny preset: every part timed, and each part's floor is the bytes it must read
    (known from the shapes) at the bandwidth the run measured."""
    from crossmap.benchmarks import decode_parts as bench
    from crossmap.benchmarks.verbalize import PRESETS, preset_config

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "parts.json"
    result = bench.run(parser.parse_args(["--preset", "tiny", "--batch", "3", "--cache", "10", "--reps", "2",
                                         "--out", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cfg, item = preset_config(PRESETS["tiny"]), 4  # float32
    parts = result["parts"]
    assert set(parts) == set(bench.PARTS) and all(p["ms"] > 0 for p in parts.values())
    assert parts["mlps"]["bytes"] == cfg.n_layers * 3 * cfg.d_model * cfg.d_ff * item
    assert parts["attention"]["bytes"] == cfg.n_layers * 2 * 3 * cfg.n_kv_heads * 10 * cfg.head_dim * item
    assert parts["projections"]["bytes"] == cfg.n_layers * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim \
        * cfg.d_model * item
    assert parts["head"]["bytes"] == cfg.vocab_size * cfg.d_model * item
    for p in parts.values():
        assert p["floor_ms"] == pytest.approx(p["bytes"] / (result["copy_bandwidth_GBps"] * 1e9) * 1e3)
    with pytest.raises(ValueError, match="need --batch >= 1 and --cache >= 2, got 4 and 1"):
        bench.run(parser.parse_args(["--preset", "tiny", "--cache", "1", "--out", str(out)]))
    with pytest.raises(ValueError, match="got 0 and 20"):  # 0 rows is refused, not read as "the default"
        bench.run(parser.parse_args(["--preset", "tiny", "--batch", "0", "--out", str(out)]))


@pytest.mark.parametrize("spread", [0.5, 6.0], ids=["flat", "peaked"])
def test_top_p_benchmark_checks_every_arity_against_sort_and_cumsum(tmp_path, spread):
    from crossmap.benchmarks import top_p as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--batch", "3", "--vocab", "4000", "--arities", "2,3,16", "--reps", "1",
                                         "--peer-reps", "1", "--spread", str(spread),
                                         "--out", str(tmp_path / "t.json")]))
    assert set(result["arity"]) == {"2", "3", "16"}
    # against the float64 definition: at most a token or two at the cut of a flat row (float32 sums)
    assert all(r["worst_row"] <= 2 and r["ms"] > 0 for r in result["arity"].values())
    assert 1 <= result["kept_per_row_mean"] < 4000 and result["sort_cumsum"]["ms"] > 0
    assert result["sort_cumsum"]["worst_row"] <= 2
    # both nucleus samplers timed, and every draw inside the nucleus
    assert all(r["ms"] > 0 and r["draws_outside_float64_nucleus"] == 0 for r in result["samplers"].values())
    assert set(result["samplers"]) == {"filter_then_sample", "sample_nucleus"}
    # an arity below 2 cannot narrow the range: refused, naming the option
    with pytest.raises(ValueError, match="arities"):
        bench.run(parser.parse_args(["--arities", "1", "--vocab", "100", "--batch", "2"]))


def test_top_p_benchmark_with_the_vocabulary_split_over_devices():
    result = run_with_devices("""
        import argparse, json
        from crossmap.benchmarks import top_p as bench
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        r = bench.run(parser.parse_args(["--batch", "4", "--vocab", "4000", "--tensor", "2", "--arities", "2,4",
                                         "--reps", "1", "--peer-reps", "1"]))
        print(json.dumps({**{k: v["worst_row"] for k, v in r["arity"].items()},
                          **{k: v["draws_outside_float64_nucleus"] for k, v in r["samplers"].items()}}))
    """, n_devices=2)
    assert set(result) == {"2", "4", "filter_then_sample", "sample_nucleus"}
    assert result["2"] <= 2 and result["4"] <= 2  # tokens at the cut, as on one device
    assert result["filter_then_sample"] == result["sample_nucleus"] == 0


# ---------------------------------------------------------------------------------------------
# real shipped models (slow)

REAL_TEXTS = ["The capital of France is", "def add(a, b):\n    return",
              "Photosynthesis converts light into chemical energy. In plants, it happens in the"]


def _hf_real(lm):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_greedy_generation_matches_transformers(name, shipped_model):
    lm, _ = shipped_model(name)
    hf = _hf_real(lm)
    prompts = [lm.tokenizer(t)["input_ids"] for t in REAL_TEXTS]
    stop = list(lm.config.eos_token_ids)
    res = generate(lm.model, prompts, max_new_tokens=16, stop_token_ids=stop, use_model_eos=False, pad_id=0)
    for i, p in enumerate(prompts):
        ref = _hf_generate(hf, input_ids=p, stop=stop[0], n_new=16)
        _assert_same_as_hf(res.tokens[i], int(res.lengths[i]), ref, f"{name}: {REAL_TEXTS[i]!r}")


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,word", [("smollm2-135m-instruct", "chat", " ocean"),
                                            ("gemma-3-270m", "base", " ocean")])
def test_real_self_verbalizer_matches_transformers_inputs_embeds(name, kind, word, shipped_model):
    """The self-verbalizer's explain() == transformers' generate on inputs_embeds with the injected row."""
    import torch

    lm, _ = shipped_model(name)
    hf = _hf_real(lm)
    spec = self_verbalizer_spec(kind, lm.tokenizer, max_new_tokens=16, stop_strings_as_tokens=False)
    v = Verbalizer(lm.model, lm.tokenizer, spec)
    word_id = lm.tokenizer(word, add_special_tokens=False)["input_ids"][-1]
    vector = np.asarray(lm.model.embed_tokens(jnp.asarray([[word_id]])))[0, 0]
    e = v.explain(vector, progress=False)[0]
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.as_tensor([v.prompt.token_ids]))
    embeds[0, v.prompt.marker_index] = torch.as_tensor(v.scale_vectors(vector[None])[0])
    stops = list(v.stop_token_ids)
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=stops, pad_token_id=0)[0].tolist()
    while ref and ref[-1] == 0 and (len(ref) > len(e.tokens[0])):
        ref.pop()
    assert e.tokens[0] == ref, f"{name}: {e.raw[0]!r} vs {lm.tokenizer.decode(ref)!r}"
    assert e.raw[0].strip(), f"{name} produced no text"


def _draws_fit(draws: np.ndarray, p: np.ndarray, cells: int = 20) -> float:
    """scipy's chi-square p-value of draws against the distribution p, the entries pooled in order of
    probability into `cells` cells of about equal mass (a token heavier than a cell has one to itself), so that
    flat rows, where no entry expects five draws, are tested too; an entry without mass must not be drawn."""
    from scipy import stats

    assert (p[draws] > 0).all(), "drew an entry without mass"
    order = np.flatnonzero(p > 0)[np.argsort(-p[p > 0], kind="stable")]
    mass_before = np.cumsum(p[order]) - p[order]
    cell_of = np.zeros(p.size, np.int64)
    cell_of[order] = np.unique(np.floor(mass_before * cells), return_inverse=True)[1]
    expected = np.bincount(cell_of, weights=p) * draws.size
    observed = np.bincount(cell_of[draws], minlength=expected.size)
    assert expected.size >= 3 and expected.min() > 5
    return stats.chisquare(observed, expected).pvalue


def _many_draws(draw, logits: np.ndarray, rows: int = 1000, calls: int = 40) -> np.ndarray:
    """40,000 draws of one row of logits, 1000 rows a call (a [40000, 50000] batch would need 8 GB a copy)."""
    import jax

    batch = jnp.broadcast_to(jnp.asarray(logits), (rows, logits.size))
    draw = jax.jit(draw)
    return np.concatenate([np.asarray(draw(jax.random.key(i), batch)) for i in range(calls)])


@pytest.mark.parametrize("vocab,filtered", [(7, 0), (50_000, 0), (50_000, 49_990)], ids=["small", "wide", "top-p"])
def test_sampling_draws_from_the_softmax(vocab, filtered):
    """Draws of sample_categorical against softmax(logits), by scipy's chi-square test; entries the top-p
    filter set to -inf are never drawn."""
    from crossmap.verbalize.engine import sample_categorical

    rng = np.random.default_rng(vocab + filtered)
    logits = rng.normal(size=vocab).astype(np.float32) * 2.0
    if filtered:
        logits[rng.choice(vocab, filtered, replace=False)] = -np.inf
    draws = _many_draws(sample_categorical, logits)
    p = np.exp(logits.astype(np.float64) - logits[np.isfinite(logits)].max())
    p /= p.sum()
    assert np.isfinite(logits[draws]).all(), "drew an entry the filter removed"
    assert _draws_fit(draws, p) > 1e-3


@pytest.mark.parametrize("chunks", [1, 7, 512, 3000])
def test_invert_cdf_against_searchsorted(chunks):
    """Known answers: masses that are multiples of 2**-20 (so float32 sums are exact) with zeros among them,
    inverted halfway between the cumulative sums (0, the top, and random points): the entry is numpy's
    searchsorted of the exact cumulative sum, never one without mass; chunk counts that divide the row, do
    not, or exceed it."""
    from crossmap.verbalize.engine import invert_cdf

    rng = np.random.default_rng(chunks)
    counts = rng.integers(0, 50, size=(3, 2000)) * (rng.random((3, 2000)) < 0.5)
    counts[1, :1500] = 0  # a row whose first chunks have no mass
    counts[2, -700:] = 0  # and one whose last have none
    probs = counts / 2**20
    running = np.cumsum(counts, axis=1)
    total = running[:, -1:]
    picks = rng.integers(0, total, size=(3, 40)) + 0.5
    picks[:, 0], picks[:, 1] = 0, total[:, 0] - 0.5
    uniforms = picks / total
    want = np.stack([np.searchsorted(running[r], picks[r], side="right") for r in range(3)])
    got = np.asarray(invert_cdf(jnp.asarray(probs, jnp.float32), jnp.asarray(uniforms, jnp.float32), chunks=chunks))
    assert (probs[np.arange(3)[:, None], got] > 0).all(), "returned an entry without mass"
    assert (got == want).all(), np.argwhere(got != want)[:5]


@pytest.mark.parametrize("spread,top_p", [(0.3, 0.9), (2.0, 0.5), (4.0, 0.9), (2.0, 1.0)],
                         ids=["flat-0.9", "middle-0.5", "peaked-0.9", "no-cut"])
def test_nucleus_sampler_draws_from_the_nucleus(spread, top_p):
    """sample_nucleus's draws against the nucleus computed in float64 (sort, the smallest top set reaching
    top_p, renormalised), by scipy's chi-square test; nothing is drawn outside it."""
    from crossmap.verbalize.engine import sample_nucleus

    rng = np.random.default_rng(int(spread * 10))
    logits = (rng.normal(size=8_000) * spread).astype(np.float32)
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    kept = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1] if top_p < 1 else order
    nucleus = np.zeros_like(p)
    nucleus[kept] = p[kept] / p[kept].sum()
    draws = _many_draws(lambda key, x: sample_nucleus(key, x, jnp.float32(top_p)), logits)
    assert nucleus[draws].min() > 0, "drew a token outside the nucleus"
    assert _draws_fit(draws, nucleus) > 1e-3


def test_nucleus_sampler_falls_back_to_the_filter_when_every_candidate_misses():
    """With a nucleus of one token in a flat row, all four candidates miss in nearly every row: the rows take
    the filter and sampler, which return the top token.  (Rows that hit beside rows that miss in one call:
    the chi-square test at top-p 0.5, where about 6% of rows miss.)"""
    import jax

    from crossmap.verbalize.engine import sample_nucleus

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(64, 5000)) * 0.3).astype(np.float32)
    got = np.asarray(jax.jit(sample_nucleus)(jax.random.key(0), jnp.asarray(logits), jnp.float32(1e-6)))
    assert (got == logits.argmax(axis=1)).all()


def test_nucleus_sampler_and_inversion_refuse_counts_below_one():
    """No candidate or no chunk cannot draw anything: refused, naming the argument."""
    import jax

    from crossmap.verbalize.engine import invert_cdf, sample_nucleus

    logits = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match="candidates must be >= 1, got 0"):
        sample_nucleus(jax.random.key(0), logits, jnp.float32(0.9), candidates=0)
    with pytest.raises(ValueError, match="chunks must be >= 1, got 0"):
        invert_cdf(jnp.full((2, 10), 0.1), jnp.zeros((2, 1)), chunks=0)


@pytest.mark.parametrize("name, marker_id, render", [("qwen2.5-coder-0.5b-instruct", 149705, "chat"),
                                                     ("gemma-3-270m", 246566, "raw")])
def test_nla_bench_prompt_through_real_tokenizers(name, marker_id, render):
    """bench verbalize --nla builds the release's AV prompt through the base model's real tokenizer: the release's
    marker (notes/nla-release.md: Qwen U+320E = 149705, Gemma 3 U+321C = 246566) once, at the slot it names; a
    chat turn where the tokenizer has a template (the shipped Gemma-3-270M has none: raw, the release's rule)."""
    from crossmap.benchmarks.verbalize import nla_prompt
    from crossmap.models import shipped_gguf
    from crossmap.models.gguf_files import convert_gguf

    ids, slot, tokenizer = nla_prompt(str(convert_gguf(shipped_gguf(name))))
    assert ids[slot] == marker_id and ids.count(marker_id) == 1
    assert bool(getattr(tokenizer, "chat_template", None)) == (render == "chat")
    text = tokenizer.decode(ids)
    assert ("<|im_start|>user" in text) == (render == "chat") and text.count(chr(0x320E if render == "chat"
                                                                                   else 0x321C)) == 1


def test_nla_bench_tiny_runs_both_sides_and_the_presets_carry_the_release(tmp_path):
    """--nla on the tiny preset: generation and the AR, each beside transformers, in one run. The presets hold
    the release's extraction layer and injection norm for each AV (notes/nla-release.md)."""
    from crossmap.benchmarks import verbalize as bench
    from crossmap.models import shipped_gguf
    from crossmap.models.gguf_files import convert_gguf

    assert bench.PRESETS["7b"]["nla"] == {"layer": 20, "injection_scale": 150.0}
    assert bench.PRESETS["27b"]["nla"] == {"layer": 41, "injection_scale": 60000.0}
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "nla.json"
    tokenizer = str(convert_gguf(shipped_gguf("qwen2.5-coder-0.5b-instruct")))
    result = bench.run(parser.parse_args(["--preset", "tiny", "--nla", "--tokenizer", tokenizer, "--reps", "1",
                                         "--new-tokens", "8", "--ar-explanations", "8", "--ar-batch", "4",
                                         "--out", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["nla"] == {"prompt_tokens": 125, "marker_slot": 111, "injection_scale": 150.0,
                             "prompt_render": "chat"}
    assert result["prompt_len"] == 125 and result["sampling"]["temperature"] == 0.7
    ar = result["reconstructor"]
    assert ar["layers"] == bench.PRESETS["tiny"]["nla"]["layer"] + 1 and ar["explanations"] == 8
    assert ar["crossmap"]["explanations_per_s"] > 0 and ar["transformers"]["explanations_per_s"] > 0
    assert ar["speedup_vs_transformers"] == pytest.approx(ar["transformers"]["total_s"] / ar["crossmap"]["total_s"])
