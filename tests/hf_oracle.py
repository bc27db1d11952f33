"""Build transformers' PyTorch models (the oracle) for crossmap ModelConfigs."""

from __future__ import annotations

import numpy as np

from crossmap.models import ModelConfig


def hf_config_dict(cfg: ModelConfig) -> dict:
    d = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": 512, "attention_dropout": 0.0,
    }
    if cfg.model_type == "gemma3_text":
        d.update(model_type="gemma3_text", sliding_window=cfg.sliding_window,
                 layer_types=["sliding_attention" if t == "sliding" else "full_attention" for t in cfg.layer_types],
                 query_pre_attn_scalar=cfg.query_pre_attn_scalar, hidden_activation="gelu_pytorch_tanh",
                 rope_parameters={
                     "full_attention": {"rope_type": "linear", "factor": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
                     if cfg.rope_scaling != 1.0 else {"rope_type": "default", "rope_theta": cfg.rope_theta},
                     "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}})
    else:
        d.update(model_type=cfg.model_type, rope_theta=cfg.rope_theta, hidden_act="silu")
        if cfg.model_type == "llama":
            d["attention_bias"] = cfg.qkv_bias
    return d


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
