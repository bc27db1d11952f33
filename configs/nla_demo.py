"""NLA pairs (AV + AR) for the embedded demo's two models, trained by crossmap from the shipped corpus.

    crossmap train-nla --config configs/nla_demo.py:qwen     # Qwen2.5-Coder-0.5B-Instruct, block 12
    crossmap train-nla --config configs/nla_demo.py:gemma    # Gemma-3-270M (base: raw prompt with BOS), block 9

A GPU run (BENCHMARKS.md has the times); on a CPU it works but takes hours.  LoRA rank 8 on every
attention and MLP projection, so the adapters of all four models stay small enough to ship in the
repository.  Explanation targets are `snippets` (see crossmap/nla/train_data.py for what they teach).
Override any field: --config.rl.steps=0, --config.model.path=/tmp/qwen.gguf, ...
"""

from crossmap.nla.train_config import base_train_config

MODELS = {
    "qwen": ("shipped:qwen2.5-coder-0.5b-instruct", 12),
    "gemma": ("shipped:gemma-3-270m", 9),
}


def get_config(which: str = "qwen"):
    if which not in MODELS:
        raise ValueError(f"configs/nla_demo.py: choose one of {sorted(MODELS)} (as configs/nla_demo.py:NAME), "
                         f"got {which!r}")
    c = base_train_config()
    c.name = f"demo-{which}"
    c.model.path, c.model.layer = MODELS[which]
    c.corpus.max_documents = 3000
    c.corpus.positions_per_doc = 10
    c.corpus.max_length = 128
    c.corpus.buckets = (64, 128)
    c.corpus.batch_size = 64
    c.finetune.mode = "lora"
    c.finetune.rank = 8
    c.finetune.alpha = 16.0
    for phase in ("av_sft", "ar_sft"):
        c[phase].steps = 600
        c[phase].batch_size = 32
        c[phase].lr = 5e-4
        c[phase].warmup_steps = 30
    c.ar_sft.head_lr = 2e-3
    c.rl.steps = 100
    c.rl.batch_size = 8
    c.rl.group_size = 4
    c.rl.lr = 5e-5
    c.rl.kl_coef = 0.05
    c.nla.response_tokens = 64
    c.nla.ar_tokens = 96
    c.eval.max_examples = 256
    c.eval.batch_size = 64
    c.checkpoint_every = 100
    c.log_every = 20
    return c
