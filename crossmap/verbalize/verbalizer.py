"""Explain vectors with an activation verbalizer: a trained NLA AV or the model itself.

    spec = self_verbalizer_spec("chat", lm.tokenizer)   # or crossmap.nla.nla_verbalizer_spec(meta) for a released AV
    verbalizer = Verbalizer(lm.model, lm.tokenizer, spec, mesh=mesh)
    explanations = verbalizer.explain(vectors, n_samples=3, temperature=0.7, top_p=0.9, seed=0)
    explanations[i].parsed[s]   # explanation of vector i, sample s (explanations[i].raw: full text)

Background washout (`WashoutConfig`; the published method's exact formula is not public, this
is crossmap's documented version): a direction d is explained *on top of* real background
activations b_1..b_n (e.g. residuals at random corpus positions of the layer the directions
live in), and what the backgrounds alone would make the verbalizer say is subtracted.  For each
vector and sample, 2n rows run in one group of the same batch:

    rows 1..n     inject  scale(b_j + d_j)      d_j = direction_scale * |b_j| * d / |d|
                                                      ("background" direction_norm; "as_is": direction_scale * d)
    rows n+1..2n  inject  scale(b_j)

and every step all 2n rows append the same token, chosen from the contrastive logits

    mean_j logits(b_j + d_j)  -  alpha * mean_j logits(b_j)

(`scale` is the spec's injection scaling, applied to each row's vector).  alpha = 0 is plain
generation on direction-plus-background and then skips the background-only rows.

What is mixed and what is contrasted, exactly: the mixing (b_j + d_j) is done on the raw vectors,
and only then is each row rescaled by the spec's policy -- for an NLA verbalizer to the sidecar's
fixed `injection_scale` -- so every injected row, mixed or background-only, has the norm the
verbalizer was trained on.  The contrast is between next-token logits (never between vectors):
one token per step, chosen from the weighted logits above, is appended to all 2n rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from .. import sharding as shd
from .engine import GenerationResult, Injection, batch_bucket, generate
from .spec import Prompt, VerbalizerSpec, build_prompt, stop_ids_for

DIRECTION_NORMS = ("background", "as_is")


@dataclass(frozen=True)
class WashoutConfig:
    """Background washout (see the module docstring).

    alpha: weight of the background-only logits subtracted (0 = plain, no subtraction).
    n_backgrounds: backgrounds used per vector (the first n of those passed; None = all).
    direction_scale, direction_norm: how the direction is sized against each background:
        "background" -> |d_j| = direction_scale * |b_j| (default 1: as large as the background);
        "as_is"      -> d_j = direction_scale * d (the vector's own norm).
    """

    alpha: float = 1.0
    n_backgrounds: int | None = 4
    direction_scale: float = 1.0
    direction_norm: str = "background"

    def __post_init__(self):
        problems = []
        if not math.isfinite(self.alpha) or self.alpha < 0:
            problems.append(f"alpha must be finite and >= 0, got {self.alpha!r}")
        if self.n_backgrounds is not None and self.n_backgrounds < 1:
            problems.append(f"n_backgrounds must be >= 1 (or None for all), got {self.n_backgrounds!r}")
        if self.direction_norm not in DIRECTION_NORMS:
            problems.append(f"direction_norm must be one of {DIRECTION_NORMS}, got {self.direction_norm!r}")
        if not math.isfinite(self.direction_scale):
            problems.append(f"direction_scale must be finite, got {self.direction_scale!r}")
        if problems:
            raise ValueError("invalid WashoutConfig: " + "; ".join(problems))


@dataclass
class Explanation:
    """The verbalizer's output for one vector: one entry per sample.

    raw: the decoded generation (stop token dropped, cut at the spec's stop strings);
    parsed: the explanation extracted by the spec's regex (falls back to the stripped raw text);
    tokens: generated token ids (stop token included); stopped: ended on a stop token;
    truncated: the spec parses tagged explanations and this sample has no closing tag (it ran out
        of max_new_tokens): `parsed` then holds the raw text, counted, never hidden.
    """

    index: int
    raw: list[str]
    parsed: list[str]
    tokens: list[list[int]]
    stopped: list[bool]
    truncated: list[bool]


def _check_vectors(name: str, array, width: int, *, allow_zero: bool) -> np.ndarray:
    """[N, width] float32, or ValueError naming the row and the problem."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must have shape [N, {width}] (the verbalizer's d_model), got {np.shape(array)}")
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] contains NaN or inf ({bad.size} bad row(s) in all)")
    if not allow_zero:
        zero = np.flatnonzero(np.linalg.norm(a, axis=1) == 0)
        if zero.size:
            raise ValueError(f"{name}[{int(zero[0])}] is all zeros: it has no direction to scale")
    return a


@jax.jit
def _mean_row_norm(table: jax.Array) -> jax.Array:
    return jnp.mean(jnp.linalg.norm(table.astype(jnp.float32), axis=-1))


def rescale_rows(vectors: np.ndarray, norm: float) -> np.ndarray:
    """Rows rescaled to L2 norm `norm`: the norm in float32 and one division by (norm / target), the
    released NLAs' rescale (training and inference must agree to the last bit)."""
    out = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True).astype(np.float32)
    return out / (np.maximum(norms, np.float32(1e-12)) / np.float32(norm))


class Verbalizer:
    """A model + tokenizer + VerbalizerSpec that turns vectors into text.

    The prompt is rendered and tokenised once (`self.prompt`).  `explain` batches vectors x
    samples (x washout rows), injects each scaled vector at the marker during prefill and
    generates with `engine.generate` (one jitted prefill + while-loop decode per batch).
    """

    def __init__(self, model, tokenizer, spec: VerbalizerSpec, *, mesh: Mesh | None = None,
                 rules: dict | None = None):
        cfg = model.config
        spec.validate()
        if spec.d_model is not None and spec.d_model != cfg.d_model:
            raise ValueError(f"spec d_model={spec.d_model} (from {spec.source or 'the spec'}) does not match the "
                             f"verbalizer model's width {cfg.d_model} ({cfg.name or cfg.model_type})")
        if spec.injection_layer > cfg.n_layers:
            raise ValueError(f"spec injection_layer={spec.injection_layer} out of range for "
                             f"{cfg.name or cfg.model_type} (0 = embeddings .. {cfg.n_layers})")
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.mesh, self.rules = mesh, rules
        self.d_model = cfg.d_model
        self.prompt: Prompt = build_prompt(tokenizer, spec)
        bad = [t for t in self.prompt.token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"the prompt has token id {bad[0]} outside the model's vocabulary "
                             f"[0, {cfg.vocab_size}): tokenizer and model do not match")
        self.stop_token_ids = stop_ids_for(tokenizer, spec, tuple(cfg.eos_token_ids))
        self._target_norm: float | None = None

    # -- scaling ---------------------------------------------------------------------------------
    def target_norm(self) -> float | None:
        """The norm every injected vector is scaled to (before scale_multiplier); None = as given."""
        if self._target_norm is None:
            policy = self.spec.scale_policy
            if policy in ("fixed", "activation"):
                self._target_norm = float(self.spec.injection_scale)
            elif policy == "embedding":
                self._target_norm = mean_embedding_norm(self.model)
            elif policy == "prompt":
                special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
                ids = [t for i, t in enumerate(self.prompt.token_ids)
                       if i not in self.prompt.marker_token_indices and t not in special]
                if not ids:
                    raise ValueError("scale_policy 'prompt': the prompt has no ordinary tokens besides the marker")
                self._target_norm = mean_embedding_norm(self.model, ids)
        return self._target_norm

    def scale_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Apply the spec's scale policy and multiplier to rows of `vectors` [N, D]."""
        target = self.target_norm()
        out = np.asarray(vectors, np.float32)
        if target is not None:
            out = rescale_rows(out, target)
        multiplier = np.float32(self.spec.scale_multiplier)
        return out if multiplier == 1 else out * multiplier

    # -- the main entry point --------------------------------------------------------------------
    def explain(self, vectors, *, n_samples: int = 1, max_new_tokens: int | None = None,
                temperature: float | None = None, top_p: float | None = None, seed: int | jax.Array = 0,
                washout: WashoutConfig | None = None, backgrounds=None, batch_size: int = 64,
                progress: bool = True) -> list[Explanation]:
        """Explain each row of `vectors` [N, d_model] (a single [d_model] vector is one row).

        n_samples: generations per vector (sampling needs temperature > 0 to differ).
        max_new_tokens, temperature, top_p: default to the spec's.  seed: int or PRNG key; batch
        k uses fold_in(key, k).  washout + backgrounds: [M, d_model] shared by every vector, or
        [N, M, d_model] per vector (the first n_backgrounds are used).  batch_size: rows per
        generation batch (vectors x samples x washout rows); a batch holds at least one vector's
        rows.  The last batch is padded up to a bucket (no recompilation per batch size).
        """
        spec = self.spec
        allow_zero = spec.scale_policy == "none"
        vecs = _check_vectors("vectors", vectors, self.d_model, allow_zero=allow_zero or washout is not None)
        n_vec = vecs.shape[0]
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        max_new = spec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        temperature = spec.temperature if temperature is None else float(temperature)
        top_p = spec.top_p if top_p is None else float(top_p)

        # rows of one vector: n_samples groups, each of `group` rows, with combination weights
        if washout is None:
            if backgrounds is not None:
                raise ValueError("backgrounds were given without washout=WashoutConfig(...)")
            group, weights = 1, np.ones(1, np.float32)
            row_vectors = self.scale_vectors(vecs)[:, None, :]  # [N, 1, D]
        else:
            row_vectors, weights = self._washout_rows(vecs, washout, backgrounds)
            group = row_vectors.shape[1]
        rows_per_vector = n_samples * group

        shards = shd.batch_shards(self.mesh, self.rules)
        vectors_per_batch = max(1, batch_size // rows_per_vector)
        groups_bucket = batch_bucket(vectors_per_batch * n_samples, shards)
        key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        prompt = list(self.prompt.token_ids)
        results: list[Explanation] = []
        starts = range(0, n_vec, vectors_per_batch)
        for b, start in enumerate(tqdm(starts, desc="verbalize", unit="batch", disable=not progress)):
            chunk = row_vectors[start:start + vectors_per_batch]  # [n, group, D]
            n = chunk.shape[0]
            # row order: vector, sample, group row (groups are consecutive rows)
            batch_vecs = np.repeat(chunk[:, None], n_samples, axis=1).reshape(n * rows_per_vector, self.d_model)
            res = generate(self.model, [prompt] * (n * rows_per_vector), max_new_tokens=max_new,
                           temperature=temperature, top_p=top_p, key=jax.random.fold_in(key, b),
                           stop_token_ids=self.stop_token_ids, use_model_eos=True,
                           injection=Injection(batch_vecs, [self.prompt.marker_index] * len(batch_vecs),
                                               layer=spec.injection_layer, mode=spec.injection_mode),
                           group_size=group, group_weights=weights, mesh=self.mesh, rules=self.rules,
                           batch_size_bucket=groups_bucket)
            results.extend(self._decode(res, start, n, n_samples, group))
        return results

    def _washout_rows(self, vecs: np.ndarray, washout: WashoutConfig, backgrounds) -> tuple[np.ndarray, np.ndarray]:
        """Row vectors [N, G, D] (direction+background rows, then background rows) and weights [G]."""
        if backgrounds is None:
            raise ValueError("washout needs backgrounds: real activations [M, d_model] (or [N, M, d_model])")
        bg = np.asarray(backgrounds, np.float32)
        n_vec = vecs.shape[0]
        if bg.ndim == 2:
            bg = np.broadcast_to(bg[None], (n_vec,) + bg.shape)
        if bg.ndim != 3 or bg.shape[0] != n_vec or bg.shape[2] != self.d_model:
            raise ValueError(f"backgrounds must have shape [M, {self.d_model}] or [{n_vec}, M, {self.d_model}], "
                             f"got {np.shape(backgrounds)}")
        n_bg = bg.shape[1] if washout.n_backgrounds is None else washout.n_backgrounds
        if bg.shape[1] < n_bg:
            raise ValueError(f"washout.n_backgrounds={n_bg} but only {bg.shape[1]} backgrounds were given")
        bg = bg[:, :n_bg]
        flat = bg.reshape(-1, self.d_model)
        bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
        if bad.size:
            raise ValueError(f"backgrounds row {int(bad[0]) % n_bg} (for vector {int(bad[0]) // n_bg}) "
                             f"contains NaN or inf")
        bg_norm = np.linalg.norm(bg, axis=-1, keepdims=True)  # [N, n, 1]
        zero = np.flatnonzero(bg_norm.reshape(-1) == 0)
        if zero.size and self.spec.scale_policy != "none":
            raise ValueError(f"backgrounds row {int(zero[0]) % n_bg} is all zeros: it cannot be norm-scaled")
        vnorm = np.linalg.norm(vecs, axis=-1)
        if washout.direction_norm == "background":
            if np.any(vnorm == 0):
                raise ValueError(f"vectors[{int(np.flatnonzero(vnorm == 0)[0])}] is all zeros: it has no direction")
            unit = vecs / vnorm[:, None]
            directions = washout.direction_scale * bg_norm * unit[:, None, :]  # [N, n, D]
        else:
            directions = np.broadcast_to(washout.direction_scale * vecs[:, None, :], bg.shape)
        with_dir = self.scale_vectors((bg + directions).reshape(-1, self.d_model)).reshape(bg.shape)
        if washout.alpha == 0:
            return with_dir, np.full(n_bg, 1.0 / n_bg, np.float32)
        alone = self.scale_vectors(flat).reshape(bg.shape)
        weights = np.concatenate([np.full(n_bg, 1.0 / n_bg), np.full(n_bg, -washout.alpha / n_bg)])
        return np.concatenate([with_dir, alone], axis=1), weights.astype(np.float32)

    def _decode(self, res: GenerationResult, start: int, n_vectors: int, n_samples: int,
                group: int) -> list[Explanation]:
        out = []
        for v in range(n_vectors):
            raw, parsed, toks, stopped, truncated = [], [], [], [], []
            for s in range(n_samples):
                row = (v * n_samples + s) * group  # every row of a group holds the same tokens
                length = int(res.lengths[row])
                ids = [int(t) for t in res.tokens[row, :length]]
                text_ids = ids[:-1] if res.stopped[row] else ids
                text = self.spec.truncate(self.tokenizer.decode(text_ids,
                                                                skip_special_tokens=self.spec.skip_special_tokens))
                raw.append(text)
                parsed.append(self.spec.parse(text))
                truncated.append(self.spec.is_truncated(text))
                toks.append(ids)
                stopped.append(bool(res.stopped[row]))
            out.append(Explanation(index=start + v, raw=raw, parsed=parsed, tokens=toks, stopped=stopped,
                                   truncated=truncated))
        return out


def explain(model, tokenizer, spec: VerbalizerSpec, vectors, **kwargs) -> list[Explanation]:
    """One-shot `Verbalizer(model, tokenizer, spec).explain(vectors, **kwargs)` (mesh= and rules= go
    to the Verbalizer)."""
    mesh, rules = kwargs.pop("mesh", None), kwargs.pop("rules", None)
    return Verbalizer(model, tokenizer, spec, mesh=mesh, rules=rules).explain(vectors, **kwargs)


def mean_embedding_norm(model, token_ids: Sequence[int] | None = None) -> float:
    """Mean input-embedding norm over `token_ids` (default: the whole vocabulary)."""
    if token_ids is None:
        norm = float(_mean_row_norm(model.embed[...]))
        return norm * (math.sqrt(model.config.d_model) if model.config.embed_scale else 1.0)
    emb = model.embed_tokens(jnp.asarray(list(token_ids), jnp.int32)[None])[0]
    return float(jnp.mean(jnp.linalg.norm(emb.astype(jnp.float32), axis=-1)))
