"""Tiny random models with small trained tokenizers (two different ones): the whole pipeline in
well under a minute, for tests.  Numbers from it mean nothing."""

from crossmap.pipeline import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.models.source.path = "tiny:qwen2"
    c.models.source.layer = 2
    c.models.target.path = "tiny:gemma3_text"
    c.models.target.layer = 4
    c.corpus.max_documents = 120
    c.corpus.max_length = 64
    c.corpus.buckets = (32, 64)
    c.corpus.batch_size = 16
    c.ridge.folds = 3
    c.ridge.lambdas = (0.1, 10.0, 1000.0)
    c.ridge.keep_pairs = 20_000
    c.sae.n_features = 256
    c.sae.k = 8
    c.sae.steps = 60
    c.sae.batch_size = 256
    c.features.n = 6
    c.features.min_freq = 0.0
    c.features.max_freq = 1.0
    c.controls.n = 6
    c.verbalizers.source.prompt = "chat"
    c.verbalizers.target.prompt = "base"
    for side in ("source", "target"):
        c.verbalizers[side].max_new_tokens = 6
        c.verbalizers[side].batch_size = 8
    c.washout.n_backgrounds = 2
    c.evaluate.n_permutations = 500
    c.evaluate.n_bootstrap = 500
    c.evaluate.context_k = 10
    return c
