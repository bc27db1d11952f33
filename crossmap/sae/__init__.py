"""Sparse autoencoders: read public formats, train TopK SAEs, describe features, map directions.

    core        `SAE` (one pytree normal form), encode / encode_selected / decode / decoder_directions, evaluate_sae
    io          load_sae (SAE-Lens, Gemma Scope 1/2, sparsify; width + layer checks), save_sae_lens
    train       train_sae (TopK + AuxK, unit-norm decoder, sharded, orbax-resumable), ArrayBatches
    stats       feature_stats (frequency, max / mean activation, streaming top-k contexts),
                feature_contexts / format_context, select_features
    directions  map_directions (x @ W, rescaled), random_directions, control_directions
"""

from crossmap.sae.core import SAE, decode, decoder_directions, encode, encode_selected, evaluate_sae, make_sae
from crossmap.sae.directions import (
    CONTROL_MODES,
    MAPPING_SCALES,
    control_directions,
    map_directions,
    random_directions,
)
from crossmap.sae.io import detect_format, load_sae, parse_hook, save_sae_lens
from crossmap.sae.stats import (
    SELECTION_METHODS,
    FeatureStats,
    feature_contexts,
    feature_stats,
    format_context,
    merge_top_k,
    select_features,
)
from crossmap.sae.train import ArrayBatches, SAETrainConfig, default_lr, train_sae

__all__ = [
    "SAE", "make_sae", "encode", "encode_selected", "decode", "decoder_directions", "evaluate_sae",
    "load_sae", "save_sae_lens", "detect_format", "parse_hook",
    "train_sae", "ArrayBatches", "SAETrainConfig", "default_lr",
    "FeatureStats", "feature_stats", "feature_contexts", "format_context", "merge_top_k", "select_features",
    "map_directions", "random_directions", "control_directions", "MAPPING_SCALES", "CONTROL_MODES",
    "SELECTION_METHODS",
]
