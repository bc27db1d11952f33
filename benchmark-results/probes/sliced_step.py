"""Probe (2026-12-06): the 7B fast decode step (fused projections, kernel attention) with its o and down
products cut into K slices (layers.sliced_product: one batched GEMM, float32 partials summed in the residual
add's fusion), against the one product, in one process, alternating. Batch 128, greedy, 64 + 128 tokens.
Usage: XLA_FLAGS=--xla_gpu_enable_triton_gemm=false sliced_step.py [OUT.json] (SLICES="o,down o,down ...")
sliced-step-7b-h100.json, with o slices, ran at commit 434936f, where layers.Attention had o_slices (slower, since
removed); here o must be 1 and the default is the down-only A/B of sliced-step-down2-7b-h100.json."""
import json
import os
import sys

import numpy as np

from crossmap.benchmarks.common import device_info, measured_copy_bandwidth
from crossmap.benchmarks.verbalize import PRESETS, preset_config, time_generate
from crossmap.models import fused, init_random, with_decode_attention, with_down_slices
from crossmap.verbalize import Injection, mean_embedding_norm

preset = PRESETS[os.environ.get("PRESET", "7b")]
cfg = preset_config(preset)
model = with_decode_attention(fused(init_random(cfg, seed=0, dtype="bfloat16"), consume=True),
                              os.environ.get("ATTENTION", "pallas"))
rng = np.random.default_rng(0)
batch, prompt_len, new_tokens = 128, 64, 128
prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
vectors = rng.normal(size=(batch, cfg.d_model)).astype(np.float32)
vectors *= mean_embedding_norm(model) / np.linalg.norm(vectors, axis=1, keepdims=True)
inj = Injection(vectors, [prompt_len // 2] * batch)
bandwidth = measured_copy_bandwidth(preset["copy_mib"] << 20)["gb_per_s"] * 1e9
result = {"device": device_info(), "copy_bandwidth_GBps": bandwidth / 1e9, "runs": []}
baseline_tokens = None
for pair in os.environ.get("SLICES", "1,1 1,2 1,1 1,2").split():
    o_slices, down_slices = (int(v) for v in pair.split(","))
    if o_slices != 1:  # measured slower, the o product's slices left the package after commit 434936f
        sys.exit("sliced_step.py: o slices other than 1 ran at commit 434936f (Attention.o_slices), not here")
    variant = with_down_slices(model, down_slices)
    timing, res = time_generate(variant, prompts, inj, new_tokens, None, 5)
    tokens = np.asarray(res.tokens)
    if baseline_tokens is None:
        baseline_tokens = tokens
    agreement = float((tokens == baseline_tokens).mean())
    result["runs"].append({"o_slices": o_slices, "down_slices": down_slices, **timing,
                           "tokens_equal_to_first_run": agreement})
    print(f"[sliced] o {o_slices}, down {down_slices}: decode step {timing['decode_step_s'] * 1e3:.3f} ms, "
          f"tokens equal to the first run's {agreement:.1%}", flush=True)
if len(sys.argv) > 1:
    json.dump(result, open(sys.argv[1], "w"), indent=1)
