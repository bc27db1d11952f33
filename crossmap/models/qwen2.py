"""Qwen2 / Qwen2.5: the llama block plus biases on q, k and v."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .llama import NORM_NAMES as NORM_NAMES  # the same norms as llama
from .llama import config_from_hf as llama_config_from_hf
from .llama import hf_config as llama_hf_config
from .llama import hf_config_from_gguf as common_hf_config_from_gguf

MODEL_TYPES = ("qwen2",)
GGUF_ARCH = "qwen2"


def config_from_hf(hf: dict, name: str = "", **overrides) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise NotImplementedError(f"{name}: Qwen2 use_sliding_window=True is not supported (Qwen2.5 ships it off)")
    return llama_config_from_hf(hf, name, qkv_bias=True, **overrides)


def hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json dict of `cfg` (q, k, v biases are implied by the model type)."""
    return llama_hf_config(cfg)


def hf_config_from_gguf(meta: dict) -> dict:
    return common_hf_config_from_gguf(meta, GGUF_ARCH)


def fix_gguf_tensor(hf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w  # llama.cpp stores qwen2 q/k unpermuted
