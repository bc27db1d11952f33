"""A released NLA verbalizer (AV) as a crossmap `Verbalizer`: the sidecar's prompt, marker and norm.

    av = load_nla_verbalizer("/ckpt/nla-qwen2.5-7b-L20-av", dtype="bfloat16", mesh=mesh)
    explanations = av.verbalizer.explain(vectors, n_samples=4)

What the release prescribes and crossmap does: the sidecar's `prompt_templates.av` with the marker
character filled in, as one user message through the chat template with the generation prompt,
tokenised in one step (no second BOS); the marker found by its token id with both neighbour ids
checked; the vector rescaled to the sidecar's `injection_scale` (norm in float32) and written over
that input-embedding row, after Gemma's sqrt(d) embedding multiply; 200 new tokens at temperature
0.7, special tokens kept in the text, `<explanation>...</explanation>` parsed, a missing closing tag
counted as truncation.  An AV crossmap trained on a base model without a chat template says
`av_render: raw` in its sidecar: the same text, tokenised raw with BOS (see `meta`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from jax.sharding import Mesh

from ..models import LoadedModel, load_model
from ..verbalize import Verbalizer, VerbalizerSpec
from .adapted import is_adapted, load_adapted
from .meta import (
    RELEASE_MAX_NEW_TOKENS,
    RELEASE_TEMPERATURE,
    NLAMeta,
    check_marker_token,
    check_model_width,
    read_nla_meta,
)


def nla_verbalizer_spec(meta: NLAMeta, **overrides) -> VerbalizerSpec:
    """The VerbalizerSpec an AV sidecar prescribes (any field can be overridden, at the user's risk)."""
    if meta.role != "av":
        raise ValueError(f"{meta.path}: role {meta.role!r} is not a verbalizer's (av)")
    spec = VerbalizerSpec(
        injection_token=meta.injection_char, injection_token_id=meta.injection_token_id,
        injection_neighbor_ids=(meta.injection_left_neighbor_id, meta.injection_right_neighbor_id),
        prompt_template=meta.av_prompt(), use_chat_template=meta.av_render == "chat",
        add_special_tokens=True if meta.av_render == "raw" else None, d_model=meta.d_model, scale_policy="fixed",
        injection_scale=meta.injection_scale, injection_mode="replace", injection_layer=0,
        max_new_tokens=RELEASE_MAX_NEW_TOKENS, temperature=RELEASE_TEMPERATURE, top_p=1.0,
        skip_special_tokens=False, source=str(meta.path), extra={"provenance": dict(meta.provenance)})
    return spec.replace(**overrides) if overrides else spec


@dataclass
class NLAVerbalizer:
    verbalizer: Verbalizer
    model: LoadedModel
    meta: NLAMeta


def load_nla_verbalizer(checkpoint: str | os.PathLike, *, dtype: str = "bfloat16", mesh: Mesh | None = None,
                        rules: dict | None = None, spec_overrides: dict | None = None) -> NLAVerbalizer:
    """Read and check the sidecar (before any weight is read), load the AV, check the sidecar against the
    live tokenizer and model, and build its prompt (which checks the injection slot)."""
    meta = read_nla_meta(checkpoint, role="av")
    if is_adapted(checkpoint):  # LoRA adapters over a base model, hashes checked (see `adapted`)
        lm = load_adapted(checkpoint, role="av", layer=None, dtype=dtype, mesh=mesh, rules=rules)
    else:
        lm = load_model(checkpoint, dtype=dtype, mesh=mesh, rules=rules)
    check_model_width(meta, lm.config.d_model, f"the model in {checkpoint} (config.json hidden_size)")
    check_marker_token(meta, lm.tokenizer)
    spec = nla_verbalizer_spec(meta, **(spec_overrides or {}))
    return NLAVerbalizer(Verbalizer(lm.model, lm.tokenizer, spec, mesh=mesh, rules=rules), lm, meta)
