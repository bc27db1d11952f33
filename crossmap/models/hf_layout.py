"""HF tensor names and shapes <-> crossmap parameter paths and layouts, for every ported architecture."""

from __future__ import annotations

from collections.abc import Callable

from .config import ModelConfig

# Prefixes under which multimodal checkpoints keep their text decoder
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_SKIP_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def hf_param_table(cfg: ModelConfig, norm_names: dict[str, str]) -> dict[str, tuple[tuple, Callable]]:
    """HF tensor name -> (path of our parameter, converter from HF layout to ours)."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same = lambda w: w
    table = {"model.embed_tokens.weight": (("embed",), same), "model.norm.weight": (("final_norm", "weight"), same)}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = (("lm_head",), lambda w: w.T)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        table.update({
            p + "self_attn.q_proj.weight": (("layers", i, "attn", "q"), lambda w: w.T.reshape(d, n, h)),
            p + "self_attn.k_proj.weight": (("layers", i, "attn", "k"), lambda w: w.T.reshape(d, k, h)),
            p + "self_attn.v_proj.weight": (("layers", i, "attn", "v"), lambda w: w.T.reshape(d, k, h)),
            p + "self_attn.o_proj.weight": (("layers", i, "attn", "o"), lambda w: w.T.reshape(n, h, d)),
            p + "mlp.gate_proj.weight": (("layers", i, "mlp", "gate"), lambda w: w.T),
            p + "mlp.up_proj.weight": (("layers", i, "mlp", "up"), lambda w: w.T),
            p + "mlp.down_proj.weight": (("layers", i, "mlp", "down"), lambda w: w.T),
        })
        if cfg.qkv_bias:
            table[p + "self_attn.q_proj.bias"] = (("layers", i, "attn", "q_bias"), lambda w: w.reshape(n, h))
            table[p + "self_attn.k_proj.bias"] = (("layers", i, "attn", "k_bias"), lambda w: w.reshape(k, h))
            table[p + "self_attn.v_proj.bias"] = (("layers", i, "attn", "v_bias"), lambda w: w.reshape(k, h))
        if cfg.qk_norm:
            table[p + "self_attn.q_norm.weight"] = (("layers", i, "attn", "q_norm", "weight"), same)
            table[p + "self_attn.k_norm.weight"] = (("layers", i, "attn", "k_norm", "weight"), same)
        for hf_norm, ours in norm_names.items():
            table[p + hf_norm + ".weight"] = (("layers", i, ours, "weight"), same)
    return table


def hf_shapes(cfg: ModelConfig, norm_names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> its shape in a HF checkpoint of this config (the names of `hf_param_table`)."""
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    by_suffix = {"q_proj.weight": (n * h, d), "k_proj.weight": (k * h, d), "v_proj.weight": (k * h, d),
                 "o_proj.weight": (d, n * h), "q_proj.bias": (n * h,), "k_proj.bias": (k * h,),
                 "v_proj.bias": (k * h,), "gate_proj.weight": (cfg.d_ff, d), "up_proj.weight": (cfg.d_ff, d),
                 "down_proj.weight": (d, cfg.d_ff), "q_norm.weight": (h,), "k_norm.weight": (h,)}
    top = {"model.embed_tokens.weight": (cfg.vocab_size, d), "lm_head.weight": (cfg.vocab_size, d)}
    shapes = {}
    for name in hf_param_table(cfg, norm_names):
        suffix = ".".join(name.rsplit(".", 2)[-2:])
        shapes[name] = top.get(name) or by_suffix.get(suffix) or (d,)  # the rest are d-wide norms
    return shapes


def canonical_hf_name(name: str) -> str | None:
    """Strip multimodal wrappers; None for tensors that are not part of the text decoder."""
    if name.startswith(_SKIP_PREFIXES):
        return None
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def to_hf_tensors(cfg: ModelConfig, norm_names: dict[str, str], params: dict) -> dict[str, object]:
    """Our parameters (a pure dict, as `nnx.to_pure_dict` gives) under their HF names and layouts:
    the inverse of `hf_param_table`'s converters (tested to round-trip)."""
    shapes = hf_shapes(cfg, norm_names)
    out = {}
    for name, (path, _) in hf_param_table(cfg, norm_names).items():
        node = params
        for part in path:
            node = node[part]
        shape = shapes[name]
        if name == "model.embed_tokens.weight" or len(shape) != 2:
            out[name] = node.reshape(shape)
        else:  # HF (out, in); ours (in..., out...)
            out[name] = node.reshape(shape[::-1]).T
    return out
