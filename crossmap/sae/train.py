"""TopK SAE training in JAX on streamed activations, sharded over the data axis, resumable.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", as is standard):
  * inputs scaled by one scalar so that E||x||^2 = d_model (the scale is stored in the SAE, whose
    encode/decode then work on raw activations);
  * TopK activation, decoder rows kept at unit norm (the gradient component parallel to each row
    is projected out before the Adam update, rows renormalised after it);
  * b_dec initialised to the data mean, W_enc initialised to W_dec^T;
  * loss = FVU (squared error / batch variance) + aux_coef * AuxK, where AuxK has the top-k_aux
    *dead* latents (not fired in the last `dead_tokens` tokens) reconstruct the main residual;
  * Adam with linear warm-up, constant, linear decay to 0 over the last `decay_frac` of steps;
    default lr = 1.5e-3 / sqrt(n_features / 8192) (see `default_lr`).

Determinism: the data for step s is `batches(s)` (a callable, or rows of an array under a seeded
per-epoch permutation, see `ArrayBatches`), and the checkpoint holds params, optimiser state,
step and dead-feature tracker; so a run stopped at any checkpoint and resumed ends with
bitwise the same parameters as an uninterrupted run on the same device kind.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from crossmap.checkpointing import checkpoint_manager, restore_state, save_state
from crossmap.failpoints import failpoint
from crossmap.sae.core import SAE, make_sae, scatter_topk
from crossmap.sharding import shard_batch

BatchSource = Callable[[int], np.ndarray] | np.ndarray


# ----------------------------------------------------------------------------- data
class ArrayBatches:
    """Deterministic batch stream over a host array: `batches(step)` -> [batch_size, d] rows.

    The rows are read as one endless stream: epoch e visits every row once in the order of
    `default_rng([seed, e]).permutation(N)`, and step s takes stream positions
    [s * batch_size, (s + 1) * batch_size), crossing into the next epoch when needed.  The
    batch for a step depends only on (data, batch_size, seed, step), which is what makes
    resumed training reproduce an uninterrupted run.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seed: int = 0):
        data = np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"ArrayBatches: data must be [N, d_model], got shape {data.shape}")
        if not 0 < batch_size <= data.shape[0]:
            raise ValueError(f"ArrayBatches: batch_size={batch_size} must be in [1, N={data.shape[0]}]")
        self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        n = len(self.data)
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = pos // n, pos % n
        rows = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            rows[sel] = self._perm(int(e))[offsets[sel]]
        return self.data[rows]

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / len(self.data)


# ----------------------------------------------------------------------------- config / state
@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """Everything that determines a training run (recorded in checkpoints and metrics)."""

    d_model: int
    n_features: int
    k: int
    steps: int
    lr: float
    batch_size: int
    seed: int
    aux_k: int
    aux_coef: float
    dead_tokens: int
    warmup_steps: int
    decay_frac: float
    adam_b1: float
    adam_b2: float
    adam_eps: float


@struct.dataclass
class TrainState:
    params: dict[str, jax.Array]  # W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d] (normalised space)
    opt_state: Any
    step: jax.Array  # int32 scalar: steps completed
    tokens_since_fired: jax.Array  # int32 [n], saturates at dead_tokens
    input_scale: jax.Array  # f32 scalar: x_normalised = x_raw * input_scale


def default_lr(n_features: int) -> float:
    """1.5e-3 at 8192 latents, scaled by 1/sqrt(width).

    About 5x the sparsify / Gao et al. heuristic (2e-4 at 16k latents), which is tuned for runs of
    10^5 steps; crossmap trains for a few hundred steps (a few epochs of ~300k tokens).  Measured on
    Qwen2.5-Coder-0.5B layer-16 activations (105k training tokens, attention-sink tokens removed;
    8192 latents, k=32, batch 4096; held-out documents), FVE / dead fraction after 250 steps:
    lr 1e-3 0.80 / 0.1%, 1.5e-3 0.82 / 0.4%, 2e-3 0.82 / 1.7%; 3e-3 (300 steps) 0.84 / 6.6%;
    the old heuristic's 2.8e-4 gave 0.73 after 300 steps and 0.62 after 120.
    """
    return 1.5e-3 / math.sqrt(n_features / 8192)


def lr_schedule(cfg: SAETrainConfig) -> optax.Schedule:
    """Linear warm-up to cfg.lr, constant, then linear decay to 0 over the last decay_frac of steps."""
    decay = int(round(cfg.steps * cfg.decay_frac))
    flat_end = max(cfg.steps - decay, 0)
    warm = min(cfg.warmup_steps, flat_end)
    return optax.join_schedules(
        [optax.linear_schedule(cfg.lr / max(warm, 1), cfg.lr, max(warm, 1)),
         optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, 0.0, max(decay, 1))],
        boundaries=[warm, flat_end])


def make_optimizer(cfg: SAETrainConfig) -> optax.GradientTransformation:
    return optax.adam(lr_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def init_params(cfg: SAETrainConfig, data_mean: np.ndarray, key: jax.Array) -> dict[str, jax.Array]:
    """Unit-norm Gaussian decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec = data mean (normalised)."""
    W_dec = _unit_rows(jax.random.normal(key, (cfg.n_features, cfg.d_model), jnp.float32))
    return {"W_enc": W_dec.T, "b_enc": jnp.zeros((cfg.n_features,), jnp.float32), "W_dec": W_dec,
            "b_dec": jnp.asarray(data_mean, jnp.float32)}


# ----------------------------------------------------------------------------- step
def sae_loss(params: dict[str, jax.Array], x: jax.Array, dead: jax.Array, k: int, aux_k: int,
             aux_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FVU + aux_coef * AuxK on a normalised batch x [B, d]; `dead` is bool [n]."""
    n = params["W_dec"].shape[0]
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    values, idx = jax.lax.top_k(pre, k)
    z = scatter_topk(jax.nn.relu(values), idx, n)
    recon = z @ params["W_dec"] + params["b_dec"]
    err = x - recon
    total_var = jnp.sum((x - x.mean(0)) ** 2)
    fvu = jnp.sum(err**2) / total_var
    # AuxK: the top aux_k dead latents reconstruct the (fixed) residual; live latents are masked
    # out with -inf, whose relu is 0, so fewer than aux_k dead latents is fine.
    aux_values, aux_idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), aux_k)
    z_aux = scatter_topk(jax.nn.relu(aux_values), aux_idx, n)
    aux = jnp.sum((z_aux @ params["W_dec"] - jax.lax.stop_gradient(err)) ** 2) / total_var
    n_dead = jnp.sum(dead)
    aux_weight = jnp.minimum(n_dead / aux_k, 1.0)  # scale down while few latents are dead
    aux = aux_weight * aux
    loss = fvu + aux_coef * aux
    return loss, {"fvu": fvu, "aux": aux, "fired": jnp.any(z > 0, axis=0), "l0": jnp.mean(jnp.sum(z > 0, -1))}


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnums=0)
def train_step(state: TrainState, x: jax.Array, cfg: SAETrainConfig,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a raw batch x [batch_size, d_model]; the state is donated.

    Jitted once per (cfg, mesh, shapes) and cached across `train_sae` calls.
    """
    optimizer = make_optimizer(cfg)
    x = x.astype(jnp.float32) * state.input_scale
    dead = state.tokens_since_fired >= cfg.dead_tokens
    (loss, out), grads = jax.value_and_grad(sae_loss, has_aux=True)(
        state.params, x, dead, cfg.k, cfg.aux_k, cfg.aux_coef)
    W_dec = state.params["W_dec"]
    # rows stay on the unit sphere: drop the radial part of their gradient ...
    g = grads["W_dec"]
    grads = dict(grads, W_dec=g - jnp.sum(g * W_dec, axis=1, keepdims=True) * W_dec)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = dict(params, W_dec=_unit_rows(params["W_dec"]))  # ... and undo Adam's drift off it
    tokens = jnp.where(out["fired"], 0, jnp.minimum(state.tokens_since_fired + x.shape[0], cfg.dead_tokens))
    new = state.replace(params=params, opt_state=opt_state, step=state.step + 1, tokens_since_fired=tokens)
    if mesh is not None:  # the state stays replicated; only the batch is split
        replicated = NamedSharding(mesh, PartitionSpec())
        new = jax.lax.with_sharding_constraint(new, jax.tree.map(lambda _: replicated, new))
    metrics = {"loss": loss, "fve": 1.0 - out["fvu"], "aux": out["aux"], "l0": out["l0"],
               "dead_frac": jnp.mean(tokens >= cfg.dead_tokens)}
    return new, metrics


# ----------------------------------------------------------------------------- statistics for init
def _check_finite_step(loss: float, step: int, mngr) -> None:
    if not math.isfinite(loss):
        kept = f"the checkpoint of step {mngr.latest_step()} is kept" if mngr is not None and \
            mngr.latest_step() is not None else "no checkpoint was written"
        raise ValueError(f"train_sae: the loss is not finite ({loss}) at step {step}: a NaN/inf or huge input row "
                         f"in the batches up to that step, or a learning rate too high; {kept}, nothing after it")


def _input_moments(batches: Callable[[int], np.ndarray], data: np.ndarray | None, n_batches: int,
                   d_model: int) -> tuple[np.ndarray, float]:
    """(mean vector, mean squared norm) of the raw inputs, in float64."""
    total, sq, count = np.zeros(d_model), 0.0, 0
    chunks = ((data[i:i + 65536] for i in range(0, len(data), 65536)) if data is not None
              else (batches(s) for s in range(n_batches)))
    for c in chunks:
        c = np.asarray(c, np.float64)
        total += c.sum(0)
        sq += float(np.einsum("nd,nd->", c, c))
        count += len(c)
    return total / count, sq / count


# ----------------------------------------------------------------------------- checkpoints
def _check_resume(saved: dict, cfg: SAETrainConfig, ckpt_dir) -> None:
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k != "steps" and saved.get(k) != v}
    if diff:
        raise ValueError(f"{ckpt_dir}: checkpoint was written by a run with different settings "
                         f"(name: (checkpoint, now)) {diff}; use a fresh ckpt_dir")
    if saved.get("steps") != cfg.steps:
        warnings.warn(f"{ckpt_dir}: resuming a run planned for {saved.get('steps')} steps with steps="
                      f"{cfg.steps}; the learning-rate schedule changes accordingly", stacklevel=3)


# ----------------------------------------------------------------------------- driver
def train_sae(batches: BatchSource, d_model: int, n_features: int, k: int, steps: int,
              lr: float | None = None, batch_size: int = 4096, seed: int = 0,
              ckpt_dir: str | os.PathLike | None = None, mesh: Mesh | None = None, *,
              aux_k: int | None = None, aux_coef: float = 1 / 32, dead_tokens: int = 200_000,
              warmup_steps: int | None = None, decay_frac: float = 0.2, adam_b1: float = 0.9,
              adam_b2: float = 0.999, adam_eps: float = 1e-8, ckpt_every: int = 500, log_every: int = 25,
              init_batches: int = 16, layer: int | None = None, model_id: str = "", hook_name: str = "",
              progress: bool = True, desc: str = "sae") -> tuple[SAE, dict[str, Any]]:
    """Train a TopK SAE and return it with a metrics dict.

    batches: a host array [N, d_model] (streamed as `ArrayBatches(batches, batch_size, seed)`), or
        a callable step -> [batch_size, d_model] float array that returns the same rows for the
        same step every time (needed for exact resume).  Leave attention-sink tokens out (e.g.
        Qwen2.5's first position, whose norm is ~50x the others'): they would set the input scale
        and dominate the loss and FVE.
    d_model, n_features, k: widths and the number of active latents per token.
    steps: optimiser steps (tokens seen = steps * batch_size).
    lr: Adam peak learning rate; None -> default_lr(n_features) (1.5e-3 at 8192 latents).
    ckpt_dir: orbax checkpoints (params, optimiser state, step, dead tracker, input scale,
        history) every `ckpt_every` steps and at the end; if it already holds a checkpoint of the
        same settings, training resumes from the latest one.
    mesh: batches are split over the mesh's batch axes (crossmap.sharding.shard_batch); the state
        is replicated, so gradients are all-reduced by the compiler.  batch_size must divide evenly.
    aux_k: dead latents used by AuxK (default d_model // 2, at most n_features); aux_coef weights it.
    dead_tokens: a latent is dead once it has not fired for this many tokens.
    warmup_steps: default min(1000, steps // 10); decay_frac: final linear decay share of steps.
    init_batches: with a callable source, how many leading batches estimate the input scale and
        b_dec's initial mean (an array source uses all rows).
    layer, model_id, hook_name: metadata stored in the returned SAE.

    Metrics: final {loss, fve, aux, l0, dead_frac} of the last step, a history of those every
    `log_every` steps, input_scale, tokens, epochs (array source), config, resumed_from, wall_s.
    """
    t0 = time.time()
    data = None
    if isinstance(batches, np.ndarray) or hasattr(batches, "__array__") and not callable(batches):
        data = np.asarray(batches)
        if data.ndim != 2 or data.shape[1] != d_model:
            raise ValueError(f"train_sae: activations must be [N, d_model={d_model}], got {data.shape}")
        batches = ArrayBatches(data, batch_size, seed)
    elif not callable(batches):
        raise TypeError(f"train_sae: batches must be an array or a callable step -> array, got {type(batches)}")
    if not 0 < k <= n_features:
        raise ValueError(f"train_sae: need 0 < k <= n_features, got k={k}, n_features={n_features}")
    if steps <= 0 or batch_size <= 0 or dead_tokens <= 0:
        raise ValueError(f"train_sae: steps ({steps}), batch_size ({batch_size}) and dead_tokens "
                         f"({dead_tokens}) must be positive")
    cfg = SAETrainConfig(
        d_model=int(d_model), n_features=int(n_features), k=int(k), steps=int(steps),
        lr=float(default_lr(n_features) if lr is None else lr), batch_size=int(batch_size), seed=int(seed),
        aux_k=int(min(aux_k if aux_k is not None else max(d_model // 2, 1), n_features)),
        aux_coef=float(aux_coef), dead_tokens=int(dead_tokens),
        warmup_steps=int(min(1000, steps // 10) if warmup_steps is None else warmup_steps),
        decay_frac=float(decay_frac), adam_b1=float(adam_b1), adam_b2=float(adam_b2),
        adam_eps=float(adam_eps))

    def host_batch(step: int) -> np.ndarray:
        x = np.asarray(batches(step), np.float32)
        if x.shape != (cfg.batch_size, cfg.d_model):
            raise ValueError(f"train_sae: batches({step}) returned shape {x.shape}, expected "
                             f"{(cfg.batch_size, cfg.d_model)}")
        return x

    def put(x: np.ndarray) -> jax.Array:
        return shard_batch(x, mesh) if mesh is not None else jax.device_put(x)

    # --- fresh state (also the restore target) ---------------------------------------------
    mean, mean_sq_norm = _input_moments(host_batch, data, max(1, min(init_batches, steps)), cfg.d_model)
    if not (np.isfinite(mean_sq_norm) and np.all(np.isfinite(mean))):
        raise ValueError("train_sae: the activations hold non-finite values (NaN/inf), or values so large that "
                         "their squared norm overflows float64")
    if not mean_sq_norm > 0:
        raise ValueError("train_sae: the activations are all zero")
    scale = math.sqrt(cfg.d_model / mean_sq_norm)
    optimizer = make_optimizer(cfg)
    _, init_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init_params(cfg, mean * scale, init_key)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.asarray(0, jnp.int32),
                       tokens_since_fired=jnp.zeros((cfg.n_features,), jnp.int32),
                       input_scale=jnp.asarray(scale, jnp.float32))
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

    history: list[dict[str, float]] = []
    resumed_from = None
    mngr = checkpoint_manager(ckpt_dir) if ckpt_dir is not None else None
    try:
        if mngr is not None and mngr.latest_step() is not None:
            resumed_from = int(mngr.latest_step())
            state, meta = restore_state(mngr, resumed_from, state)
            _check_resume(meta["config"], cfg, ckpt_dir)
            history = list(meta.get("history", []))
        start = int(state.step)

        def meta() -> dict:
            return {"config": dataclasses.asdict(cfg), "history": history,
                    "input_scale": float(state.input_scale)}

        bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
        x_next = put(host_batch(start)) if start < cfg.steps else None
        for s in range(start, cfg.steps):
            state, metrics = train_step(state, x_next, cfg, mesh)
            done = s + 1
            if done % log_every == 0 or done == cfg.steps:
                row = {"step": done, **{n: float(v) for n, v in jax.device_get(metrics).items()}}
                _check_finite_step(row["loss"], done, mngr)
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", fve=f"{row['fve']:.3f}", l0=f"{row['l0']:.1f}",
                                dead=f"{row['dead_frac']:.3f}", refresh=False)
            if mngr is not None and (done % ckpt_every == 0 or done == cfg.steps):
                _check_finite_step(float(metrics["loss"]), done, mngr)  # a NaN state never overwrites a good one
                failpoint("sae_checkpoint")
                save_state(mngr, int(state.step), state, meta())
                failpoint("sae_checkpoint")
            if done < cfg.steps:
                # fetched while the device still runs step s (dispatch is asynchronous)
                x_next = put(host_batch(done))
            bar.update(1)
        bar.close()
        if mngr is not None and mngr.latest_step() != int(state.step):
            save_state(mngr, int(state.step), state, meta())
    finally:
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()

    p = jax.device_get(state.params)
    sae = make_sae(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], activation="topk", k=cfg.k,
                   input_scale=float(state.input_scale), apply_b_dec_to_input=True, layer=layer,
                   hook_name=hook_name or (f"blocks.{layer}.hook_resid_post" if layer is not None else ""),
                   model_id=model_id, source_format="crossmap", where="train_sae")
    final = {k_: v for k_, v in history[-1].items() if k_ != "step"} if history else {}
    out = {"final": final, "history": history, "input_scale": float(state.input_scale),
           "tokens": cfg.steps * cfg.batch_size, "config": dataclasses.asdict(cfg),
           "resumed_from": resumed_from, "wall_s": time.time() - t0,
           "dead_frac": float(np.mean(np.asarray(state.tokens_since_fired) >= cfg.dead_tokens))}
    if isinstance(batches, ArrayBatches):
        out["epochs"] = batches.epochs(cfg.steps)
    return sae, out
