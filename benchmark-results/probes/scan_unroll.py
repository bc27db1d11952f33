"""Probe: the 27B scanned decode step with 1 and 2 groups per loop iteration (fori_loop unroll), in one process.
Run with models.scan.SCANNED_GPU_XLA_FLAGS in XLA_FLAGS."""
import json
import os
import sys

import numpy as np

from crossmap.benchmarks.verbalize import PRESETS, preset_config, time_generate
from crossmap.models import init_random, scanned
from crossmap.verbalize import Injection, mean_embedding_norm

preset = sys.argv[1] if len(sys.argv) > 1 else "27b"
cfg = preset_config(PRESETS[preset])
model = scanned(init_random(cfg, seed=0, dtype="bfloat16"), consume=True)
rng = np.random.default_rng(0)
batch, prompt_len, new_tokens = 128, 64, 128
prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
vectors = rng.normal(size=(batch, cfg.d_model)).astype(np.float32)
vectors *= mean_embedding_norm(model) / np.linalg.norm(vectors, axis=1, keepdims=True)
inj = Injection(vectors, [prompt_len // 2] * batch)
out = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
for unroll in (1, 2):
    model.scan_unroll = unroll
    timing, _ = time_generate(model, prompts, inj, new_tokens, None, 2)
    out[f"unroll_{unroll}"] = {"compile_s": timing["first_call_s"] - timing["total_s"],
                               "decode_step_ms": timing["decode_step_s"] * 1e3}
    print(unroll, out[f"unroll_{unroll}"], flush=True)
print(json.dumps(out))
