"""Qwen2 / Qwen2.5: the llama block plus biases on q, k and v."""

from __future__ import annotations

import numpy as np

from . import llama
from .config import ModelConfig

MODEL_TYPES = ("qwen2",)
GGUF_ARCH = "qwen2"
NORM_NAMES = llama.NORM_NAMES


def config_from_hf(hf: dict, name: str = "", **overrides) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise NotImplementedError(f"{name}: Qwen2 use_sliding_window=True is not supported (Qwen2.5 ships it off)")
    return llama.config_from_hf(hf, name, qkv_bias=True, **overrides)


def hf_config_from_gguf(meta: dict) -> dict:
    return llama.hf_config_from_gguf(meta, GGUF_ARCH)


def fix_gguf_tensor(hf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return w  # llama.cpp stores qwen2 q/k unpermuted
