"""Activations of two models over one corpus, paired where both have read the same text.

    corpus   documents from .txt / .jsonl files (the shipped corpus by default); folds by document
    pairing  tokenisation with character offsets, cross-tokenizer pairing, bucketed batches and the
             collection loop that hands paired hidden states to a consumer (ridge statistics, host
             collection)
"""

from .corpus import CORPUS_SPLITS, CORPUS_SUFFIXES, assign_folds, default_corpus_path, read_corpus
from .pairing import (
    DEFAULT_BUCKETS,
    DEFAULT_SKIP_FIRST,
    PAIRINGS,
    ActivationBatch,
    Consumer,
    FormattedDocument,
    HiddenFn,
    HostPairCollector,
    TokenizedDocument,
    bucket_length,
    collect_activations,
    collect_pairs,
    format_document,
    pack_rows,
    pair_positions,
    plan_batches,
    tokenize_document,
    tokenize_with_offsets,
    usable_positions,
)

__all__ = ["CORPUS_SPLITS", "CORPUS_SUFFIXES", "DEFAULT_BUCKETS", "DEFAULT_SKIP_FIRST", "PAIRINGS", "ActivationBatch",
           "Consumer", "FormattedDocument", "HiddenFn", "HostPairCollector", "TokenizedDocument", "assign_folds",
           "bucket_length", "collect_activations", "collect_pairs", "default_corpus_path", "format_document",
           "pack_rows", "pair_positions", "plan_batches", "read_corpus", "tokenize_document", "tokenize_with_offsets",
           "usable_positions"]
