"""Explain vectors in words: generation with injected vectors, NLA verbalizers, self-verbalizers.

    engine.py      batched prefill + jitted while-loop decode with a preallocated KV cache
                   (`generate`, `Injection`, `GenerationResult`); a prompt prefix
                   that every row shares is prefilled once
    spec.py        the verbalizer contract (`VerbalizerSpec`), self-verbalizer presets, prompt
                   rendering and marker location (by characters, or by pinned token id and neighbours)
    verbalizer.py  `Verbalizer.explain` (scaling, samples, background washout, parsing)
"""

from .engine import (
    INJECTION_MODES,
    GenerationResult,
    Injection,
    generate,
    sample_nucleus,
    shared_prefix_length,
    top_p_filter,
)
from .spec import (
    SCALE_POLICIES,
    SELF_PROMPTS,
    VERBALIZER_KINDS,
    Prompt,
    VerbalizerSpec,
    build_prompt,
    self_verbalizer_spec,
)
from .verbalizer import Explanation, Verbalizer, WashoutConfig, explain, mean_embedding_norm

__all__ = ["INJECTION_MODES", "SCALE_POLICIES", "SELF_PROMPTS", "VERBALIZER_KINDS", "GenerationResult", "Injection", "generate", "sample_nucleus", "shared_prefix_length", "top_p_filter", "VerbalizerSpec", "Prompt", "build_prompt",
           "self_verbalizer_spec", "Explanation", "Verbalizer", "WashoutConfig", "explain", "mean_embedding_norm"]
