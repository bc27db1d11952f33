"""The NLA training objectives, as pure functions of a model and a batch.

AV batches share one prompt (the sidecar's template with the marker: the same tokens for every row),
so every row's response starts at the same slot P, and only the R response slots go through the LM
head (a 262k-token vocabulary times the whole prompt would be most of the step's memory):

    slot      0 .. P-1                 P .. P+R-1
    tokens    [prompt, marker at m]    [response tokens, right padded]
    loss      -                        mask = response tokens (the closing tag and end-of-turn included)

The vector is written over the marker's input-embedding row, after Gemma's sqrt(d) multiply (the
release's injection), already rescaled to the sidecar's `injection_scale`.

AR batches are AR prompts right padded, with each row's last real slot; the AR is the backbone's
blocks 0..K (no final norm) and a bias-free d x d head on the last token, trained with the release's
MSE of both vectors normalised to sqrt(d) (= 2 (1 - cos)).

GRPO: a group of G samples per vector, rewards from the AR, advantages normalised within the group,
the policy gradient of the sampled tokens weighted by them, and a KL penalty to the SFT policy with
the k3 estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
REWARDS = ("neg_mse", "cosine")  # the GRPO reward from the AR's reconstruction


class AVBatch(NamedTuple):
    tokens: Array  # int32 [B, P + R]
    valid: Array  # bool [B, P + R]
    loss_mask: Array  # float32 [B, R]: 1 on the response tokens that are predicted
    vectors: Array  # float32 [B, D], already at the injection norm


class ARBatch(NamedTuple):
    tokens: Array  # int32 [B, T]
    valid: Array  # bool [B, T]
    last: Array  # int32 [B]: each row's last real slot
    targets: Array  # float32 [B, D]
    weight: Array  # float32 [B]: 1 for real rows, 0 for filler


def response_logits(model, batch: AVBatch, prompt_len: int, marker: int) -> Array:
    """Next-token logits [B, R, V] (float32) for the response slots, with the vector injected."""
    tokens = batch.tokens
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], tokens.shape)
    x = model.embed_tokens(tokens)
    at_marker = (jnp.arange(tokens.shape[1]) == marker)[None, :, None]
    x = jnp.where(at_marker, batch.vectors[:, None, :].astype(x.dtype), x)
    hidden, _ = model.run(x, positions, batch.valid)
    # slot t predicts token t + 1: the response tokens P..P+R-1 are predicted from slots P-1..P+R-2
    return model.head(hidden[:, prompt_len - 1:-1])


def response_logprobs(model, batch: AVBatch, prompt_len: int, marker: int) -> Array:
    """log p(token) [B, R] of each response token under `model` (0 where the mask is 0)."""
    logits = response_logits(model, batch, prompt_len, marker)
    targets = batch.tokens[:, prompt_len:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked * batch.loss_mask


def av_sft_loss(model, batch: AVBatch, prompt_len: int, marker: int) -> tuple[Array, dict]:
    """Mean cross-entropy over every response token of the batch."""
    logp = response_logprobs(model, batch, prompt_len, marker)
    n = jnp.maximum(batch.loss_mask.sum(), 1.0)
    loss = -logp.sum() / n
    return loss, {"loss": loss, "tokens": batch.loss_mask.sum()}


def ar_vectors(model, head: Array, tokens: Array, valid: Array, last: Array, *, positions: Array | None = None,
               layer: int | None = None) -> Array:
    """[B, D] float32: the head applied to the output of block `layer` (default: the model's last; an AR
    holds exactly its K+1 blocks) at each row's last token, no final norm.  The one AR forward: training,
    `nla.reconstructor` and its benchmark all run this."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], tokens.shape)
    layer = model.config.n_layers - 1 if layer is None else layer
    hidden = model.hidden(tokens, positions, valid, layer=layer)
    at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,ed->be", at_last, head.astype(at_last.dtype), preferred_element_type=jnp.float32)


def normalised_mse(predicted: Array, targets: Array) -> Array:
    """Per row: mean squared difference of both vectors rescaled to norm sqrt(d) (= 2 (1 - cos))."""
    d = predicted.shape[-1]

    def unit(x):
        x = x.astype(jnp.float32)
        return x * (math.sqrt(d) / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12))

    return jnp.mean((unit(predicted) - unit(targets)) ** 2, axis=-1)


def ar_sft_loss(model, head: Array, batch: ARBatch) -> tuple[Array, dict]:
    """The release's AR loss: normalised MSE, averaged over the real rows."""
    predicted = ar_vectors(model, head, batch.tokens, batch.valid, batch.last)
    mse = normalised_mse(predicted, batch.targets)
    n = jnp.maximum(batch.weight.sum(), 1.0)
    loss = jnp.sum(mse * batch.weight) / n
    cosine = jnp.sum((1.0 - mse / 2.0) * batch.weight) / n
    return loss, {"loss": loss, "cosine": cosine}


def rewards_from_mse(mse: Array, kind: str) -> Array:
    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    return -mse if kind == "neg_mse" else 1.0 - mse / 2.0


def group_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """(r - mean of its group) / (std of its group + eps); rows come in consecutive groups."""
    r = rewards.reshape(-1, group_size).astype(jnp.float32)
    adv = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """Per-token KL estimate of the policy from the reference: exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0


def grpo_loss(model, batch: AVBatch, prompt_len: int, marker: int, advantages: Array, ref_logp: Array,
              kl_coef: float) -> tuple[Array, dict]:
    """On-policy GRPO: -A * logp (through the ratio exp(logp - stop_grad(logp)), 1 in value), plus
    kl_coef * k3 KL to the reference, averaged per sequence over its tokens, then over sequences."""
    logp = response_logprobs(model, batch, prompt_len, marker)
    mask = batch.loss_mask
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
    per_token = -advantages[:, None] * ratio + kl_coef * kl_k3(logp, ref_logp)
    lengths = jnp.maximum(mask.sum(axis=1), 1.0)
    per_seq = (per_token * mask).sum(axis=1) / lengths
    kl = (kl_k3(logp, ref_logp) * mask).sum(axis=1) / lengths
    has = (mask.sum(axis=1) > 0).astype(jnp.float32)
    n = jnp.maximum(has.sum(), 1.0)
    loss = jnp.sum(per_seq * has) / n
    return loss, {"loss": loss, "kl": jnp.sum(kl * has) / n, "tokens": mask.sum()}
