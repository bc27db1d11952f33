"""Gemma 3 text decoder: (1+w) RMSNorms, sqrt(d) embedding scale, q/k norms, sandwich norms,
gelu-tanh MLP, query_pre_attn_scalar, 5 sliding-window layers to 1 global, separate RoPE bases
for local and global layers with linear scaling on global ones, tied embeddings."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, token_ids, token_ids_to_hf
from .llama import hf_config_from_gguf as common_hf_config_from_gguf

MODEL_TYPES = ("gemma3_text", "gemma3")  # "gemma3": the multimodal checkpoint's text tower
GGUF_ARCH = "gemma3"
NORM_NAMES = {
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "pre_mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
}


def _layer_types(hf: dict, n_layers: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple("sliding" if t == "sliding_attention" else "full" for t in hf["layer_types"])
    pattern = hf.get("sliding_window_pattern", 6)
    return tuple("sliding" if (i + 1) % pattern else "full" for i in range(n_layers))


def config_from_hf(hf: dict, name: str = "", **overrides) -> ModelConfig:
    if hf.get("model_type") == "gemma3":  # multimodal wrapper: the decoder is in text_config
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    for flag, what in (("use_bidirectional_attention", "bidirectional attention"),
                       ("attention_bias", "biases on q, k, v and o")):
        if hf.get(flag):
            raise NotImplementedError(f"{name}: {flag}=True ({what}) is not implemented by the Gemma 3 port")
    rope_params = hf.get("rope_parameters") or {}
    full = rope_params.get("full_attention") or {}
    local = rope_params.get("sliding_attention") or {}
    if local.get("rope_type", local.get("type", "default")) not in ("default", None):
        raise NotImplementedError(f"{name}: RoPE scaling on sliding-window layers ({local}) is not implemented by "
                                  "the Gemma 3 port (only linear scaling of the global layers)")
    scaling = hf.get("rope_scaling") or full
    factor = 1.0
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "linear":
        factor = float(scaling["factor"])
    elif scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise NotImplementedError(f"{name}: Gemma 3 RoPE scaling {scaling} is not supported (only linear)")
    n_layers = hf["num_hidden_layers"]
    d = hf.get("hidden_size", 2304)
    n_heads = hf.get("num_attention_heads", 8)
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise NotImplementedError(f"{name}: hidden_activation {act!r} is not supported")
    kw = dict(
        model_type="gemma3_text", vocab_size=hf.get("vocab_size", 262_208), d_model=d, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads", 4), head_dim=hf.get("head_dim", 256),
        d_ff=hf.get("intermediate_size", 9216), rms_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta") or full.get("rope_theta", 1_000_000.0)),
        rope_local_theta=float(hf.get("rope_local_base_freq") or local.get("rope_theta", 10_000.0)),
        rope_scaling=factor, sliding_window=hf.get("sliding_window", 4096),
        layer_types=_layer_types(hf, n_layers), qkv_bias=False,
        qk_norm=True, norm_plus_one=True, sandwich_norms=True, embed_scale=True, activation="gelu_tanh",
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        bos_token_id=hf.get("bos_token_id", 2), eos_token_ids=token_ids(hf.get("eos_token_id", 1)),
        pad_token_id=hf.get("pad_token_id", 0), max_position_embeddings=hf.get("max_position_embeddings", 131072),
        name=name,
    )
    if hf.get("attn_logit_softcapping"):
        raise NotImplementedError(f"{name}: attn_logit_softcapping is not supported (Gemma 3 has none)")
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json dict of `cfg` (a text-only `gemma3_text` decoder)."""
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
        "rms_norm_eps": cfg.rms_eps, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"full_attention": full,
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
        "sliding_window": cfg.sliding_window,
        "layer_types": ["sliding_attention" if t == "sliding" else "full_attention" for t in cfg.layer_types],
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "final_logit_softcapping": cfg.final_logit_softcap,
        "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": token_ids_to_hf(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id,
    }


def hf_config_from_gguf(meta: dict) -> dict:
    hf = common_hf_config_from_gguf(meta, GGUF_ARCH)
    hf.update(model_type="gemma3_text", sliding_window=int(meta.get("gemma3.attention.sliding_window", 4096)),
              query_pre_attn_scalar=hf["head_dim"], rope_local_base_freq=10_000.0,
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    return hf


def fix_gguf_tensor(hf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """GGUF stores every Gemma RMSNorm weight as (1 + w): subtract 1 for HF's parameter."""
    if hf_name.endswith("norm.weight"):
        return w - 1.0
    return w
