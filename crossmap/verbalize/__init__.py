"""Explain vectors in words: generation with injected vectors, NLA verbalizers, self-verbalizers.

    engine.py      batched prefill + jitted while-loop decode with a preallocated KV cache
                   (`generate`, `Injection`, `GenerationResult`)
    spec.py        the verbalizer contract (`VerbalizerSpec`), NLA sidecar loading, self-verbalizer
                   presets, prompt rendering and marker location
    verbalizer.py  `Verbalizer.explain` (scaling, samples, background washout, parsing)
"""

from .engine import INJECTION_MODES, GenerationResult, Injection, generate, top_p_filter
from .spec import (
    SCALE_POLICIES,
    SELF_PROMPTS,
    SIDECAR_ALIASES,
    SIDECAR_NAMES,
    VERBALIZER_KINDS,
    Prompt,
    VerbalizerSpec,
    build_prompt,
    load_verbalizer_spec,
    self_verbalizer_spec,
    spec_from_sidecar,
)
from .verbalizer import Explanation, Verbalizer, WashoutConfig, explain, mean_embedding_norm

__all__ = ["INJECTION_MODES", "SCALE_POLICIES", "SELF_PROMPTS", "VERBALIZER_KINDS", "GenerationResult", "Injection", "generate", "top_p_filter", "VerbalizerSpec", "Prompt", "build_prompt",
           "load_verbalizer_spec", "self_verbalizer_spec", "spec_from_sidecar", "SIDECAR_ALIASES", "SIDECAR_NAMES",
           "Explanation", "Verbalizer", "WashoutConfig", "explain", "mean_embedding_norm"]
