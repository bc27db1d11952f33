"""Explain vectors in words: generation with injected vectors, NLA verbalisers, self-verbalisers.

    engine.py      batched prefill + jitted while-loop decode with a preallocated KV cache
                   (`generate`, `Injection`, `GenerationResult`)
    spec.py        the verbaliser contract (`VerbaliserSpec`), NLA sidecar loading, self-verbaliser
                   presets, prompt rendering and marker location
    verbaliser.py  `Verbaliser.explain` (scaling, samples, background washout, parsing)
"""

from .engine import GenerationResult, Injection, generate, top_p_filter
from .spec import (
    SIDECAR_ALIASES,
    SIDECAR_NAMES,
    Prompt,
    VerbaliserSpec,
    build_prompt,
    load_verbaliser_spec,
    self_verbaliser_spec,
    spec_from_sidecar,
)
from .verbaliser import Explanation, Verbaliser, WashoutConfig, explain, mean_embedding_norm

__all__ = ["GenerationResult", "Injection", "generate", "top_p_filter", "VerbaliserSpec", "Prompt", "build_prompt",
           "load_verbaliser_spec", "self_verbaliser_spec", "spec_from_sidecar", "SIDECAR_ALIASES", "SIDECAR_NAMES",
           "Explanation", "Verbaliser", "WashoutConfig", "explain", "mean_embedding_norm"]
