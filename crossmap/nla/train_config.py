"""Every field of an NLA training run (`crossmap train-nla --config configs/nla_*.py`), its default, and
the checks made before any model loads.  Allowed values live beside the code that acts on them."""

from __future__ import annotations

import ml_collections

from ..activations.corpus import default_corpus_path
from .lora import PROJECTIONS
from .objectives import REWARDS
from .train_data import DEFAULT_SPLIT_FRACTIONS, SPLITS, TARGET_SOURCES

FINETUNE_MODES = ("lora", "full")
COMPUTE_DTYPES = ("bfloat16", "float32")


def _phase(steps: int, lr: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "steps": steps, "lr": lr, "warmup_steps": 10, "batch_size": 16, "grad_accum": 1, "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    })


def base_train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "nla"
    c.run_dir = ""  # default: checkpoints/nla-<name>
    c.seed = 0
    c.model = ml_collections.ConfigDict({"path": "", "layer": 0})
    c.corpus = ml_collections.ConfigDict({
        "path": str(default_corpus_path()), "max_documents": 0, "max_length": 128, "buckets": (64, 128),
        "batch_size": 16, "positions_per_doc": 10, "split_fractions": DEFAULT_SPLIT_FRACTIONS,
        "context_tokens": 16, "tail_tokens": 4,
    })
    c.targets = ml_collections.ConfigDict({
        "source": "snippets",  # TARGET_SOURCES
        "generator": "",  # an instruct checkpoint for source="generated" ("" = the base model itself)
        "max_new_tokens": 32,
    })
    c.nla = ml_collections.ConfigDict({
        "injection_scale": 0.0,  # 0: the mean norm of the collected activations (the release's rule)
        "response_tokens": 64,  # AV target / rollout length; longer SFT targets are trimmed inside their tags
        "ar_tokens": 96,  # AR prompt length (longer explanations are cut before the template's suffix)
    })
    c.finetune = ml_collections.ConfigDict({
        "mode": "lora", "rank": 16, "alpha": 32.0, "targets": tuple(PROJECTIONS),
        "compute_dtype": "bfloat16",  # master weights stay float32
    })
    c.av_sft = _phase(200, 2e-4)
    c.ar_sft = _phase(200, 2e-4)
    c.ar_sft.head_lr = 1e-3
    c.rl = _phase(0, 2e-5)
    c.rl.update(dict(batch_size=8, group_size=4, kl_coef=0.05, temperature=1.0, reward="neg_mse", train_ar=True))
    c.eval = ml_collections.ConfigDict({"max_examples": 128, "temperature": 0.0, "batch_size": 32,
                                        "constant_explanation": "a word in a sentence", "self_verbalizer": True})
    c.checkpoint_every = 50
    c.log_every = 10
    c.export_dtype = "bfloat16"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.lock()
    return c


def validate_train_config(c: ml_collections.ConfigDict) -> None:
    """Every problem at once, each naming its field."""
    problems: list[str] = []

    def one_of(field: str, value, allowed: tuple) -> None:
        if value not in allowed:
            problems.append(f"{field}={value!r}: expected one of {allowed}")

    def positive(field: str, value, zero_ok: bool = False) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not zero_ok):
            problems.append(f"{field}={value!r}: must be {'>= 0' if zero_ok else '> 0'}")

    if not c.model.path:
        problems.append("model.path is empty: name the base checkpoint (a directory, a .gguf or shipped:<name>)")
    if not isinstance(c.model.layer, int) or c.model.layer < 0:
        problems.append(f"model.layer={c.model.layer!r}: must be a block index >= 0")
    one_of("targets.source", c.targets.source, TARGET_SOURCES)
    one_of("finetune.mode", c.finetune.mode, FINETUNE_MODES)
    one_of("finetune.compute_dtype", c.finetune.compute_dtype, COMPUTE_DTYPES)
    one_of("rl.reward", c.rl.reward, REWARDS)
    unknown = set(c.finetune.targets) - set(PROJECTIONS)
    if unknown:
        problems.append(f"finetune.targets has {sorted(unknown)}; choose from {tuple(PROJECTIONS)}")
    fractions = tuple(c.corpus.split_fractions)
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        problems.append(f"corpus.split_fractions={fractions}: {len(SPLITS)} fractions for {SPLITS}, summing to 1")
    for field in ("corpus.positions_per_doc", "corpus.batch_size", "corpus.max_length", "nla.response_tokens",
                  "nla.ar_tokens", "finetune.rank", "checkpoint_every", "log_every", "eval.max_examples"):
        section, name = field.split(".") if "." in field else (None, field)
        positive(field, c[section][name] if section else c[name])
    positive("nla.injection_scale", c.nla.injection_scale, zero_ok=True)
    for phase in ("av_sft", "ar_sft", "rl"):
        p = c[phase]
        positive(f"{phase}.steps", p.steps, zero_ok=True)
        for name in ("lr", "batch_size", "grad_accum"):
            positive(f"{phase}.{name}", p[name])
    if c.rl.steps and (c.rl.group_size < 2):
        problems.append(f"rl.group_size={c.rl.group_size}: GRPO needs at least 2 samples per vector")
    if c.rl.steps and c.rl.temperature <= 0:
        problems.append(f"rl.temperature={c.rl.temperature}: rollouts must be sampled (> 0)")
    if problems:
        raise ValueError("invalid NLA training config:\n  " + "\n  ".join(problems))
