"""Parity on REAL weights: the shipped SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct and
Gemma-3-270M, loaded from their GGUF by crossmap (gguf dequantisation, no torch) and by
transformers (its own GGUF loader) as the oracle."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis converts light into chemical energy.",
]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_real_weights_match_transformers(name, shipped_model):
    import torch
    from transformers import AutoModelForCausalLM

    lm, gguf_path = shipped_model(name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              dtype=torch.float32).eval()
    enc = [lm.tokenizer(t)["input_ids"] for t in TEXTS]
    total = max(map(len, enc))
    tokens = np.full((len(enc), total), lm.config.pad_token_id or 0, np.int32)
    valid = np.zeros_like(tokens, bool)
    for i, ids in enumerate(enc):  # right padding: a ragged batch
        tokens[i, :len(ids)] = ids
        valid[i, :len(ids)] = True
    positions = np.broadcast_to(np.arange(total, dtype=np.int32), tokens.shape)
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                 attention_mask=torch.as_tensor(valid, dtype=torch.long), output_hidden_states=True)
    logits = np.asarray(lm.model.logits(tokens, positions, valid))
    ref_logits = out.logits.numpy()
    # same top token at every real position
    assert (logits.argmax(-1)[valid] == ref_logits.argmax(-1)[valid]).all()
    assert np.abs(logits - ref_logits)[valid].max() / np.abs(ref_logits[valid]).max() < 1e-4
    for layer in (0, lm.config.n_layers // 2, lm.config.n_layers - 2):
        h = np.asarray(lm.model.hidden(tokens, positions, valid, layer=layer))[valid]
        ref = out.hidden_states[layer + 1].numpy()[valid]
        assert np.abs(h - ref).max() / np.abs(ref).max() < 1e-4, f"{name} layer {layer}"
