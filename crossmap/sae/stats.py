"""Feature statistics over a corpus, top-activating contexts, and config-driven feature selection.

Streaming design: the pipeline hands over, per batch, the valid rows of the residual stream
(acts [R, d_model], raw units) with parallel arrays doc_id [R] and position [R] (token index in
its document).  `feature_stats` encodes them in fixed-size chunks (one compile), and keeps on the
device, per feature: firing count, sum and max of activations, and the top-k (activation, doc,
position) seen so far.  The top-k merge transposes the chunk's activations to [n_features, R],
takes lax.top_k along the rows and merges with the running [n_features, top_k] table.
Rendering is separate (`feature_contexts`, `format_context`) and needs only a token lookup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from crossmap.sae.core import SAE, encode


@dataclasses.dataclass
class FeatureStats:
    """Per-feature statistics (numpy).  Empty top-k slots have doc = pos = -1 and act = 0."""

    n_tokens: int
    count: np.ndarray  # [n] int64: tokens on which the feature fired (activation > 0)
    max_act: np.ndarray  # [n] float32: 0 for features that never fired
    sum_act: np.ndarray  # [n] float64
    top_acts: np.ndarray  # [n, top_k] float32, descending
    top_doc: np.ndarray  # [n, top_k] int64
    top_pos: np.ndarray  # [n, top_k] int64

    @property
    def n_features(self) -> int:
        return int(self.count.shape[0])

    @property
    def freq(self) -> np.ndarray:
        """Fraction of tokens on which each feature fired."""
        return self.count / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> np.ndarray:
        """Mean activation over the tokens where the feature fired (0 if it never did)."""
        return np.where(self.count > 0, self.sum_act / np.maximum(self.count, 1), 0.0)

    @property
    def alive(self) -> np.ndarray:
        return self.count > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no top-k tables)."""
        return {"n_tokens": self.n_tokens, "n_features": self.n_features,
                "dead_frac": float(1 - self.alive.mean()), "freq": self.freq.tolist(),
                "max_act": self.max_act.tolist(), "mean_act": self.mean_act.tolist()}


def _init_state(n_features: int, top_k: int) -> dict[str, jax.Array]:
    return {"count": jnp.zeros((n_features,), jnp.int32), "sum": jnp.zeros((n_features,), jnp.float32),
            "max": jnp.zeros((n_features,), jnp.float32),
            "top_acts": jnp.full((n_features, top_k), -jnp.inf, jnp.float32),
            "top_doc": jnp.full((n_features, top_k), -1, jnp.int32),
            "top_pos": jnp.full((n_features, top_k), -1, jnp.int32)}


def merge_top_k(acts_t: jax.Array, doc: jax.Array, pos: jax.Array, top_acts: jax.Array,
                top_doc: jax.Array, top_pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merge a chunk into running per-feature top-k tables.

    acts_t [n, R] (feature-major; -inf where a row must not count), doc / pos [R] int32;
    top_* [n, top_k].  Ties keep the entry seen first (lax.top_k prefers lower indices and the
    running table comes first).
    """
    top_k = top_acts.shape[1]
    cand_acts, cand_idx = jax.lax.top_k(acts_t, min(top_k, acts_t.shape[1]))
    all_acts = jnp.concatenate([top_acts, cand_acts], axis=1)
    all_doc = jnp.concatenate([top_doc, doc[cand_idx]], axis=1)
    all_pos = jnp.concatenate([top_pos, pos[cand_idx]], axis=1)
    new_acts, sel = jax.lax.top_k(all_acts, top_k)
    return (new_acts, jnp.take_along_axis(all_doc, sel, axis=1), jnp.take_along_axis(all_pos, sel, axis=1))


@jax.jit
def _update(state: dict[str, jax.Array], sae: SAE, x: jax.Array, doc: jax.Array, pos: jax.Array,
            valid: jax.Array) -> dict[str, jax.Array]:
    z = encode(sae, x)
    fired = (z > 0) & valid[:, None]
    z_valid = jnp.where(fired, z, 0.0)
    new = {"count": state["count"] + jnp.sum(fired, 0, dtype=jnp.int32),
           "sum": state["sum"] + jnp.sum(z_valid, 0),
           "max": jnp.maximum(state["max"], jnp.max(z_valid, 0))}
    # only firing tokens are candidates, so top-k tables never hold zeros or padding rows
    acts_t = jnp.where(fired, z, -jnp.inf).T
    new["top_acts"], new["top_doc"], new["top_pos"] = merge_top_k(
        acts_t, doc, pos, state["top_acts"], state["top_doc"], state["top_pos"])
    return new


def _as_triple(item: Any, n_seen: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise one batch: array, (acts, doc_id, position) or {'acts', 'doc_id', 'position'}."""
    if isinstance(item, Mapping):
        acts, doc, pos = item["acts"], item.get("doc_id"), item.get("position")
    elif isinstance(item, tuple | list):
        if len(item) != 3:
            raise ValueError(f"feature_stats: a batch tuple must be (acts, doc_id, position), got {len(item)} items")
        acts, doc, pos = item
    else:
        acts, doc, pos = item, None, None
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"feature_stats: acts must be [rows, d_model], got shape {acts.shape}")
    r = acts.shape[0]
    # without doc ids, rows are numbered by their place in the stream (doc = -1 never appears)
    doc = np.zeros(r, np.int64) if doc is None else np.asarray(doc).reshape(-1)
    pos = np.arange(n_seen, n_seen + r) if pos is None else np.asarray(pos).reshape(-1)
    if doc.shape != (r,) or pos.shape != (r,):
        raise ValueError(f"feature_stats: doc_id {doc.shape} and position {pos.shape} must be [{r}] like acts")
    return acts, doc, pos


def feature_stats(sae: SAE, acts_iter: Iterable[Any], top_k: int = 20, chunk_rows: int = 4096,
                  progress: bool = True, total: int | None = None) -> FeatureStats:
    """Stream a corpus through `sae` and collect per-feature statistics and top-k contexts.

    acts_iter yields per batch either acts [R, d_model] (raw residual stream, valid rows only),
    a tuple (acts, doc_id [R], position [R]), or a dict with those keys.  Without doc ids every
    row gets doc 0 and position = its index in the whole stream.
    top_k: contexts kept per feature (0 keeps none).  chunk_rows: rows per device call; batches
    are cut and padded to it so the update compiles once.  total: batch count for the bar.
    """
    n = sae.n_features
    state = _init_state(n, max(top_k, 1))
    n_tokens = 0
    for item in tqdm(acts_iter, desc="feature stats", disable=not progress, total=total, dynamic_ncols=True):
        acts, doc, pos = _as_triple(item, n_tokens)
        if acts.shape[1] != sae.d_model:
            raise ValueError(f"feature_stats: acts have width {acts.shape[1]}, the SAE expects {sae.d_model}")
        if doc.size and (doc.max() >= 2**31 or pos.max() >= 2**31 or doc.min() < 0 or pos.min() < 0):
            raise ValueError("feature_stats: doc_id and position must be in [0, 2**31)")
        for start in range(0, acts.shape[0], chunk_rows):
            x = acts[start:start + chunk_rows].astype(np.float32)
            m = x.shape[0]
            valid = np.zeros(chunk_rows, bool)
            valid[:m] = True
            pad = chunk_rows - m
            d = np.pad(doc[start:start + m].astype(np.int32), (0, pad), constant_values=-1)
            p = np.pad(pos[start:start + m].astype(np.int32), (0, pad), constant_values=-1)
            x = np.pad(x, ((0, pad), (0, 0)))
            state = _update(state, sae, x, d, p, valid)
        n_tokens += acts.shape[0]
    s = jax.device_get(state)
    found = np.isfinite(s["top_acts"])
    top_acts = np.where(found, s["top_acts"], 0.0).astype(np.float32)[:, :top_k]
    top_doc = np.where(found, s["top_doc"], -1).astype(np.int64)[:, :top_k]
    top_pos = np.where(found, s["top_pos"], -1).astype(np.int64)[:, :top_k]
    return FeatureStats(n_tokens=n_tokens, count=s["count"].astype(np.int64), max_act=s["max"],
                        sum_act=s["sum"].astype(np.float64), top_acts=top_acts, top_doc=top_doc,
                        top_pos=top_pos)


# ----------------------------------------------------------------------------- rendering
def context_pieces(tokens: Sequence[str], position: int, left: int = 12, right: int = 4) -> tuple[str, str, str]:
    """(text before, the token, text after) of the window tokens[position - left : position + right + 1];
    '...' shows that the document continues beyond the window."""
    if not 0 <= position < len(tokens):
        raise IndexError(f"format_context: position {position} outside a document of {len(tokens)} tokens")
    lo, hi = max(0, position - left), min(len(tokens), position + right + 1)
    return (("..." if lo > 0 else "") + "".join(tokens[lo:position]), tokens[position],
            "".join(tokens[position + 1:hi]) + ("..." if hi < len(tokens) else ""))


def format_context(tokens: Sequence[str], position: int, left: int = 12, right: int = 4,
                   marks: tuple[str, str] = ("«", "»"), escape_newlines: bool = True) -> str:
    """Render tokens[position - left : position + right + 1] with the token at `position` marked.

    Tokens are decoded strings (with their own leading spaces), so they are concatenated as is;
    the marked token's leading whitespace goes outside the marks: '...the «cat» sat...'.
    '...' shows that the document continues beyond the window.
    """
    before, tok, after = context_pieces(tokens, position, left, right)
    stripped = tok.lstrip()
    marked = tok[:len(tok) - len(stripped)] + marks[0] + (stripped or tok) + marks[1]
    text = before + marked + after
    return text.replace("\n", "\\n") if escape_newlines else text


def feature_contexts(stats: FeatureStats, feature: int, token_lookup: Callable[[int], Sequence[str]],
                     n: int | None = None, left: int = 12, right: int = 4, **format_kwargs) -> list[dict]:
    """Top-activating contexts of `feature`, best first, as dicts {act, doc, pos, text, left, token, right}:
    `text` the window with the token marked (`format_context`), `left` / `token` / `right` the same window
    in three unmarked pieces, for a page that highlights the token itself.

    token_lookup(doc_id) returns the document's tokens as strings, indexed by position.
    """
    if not 0 <= feature < stats.n_features:
        raise IndexError(f"feature_contexts: feature {feature} outside [0, {stats.n_features})")
    out = []
    for act, doc, pos in zip(stats.top_acts[feature], stats.top_doc[feature], stats.top_pos[feature], strict=True):
        if doc < 0 or (n is not None and len(out) >= n):
            break
        tokens = token_lookup(int(doc))
        before, token, after = context_pieces(tokens, int(pos), left, right)
        out.append({"act": float(act), "doc": int(doc), "pos": int(pos),
                    "text": format_context(tokens, int(pos), left, right, **format_kwargs),
                    "left": before, "token": token, "right": after})
    return out


# ----------------------------------------------------------------------------- selection
SELECTION_METHODS = ("explicit", "random", "top_max_act")


def _stat(stats: FeatureStats | Mapping[str, Any], name: str) -> np.ndarray:
    if isinstance(stats, Mapping):
        if name not in stats:
            raise KeyError(f"select_features: stats has no {name!r} (keys: {sorted(stats)})")
        return np.asarray(stats[name])
    return np.asarray(getattr(stats, name))


def select_features(stats: FeatureStats | Mapping[str, Any], method: str, n: int | None = None,
                    seed: int = 0, *, indices: Sequence[int] | None = None, min_freq: float = 0.0,
                    max_freq: float = 1.0, exclude: Sequence[int] = ()) -> np.ndarray:
    """Pick SAE features by a config rule; returns int64 indices.

    method:
      'explicit'     the given `indices` (checked to be in range and unique; n, if given, must match);
      'random'       n features drawn without replacement (numpy Generator seeded with `seed`)
                     among those alive with firing frequency in [min_freq, max_freq]; sorted;
      'top_max_act'  the n alive features in the band with the largest max activation, largest
                     first (ties by lower index).
    `exclude` removes features from eligibility.  Fewer than n eligible features is an error that
    says how many there are and why.  stats: a FeatureStats or a mapping with 'freq', 'max_act'.
    """
    freq = _stat(stats, "freq")
    n_features = freq.shape[0]
    if method == "explicit":
        if indices is None:
            raise ValueError("select_features(method='explicit'): pass indices=[...]")
        idx = np.asarray(list(indices), np.int64)
        bad = idx[(idx < 0) | (idx >= n_features)]
        if bad.size:
            raise ValueError(f"select_features: indices {bad.tolist()} outside [0, {n_features})")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"select_features: indices contain duplicates: {idx.tolist()}")
        if n is not None and n != len(idx):
            raise ValueError(f"select_features: n={n} but {len(idx)} explicit indices were given")
        return idx
    if method not in SELECTION_METHODS:
        raise ValueError(f"select_features: unknown method {method!r}; known: {SELECTION_METHODS}")
    if n is None or n <= 0:
        raise ValueError(f"select_features(method={method!r}): need a positive n, got {n}")
    if not 0.0 <= min_freq <= max_freq:
        raise ValueError(f"select_features: need 0 <= min_freq <= max_freq, got [{min_freq}, {max_freq}]")
    alive = freq > 0
    in_band = alive & (freq >= min_freq) & (freq <= max_freq)
    excluded = np.zeros(n_features, bool)
    excluded[np.asarray(list(exclude), np.int64)] = True
    eligible = np.flatnonzero(in_band & ~excluded)
    if len(eligible) < n:
        raise ValueError(
            f"select_features(method={method!r}): only {len(eligible)} features are eligible but n={n} "
            f"were asked for ({n_features} features, {int((~alive).sum())} dead, {int(in_band.sum())} "
            f"alive with frequency in [{min_freq}, {max_freq}], {int((in_band & excluded).sum())} of "
            f"those excluded)")
    if method == "random":
        return np.sort(np.random.default_rng(seed).choice(eligible, size=n, replace=False)).astype(np.int64)
    max_act = _stat(stats, "max_act")[eligible]
    order = np.lexsort((eligible, -max_act))  # max_act descending, then index ascending
    return eligible[order[:n]].astype(np.int64)
