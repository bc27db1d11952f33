"""Low-rank adapters on the attention and MLP projections of a crossmap `Transformer`, as a pytree.

    adapters = init_adapters(params, rank=16, key=key)       # {"layers/3/attn/q": {"a": .., "b": ..}, ..}
    merged = merge_adapters(params, adapters, alpha=32)      # W + (alpha / rank) * A @ B, same pytree as params

A projection W is stored (in..., out...) in the ports (q: [d, heads, head_dim], o: [heads, head_dim, d],
gate: [d, d_ff], ...), so an adapter is A [in..., r] and B [r, out...]; B starts at zero, so the adapted
model equals the base model at step 0.  The adapted weight is formed in full once per step, rather than
threading a low-rank branch through every einsum: the ports stay as they are, every forward (training,
generation, export) sees the same weights, and the extra work is one [in, r] x [r, out] product per
projection, small beside a batch's forward.

Adapters are saved as a flat safetensors file (`adapter_model.safetensors`, PEFT's tensor names and
layouts, so PEFT can read it too) and read back by `read_adapter_file`, to be merged into a loaded base
model's parameters with `merge_adapters`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# our projection name -> (how many leading axes are the input, PEFT module name)
PROJECTIONS = {"q": (1, "self_attn.q_proj"), "k": (1, "self_attn.k_proj"), "v": (1, "self_attn.v_proj"),
               "o": (2, "self_attn.o_proj"), "gate": (1, "mlp.gate_proj"), "up": (1, "mlp.up_proj"),
               "down": (1, "mlp.down_proj")}
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _sites(params: dict) -> dict[str, tuple[int, str, str]]:
    """'layers/i/group/name' -> (layer, group, name) for every adaptable projection in `params`."""
    out = {}
    for i, block in params["layers"].items():
        for group in ("attn", "mlp"):
            for name in block[group]:
                if name in PROJECTIONS:
                    out[f"layers/{i}/{group}/{name}"] = (int(i), group, name)
    return out


def _weight(params: dict, site: tuple[int, str, str]):
    i, group, name = site
    return params["layers"][i][group][name]


def init_adapters(params: dict, rank: int, key: jax.Array, targets: tuple[str, ...] = tuple(PROJECTIONS)) -> dict:
    """Adapters for the projections named in `targets` ({"a": N(0, 1/in), "b": 0}, float32)."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"lora targets {sorted(unknown)} are not projections; choose from {tuple(PROJECTIONS)}")
    adapters = {}
    for n, (path, site) in enumerate(sorted(_sites(params).items())):
        if site[2] not in targets:
            continue
        w = _weight(params, site)
        n_in = PROJECTIONS[site[2]][0]
        in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
        a = jax.random.normal(jax.random.fold_in(key, n), (*in_shape, rank), jnp.float32) / math.sqrt(math.prod(in_shape))
        adapters[path] = {"a": a, "b": jnp.zeros((rank, *out_shape), jnp.float32)}
    return adapters


def adapter_delta(adapter: dict, scale: float, n_in: int) -> jax.Array:
    """(alpha / rank) * A @ B in the weight's own layout, float32."""
    a, b = adapter["a"], adapter["b"]
    in_shape, rank = a.shape[:n_in], a.shape[-1]
    out_shape = b.shape[1:]
    delta = a.reshape(-1, rank).astype(jnp.float32) @ b.reshape(rank, -1).astype(jnp.float32)
    return (scale * delta).reshape(*in_shape, *out_shape)


def merge_adapters(params: dict, adapters: dict, alpha: float) -> dict:
    """`params` with every adapted projection replaced by W + (alpha / rank) * A @ B (in W's dtype)."""
    if not adapters:
        return params
    sites = _sites(params)
    out = jax.tree.map(lambda x: x, params)  # a new tree of the same leaves; leaves are replaced below
    for path, adapter in adapters.items():
        if path not in sites:
            raise ValueError(f"adapter {path!r} has no projection in this model")
        i, group, name = sites[path]
        w = params["layers"][i][group][name]
        rank = adapter["a"].shape[-1]
        delta = adapter_delta(adapter, alpha / rank, PROJECTIONS[name][0])
        if delta.shape != w.shape:
            raise ValueError(f"adapter {path!r} builds a {delta.shape} update for a {w.shape} weight")
        out["layers"][i][group][name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return out


def adapter_logical(adapters: dict, params_logical: dict) -> dict:
    """Logical axis names of each adapter array: A keeps W's input axes, B its output axes."""
    out = {}
    for path in adapters:
        _, i, group, name = path.split("/")
        logical = params_logical["layers"][int(i)][group][name]
        n_in = PROJECTIONS[name][0]
        out[path] = {"a": (*logical[:n_in], None), "b": (None, *logical[n_in:])}
    return out


# ---------------------------------------------------------------------------------------------- files
def _peft_name(path: str, part: str) -> str:
    _, i, _, name = path.split("/")
    return f"base_model.model.model.layers.{i}.{PROJECTIONS[name][1]}.lora_{'A' if part == 'a' else 'B'}.weight"


def save_adapter_file(directory: str | os.PathLike, adapters: dict, *, rank: int, alpha: float,
                      dtype: str = "bfloat16") -> Path:
    """`adapter_model.safetensors` (PEFT layout: lora_A [r, in], lora_B [out, r]) and `adapter_config.json`."""
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16)

    from ..jsonio import save_json
    from ..models.checkpoint_files import write_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for path, adapter in sorted(adapters.items()):
        a = np.asarray(jax.device_get(adapter["a"]), np.float32)
        b = np.asarray(jax.device_get(adapter["b"]), np.float32)
        arrays[_peft_name(path, "a")] = a.reshape(-1, a.shape[-1]).T.astype(dtype)
        arrays[_peft_name(path, "b")] = b.reshape(b.shape[0], -1).T.astype(dtype)
    entries = [(name, value.shape, value.dtype) for name, value in arrays.items()]
    write_safetensors(directory / ADAPTER_FILE, entries, lambda name: iter([arrays[name]]))
    targets = sorted({PROJECTIONS[p.split("/")[3]][1].split(".")[1] for p in adapters})
    save_json(directory / ADAPTER_CONFIG, {"peft_type": "LORA", "r": int(rank), "lora_alpha": float(alpha),
                                           "target_modules": targets, "bias": "none"})
    return directory / ADAPTER_FILE


def read_adapter_file(directory: str | os.PathLike, params: dict) -> tuple[dict, float]:
    """(adapters in crossmap's layout, alpha) from a directory written by `save_adapter_file`."""
    from ..jsonio import load_json
    from ..models.checkpoint_files import iter_safetensors_file

    directory = Path(directory)
    config = load_json(directory / ADAPTER_CONFIG)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{directory / ADAPTER_CONFIG}: fields 'r' (a positive integer) and 'lora_alpha' are "
                         f"required, got r={rank!r}, lora_alpha={alpha!r}")
    by_name = {_peft_name(path, part): (path, part) for path in _sites(params) for part in "ab"}
    adapters: dict = {}
    for name, value in iter_safetensors_file(directory / ADAPTER_FILE):
        if name not in by_name:
            raise ValueError(f"{directory / ADAPTER_FILE}: tensor {name!r} names no projection of this model")
        path, part = by_name[name]
        w = _weight(params, _sites(params)[path])
        n_in = PROJECTIONS[path.split("/")[3]][0]
        value = np.asarray(value, np.float32)
        want = (rank, math.prod(w.shape[:n_in])) if part == "a" else (math.prod(w.shape[n_in:]), rank)
        if value.shape != want:
            raise ValueError(f"{directory / ADAPTER_FILE}: tensor {name!r} has shape {value.shape}, expected {want} "
                             f"for rank {rank}")
        shape = (*w.shape[:n_in], rank) if part == "a" else (rank, *w.shape[n_in:])
        adapters.setdefault(path, {})[part] = jnp.asarray(value.T.reshape(shape))
    half = [p for p, v in adapters.items() if set(v) != {"a", "b"}]
    if half:
        raise ValueError(f"{directory / ADAPTER_FILE}: {half[0]!r} has only one of lora_A / lora_B")
    return adapters, float(alpha)
