"""Build transformers' PyTorch models (the oracle) for crossmap ModelConfigs."""

from __future__ import annotations

import numpy as np

from crossmap.models import ModelConfig, hf_config


def hf_config_dict(cfg: ModelConfig) -> dict:
    """crossmap's own config.json form of `cfg` (models.hf_config), as transformers reads it."""
    return {**hf_config(cfg), "attention_dropout": 0.0, "max_position_embeddings": 512}


def build_hf_model(cfg: ModelConfig, seed: int = 0):
    """A transformers CausalLM for `cfg` with every parameter random (norm weights included)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "norm" in name else (1.0 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.05)
            if "embed" in name:
                scale = 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name and
                                                                    cfg.model_type != "gemma3_text" else 0.0))
    return model.eval()


def hf_forward(model, tokens: np.ndarray, positions: np.ndarray, valid: np.ndarray):
    """(hidden_states tuple as numpy, logits numpy) from the oracle."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(valid, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states], out.logits.numpy()
