"""Train an NLA pair (AV and AR) for any supported model, in JAX: SFT of both, then GRPO of the AV.

    summary = train_nla(load_config("configs/nla_demo.py"))      # crossmap train-nla --config ...

The run directory holds, in the order they are made:

    data/examples.npz, data/targets.json   activations at a few positions per document, contexts, split, targets
    av/nla_meta.yaml, ar/nla_meta.yaml     the sidecars, written first: training renders its prompts from them
    ckpt/{av_sft,ar_sft,rl}/               orbax checkpoints (trainable weights, optimizer state, step, record)
    metrics.jsonl                          one row per logged step: loss, cosine, reward, KL, tokens/s
    export/av, export/ar                   release-layout checkpoints (config.json, safetensors, tokenizer, sidecar)
    eval.json                              held-out round-trip cosine after SFT and after RL, with baselines

Every phase resumes from its latest checkpoint after a kill, and ends with the same weights as a run
that was never stopped (the batch of step s is a function of the seed and s alone).  A run directory
started under other settings is refused, naming what changed; `restart=True` starts it afresh.  A
step whose loss or gradient is not finite is not applied: the run stops naming the phase and step,
and the last checkpoint stays as it was.

Weights: master weights in float32, the forward in `finetune.compute_dtype`.  LoRA (`finetune.mode`)
trains adapters on the attention and MLP projections (`lora`), the base held in the compute dtype;
full fine-tuning trains every weight.  Parameters, adapters and optimizer state are placed by their
logical axis names (`crossmap.sharding.LOGICAL_RULES`: width over `fsdp`, heads and MLP over
`tensor`), and batches are split over the batch axes.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from .. import sharding as shd
from ..activations.corpus import read_corpus
from ..checkpointing import checkpoint_manager, restore_state, save_state
from ..failpoints import failpoint
from ..integrity import file_sha256, path_identity
from ..jsonio import load_json, save_json, to_jsonable
from ..models import Transformer, load_model, make_hidden_fn, resolve_model_path, save_checkpoint
from ..models.checkpoint_files import write_safetensors
from ..verbalize.engine import Injection, generate
from ..verbalize.spec import build_prompt, stop_ids_for
from ..verbalize.verbalizer import rescale_rows
from . import lora as lora_lib
from .adapted import MANIFEST, truncated
from .meta import (
    SIDECAR_NAME,
    check_marker_token,
    default_av_render,
    pick_marker,
    read_nla_meta,
    write_nla_meta,
)
from .objectives import (
    ARBatch,
    AVBatch,
    ar_sft_loss,
    av_sft_loss,
    group_advantages,
    grpo_loss,
    normalised_mse,
    response_logprobs,
    rewards_from_mse,
)
from .reconstructor import VALUE_HEAD_FILE, reconstruct_batch
from .train_config import validate_train_config
from .train_data import (
    SPLITS,
    Examples,
    collect_examples,
    generated_explanations,
    snippet_explanations,
    wrap_explanation,
)
from .verbalizer import nla_verbalizer_spec


class NonFiniteStep(RuntimeError):
    """A step's loss or gradient was not finite; it was not applied."""


# ------------------------------------------------------------------------------------------ pytrees
def logical_tree(model: Transformer) -> dict:
    """The pure-dict tree of each parameter's logical axis names."""
    _, state = nnx.split(model)
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = tuple(var.get_metadata().get("logical"))
    return out


def place(tree: Any, logical: Any, mesh, rules=None) -> Any:
    """Each array of `tree` onto `mesh` by its logical names (a tree of tuples of the same structure)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
    return jax.tree.map(lambda names, x: jax.device_put(x, shd.sharding_for(mesh, names, np.shape(x), rules)),
                        logical, tree, is_leaf=is_names)


def cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------------------ optimiser
def make_optimizer(phase: ml_collections.ConfigDict, head_lr: float | None = None) -> optax.GradientTransformation:
    """Clipped AdamW with linear warm-up and cosine decay to a tenth; a separate rate for the AR head."""
    def adamw(lr: float):
        steps = max(int(phase.steps), 1)
        warmup = min(int(phase.warmup_steps), steps - 1) if steps > 1 else 0
        schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, steps, lr * 0.1)
        return optax.chain(optax.clip_by_global_norm(phase.max_grad_norm),
                           optax.adamw(schedule, weight_decay=phase.weight_decay))
    if head_lr is None:
        return adamw(float(phase.lr))
    def labels(tree: dict) -> dict:
        return {k: jax.tree.map(lambda _, label="head" if k == "head" else "body": label, v) for k, v in tree.items()}
    return optax.multi_transform({"body": adamw(float(phase.lr)), "head": adamw(float(head_lr))}, labels)


# ------------------------------------------------------------------------------------------ learner
class Learner:
    """One model being trained: its frozen base (LoRA), trainable tree, optimizer and jitted step.

    trainable: {"model": params} (full) or {"adapters": ...} (LoRA), plus {"head": W} for an AR.
    loss_fn(model, trainable, micro) -> (loss, metrics); a batch's leaves have a leading axis of
    gradient-accumulation micro-batches, averaged before the one optimizer update.
    """

    def __init__(self, graphdef, frozen: dict | None, trainable: dict, *, alpha: float, compute_dtype: str,
                 optimizer: optax.GradientTransformation, loss_fn: Callable, mesh=None, rules=None):
        self.graphdef, self.frozen, self.alpha = graphdef, frozen, float(alpha)
        self.compute = jnp.dtype(compute_dtype)
        self.optimizer, self.mesh, self.rules = optimizer, mesh, rules
        self.state = {"trainable": trainable, "opt": jax.jit(optimizer.init)(trainable),
                      "step": jnp.zeros((), jnp.int32)}
        self._forward = jax.jit(self._forward_params)
        self.retarget(loss_fn)

    def retarget(self, loss_fn: Callable, optimizer: optax.GradientTransformation | None = None) -> None:
        """Train the same weights on another loss (GRPO after SFT); a new optimizer starts from a fresh state."""
        if optimizer is not None:
            self.optimizer = optimizer
            self.state["opt"] = jax.jit(optimizer.init)(self.state["trainable"])
        self._step = jax.jit(self._make_step(loss_fn), donate_argnums=0)

    def _forward_params(self, trainable: dict, frozen: dict | None) -> dict:
        base = trainable["model"] if frozen is None else lora_lib.merge_adapters(frozen, trainable["adapters"],
                                                                                  self.alpha)
        return cast_floats(base, self.compute)

    def _make_step(self, loss_fn: Callable):
        def loss_of(trainable, frozen, micro):
            model = nnx.merge(self.graphdef, self._forward_params(trainable, frozen))
            return loss_fn(model, trainable, micro)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def step(state, frozen, batch):
            def one(carry, micro):
                (loss, metrics), grads = grad_fn(state["trainable"], frozen, micro)
                total = jax.tree.map(jnp.add, carry, grads)
                return total, metrics
            zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
            grads, metrics = jax.lax.scan(one, zeros, batch)
            n = jax.tree.leaves(batch)[0].shape[0]
            grads = jax.tree.map(lambda g: g / n, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
            grad_norm = optax.tree.norm(grads)
            updates, opt = self.optimizer.update(grads, state["opt"], state["trainable"])
            trainable = optax.apply_updates(state["trainable"], updates)
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(ok, new, old)
            new = {"trainable": jax.tree.map(keep, trainable, state["trainable"]),
                   "opt": jax.tree.map(keep, opt, state["opt"]), "step": state["step"] + ok.astype(jnp.int32)}
            return new, {**metrics, "grad_norm": grad_norm, "finite": ok}
        return step

    def params(self) -> dict:
        """The forward weights now (compute dtype): the model's pure dict."""
        return self._forward(self.state["trainable"], self.frozen)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params())

    def step(self, batch: Any, where: str) -> dict[str, float]:
        if self.mesh is not None:  # [accum, batch, ...]: split the batch axis
            batch = jax.tree.map(lambda x: jax.device_put(x, shd.sharding_for(
                self.mesh, (None, "batch") + (None,) * (np.ndim(x) - 2), np.shape(x), self.rules)), batch)
        self.state, metrics = self._step(self.state, self.frozen, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not metrics.pop("finite"):
            raise NonFiniteStep(f"{where}: the loss ({metrics['loss']}) or the gradient norm ({metrics['grad_norm']}) "
                                "is not finite; the step was not applied and no checkpoint was written after it "
                                "(a learning rate too high, or a non-finite input)")
        return metrics


# ------------------------------------------------------------------------------------------ batches
def step_rows(n_rows: int, batch: int, step: int, seed: int) -> np.ndarray:
    """The rows of step `step`: consecutive slices of one seeded permutation per epoch."""
    if n_rows < 1:
        raise ValueError("step_rows: no rows")
    first = step * batch
    out = []
    for g in range(first, first + batch):
        epoch, at = divmod(g, n_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(n_rows)[at])
    return np.asarray(out, np.int64)


@dataclass
class AVData:
    """Encoded AV examples: the shared prompt and every row's response ids, padded."""

    prompt: np.ndarray  # int32 [P]
    marker: int
    responses: np.ndarray  # int32 [N, R]
    lengths: np.ndarray  # int32 [N]
    vectors: np.ndarray  # float32 [N, D] at the injection norm

    def batch(self, rows: np.ndarray) -> AVBatch:
        p, r = len(self.prompt), self.responses.shape[1]
        n = len(rows)
        tokens = np.concatenate([np.broadcast_to(self.prompt, (n, p)), self.responses[rows]], axis=1)
        in_response = np.arange(r)[None, :] < self.lengths[rows][:, None]
        valid = np.concatenate([np.ones((n, p), bool), in_response], axis=1)
        return AVBatch(tokens.astype(np.int32), valid, in_response.astype(np.float32), self.vectors[rows])


def encode_responses(tokenizer, texts: list[str], end_id: int, length: int, wrap: Callable[[str], str]) -> tuple:
    """(ids [N, length], lengths): wrap(text) + end token; an inner text too long is cut so the closing
    tag and the end token always fit."""
    ids = np.zeros((len(texts), length), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    overhead = len(tokenizer(wrap(""), add_special_tokens=False)["input_ids"]) + 1
    if overhead + 1 > length:
        raise ValueError(f"nla.response_tokens={length} cannot hold even an empty explanation ({overhead} tokens)")
    for i, text in enumerate(texts):
        inner = tokenizer(text, add_special_tokens=False)["input_ids"]
        budget = length - overhead - 2  # the tags can tokenise differently next to the text
        if len(inner) > budget:
            text = tokenizer.decode(inner[:budget], skip_special_tokens=True)
        row = [int(t) for t in tokenizer(wrap(text), add_special_tokens=False)["input_ids"]][:length - 1] + [end_id]
        ids[i, :len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def assistant_end_id(tokenizer, render: str) -> int:
    """The token that ends an assistant turn in the chat template (raw: the tokenizer's EOS)."""
    if render == "raw":
        if tokenizer.eos_token_id is None:
            raise ValueError("a raw-rendered AV needs a tokenizer with an EOS token to end its explanations")
        return int(tokenizer.eos_token_id)
    probe = "\ue000probe\ue000"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = text.split(probe, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the chat template puts nothing after an assistant message: no end-of-turn token to train")
    return int(ids[0])


def encode_ar(tokenizer, meta, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [N, length], valid, last) of each AR prompt; an explanation too long for `length` is cut
    before the template's suffix, which the head's token must end with."""
    suffix = list(meta.critic_suffix_ids)
    tokens = np.zeros((len(texts), length), np.int32)
    valid = np.zeros((len(texts), length), bool)
    last = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        ids = [int(t) for t in tokenizer(meta.ar_prompt(text), add_special_tokens=True)["input_ids"]]
        if len(ids) > length:
            inner = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut = len(inner) - (len(ids) - length) - 2
            text = tokenizer.decode(inner[:max(cut, 0)], skip_special_tokens=True)
            ids = [int(t) for t in tokenizer(meta.ar_prompt(text), add_special_tokens=True)["input_ids"]]
        if ids[-len(suffix):] != suffix or len(ids) > length:
            raise ValueError(f"{meta.path}: the AR prompt of example {i} does not end with tokens.critic_suffix_ids "
                             f"{suffix} within nla.ar_tokens={length} tokens")
        tokens[i, :len(ids)] = ids
        valid[i, :len(ids)] = True
        last[i] = len(ids) - 1
    return tokens, valid, last


def ar_batch(tokens, valid, last, targets, rows: np.ndarray) -> ARBatch:
    return ARBatch(tokens[rows], valid[rows], last[rows], targets[rows].astype(np.float32),
                   np.ones(len(rows), np.float32))


def stack(batches: list) -> Any:
    """Micro-batches -> one batch with a leading accumulation axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


# ------------------------------------------------------------------------------------------ the run
class _Run:
    """What the phases share: config, directories, tokenizer, sidecars, encoded data, logging."""

    def __init__(self, c: ml_collections.ConfigDict, root: Path, progress: bool):
        self.c, self.root, self.progress = c, root, progress
        self.metrics_path = root / "metrics.jsonl"

    def log(self, row: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            import json

            fh.write(json.dumps(to_jsonable(row, strict=False)) + "\n")

    def forget_logs_after(self, phase: str, step: int) -> None:
        """Drop logged rows of `phase` past `step` (a killed run logged them before its checkpoint)."""
        if not self.metrics_path.exists():
            return
        import json

        rows = [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line]
        kept = [r for r in rows if not (r.get("phase") == phase and r.get("step", 0) > step)]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def _identity(c: ml_collections.ConfigDict, *sections: str) -> dict:
    return {s: to_jsonable(c[s].to_dict() if isinstance(c[s], ml_collections.ConfigDict) else c[s]) for s in sections}


def _check_identity(saved: dict, now: dict, where: Path) -> None:
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{where}: started with other settings ({', '.join(changed)} changed); nothing there is reused "
                         "silently: run with --restart to start afresh, or give another run_dir")


def run_phase(run: _Run, name: str, learners: dict[str, Learner], steps: int, identity: dict,
              do_step: Callable[[int], dict[str, float]], tokens_of_step: Callable[[dict], float]) -> dict:
    """The resumable loop of one phase: restore the latest checkpoint, step, log, checkpoint."""
    mngr = checkpoint_manager(run.root / "ckpt" / name)
    state = {k: v.state for k, v in learners.items()}
    start = 0
    try:
        latest = mngr.latest_step()
        if latest is not None:
            restored, meta = restore_state(mngr, latest, state)
            _check_identity(meta["identity"], to_jsonable(identity), run.root / "ckpt" / name)
            for k, learner in learners.items():
                learner.state = restored[k]
            start = int(latest)
        run.forget_logs_after(name, start)
        if start >= steps:
            return {"resumed_from": start, "steps": steps}
        bar = tqdm(total=steps, initial=start, desc=name, unit="step", disable=not run.progress, dynamic_ncols=True)
        t0, tokens = time.perf_counter(), 0.0
        for s in range(start, steps):
            metrics = do_step(s)
            tokens += tokens_of_step(metrics)
            done = s + 1
            failpoint("nla_train_step")
            if done % run.c.log_every == 0 or done == steps:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                row = {"phase": name, "step": done, **metrics, "tokens_per_s": tokens / elapsed}
                run.log(row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "cosine", "reward", "kl")},
                                refresh=False)
            if done % run.c.checkpoint_every == 0 or done == steps:
                save_state(mngr, done, {k: v.state for k, v in learners.items()}, {"identity": to_jsonable(identity)})
                mngr.wait_until_finished()
            bar.update(1)
        bar.close()
        return {"resumed_from": start or None, "steps": steps, "wall_s": time.perf_counter() - t0}
    finally:
        mngr.wait_until_finished()
        mngr.close()


def _pure(model: Transformer) -> dict:
    return nnx.to_pure_dict(nnx.split(model)[1])


def _learner_parts(c, params: dict, logical: dict, mesh, key) -> tuple[dict | None, dict]:
    """(frozen, trainable) for full fine-tuning or LoRA, placed on `mesh` by their logical names."""
    if c.finetune.mode == "full":
        # copies: the step donates its state, and these arrays may also back another model (the AR shares
        # the AV's embeddings and first blocks at load)
        master = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), params)
        return None, {"model": place(master, logical, mesh)}
    adapters = lora_lib.init_adapters(params, int(c.finetune.rank), key, tuple(c.finetune.targets))
    adapters = place(adapters, lora_lib.adapter_logical(adapters, logical), mesh)
    frozen = place(cast_floats(params, jnp.dtype(c.finetune.compute_dtype)), logical, mesh)
    return frozen, {"adapters": adapters}


def train_nla(c: ml_collections.ConfigDict, *, restart: bool = False, progress: bool = True) -> dict:
    """Run every phase of `c` (see the module docstring); returns the summary also saved as eval.json."""
    validate_train_config(c)
    root = Path(c.run_dir or f"checkpoints/nla-{c.name}")
    if restart and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    run = _Run(c, root, progress)
    mesh = shd.make_mesh(dict(c.mesh)) if len(jax.devices()) > 1 else None

    # -- the base model -------------------------------------------------------------------------
    lm = load_model(c.model.path, dtype="float32", mesh=mesh)
    cfg, tokenizer = lm.config, lm.tokenizer
    layer = int(c.model.layer)
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"model.layer={layer} is out of range for {c.model.path}, which has {cfg.n_layers} blocks "
                         f"(valid: 0..{cfg.n_layers - 1})")
    model_identity = path_identity(resolve_model_path(c.model.path))

    # -- data -----------------------------------------------------------------------------------
    examples, targets = _data(run, lm, layer, model_identity, mesh)
    rows = {s: examples.rows(s) for s in SPLITS}
    injection_scale = float(c.nla.injection_scale) or float(np.mean(np.linalg.norm(
        examples.vectors[np.concatenate([rows["av_sft"], rows["ar_sft"], rows["rl"]])], axis=1)))

    # -- sidecars, written first; training renders its prompts from them ------------------------
    render = default_av_render(tokenizer)
    marker = pick_marker(tokenizer, render=render)
    provenance = {"stage": "crossmap", "base_checkpoint": str(c.model.path), "created_by": "crossmap train-nla",
                  "training": {"finetune": c.finetune.mode, "targets": c.targets.source}}
    for role in ("av", "ar"):
        (root / role).mkdir(exist_ok=True)
        write_nla_meta(root / role, role=role, tokenizer=tokenizer, d_model=cfg.d_model, injection_char=marker,
                       injection_scale=injection_scale, extraction_layer=layer, provenance=provenance, av_render=render)
    av_meta, ar_meta = read_nla_meta(root / "av", role="av"), read_nla_meta(root / "ar", role="ar")
    check_marker_token(av_meta, tokenizer)
    spec = nla_verbalizer_spec(av_meta)
    prompt = build_prompt(tokenizer, spec)
    end_id = assistant_end_id(tokenizer, render)
    texts = [targets.get(i, "") for i in range(len(examples))]
    scaled = rescale_rows(examples.vectors, injection_scale)
    R = int(c.nla.response_tokens)
    responses, lengths = encode_responses(tokenizer, texts, end_id, R, wrap_explanation)
    av_data = AVData(np.asarray(prompt.token_ids, np.int32), prompt.marker_index, responses, lengths, scaled)
    ar_tokens, ar_valid, ar_last = encode_ar(tokenizer, ar_meta, texts, int(c.nla.ar_tokens))
    P, M = len(prompt.token_ids), prompt.marker_index

    key = jax.random.key(int(c.seed))
    logical = logical_tree(lm.model)
    base_params = _pure(lm.model)
    compute = c.finetune.compute_dtype
    alpha = float(c.finetune.alpha)

    # -- AV -------------------------------------------------------------------------------------
    av_graphdef = nnx.split(lm.model)[0]
    frozen, trainable = _learner_parts(c, base_params, logical, mesh, jax.random.fold_in(key, 1))
    av_loss = lambda model, _t, b: av_sft_loss(model, b, P, M)
    av = Learner(av_graphdef, frozen, trainable, alpha=alpha, compute_dtype=compute,
                 optimizer=make_optimizer(c.av_sft), loss_fn=av_loss, mesh=mesh)

    # -- AR: the backbone truncated to blocks 0..K, a d x d head starting at the identity ----------
    ar_abstract, ar_params = truncated(lm.model, layer)
    ar_logical = logical_tree(ar_abstract)
    ar_frozen, ar_trainable = _learner_parts(c, ar_params, ar_logical, mesh, jax.random.fold_in(key, 2))
    ar_trainable["head"] = place(jnp.eye(cfg.d_model, dtype=jnp.float32), ("embed", None), mesh)

    def ar_loss(model, trainable_tree, b):
        return ar_sft_loss(model, trainable_tree["head"].astype(jnp.dtype(compute)), b)

    ar = Learner(nnx.split(ar_abstract)[0], ar_frozen, ar_trainable, alpha=alpha, compute_dtype=compute,
                 optimizer=make_optimizer(c.ar_sft, head_lr=float(c.ar_sft.head_lr)), loss_fn=ar_loss, mesh=mesh)
    del lm, base_params, ar_params

    data_identity = {"model": model_identity, **_identity(c, "seed", "corpus", "targets", "nla", "finetune"),
                     "layer": layer}

    def sft_step(learner: Learner, phase: str, split: str, make: Callable[[np.ndarray], Any]):
        p = c[phase]

        def step(s: int) -> dict[str, float]:
            micro = [make(rows[split][step_rows(len(rows[split]), int(p.batch_size), s * int(p.grad_accum) + a,
                                                int(c.seed))]) for a in range(int(p.grad_accum))]
            return learner.step(stack(micro), f"{phase} step {s + 1}")
        return step

    summary: dict = {"run_dir": str(root), "injection_scale": injection_scale, "marker": marker, "render": render,
                     "examples": {s: int(len(r)) for s, r in rows.items()}, "phases": {}}
    summary["phases"]["av_sft"] = run_phase(
        run, "av_sft", {"av": av}, int(c.av_sft.steps), {**data_identity, **_identity(c, "av_sft")},
        sft_step(av, "av_sft", "av_sft", av_data.batch), lambda m: m["tokens"])
    summary["phases"]["ar_sft"] = run_phase(
        run, "ar_sft", {"ar": ar}, int(c.ar_sft.steps), {**data_identity, **_identity(c, "ar_sft")},
        sft_step(ar, "ar_sft", "ar_sft", lambda r: ar_batch(ar_tokens, ar_valid, ar_last, examples.vectors, r)),
        lambda m: float(c.ar_sft.batch_size * c.ar_sft.grad_accum * c.nla.ar_tokens))

    evaluator = Evaluator(c, tokenizer, av_meta, ar_meta, spec, av_data, examples, rows["eval"], mesh)
    summary["eval_rows"] = [int(r) for r in evaluator.rows]
    summary["after_sft"] = evaluator.round_trip(av, ar)

    # -- GRPO -----------------------------------------------------------------------------------
    if int(c.rl.steps) > 0:
        reference = av.params()  # the SFT policy, fixed
        grpo = GRPO(c, av, ar, reference, av_data, evaluator, rows["rl"], ar_meta, tokenizer,
                    ar_optimizer=make_optimizer(c.rl, head_lr=float(c.ar_sft.head_lr)))
        summary["phases"]["rl"] = run_phase(
            run, "rl", {"av": av, "ar": ar}, int(c.rl.steps),
            {**data_identity, **_identity(c, "av_sft", "ar_sft", "rl")}, grpo.step, lambda m: m["tokens"])
        summary["after_rl"] = evaluator.round_trip(av, ar)

    # -- export and the baselines ---------------------------------------------------------------
    av_dir, ar_dir = export_pair(run, av, ar, av_abstract_cfg=cfg, ar_abstract=ar_abstract, tokenizer=tokenizer)
    summary["export"] = {"av": str(av_dir), "ar": str(ar_dir)}
    summary["baselines"] = evaluator.baselines(ar)
    if c.eval.self_verbalizer:
        base = load_model(c.model.path, dtype=compute, mesh=mesh)
        summary["baselines"]["self_verbalizer"] = evaluator.self_verbalizer(ar, base.model)
        del base
    save_json(root / "eval.json", summary)
    return summary


def _data(run: _Run, lm, layer: int, model_identity, mesh) -> tuple[Examples, dict[int, str]]:
    """Examples and targets, built once and reused only under the same settings."""
    c = run.c
    identity = to_jsonable({"model": model_identity, "layer": layer, **_identity(c, "seed", "corpus", "targets")})
    data_dir = run.root / "data"
    record = data_dir / "identity.json"
    if record.exists():
        _check_identity(load_json(record), identity, data_dir)
        z = np.load(data_dir / "examples.npz")
        side = load_json(data_dir / "targets.json")
        examples = Examples(z["vectors"], z["doc_ids"], z["positions"], z["split"], side["contexts"], side["tails"])
        return examples, {int(k): v for k, v in side["targets"].items()}
    documents = read_corpus(c.corpus.path, max_documents=int(c.corpus.max_documents) or None)
    fn = make_hidden_fn(lm.model, layer, mesh)
    examples = collect_examples(fn, lm.tokenizer, documents, positions_per_doc=int(c.corpus.positions_per_doc),
                                seed=int(c.seed), split_fractions=tuple(c.corpus.split_fractions),
                                max_length=int(c.corpus.max_length), batch_size=int(c.corpus.batch_size),
                                buckets=tuple(c.corpus.buckets), context_tokens=int(c.corpus.context_tokens),
                                tail_tokens=int(c.corpus.tail_tokens), min_per_split=1, mesh=mesh,
                                progress=run.progress)
    supervised = np.concatenate([examples.rows("av_sft"), examples.rows("ar_sft"), examples.rows("eval")])
    if c.targets.source == "snippets":
        snippets = snippet_explanations(examples)
        targets = {int(r): snippets[r] for r in supervised}
    else:
        generator = lm if not c.targets.generator else load_model(c.targets.generator, dtype="bfloat16", mesh=mesh)
        targets = generated_explanations(generator.model, generator.tokenizer, examples, supervised,
                                         max_new_tokens=int(c.targets.max_new_tokens), mesh=mesh,
                                         progress=run.progress)
        empty = [r for r, t in targets.items() if not t]
        if len(empty) == len(targets):
            raise ValueError("targets.source='generated': the generator wrote nothing for every example")
        targets = {r: t for r, t in targets.items() if t}
        keep = np.ones(len(examples), bool)
        keep[empty] = False
        examples, targets = _subset(examples, keep, targets)
    data_dir.mkdir(exist_ok=True)
    np.savez(data_dir / "examples.npz", vectors=examples.vectors, doc_ids=examples.doc_ids,
             positions=examples.positions, split=examples.split)
    save_json(data_dir / "targets.json", {"contexts": examples.contexts, "tails": examples.tails,
                                          "targets": {str(k): v for k, v in targets.items()}})
    save_json(record, identity)
    return examples, targets


def _subset(examples: Examples, keep: np.ndarray, targets: dict[int, str]) -> tuple[Examples, dict[int, str]]:
    index = np.flatnonzero(keep)
    new_of = {int(old): new for new, old in enumerate(index)}
    sub = Examples(examples.vectors[index], examples.doc_ids[index], examples.positions[index], examples.split[index],
                   [examples.contexts[i] for i in index], [examples.tails[i] for i in index])
    return sub, {new_of[r]: t for r, t in targets.items() if r in new_of}


# ------------------------------------------------------------------------------------------ sampling
def sample_explanations(model: Transformer, tokenizer, spec, av_data: AVData, vectors: np.ndarray, *,
                        max_new_tokens: int, temperature: float, key, mesh=None) -> tuple[np.ndarray, np.ndarray, list]:
    """(response ids [N, R], lengths, parsed texts) generated by the AV for `vectors` (at the injection norm)."""
    prompts = np.broadcast_to(av_data.prompt, (len(vectors), len(av_data.prompt)))
    stops = stop_ids_for(tokenizer, spec, tuple(model.config.eos_token_ids))
    result = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, key=key,
                      stop_token_ids=stops, injection=Injection(vectors, np.full(len(vectors), av_data.marker)),
                      mesh=mesh)
    texts = [spec.parse(tokenizer.decode(t[:n], skip_special_tokens=False)) for t, n in
             zip(result.tokens, result.lengths, strict=True)]
    return result.tokens, result.lengths.astype(np.int32), texts


def reconstruct(ar: Learner, tokenizer, ar_meta, texts: list[str], length: int, batch: int = 32) -> np.ndarray:
    """The AR's reconstructions [N, D] (float32) of `texts`, from the learner's current weights."""
    params, head = ar.params(), ar.state["trainable"]["head"].astype(ar.compute)
    tokens, valid, last = encode_ar(tokenizer, ar_meta, texts, length)
    out = []
    for start in range(0, len(texts), batch):
        sl = slice(start, start + batch)
        n = len(tokens[sl])
        b_tokens, b_valid, b_last = (np.concatenate([x[sl], np.repeat(x[:1], batch - n, axis=0)])
                                     for x in (tokens, valid, last))
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), b_tokens.shape)
        out.append(np.asarray(reconstruct_batch(params, head, b_tokens, positions, b_valid, b_last, graphdef=ar.graphdef,
                                                layer=len(params["layers"]) - 1))[:n])
    return np.concatenate(out) if out else np.zeros((0, head.shape[0]), np.float32)


class GRPO:
    """One GRPO step: sample a group per vector, reward by the AR, update the AV (and the AR, by config)."""

    def __init__(self, c, av: Learner, ar: Learner, reference: dict, av_data: AVData, evaluator, rl_rows: np.ndarray,
                 ar_meta, tokenizer, ar_optimizer):
        self.c, self.av, self.ar, self.reference = c, av, ar, reference
        self.av_data, self.rows, self.ar_meta, self.tokenizer = av_data, rl_rows, ar_meta, tokenizer
        self.spec, self.mesh = evaluator.spec, evaluator.mesh
        P, M, kl = len(av_data.prompt), av_data.marker, float(c.rl.kl_coef)
        av.retarget(lambda model, _t, b: grpo_loss(model, b[0], P, M, b[1], b[2], kl), make_optimizer(c.rl))
        if c.rl.train_ar:
            ar.retarget(lambda model, t, b: ar_sft_loss(model, t["head"].astype(ar.compute), b), ar_optimizer)
        ref_graphdef = av.graphdef
        self._ref_logp = jax.jit(lambda params, batch: response_logprobs(nnx.merge(ref_graphdef, params), batch, P, M))

    def step(self, s: int) -> dict[str, float]:
        c, g = self.c, int(self.c.rl.group_size)
        picks = self.rows[step_rows(len(self.rows), int(c.rl.batch_size), s, int(c.seed))]
        vectors = np.repeat(self.av_data.vectors[picks], g, axis=0)
        key = jax.random.fold_in(jax.random.key(int(c.seed) + 7), s)
        R = self.av_data.responses.shape[1]
        tokens, lengths, texts = sample_explanations(self.av.model(), self.tokenizer, self.spec, self.av_data, vectors,
                                                     max_new_tokens=R, temperature=float(c.rl.temperature), key=key,
                                                     mesh=self.mesh)
        originals = np.repeat(self.av_data.vectors[picks], g, axis=0)
        recon = reconstruct(self.ar, self.tokenizer, self.ar_meta, texts, int(c.nla.ar_tokens), batch=len(texts))
        mse = np.asarray(normalised_mse(jnp.asarray(recon), jnp.asarray(originals)))
        rewards = np.asarray(rewards_from_mse(jnp.asarray(mse), c.rl.reward))
        advantages = np.asarray(group_advantages(jnp.asarray(rewards), g))
        rollout = AVData(self.av_data.prompt, self.av_data.marker, tokens.astype(np.int32), lengths, vectors)
        batch = rollout.batch(np.arange(len(vectors)))
        ref_logp = np.asarray(self._ref_logp(self.reference, batch))
        metrics = self.av.step(stack([(batch, advantages.astype(np.float32), ref_logp)]), f"rl step {s + 1}")
        out = {"loss": metrics["loss"], "kl": metrics["kl"], "tokens": metrics["tokens"],
               "reward": float(rewards.mean()), "cosine": float(np.mean(1 - mse / 2)),
               "grad_norm": metrics["grad_norm"]}
        if c.rl.train_ar:
            at, av_, al = encode_ar(self.tokenizer, self.ar_meta, texts, int(c.nla.ar_tokens))
            ar_metrics = self.ar.step(stack([ar_batch(at, av_, al, self.av_data.vectors[picks].repeat(g, 0),
                                                      np.arange(len(texts)))]), f"rl step {s + 1} (AR)")
            out["ar_loss"] = ar_metrics["loss"]
        return out


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Held-out round trips: the AV explains each held-out vector, the AR reconstructs it."""

    def __init__(self, c, tokenizer, av_meta, ar_meta, spec, av_data: AVData, examples: Examples, rows, mesh):
        self.c, self.tokenizer, self.av_meta, self.ar_meta, self.spec = c, tokenizer, av_meta, ar_meta, spec
        self.av_data, self.examples, self.mesh = av_data, examples, mesh
        self.rows = np.asarray(rows)[:int(c.eval.max_examples)]

    def _cosines(self, ar: Learner, texts: list[str]) -> np.ndarray:
        recon = reconstruct(ar, self.tokenizer, self.ar_meta, texts, int(self.c.nla.ar_tokens),
                            batch=int(self.c.eval.batch_size))
        originals = self.examples.vectors[self.rows]
        return 1.0 - np.asarray(normalised_mse(jnp.asarray(recon), jnp.asarray(originals))) / 2.0

    def explain(self, model: Transformer) -> list[str]:
        texts: list[str] = []
        b = int(self.c.eval.batch_size)
        for start in range(0, len(self.rows), b):
            rows = self.rows[start:start + b]
            _, _, t = sample_explanations(model, self.tokenizer, self.spec, self.av_data, self.av_data.vectors[rows],
                                          max_new_tokens=int(self.c.nla.response_tokens),
                                          temperature=float(self.c.eval.temperature), key=int(self.c.seed),
                                          mesh=self.mesh)
            texts.extend(t)
        return texts

    def round_trip(self, av: Learner, ar: Learner) -> dict:
        texts = self.explain(av.model())
        cos = self._cosines(ar, texts)
        return {**summarise(cos), "examples": [{"context": self.examples.contexts[r], "explanation": t}
                                                for r, t in zip(self.rows[:8], texts[:8], strict=False)],
                "explanations": texts, "cosines": [float(x) for x in cos]}

    def baselines(self, ar: Learner) -> dict:
        """The AR's cosine on explanations that carry no information about the vector (one constant text),
        and on the SFT targets themselves (the snippets or generated sentences: what SFT imitates)."""
        constant = [self.c.eval.constant_explanation] * len(self.rows)
        out = {"constant": summarise(self._cosines(ar, constant))}
        snippets = snippet_explanations(self.examples)
        out["snippets"] = summarise(self._cosines(ar, [snippets[r] for r in self.rows]))
        return out

    def self_verbalizer(self, ar: Learner, model: Transformer, max_new_tokens: int = 32) -> dict:
        """The AR's cosine on what the base model says about each vector through crossmap's self-verbalizer
        preset (`verbalize.self_verbalizer_spec("auto")`), greedy."""
        from ..verbalize import Verbalizer, self_verbalizer_spec

        verbalizer = Verbalizer(model, self.tokenizer, self_verbalizer_spec("auto", self.tokenizer), mesh=self.mesh)
        explained = verbalizer.explain(self.examples.vectors[self.rows], max_new_tokens=max_new_tokens, temperature=0.0,
                                       batch_size=int(self.c.eval.batch_size), progress=False)
        texts = [e.parsed[0] for e in explained]
        return {**summarise(self._cosines(ar, texts)), "examples": texts[:8]}


def summarise(cos: np.ndarray) -> dict:
    cos = np.asarray(cos, np.float64)
    half = 1.96 * cos.std(ddof=1) / math.sqrt(len(cos)) if len(cos) > 1 else float("nan")
    return {"mean_cosine": float(cos.mean()), "ci95": [float(cos.mean() - half), float(cos.mean() + half)],
            "n": int(len(cos))}


# ------------------------------------------------------------------------------------------ export
def export_pair(run: _Run, av: Learner, ar: Learner, *, av_abstract_cfg, ar_abstract, tokenizer) -> tuple[Path, Path]:
    """Release-layout AV and AR directories (adapters merged), each with its sidecar; with LoRA, the
    adapters too (`adapter/`: adapter_model.safetensors, and for the AR its value head)."""
    c = run.c
    out = run.root / "export"
    dtype = c.export_dtype
    av_dir, ar_dir = out / "av", out / "ar"
    save_checkpoint(av_abstract_cfg, jax.device_get(av.params()), av_dir, dtype=dtype, tokenizer=tokenizer)
    save_checkpoint(ar_abstract.config, jax.device_get(ar.params()), ar_dir, dtype=dtype, tokenizer=tokenizer)
    head = np.asarray(jax.device_get(ar.state["trainable"]["head"]), np.float32).astype(dtype)
    write_safetensors(ar_dir / VALUE_HEAD_FILE, [("weight", head.shape, head.dtype)], lambda _: iter([head]))
    for role, directory in (("av", av_dir), ("ar", ar_dir)):
        shutil.copyfile(run.root / role / SIDECAR_NAME, directory / SIDECAR_NAME)
    if c.finetune.mode == "lora":  # the adapters alone: a directory `nla.adapted` loads over the base model
        for learner, directory in ((av, av_dir), (ar, ar_dir)):
            adapter = directory / "adapter"
            lora_lib.save_adapter_file(adapter, learner.state["trainable"]["adapters"], rank=int(c.finetune.rank),
                                       alpha=float(c.finetune.alpha))
            shutil.copyfile(directory / SIDECAR_NAME, adapter / SIDECAR_NAME)
            if directory == ar_dir:
                shutil.copyfile(ar_dir / VALUE_HEAD_FILE, adapter / VALUE_HEAD_FILE)
            files = sorted(p.name for p in adapter.iterdir() if p.is_file() and p.name != MANIFEST)
            save_json(adapter / MANIFEST, {"base": str(c.model.path), "sha256": {f: file_sha256(adapter / f) for f in files},
                                           "trained_by": "crossmap train-nla", "config": c.name})
    return av_dir, ar_dir
