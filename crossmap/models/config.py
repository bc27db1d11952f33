"""Model configuration shared by every architecture.

`ModelConfig` is the one description of a decoder that the shared layers read.  Each
architecture file turns its own HF `config.json` (or GGUF metadata) into a `ModelConfig`
and sets the flags that make it differ (qkv bias, (1+w) norms, sandwich norms, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def token_ids(value) -> tuple[int, ...]:
    """config.json's eos_token_id (None, an int or a list) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def token_ids_to_hf(ids: tuple[int, ...]):
    """The inverse of `token_ids`: None, an int, or a list."""
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # registry key: "llama", "qwen2", "gemma3_text"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rms_eps: float = 1e-6
    rope_theta: float = 10_000.0  # base of global (full-attention) layers
    rope_scaling: float = 1.0  # linear RoPE scaling factor of global layers (Gemma-3 27B: 8)
    # Llama 3.x "llama3" RoPE scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None = none
    rope_llama3: tuple[float, float, float, int] | None = None
    rope_local_theta: float | None = None  # base of sliding-window layers (Gemma 3)
    sliding_window: int | None = None  # window of "sliding" layers; None means no local layers
    layer_types: tuple[str, ...] = ()  # per layer "full" or "sliding"; empty means all "full"
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm on q and k per head (Gemma 3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    sandwich_norms: bool = False  # post-attention and post-feedforward norms (Gemma 2/3)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
    activation: str = "silu"  # "silu" or "gelu_tanh"
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default head_dim)
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    max_position_embeddings: int = 32768
    name: str = ""  # free-form id, e.g. the checkpoint directory name
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.n_layers)
        problems = []
        if len(self.layer_types) != self.n_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if any(t not in ("full", "sliding") for t in self.layer_types):
            problems.append(f"layer_types must be 'full' or 'sliding', got {sorted(set(self.layer_types))}")
        if "sliding" in self.layer_types and not self.sliding_window:
            problems.append("sliding layers need sliding_window > 0")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.activation not in ("silu", "gelu_tanh"):
            problems.append(f"activation {self.activation!r} is not 'silu' or 'gelu_tanh'")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_llama3 is not None:
            factor, low, high, original = self.rope_llama3
            if not (factor >= 1 and 0 < low < high and original > 0):
                problems.append(f"rope_llama3 (factor, low_freq_factor, high_freq_factor, original context) must "
                                f"have factor >= 1 and 0 < low < high, got {self.rope_llama3}")
        if problems:
            raise ValueError(f"invalid model config {self.name or self.model_type}: " + "; ".join(problems))

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def through_block(self, layer: int, **changes) -> ModelConfig:
        """The config of blocks 0..layer only (an AR's backbone, a truncated forward), each keeping its layer
        type; `changes` as in `replace`."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for {self.name or self.model_type}, which has "
                             f"{self.n_layers} blocks (0..{self.n_layers - 1})")
        return self.replace(n_layers=layer + 1, layer_types=self.layer_types[:layer + 1], **changes)

    def param_count(self, *, upto_layer: int | None = None, with_head: bool = True) -> int:
        """Number of parameters (embedding included; LM head unless tied or `with_head=False`)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * h * d
        if self.qkv_bias:
            attn += h * (self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.d_ff
        norms = d * (4 if self.sandwich_norms else 2) + (2 * h if self.qk_norm else 0)
        n = self.n_layers if upto_layer is None else upto_layer + 1
        total = self.vocab_size * d + n * (attn + mlp + norms)
        if with_head and upto_layer is None:
            total += d + (0 if self.tie_embeddings else self.vocab_size * d)
        return total

    def forward_flops_per_token(self, seq_len: int, *, upto_layer: int | None = None,
                                with_head: bool = True) -> float:
        """Model FLOPs of one token's forward: 2 x matmul params + causal attention (QK^T and AV).

        The embedding lookup is not a matmul and is not counted; attention counts the causal
        half (sliding layers: at most the window), the convention used for MFU.
        """
        d, h = self.d_model, self.head_dim
        n = self.n_layers if upto_layer is None else upto_layer + 1
        matmul = d * h * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * h * d + 3 * d * self.d_ff
        flops = 2.0 * n * matmul
        for kind in self.layer_types[:n]:
            ctx = seq_len / 2 if kind == "full" else min(seq_len / 2, self.sliding_window or seq_len)
            flops += 2 * 2 * self.n_heads * h * ctx
        if with_head and upto_layer is None:
            flops += 2.0 * d * self.vocab_size
        return flops
