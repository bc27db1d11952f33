"""Tokenisation with character offsets, cross-tokenizer pairing and activation collection.

Two models with different tokenizers read the same documents.  A source position and a target position
are *paired* when both tokens end at the same character of the document: at that point both models have
read exactly the same text.  The collection loop runs both models batch by batch over fixed-shape padded
batches (a few bucket lengths, so the jitted forwards compile a handful of times), gathers the hidden
states of paired positions on device into a fixed-size buffer with a mask, and hands each batch to a
consumer (ridge statistics, host collection for SAE training or evaluation).

Conventions
- One document per batch row, right padded; `positions` restart at 0 in every row; no packing of several
  documents into one row (simpler masks, and each document starts from a clean context).
- Documents are truncated to `max_length` tokens (default: the largest bucket) per model.
- The first `skip_first` positions of every token sequence (BOS and template tokens included) are never
  used: the first positions carry attention-sink activations of huge norm that would dominate a
  regression.  The default 2 drops BOS plus the first text token for models that add BOS (Gemma,
  SmolLM2) and the first two text tokens for those that do not (Qwen).
- Folds are assigned to documents, never to tokens, and a batch never mixes folds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..sharding import shard_batch, to_host

DEFAULT_BUCKETS: tuple[int, ...] = (64, 128, 256, 512)
DEFAULT_SKIP_FIRST = 2
PAIRINGS = ("offsets", "last", "mean")

HiddenFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Consumer = Callable[[jax.Array, jax.Array, jax.Array, int, dict], Any]


# ------------------------------------------------------------------------------ tokenisation, offsets


def _model_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


@dataclass(frozen=True)
class FormattedDocument:
    """The string a tokenizer reads for one document, and where the document text lies in it."""

    text: str  # what is tokenised: the document itself, or the chat-formatted message
    doc_start: int  # document text is text[doc_start:doc_end]
    doc_end: int
    add_special_tokens: bool  # False when a chat template already wrote BOS etc.


def format_document(tokenizer: Any, text: str, chat: bool = False) -> FormattedDocument:
    """Render `text` as is, or (chat=True) as a user message through the tokenizer's own chat template.

    The document must appear verbatim in the rendered message so that offsets can be mapped back into
    document coordinates; a template that rewrites the text (e.g. trims it) is handled by searching for
    the text, and one that changes it beyond recognition is an error.
    """
    if not chat:
        return FormattedDocument(text, 0, len(text), True)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {_model_name(tokenizer)!r} has no chat template; use chat=False for it")

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=False)

    # Rendering a sentinel first finds the document's slot even if the text also occurs in the system prompt.
    sentinel = "\x00crossmap-document\x00"
    with_sentinel = render(sentinel)
    rendered = render(text)
    if with_sentinel.count(sentinel) == 1:
        prefix, suffix = with_sentinel.split(sentinel)
        if rendered == prefix + text + suffix:
            return FormattedDocument(rendered, len(prefix), len(prefix) + len(text), False)
    start = rendered.rfind(text)
    if start < 0:
        raise ValueError(f"chat template of model {_model_name(tokenizer)!r} changed the document text, so "
                         f"its tokens cannot be mapped back to the document: {text[:60]!r}...")
    return FormattedDocument(rendered, start, start + len(text), False)


@dataclass(frozen=True)
class TokenizedDocument:
    """Token ids of one document and, per token, where it ends in the document text.

    ends[i] is the character offset (into the *document*, not the formatted string) at which token i
    ends, or -1 when token i cannot be paired: special tokens, tokens outside the document span (chat
    template), and tokens that end inside a character another token finishes (byte-level BPE splits of
    multi-byte characters).
    """

    ids: np.ndarray  # int32[n]
    ends: np.ndarray  # int32[n]
    truncated: bool  # True when the document had more than max_length tokens

    def __len__(self) -> int:
        return len(self.ids)


def _pairable_ends(offsets: np.ndarray, doc_start: int, doc_end: int) -> np.ndarray:
    """ends[i] per the TokenizedDocument rule from (start, stop) character offsets of each token."""
    starts, stops = offsets[:, 0], offsets[:, 1]
    nonempty = stops > starts  # special tokens get (0, 0)
    # A token ends a character boundary only if no later token starts before its stop: byte-level BPE
    # gives every piece of a split multi-byte character the offsets of the whole character.
    later_min_start = np.full(len(starts), np.iinfo(np.int64).max, np.int64)
    if len(starts) > 1:
        masked_starts = np.where(nonempty, starts, np.iinfo(np.int64).max)[1:]
        later_min_start[:-1] = np.minimum.accumulate(masked_starts[::-1])[::-1]
    complete = nonempty & (later_min_start >= stops)
    # The stop must fall inside (doc_start, doc_end]: the model has then read document text and nothing
    # of the template after it.  A token that starts in the template prefix but ends in the document
    # still marks "has read document[:end]".
    in_document = (stops > doc_start) & (stops <= doc_end)
    return np.where(complete & in_document, stops - doc_start, -1).astype(np.int32)


def tokenize_with_offsets(tokenizer: Any, text: str, *, add_special_tokens: bool = True,
                          max_length: int | None = None,
                          span: tuple[int, int] | None = None) -> TokenizedDocument:
    """Tokenise `text` with a fast (offset-reporting) tokenizer.

    span: (start, stop) of the document inside `text` (default: all of it); ends are reported relative to
    span start.  The whole text is tokenised and then cut to `max_length` tokens, so a token whose
    character is completed by a cut-off token is correctly marked unpairable.
    """
    try:
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise ValueError(f"tokenizer of {_model_name(tokenizer)!r} cannot report character offsets "
                         f"(a slow/Python tokenizer?); load its fast tokenizer instead ({e})") from None
    offsets = encoding.get("offset_mapping") if hasattr(encoding, "get") else None
    if offsets is None:
        raise ValueError(f"tokenizer of {_model_name(tokenizer)!r} returned no offset_mapping; a fast "
                         "tokenizer is needed for cross-tokenizer pairing")
    ids = np.asarray(encoding["input_ids"], np.int32).reshape(-1)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    if len(offsets) != len(ids):
        raise ValueError(f"tokenizer of {_model_name(tokenizer)!r}: {len(ids)} ids but {len(offsets)} offsets")
    start, stop = span if span is not None else (0, len(text))
    ends = _pairable_ends(offsets, start, stop)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, ends = ids[:max_length], ends[:max_length]
    return TokenizedDocument(ids, ends, bool(truncated))


def tokenize_document(tokenizer: Any, text: str, *, chat: bool = False,
                      max_length: int | None = None) -> TokenizedDocument:
    """format_document + tokenize_with_offsets: ends are in coordinates of `text` itself."""
    formatted = format_document(tokenizer, text, chat)
    return tokenize_with_offsets(tokenizer, formatted.text, add_special_tokens=formatted.add_special_tokens,
                                 max_length=max_length, span=(formatted.doc_start, formatted.doc_end))


# ------------------------------------------------------------------------------------------- pairing


def usable_positions(doc: TokenizedDocument, skip_first: int = DEFAULT_SKIP_FIRST) -> np.ndarray:
    """Positions of `doc` that may enter a pair or a mean: pairable tokens at index >= skip_first."""
    keep = doc.ends >= 0
    keep[:skip_first] = False
    return np.flatnonzero(keep)


def pair_positions(source: TokenizedDocument, target: TokenizedDocument, pairing: str = "offsets",
                   skip_first: int = DEFAULT_SKIP_FIRST) -> tuple[np.ndarray, np.ndarray]:
    """(source positions, target positions) of equal length whose tokens end at the same character.

    pairing="offsets": every common end; "last": only the last common end (at most one pair).
    ("mean" pairs document means, see `usable_positions`; it has no position pairs.)
    """
    if pairing not in ("offsets", "last"):
        raise ValueError(f"pair_positions: pairing must be 'offsets' or 'last', got {pairing!r}")
    src_pos, tgt_pos = usable_positions(source, skip_first), usable_positions(target, skip_first)
    # usable ends are strictly increasing (see _pairable_ends), so intersect1d's indices are exact
    _, i_src, i_tgt = np.intersect1d(source.ends[src_pos], target.ends[tgt_pos], assume_unique=True,
                                     return_indices=True)
    src_pairs, tgt_pairs = src_pos[i_src].astype(np.int32), tgt_pos[i_tgt].astype(np.int32)
    if pairing == "last":
        src_pairs, tgt_pairs = src_pairs[-1:], tgt_pairs[-1:]
    return src_pairs, tgt_pairs


# ------------------------------------------------------------------------------------------- batches


def bucket_length(n_tokens: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds `n_tokens` tokens."""
    for b in sorted(buckets):
        if n_tokens <= b:
            return b
    raise ValueError(f"{n_tokens} tokens exceed the largest bucket {max(buckets)}")


def _check_buckets(buckets: Sequence[int], max_length: int | None) -> tuple[tuple[int, ...], int]:
    buckets = tuple(sorted(int(b) for b in buckets))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets must be positive lengths, got {buckets}")
    if max_length is None:
        max_length = buckets[-1]
    if max_length > buckets[-1]:
        raise ValueError(f"max_length {max_length} exceeds the largest bucket {buckets[-1]}")
    return buckets, max_length


def pack_rows(docs: Sequence[TokenizedDocument | None], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens int32[B,T], positions int32[B,T], valid bool[B,T]; None rows are all padding."""
    n_rows = len(docs)
    tokens = np.zeros((n_rows, seq_len), np.int32)
    valid = np.zeros((n_rows, seq_len), bool)
    for row, doc in enumerate(docs):
        if doc is not None:
            tokens[row, :len(doc)] = doc.ids
            valid[row, :len(doc)] = True
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n_rows, seq_len)).copy()
    return tokens, positions, valid


def plan_batches(keys: Sequence[tuple], batch_size: int) -> list[list[int]]:
    """Group document indices with equal keys (fold, bucket lengths ...) into batches of <= batch_size.

    Batches come in sorted key order; inside a key, documents keep their index order.
    """
    order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and keys[batches[-1][0]] == keys[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _to_device(x: np.ndarray, mesh):
    return shard_batch(x, mesh) if mesh is not None else jnp.asarray(x)


@jax.jit
def _gather_rows(hidden: jax.Array, index: jax.Array, mask: jax.Array) -> jax.Array:
    """hidden [B,T,D], index int32[B,P], mask bool[B,P] -> [B*P, D]; masked rows exactly zero."""
    picked = jnp.take_along_axis(hidden, index[:, :, None], axis=1)
    # where, not multiply: padding rows of a model may hold NaN (softmax over no keys)
    picked = jnp.where(mask[:, :, None], picked, jnp.zeros((), picked.dtype))
    return picked.reshape(-1, hidden.shape[-1])


@jax.jit
def _masked_mean(hidden: jax.Array, weights: jax.Array) -> jax.Array:
    """hidden [B,T,D], weights float32[B,T] (rows sum to 1 or 0) -> float32[B,D]."""
    h = jnp.where(weights[:, :, None] > 0, hidden.astype(jnp.float32), 0.0)
    return jnp.einsum("bt,btd->bd", weights, h)


# ----------------------------------------------------------------------------------- collection loop


def _tokenize_all(tokenizer: Any, documents: Sequence[str], chat: bool, max_length: int) -> list[TokenizedDocument]:
    return [tokenize_document(tokenizer, d, chat=chat, max_length=max_length) for d in documents]


def collect_pairs(source_fn: HiddenFn, target_fn: HiddenFn, source_tokenizer: Any, target_tokenizer: Any,
                  documents: Sequence[str], *, consumer: Consumer, pairing: str = "offsets",
                  skip_first: int = DEFAULT_SKIP_FIRST, batch_size: int = 8,
                  buckets: Sequence[int] = DEFAULT_BUCKETS, max_length: int | None = None,
                  chat_source: bool = False, chat_target: bool = False,
                  fold_of_doc: Sequence[int] | np.ndarray | None = None, mesh=None,
                  progress: bool = True) -> dict[str, Any]:
    """Run both models over `documents` and feed paired hidden states to `consumer`, batch by batch.

    source_fn / target_fn: jitted (tokens int32[B,T], positions int32[B,T], valid bool[B,T]) -> [B,T,D]
    (crossmap.models.make_hidden_fn).  Every batch has `batch_size` rows and one bucket length T, the
    smallest bucket that holds both tokenisations of each of its documents.

    consumer(x, y, mask, fold, info) is called once per batch with
      x [P, D_source], y [P, D_target]  paired hidden states (device arrays; rows where mask is False are 0)
      mask bool[P]; fold: the batch's fold (batches never mix folds)
      info: numpy arrays per pair row "pair_doc" (document index, -1 padding), "pair_fold",
            "pair_end" (character end in the document; -1 for pairing="mean"), "pair_source_pos",
            "pair_target_pos" (-1 for "mean"), plus "doc_ids" [B] (-1 padding rows), "batch", "n_pairs".
    P = batch_size * T for "offsets", batch_size for "last" / "mean" (one pair per
    document; "mean" averages each model's usable positions separately, in float32).

    Returns a summary: n_documents, n_batches, n_pairs, kept_per_document (pairs per document, input
    order), tokens_source / tokens_target (tokens run, after truncation), document_tokens_* (usable
    positions), unpaired_source / unpaired_target (usable positions in no pair), truncated_documents,
    seconds, pairs_per_second.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"collect_pairs: pairing must be one of {PAIRINGS}, got {pairing!r}")
    if batch_size < 1 or skip_first < 0:
        raise ValueError(f"collect_pairs: need batch_size >= 1 and skip_first >= 0, got {batch_size}, {skip_first}")
    n_docs = len(documents)
    if n_docs == 0:
        raise ValueError("collect_pairs: no documents")
    buckets, max_length = _check_buckets(buckets, max_length)
    folds = np.zeros(n_docs, np.int32) if fold_of_doc is None else np.asarray(fold_of_doc, np.int32)
    if folds.shape != (n_docs,):
        raise ValueError(f"collect_pairs: fold_of_doc has shape {folds.shape}, expected ({n_docs},)")

    src_docs = _tokenize_all(source_tokenizer, documents, chat_source, max_length)
    tgt_docs = _tokenize_all(target_tokenizer, documents, chat_target, max_length)
    # One bucket per document for both models: tokenisations have similar lengths, and a shared length
    # fragments the batches less (fold x bucket groups) and compiles fewer shapes.
    keys = [(int(folds[i]), bucket_length(max(len(src_docs[i]), len(tgt_docs[i])), buckets))
            for i in range(n_docs)]
    batches = plan_batches(keys, batch_size)

    kept = np.zeros(n_docs, np.int64)
    usable_src = usable_tgt = 0
    n_pairs_total = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_docs, unit="doc", desc=f"pairs ({pairing})", disable=not progress)
    tokens_run = 0
    for batch_index, doc_ids in enumerate(batches):
        fold, seq_len = keys[doc_ids[0]]
        rows = doc_ids + [-1] * (batch_size - len(doc_ids))
        row_src = [src_docs[i] if i >= 0 else None for i in rows]
        row_tgt = [tgt_docs[i] if i >= 0 else None for i in rows]
        hs = source_fn(*(_to_device(a, mesh) for a in pack_rows(row_src, seq_len)))
        ht = target_fn(*(_to_device(a, mesh) for a in pack_rows(row_tgt, seq_len)))

        pairs_per_row = seq_len if pairing == "offsets" else 1  # both sides are padded to one bucket
        shape = (batch_size, pairs_per_row)
        idx_src, idx_tgt = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        pos_src, pos_tgt = np.full(shape, -1, np.int32), np.full(shape, -1, np.int32)
        pair_end, pair_doc = np.full(shape, -1, np.int32), np.full(shape, -1, np.int32)
        mask = np.zeros(shape, bool)
        w_src = np.zeros((batch_size, seq_len), np.float32)
        w_tgt = np.zeros((batch_size, seq_len), np.float32)
        for row, doc in enumerate(rows):
            if doc < 0:
                continue
            s_use, t_use = usable_positions(src_docs[doc], skip_first), usable_positions(tgt_docs[doc], skip_first)
            usable_src += len(s_use)
            usable_tgt += len(t_use)
            if pairing == "mean":
                if len(s_use) and len(t_use):
                    w_src[row, s_use] = 1.0 / len(s_use)
                    w_tgt[row, t_use] = 1.0 / len(t_use)
                    mask[row, 0], pair_doc[row, 0] = True, doc
                    kept[doc] = 1
                continue
            p_src, p_tgt = pair_positions(src_docs[doc], tgt_docs[doc], pairing, skip_first)
            n = len(p_src)
            idx_src[row, :n], idx_tgt[row, :n] = p_src, p_tgt
            pos_src[row, :n], pos_tgt[row, :n] = p_src, p_tgt
            pair_end[row, :n] = src_docs[doc].ends[p_src]
            pair_doc[row, :n] = doc
            mask[row, :n] = True
            kept[doc] = n

        mask_dev = _to_device(mask, mesh)
        if pairing == "mean":
            x = _masked_mean(hs, _to_device(w_src, mesh))
            y = _masked_mean(ht, _to_device(w_tgt, mesh))
            mask_flat = mask_dev[:, 0]
        else:
            x = _gather_rows(hs, _to_device(idx_src, mesh), mask_dev)
            y = _gather_rows(ht, _to_device(idx_tgt, mesh), mask_dev)
            mask_flat = mask_dev.reshape(-1)
        n_batch_pairs = int(mask.sum())
        info = {
            "batch": batch_index,
            "doc_ids": np.asarray(rows, np.int32),
            "pair_doc": pair_doc.reshape(-1),
            "pair_fold": np.where(pair_doc.reshape(-1) >= 0, fold, -1).astype(np.int32),
            "pair_end": pair_end.reshape(-1),
            "pair_source_pos": pos_src.reshape(-1),
            "pair_target_pos": pos_tgt.reshape(-1),
            "n_pairs": n_batch_pairs,
        }
        consumer(x, y, mask_flat, fold, info)
        n_pairs_total += n_batch_pairs
        tokens_run += sum(len(src_docs[i]) + len(tgt_docs[i]) for i in doc_ids)
        elapsed = time.perf_counter() - t0
        bar.update(len(doc_ids))
        bar.set_postfix(pairs=n_pairs_total, tok_s=f"{tokens_run / max(elapsed, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    paired_positions = int(kept.sum()) if pairing == "offsets" else None
    return {
        "pairing": pairing,
        "skip_first": skip_first,
        "n_documents": n_docs,
        "n_batches": len(batches),
        "n_pairs": n_pairs_total,
        "kept_per_document": kept.tolist(),
        "tokens_source": sum(len(d) for d in src_docs),
        "tokens_target": sum(len(d) for d in tgt_docs),
        "document_tokens_source": usable_src,
        "document_tokens_target": usable_tgt,
        "unpaired_source": usable_src - paired_positions if paired_positions is not None else None,
        "unpaired_target": usable_tgt - paired_positions if paired_positions is not None else None,
        "truncated_documents": sum(d.truncated or e.truncated for d, e in zip(src_docs, tgt_docs, strict=True)),
        "seconds": seconds,
        "pairs_per_second": n_pairs_total / max(seconds, 1e-9),
    }


class HostPairCollector:
    """A `collect_pairs` consumer that keeps the valid pairs on the host (for SAE work and evaluation).

    After the run, `arrays()` gives x [N, D_source], y [N, D_target] and per pair doc, fold, end,
    source_pos, target_pos, in batch order.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                                    ("x", "y", "doc", "fold", "end", "source_pos", "target_pos")}

    def __call__(self, x, y, mask, fold, info) -> None:
        keep = to_host(mask)
        self._parts["x"].append(to_host(x)[keep])
        self._parts["y"].append(to_host(y)[keep])
        for key, info_key in (("doc", "pair_doc"), ("fold", "pair_fold"), ("end", "pair_end"),
                              ("source_pos", "pair_source_pos"), ("target_pos", "pair_target_pos")):
            self._parts[key].append(info[info_key][keep])

    def arrays(self) -> dict[str, np.ndarray]:
        if not self._parts["x"]:
            raise ValueError("HostPairCollector: no batches were collected")
        return {k: np.concatenate(v) for k, v in self._parts.items()}


class ActivationBatch(NamedTuple):
    """Hidden states of the usable positions of one batch, on the host."""

    acts: np.ndarray  # [n, D]
    doc_ids: np.ndarray  # int32[n] index into the documents
    positions: np.ndarray  # int32[n] token position in the document's sequence
    token_ids: np.ndarray  # int32[n]


def collect_activations(fn: HiddenFn, tokenizer: Any, documents: Sequence[str], *,
                        skip_first: int = DEFAULT_SKIP_FIRST, batch_size: int = 8,
                        buckets: Sequence[int] = DEFAULT_BUCKETS, max_length: int | None = None,
                        chat: bool = False, mesh=None, progress: bool = True) -> Iterator[ActivationBatch]:
    """Run one model over `documents` and yield the hidden states of usable positions, batch by batch.

    Usable positions are those `collect_pairs` could pair (document tokens at index >= skip_first), so
    statistics gathered here (SAE training, feature activations) match the paired data.  Batches are
    grouped by bucket length; `doc_ids` gives each row's document.
    """
    if not documents:
        raise ValueError("collect_activations: no documents")
    buckets, max_length = _check_buckets(buckets, max_length)
    docs = _tokenize_all(tokenizer, documents, chat, max_length)
    keys = [(bucket_length(len(d), buckets),) for d in docs]
    batches = plan_batches(keys, batch_size)
    bar = tqdm(total=len(documents), unit="doc", desc="activations", disable=not progress)
    t0, n_tokens = time.perf_counter(), 0
    for doc_ids in batches:
        (seq_len,) = keys[doc_ids[0]]
        rows = [docs[i] for i in doc_ids] + [None] * (batch_size - len(doc_ids))
        tokens, positions, valid = pack_rows(rows, seq_len)
        hidden = fn(*(_to_device(a, mesh) for a in (tokens, positions, valid)))
        use = np.zeros((batch_size, seq_len), bool)
        doc_of_row = np.full(batch_size, -1, np.int32)
        for row, i in enumerate(doc_ids):
            use[row, usable_positions(docs[i], skip_first)] = True
            doc_of_row[row] = i
        rr, tt = np.nonzero(use)
        acts = to_host(hidden)[rr, tt]
        n_tokens += len(rr)
        bar.update(len(doc_ids))
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        yield ActivationBatch(acts, doc_of_row[rr], tt.astype(np.int32), tokens[rr, tt])
    bar.close()
