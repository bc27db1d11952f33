"""Weight-only int8: a model's matmul kernels stored as int8 with one float32 scale per output channel.

`quantized(model, "int8")` returns a new `Transformer` over the same float arrays but with every
attention (q, k, v, o; or a fused qkv), MLP (gate, up, down; or a fused gate_up) and LM-head kernel
replaced by symmetric int8 values and their scales; the shared layers then run those products through `int8_matmul` (a Pallas kernel
on GPU that reads only the int8 bytes).  What stays float: the embedding table (a decode step
gathers a few of its rows), norms and biases, activations, the KV cache and the logits.  A tied
model's LM head gets its own int8 copy of the table ([d_model, vocab], as the head reads it), so
the gather keeps the float rows.

Quantisation is per output channel: scale = max |w| over the input axes / 127, value =
round(w / scale).  A scanned model (models.scan) quantizes the same way, per block of each stack.
The model is for inference; it is not saved back into a checkpoint.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from .int8_matmul import IMPLEMENTATIONS, stores_output_major
from .layers import MLP, Attention, Transformer

Array = jax.Array

# verbalizers.<side>.weights: "float" keeps the model's dtype; "int8" is weight-only int8
WEIGHT_FORMATS = ("float", "int8")

# (module type, kernel name, leading input axes of the kernel); a fused model (models.fuse) holds qkv and gate_up
# where the others hold q/k/v and gate/up, and None in their place
_KERNELS = ((Attention, "q", 1), (Attention, "k", 1), (Attention, "v", 1), (Attention, "qkv", 1),
            (Attention, "o", 2), (MLP, "gate", 1), (MLP, "up", 1), (MLP, "gate_up", 1), (MLP, "down", 1))


@partial(jax.jit, static_argnames=("input_axes", "leading"))
def quantize_int8(w: Array, input_axes: int = 1, leading: int = 0) -> tuple[Array, Array]:
    """Symmetric per-output-channel int8 of a kernel w [lead..., in..., out...] (its `input_axes` axes after
    the first `leading` are contracted; a scanned model's kernels lead with their group axis): (int8 values of
    w's shape, float32 scales [lead..., out...]) with w ~ values * scales."""
    w32 = w.astype(jnp.float32)
    axes = tuple(range(leading, leading + input_axes))
    amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel stays zero at any scale
    values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return values, jnp.squeeze(scale, axes)


def dequantize(values: Array, scale: Array, dtype=jnp.float32) -> Array:
    """values * scale in `dtype`: the float kernel an int8 kernel stands for."""
    return (values.astype(jnp.float32) * scale).astype(dtype)


def _quantize_param(module, name: str, input_axes: int, implementation: str, source: nnx.Param | None = None,
                    transpose: bool = False) -> None:
    param = source if source is not None else getattr(module, name)
    logical = tuple(param.get_metadata().get("logical", ()))
    w = param[...]
    if transpose:  # the tied table [vocab, embed] as the head's kernel [embed, vocab]
        w, logical = w.T, logical[::-1]
    leading = 1 if logical[:1] == ("layers",) else 0  # a scanned model's stacked kernel
    values, scale = quantize_int8(w, input_axes, leading)
    scale_logical = logical[:leading] + logical[leading + input_axes:]
    in_shape = w.shape[leading:leading + input_axes]
    if stores_output_major(math.prod(in_shape), math.prod(w.shape[leading + input_axes:]), implementation):
        # [lead..., out..., in...]: the Mosaic GPU kernel reads the int8 operand with K contiguous
        order = (*range(leading), *range(leading + input_axes, w.ndim), *range(leading, leading + input_axes))
        values, logical = jnp.transpose(values, order), tuple(logical[i] for i in order)
        kernel = nnx.Param(values, logical=logical, output_major=True)
    else:
        kernel = nnx.Param(values, logical=logical)
    setattr(module, name, nnx.data(kernel))
    # the attribute was None (static) in the float model: marked as data, it joins the state
    setattr(module, f"{name}_scale", nnx.data(nnx.Param(scale, logical=scale_logical)))


def quantized(model: Transformer, weights: str, *, implementation: str = "auto") -> Transformer:
    """`model` with its matmul kernels in `weights` format (WEIGHT_FORMATS); "float" returns it unchanged.

    The result is a new module: `model` itself keeps its float kernels (a self-verbalizer's model also
    serves the other stages).  `implementation` is how its int8 products run (int8_matmul.IMPLEMENTATIONS:
    "auto" is the Pallas kernel on GPU for decode steps, else the XLA reference).  "mosaic" stores the wide
    kernels (int8_matmul.stores_output_major) output-major, [lead..., out..., in...], their Param marked
    `output_major`; `layers.project` reads that mark."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if weights == "float":
        return model
    if model.lm_head_scale is not None:
        raise ValueError("model is already quantized")
    devices = max((len(leaf.sharding.device_set) for leaf in jax.tree.leaves(nnx.state(model))
                   if hasattr(leaf, "sharding")), default=1)
    if devices > 1:
        # the Pallas kernel has no partitioning rule: XLA would gather every kernel onto every device
        raise NotImplementedError("int8 weights run on one device so far; this model's parameters are placed on "
                                  f"{devices} devices (use a one-device mesh for an int8 verbalizer)")
    copy = nnx.merge(*nnx.split(model))  # a new module tree over the same arrays
    for _, module in nnx.iter_modules(copy):
        for kind, name, input_axes in _KERNELS:
            if isinstance(module, kind) and getattr(module, name) is not None:
                _quantize_param(module, name, input_axes, implementation)
                module.int8_implementation = implementation
    if copy.lm_head is None:
        _quantize_param(copy, "lm_head", 1, implementation, source=copy.embed, transpose=True)
    else:
        _quantize_param(copy, "lm_head", 1, implementation)
    copy.int8_implementation = implementation
    return copy


def is_quantized(model: Transformer) -> bool:
    return model.lm_head_scale is not None
