"""Which architecture file ports which checkpoint: `model_type` (config.json) or GGUF architecture name.

Each architecture file (llama.py, qwen2.py, gemma3.py) gives both directions between a HF
config.json dict and crossmap's `ModelConfig` (`config_from_hf`, `hf_config`), the names of its
norms, and its GGUF fix-ups; this module only dispatches to them.
"""

from __future__ import annotations

import types

import crossmap.models.gemma3 as gemma3
import crossmap.models.llama as llama
import crossmap.models.qwen2 as qwen2

from .config import ModelConfig

_MODULES = (llama, qwen2, gemma3)
ARCHITECTURES: dict[str, types.ModuleType] = {t: m for m in _MODULES for t in m.MODEL_TYPES}
GGUF_ARCHITECTURES: dict[str, types.ModuleType] = {m.GGUF_ARCH: m for m in _MODULES}


def architecture_for(model_type: str, source: str = "") -> types.ModuleType:
    """The architecture module for a HF `model_type`; an unknown one is an error naming `source`."""
    if model_type not in ARCHITECTURES:
        where = f" (in {source})" if source else ""
        raise ValueError(f"unknown model_type {model_type!r}{where}; crossmap ports: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def gguf_architecture_for(arch: str, source: str = "") -> types.ModuleType:
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} has no crossmap port; "
                         f"known: {sorted(GGUF_ARCHITECTURES)}")
    return GGUF_ARCHITECTURES[arch]


def config_from_hf(hf: dict, name: str = "", **overrides) -> ModelConfig:
    """ModelConfig from a HF config.json dict, dispatched on its model_type."""
    if "model_type" not in hf:
        raise ValueError(f"config of {name or 'model'} has no 'model_type' field")
    return architecture_for(hf["model_type"], name).config_from_hf(hf, name, **overrides)


def hf_config(cfg: ModelConfig) -> dict:
    """The HF config.json dict that describes `cfg` (config_from_hf(hf_config(cfg)) == cfg)."""
    return architecture_for(cfg.model_type).hf_config(cfg)
