"""`crossmap bench train-nla`: step times and MFU of NLA training (AV SFT, AR SFT, one GRPO step) at a
model's real shape with random weights, LoRA and full fine-tuning, against the bf16 matmul peak
measured in the same run.

Model FLOPs of a step: forward = 2 x matmul params x tokens + causal attention, the LM head only on the
response slots (that is all the AV loss reads); backward = 2 x forward for full fine-tuning (input and
weight gradients), 1 x forward for LoRA (input gradients; the frozen weights get none, the adapters'
share is negligible).  A configuration that does not fit in memory is reported as such.
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ..models import config_from_hf, init_random, shape_config, tiny_config
from ..nla.adapted import truncated
from ..nla.objectives import ARBatch, AVBatch, ar_sft_loss, av_sft_loss, grpo_loss, response_logprobs
from ..nla.train import Learner, _learner_parts, logical_tree, make_optimizer, stack
from ..nla.train_config import FINETUNE_MODES, base_train_config
from ..verbalize.engine import Injection, generate
from .common import device_info, measured_matmul_peak, median_time, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct",
                   help="a shipped shape config (qwen2.5-coder-0.5b-instruct, qwen2.5-7b-instruct, ...) or tiny-<arch>")
    p.add_argument("--layer", type=int, default=12, help="the AR's extraction layer K (it keeps blocks 0..K)")
    p.add_argument("--modes", default="lora,full", help=f"comma-separated, of {FINETUNE_MODES}")
    p.add_argument("--batch", type=int, default=32, help="rows per SFT step (and GRPO rollouts per step)")
    p.add_argument("--prompt", type=int, default=160, help="AV prompt tokens (the release's template is ~150)")
    p.add_argument("--response", type=int, default=64, help="response / rollout tokens")
    p.add_argument("--ar-tokens", type=int, default=96)
    p.add_argument("--group", type=int, default=4, help="GRPO samples per vector")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")


def _config(name: str):
    if name.startswith("tiny-"):
        return tiny_config(name[5:])
    hf, label = shape_config(name)
    return config_from_hf(hf, label)


def _train_flops(cfg, seq: int, head_tokens: int, rows: int, mode: str, upto: int | None = None) -> float:
    forward = rows * (seq * cfg.forward_flops_per_token(seq, upto_layer=upto, with_head=False)
                      + head_tokens * 2 * cfg.d_model * cfg.vocab_size)
    return forward * (3 if mode == "full" else 2)


def _bench_mode(cfg, mode: str, args, peak: float) -> dict:
    c = base_train_config()
    c.finetune.mode, c.finetune.rank = mode, args.rank
    phase = ml_collections.ConfigDict(dict(c.av_sft))
    model = init_random(cfg, seed=0, dtype="float32" if mode == "full" else "bfloat16")
    params = nnx.to_pure_dict(nnx.split(model)[1])
    graphdef = nnx.split(model)[0]
    logical = logical_tree(model)
    frozen, trainable = _learner_parts(c, params, logical, None, jax.random.key(0))
    P, R, B, M = args.prompt, args.response, args.batch, 10
    rng = np.random.default_rng(0)
    av_batch = AVBatch(rng.integers(0, cfg.vocab_size, (B, P + R)).astype(np.int32), np.ones((B, P + R), bool),
                       np.ones((B, R), np.float32), rng.standard_normal((B, cfg.d_model)).astype(np.float32))
    out: dict = {"mode": mode}

    av = Learner(graphdef, frozen, trainable, alpha=32.0, compute_dtype="bfloat16", optimizer=make_optimizer(phase),
                 loss_fn=lambda m, _t, b: av_sft_loss(m, b, P, M))
    batch = stack([av_batch])
    seconds = median_time(lambda: av.step(batch, "bench") and av.state["step"], args.repeats)
    flops = _train_flops(cfg, P + R, R, B, mode)
    out["av_sft"] = {"step_s": seconds, "tokens_per_s": B * (P + R) / seconds, "tflops": flops / seconds / 1e12,
                     "mfu": flops / seconds / 1e12 / peak}

    # GRPO: rollouts by the engine, the reference's log-probs, one update
    reference = av.params()
    ref_logp = jax.jit(lambda p, b: response_logprobs(nnx.merge(graphdef, p), b, P, M))
    av.retarget(lambda m, _t, b: grpo_loss(m, b[0], P, M, b[1], b[2], 0.05))
    prompts = av_batch.tokens[:, :P]

    def grpo_step():
        t0 = time.perf_counter()
        result = generate(av.model(), prompts, max_new_tokens=R, temperature=1.0, key=0, use_model_eos=False,
                          injection=Injection(av_batch.vectors, np.full(B, M)))
        t1 = time.perf_counter()
        rollout = AVBatch(np.concatenate([prompts, result.tokens], 1), np.ones((B, P + R), bool),
                          np.ones((B, R), np.float32), av_batch.vectors)
        ref = np.asarray(ref_logp(reference, rollout))
        adv = rng.standard_normal(B).astype(np.float32)
        av.step(stack([(rollout, adv, ref)]), "bench")
        jax.block_until_ready(av.state["step"])
        return t1 - t0, time.perf_counter() - t1

    grpo_step()
    parts = [grpo_step() for _ in range(args.repeats)]
    gen = float(np.median([p[0] for p in parts]))
    upd = float(np.median([p[1] for p in parts]))
    out["grpo"] = {"step_s": gen + upd, "generate_s": gen, "update_s": upd, "rollouts": B,
                   # the update adds the reference's forward to the step: (k + 1) / k of the SFT step's FLOPs
                   "update_mfu": _train_flops(cfg, P + R, R, B, mode) * (4 / 3 if mode == "full" else 3 / 2)
                   / upd / 1e12 / peak}
    gc.collect()

    # AR SFT on the truncated backbone
    layer = min(args.layer, cfg.n_layers - 1)
    ar_abstract, ar_params = truncated(model, layer)
    ar_frozen, ar_trainable = _learner_parts(c, ar_params, logical_tree(ar_abstract), None, jax.random.key(1))
    ar_trainable["head"] = jnp.eye(cfg.d_model, dtype=jnp.float32)
    T = args.ar_tokens
    ar_b = ARBatch(rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32), np.ones((B, T), bool),
                   np.full(B, T - 1, np.int32), rng.standard_normal((B, cfg.d_model)).astype(np.float32),
                   np.ones(B, np.float32))
    ar = Learner(nnx.split(ar_abstract)[0], ar_frozen, ar_trainable, alpha=32.0, compute_dtype="bfloat16",
                 optimizer=make_optimizer(phase, head_lr=1e-3),
                 loss_fn=lambda m, t, b: ar_sft_loss(m, t["head"].astype(jnp.bfloat16), b))
    batch = stack([ar_b])
    seconds = median_time(lambda: ar.step(batch, "bench") and ar.state["step"], args.repeats)
    flops = _train_flops(cfg, T, 0, B, mode, upto=layer)
    out["ar_sft"] = {"step_s": seconds, "tokens_per_s": B * T / seconds, "mfu": flops / seconds / 1e12 / peak}
    return out


def run(args: argparse.Namespace) -> None:
    cfg = _config(args.model)
    peak = measured_matmul_peak()["tflops"]
    result = {"bench": "train-nla", "device": device_info(), "model": args.model, "matmul_peak_tflops": peak,
              "batch": args.batch, "prompt": args.prompt, "response": args.response, "ar_tokens": args.ar_tokens,
              "lora_rank": args.rank, "results": []}
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in FINETUNE_MODES:
            raise ValueError(f"--modes: {mode!r} is not one of {FINETUNE_MODES}")
        try:
            result["results"].append(_bench_mode(cfg, mode, args, peak))
        except Exception as err:  # an out-of-memory at this shape is a result, not a crash
            if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                raise
            result["results"].append({"mode": mode, "does_not_fit": str(err).splitlines()[0][:300]})
        gc.collect()
    write_json(result, args.out)
