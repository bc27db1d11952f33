"""Llama (and SmolLM2): the plain pre-norm block; no qkv bias, SiLU MLP, one RoPE base."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, token_ids, token_ids_to_hf

MODEL_TYPES = ("llama",)
GGUF_ARCH = "llama"
ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # config.json "architectures"

# HF norm name -> our module path inside a block
NORM_NAMES = {"input_layernorm": "input_norm", "post_attention_layernorm": "pre_mlp_norm"}


def config_from_hf(hf: dict, name: str = "", **overrides) -> ModelConfig:
    """ModelConfig from a HF config.json dict of a llama-family decoder."""
    n_heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    llama3 = None
    if rope_type == "llama3":
        try:
            llama3 = (float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                      int(scaling["original_max_position_embeddings"]))
        except KeyError as err:
            raise ValueError(f"{name}: llama3 RoPE scaling {scaling} lacks {err}") from None
        if scaling.get("attention_factor") not in (None, 1, 1.0):
            raise NotImplementedError(f"{name}: llama3 RoPE scaling with attention_factor "
                                      f"{scaling['attention_factor']} is not implemented")
    elif rope_type not in ("default", None):
        raise NotImplementedError(f"{name}: RoPE scaling {scaling} is not supported for llama-family ports "
                                  "(default and llama3 are)")
    if hf.get("model_type") == "llama":
        for flag, what in (("attention_bias", "biases on q, k, v and o"), ("mlp_bias", "biases in the MLP")):
            if hf.get(flag):
                raise NotImplementedError(f"{name}: {flag}=True ({what}) is not implemented by the llama port")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    kw = dict(
        model_type=hf["model_type"], vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        rms_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        qkv_bias=False, rope_llama3=llama3, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"), max_position_embeddings=hf.get("max_position_embeddings", 32768),
        name=name,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json dict of `cfg` (the inverse of `config_from_hf`)."""
    hf = {
        "model_type": cfg.model_type, "architectures": [ARCHITECTURE_CLASSES[cfg.model_type]],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": token_ids_to_hf(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id,
    }
    if cfg.rope_llama3 is not None:
        factor, low, high, original = cfg.rope_llama3
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                              "high_freq_factor": high, "original_max_position_embeddings": original}
    if cfg.model_type == "llama":
        if cfg.qkv_bias:
            raise NotImplementedError(f"{cfg.name}: a llama config.json cannot say q, k, v biases without o (qwen2 can)")
        hf["attention_bias"] = False
    return hf


def hf_config_from_gguf(meta: dict, arch: str = GGUF_ARCH) -> dict:
    """HF-style config.json dict from GGUF metadata (keys `<arch>.block_count` etc.)."""
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_heads = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    return {
        "model_type": arch, "hidden_size": d_model, "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "head_dim": int(g("attention.key_length", d_model // n_heads)),
        "intermediate_size": int(g("feed_forward_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10_000.0)),
        "max_position_embeddings": int(g("context_length", 32768)),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def fix_gguf_tensor(hf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """llama.cpp permutes q/k rows for its interleaved RoPE; undo it to HF's rotate-half layout."""
    for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
        if hf_name.endswith(f"self_attn.{proj}.weight"):
            d_in = w.shape[-1]
            return w.reshape(heads, cfg.head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(w.shape)
    return w
