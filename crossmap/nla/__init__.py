"""The released Natural Language Autoencoders: verbalizers (AV, vector -> text) and reconstructors (AR,
text -> vector), run exactly as their published contract says.

    meta.py           `nla_meta.yaml`: read, checked field by field, checked against the live tokenizer
    verbalizer.py     an AV as a crossmap `Verbalizer` (`load_nla_verbalizer`, `nla_verbalizer_spec`)
    reconstructor.py  an AR: truncated backbone + value head, batched and jitted (`Reconstructor`),
                      and the release's score (`round_trip_cosine`, MSE = 2 (1 - cos))
    explain.py        explaining vectors from a file into resumable JSONL (`crossmap explain`)
    adapted.py        NLAs stored as LoRA adapters over a base model, and the pairs crossmap ships
                      (`shipped_nla("gemma-3-270m-L9-av")`, `shipped_nla_names()`)

Training a new pair (`crossmap train-nla`; imported on demand, `from crossmap.nla.train import train_nla`):

    train_data.py     activations at positions of a corpus, contexts, the document split, explanation targets
    objectives.py     the AV and AR SFT losses, GRPO's advantages, KL and loss (pure functions)
    lora.py           low-rank adapters as a pytree; merging; PEFT-layout adapter files
    train_config.py   every field of a training config, its default and its checks
    train.py          the learner (jitted step, accumulation, NaN refusal), the resumable phases, evaluation
                      on held-out vectors with baselines, and export in the release layout
"""

from .adapted import shipped_nla, shipped_nla_names
from .explain import explain_to_jsonl, explain_vectors, read_vectors
from .meta import (
    NLA_ROLES,
    RELEASE_MAX_NEW_TOKENS,
    RELEASE_TEMPERATURE,
    SIDECAR_NAME,
    NLAMeta,
    check_marker_token,
    read_nla_meta,
)
from .reconstructor import Reconstructor, read_value_head, round_trip_cosine, round_trip_mse
from .verbalizer import NLAVerbalizer, load_nla_verbalizer, nla_verbalizer_spec

__all__ = ["NLA_ROLES", "RELEASE_MAX_NEW_TOKENS", "RELEASE_TEMPERATURE", "SIDECAR_NAME", "NLAMeta",
           "check_marker_token", "read_nla_meta", "Reconstructor", "read_value_head", "round_trip_cosine",
           "round_trip_mse", "NLAVerbalizer", "load_nla_verbalizer", "nla_verbalizer_spec", "explain_to_jsonl",
           "explain_vectors", "read_vectors", "shipped_nla", "shipped_nla_names"]
