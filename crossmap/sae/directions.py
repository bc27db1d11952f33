"""Carry SAE directions through a ridge map, and draw random control directions.

Only the linear part of the ridge map is used (d -> d @ W, no intercept): a direction is a
difference of activations, which the intercept cancels out of.  Mapped rows are then rescaled by
a policy: 'unit' (L2 norm 1) or 'target_norm' (a given float, typically the target model's
mean activation norm at that layer, so injected vectors have a natural size).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAPPING_SCALES = ("unit", "target_norm")  # how a mapped direction's norm is set
CONTROL_MODES = ("source", "target")  # where random control directions are drawn


def _check_policy(scale_policy: str, target_norm: float | None) -> float:
    if scale_policy not in MAPPING_SCALES:
        raise ValueError(f"scale_policy {scale_policy!r} is not one of {MAPPING_SCALES}")
    if scale_policy == "unit":
        return 1.0
    if target_norm is None or not np.isfinite(target_norm) or target_norm <= 0:
        raise ValueError(f"scale_policy='target_norm' needs a positive target_norm, got {target_norm}")
    return float(target_norm)


def map_directions(directions: np.ndarray, W: np.ndarray, scale_policy: str = "unit",
                   target_norm: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Map directions [n, d_in] through W [d_in, d_out] and rescale each row.

    Returns (mapped [n, d_out] float32, record) with record = {scale_policy, target_norm,
    source_norm [n], mapped_norm [n] (norm of d @ W before rescaling), scale [n] (factor
    applied)}.  A row that maps to (numerically) zero is an error naming it.
    """
    directions = np.asarray(directions, np.float64)
    W = np.asarray(W, np.float64)
    if directions.ndim != 2 or W.ndim != 2 or directions.shape[1] != W.shape[0]:
        raise ValueError(f"map_directions: directions {directions.shape} and W {W.shape} do not chain "
                         f"([n, d_in] @ [d_in, d_out])")
    norm_to = _check_policy(scale_policy, target_norm)
    mapped = directions @ W
    mapped_norm = np.linalg.norm(mapped, axis=1)
    source_norm = np.linalg.norm(directions, axis=1)
    tiny = 1e-12 * np.maximum(source_norm, 1e-30) * max(np.abs(W).max(), 1e-30)
    zero = np.flatnonzero(mapped_norm <= tiny)
    if zero.size:
        raise ValueError(f"map_directions: rows {zero[:20].tolist()} map to the zero vector (norm before "
                         f"mapping {source_norm[zero[:5]].tolist()}); they cannot be rescaled")
    scale = norm_to / mapped_norm
    record = {"scale_policy": scale_policy, "target_norm": None if target_norm is None else float(target_norm),
              "source_norm": source_norm, "mapped_norm": mapped_norm, "scale": scale}
    return (mapped * scale[:, None]).astype(np.float32), record


def random_directions(n: int, d: int, seed: int) -> np.ndarray:
    """n isotropic Gaussian directions in R^d, normalised to unit norm (float32, seeded)."""
    if n <= 0 or d <= 0:
        raise ValueError(f"random_directions: need n > 0 and d > 0, got n={n}, d={d}")
    g = np.random.default_rng(seed).standard_normal((n, d))
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)


def control_directions(n: int, mode: str = "source", W: np.ndarray | None = None, d_in: int | None = None,
                       d_out: int | None = None, seed: int = 0, scale_policy: str = "unit",
                       target_norm: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Random control directions in the target space, [n, d_out] float32, and a record of the choice.

    mode 'source': draw in source space (d_in) and map them exactly like SAE features
        (`map_directions` with W and the same scale policy), so they share the map's anisotropy;
    mode 'target': draw directly in target space (d_out) and rescale by the policy.
    d_in / d_out default to W's shape; W is required for 'source'.
    """
    if W is not None:
        W = np.asarray(W)
        if W.ndim != 2:
            raise ValueError(f"control_directions: W must be [d_in, d_out], got shape {W.shape}")
        for name, given, have in (("d_in", d_in, W.shape[0]), ("d_out", d_out, W.shape[1])):
            if given is not None and given != have:
                raise ValueError(f"control_directions: {name}={given} but W has shape {W.shape}")
        d_in, d_out = W.shape
    record: dict[str, Any] = {"mode": mode, "n": int(n), "seed": int(seed), "d_in": d_in, "d_out": d_out,
                              "scale_policy": scale_policy,
                              "target_norm": None if target_norm is None else float(target_norm)}
    if mode == "source":
        if W is None:
            raise ValueError("control_directions(mode='source'): W (the ridge map's linear part) is required")
        mapped, rec = map_directions(random_directions(n, d_in, seed), W, scale_policy, target_norm)
        record.update(mapped_norm=rec["mapped_norm"], scale=rec["scale"])
        return mapped, record
    if mode == "target":
        if d_out is None:
            raise ValueError("control_directions(mode='target'): pass d_out or W")
        norm_to = _check_policy(scale_policy, target_norm)
        record["scale"] = np.full(n, norm_to)
        return random_directions(n, d_out, seed) * np.float32(norm_to), record
    raise ValueError(f"control_directions: mode must be one of {CONTROL_MODES}, got {mode!r}")
