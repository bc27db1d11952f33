"""Training data for an NLA pair: activations at a few positions per document, the context text they
came from, a document-level split, and the SFT explanation targets.

    examples = collect_examples(hidden_fn, tokenizer, documents, positions_per_doc=10, seed=0)
    targets = snippet_explanations(examples)                  # or generated_explanations(...)

Splits are by document (the release's AV-SFT / AR-SFT / RL split, 30/30/40, plus a held-out set
that no phase trains on), so no document's context teaches two phases or leaks into evaluation.

Explanation sources (`TARGET_SOURCES`), and what each teaches:
- `snippets`: 2 quoted text snippets of the context that ends at the position (a wide window and the
  last few tokens).  Needs no model.  It teaches the AV to read back the text a residual vector was
  computed on, which is what a mid-depth residual encodes most directly (the current token and its
  recent context); the AR learns the inverse.  The release's explanations are "2-3 text snippets"
  written by an API model; these are the literal version.
- `generated`: one sentence about the context, written by a local instruct model through crossmap's
  own generation engine.  It teaches descriptions rather than quotations, as good as that model's
  reading of the context (a 0.5B model writes short, often generic ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..activations.pairing import DEFAULT_SKIP_FIRST, collect_activations, tokenize_document, usable_positions

SPLITS = ("av_sft", "ar_sft", "rl", "eval")
DEFAULT_SPLIT_FRACTIONS = (0.27, 0.27, 0.36, 0.10)  # the release's 30/30/40 of the training documents, 10% held out
TARGET_SOURCES = ("snippets", "generated")
GENERATOR_PROMPT = ('Here is the end of a text:\n\n"{context}"\n\n'
                    'In one short sentence, say what the last words are about.')


@dataclass
class Examples:
    """One row per (document, position): the activation after the chosen block and its context."""

    vectors: np.ndarray  # float32 [N, D]
    doc_ids: np.ndarray  # int32 [N]
    positions: np.ndarray  # int32 [N] token index in the document's tokenisation
    split: np.ndarray  # int8 [N] index into SPLITS
    contexts: list[str]  # the document text up to and including the token (last `context_tokens` tokens)
    tails: list[str]  # the last few tokens of that context

    def __len__(self) -> int:
        return len(self.vectors)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))


def split_documents(n_documents: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """int8 [n] split of each document: a seeded permutation cut at the cumulative fractions."""
    fractions = np.asarray(fractions, np.float64)
    if fractions.shape != (len(SPLITS),) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be {len(SPLITS)} non-negative numbers for {SPLITS} summing to 1, "
                         f"got {tuple(fractions)}")
    cuts = np.round(np.cumsum(fractions) * n_documents).astype(int)
    out = np.empty(n_documents, np.int8)
    order = np.random.default_rng(seed).permutation(n_documents)
    start = 0
    for k, stop in enumerate(cuts):
        out[order[start:stop]] = k
        start = stop
    return out


def _char_start(ends: np.ndarray, first: int) -> int:
    """Where token `first` starts: the end of the last pairable token before it (0 if none)."""
    before = ends[:first]
    before = before[before >= 0]
    return int(before[-1]) if before.size else 0


def collect_examples(hidden_fn: Callable, tokenizer, documents: Sequence[str], *, positions_per_doc: int,
                     seed: int, split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                     max_length: int = 256, batch_size: int = 8, buckets: Sequence[int] = (64, 128, 256),
                     skip_first: int = DEFAULT_SKIP_FIRST, context_tokens: int = 24, tail_tokens: int = 4,
                     min_per_split: int = 1, mesh=None, progress: bool = True) -> Examples:
    """Activations (`hidden_fn`, e.g. `models.make_hidden_fn(model, layer)`) at up to
    `positions_per_doc` random usable positions of each document, with their contexts."""
    if positions_per_doc < 1:
        raise ValueError(f"positions_per_doc must be >= 1, got {positions_per_doc}")
    if not documents:
        raise ValueError("collect_examples: the corpus has no documents")
    split_of_doc = split_documents(len(documents), split_fractions, seed)
    docs = [tokenize_document(tokenizer, d, max_length=max_length) for d in documents]
    chosen: list[set[int]] = []
    for i, doc in enumerate(docs):
        usable = usable_positions(doc, skip_first)
        rng = np.random.default_rng([seed, i])
        take = rng.choice(usable, size=min(positions_per_doc, usable.size), replace=False) if usable.size else []
        chosen.append({int(p) for p in take})
    vectors, doc_ids, positions = [], [], []
    for batch in collect_activations(hidden_fn, tokenizer, documents, skip_first=skip_first, batch_size=batch_size,
                                     buckets=buckets, max_length=max_length, mesh=mesh, progress=progress):
        keep = np.asarray([int(p) in chosen[d] for d, p in zip(batch.doc_ids, batch.positions, strict=True)], bool)
        vectors.append(batch.acts[keep].astype(np.float32))
        doc_ids.append(batch.doc_ids[keep])
        positions.append(batch.positions[keep])
    vectors_a, doc_a, pos_a = np.concatenate(vectors), np.concatenate(doc_ids), np.concatenate(positions)
    order = np.lexsort((pos_a, doc_a))  # a fixed order, whatever the batching
    vectors_a, doc_a, pos_a = vectors_a[order], doc_a[order], pos_a[order]
    if not np.isfinite(vectors_a).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors_a).all(axis=1))[0])
        raise ValueError(f"collect_examples: the activation of document {int(doc_a[bad])} at token "
                         f"{int(pos_a[bad])} is not finite")
    split = split_of_doc[doc_a]
    for k, name in enumerate(SPLITS):
        n = int((split == k).sum())
        if n < min_per_split:
            raise ValueError(f"collect_examples: split {name!r} has {n} positions (from {int((split_of_doc == k).sum())}"
                             f" of {len(documents)} documents), fewer than the {min_per_split} needed; use a larger "
                             "corpus, more positions per document, or other split fractions")
    contexts, tails = [], []
    for d, p in zip(doc_a, pos_a, strict=True):
        ends, text = docs[d].ends, documents[d]
        stop = int(ends[p])
        contexts.append(text[_char_start(ends, max(0, p - context_tokens + 1)):stop].strip())
        tails.append(text[_char_start(ends, max(0, p - tail_tokens + 1)):stop].strip())
    return Examples(vectors_a, doc_a.astype(np.int32), pos_a.astype(np.int32), split, contexts, tails)


def wrap_explanation(text: str) -> str:
    """The release's AV SFT target: `<explanation>\\n...\\n</explanation>`."""
    return f"<explanation>\n{text}\n</explanation>"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace('"', "'")


def snippet_explanations(examples: Examples) -> list[str]:
    """Two quoted snippets per example: the context window, and its last few tokens."""
    return [f'"...{_one_line(c)}"\n"{_one_line(t)}"' for c, t in zip(examples.contexts, examples.tails, strict=True)]


def generated_explanations(model, tokenizer, examples: Examples, rows: Sequence[int], *, max_new_tokens: int = 32,
                           batch_size: int = 32, mesh=None, progress: bool = True) -> dict[int, str]:
    """One sentence per row from a local instruct model (greedy), by crossmap's generation engine."""
    from tqdm.auto import tqdm

    from ..verbalize.engine import generate
    from ..verbalize.spec import chat_token_ids

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("generated explanations need an instruct model with a chat template; this tokenizer has none")
    rows = [int(r) for r in rows]
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": GENERATOR_PROMPT.format(
        context=_one_line(examples.contexts[r]))}], " (explanation generator)") for r in rows]
    stops = [t for t in (tokenizer.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"))
             if isinstance(t, int) and t >= 0 and t != getattr(tokenizer, "unk_token_id", None)]
    out: dict[int, str] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="explanations", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        result = generate(model, prompts[chunk], max_new_tokens=max_new_tokens, stop_token_ids=stops, mesh=mesh)
        for r, tokens, n in zip(rows[chunk], result.tokens, result.lengths, strict=True):
            text = tokenizer.decode(tokens[:n], skip_special_tokens=True).strip()
            out[r] = _one_line(text)  # may be empty: the trainer counts and drops those
    return out
