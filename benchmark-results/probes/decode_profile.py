"""Probe: where a decode step's time goes, from a JAX profiler trace of one `generate` call, unrolled and scanned
in one process. Usage: decode_profile.py PRESET [layouts] (XLA flags from XLA_FLAGS; OUT names the output folder).
A layout "fast" is the unrolled model with fused projections and the Pallas decode attention (added 2026-12-04).
STOP_CHECK=N (default 1) passes generate's stop_check_every=N and names the outputs "-checkN" (added 2026-12-05).

Kernels of the decode loop run (new tokens - 1) times or more per call; prefill's run once (per layer). Each
kernel is grouped by its XLA op's name with the numeric suffix removed; per step = total / (new tokens - 1).
The wall step is the bench's (full call - 1-token call) / (new tokens - 1); wall - GPU busy is time the GPU waits
(launches, host syncs of loop predicates or slice offsets)."""
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax
import numpy as np

from crossmap.benchmarks.verbalize import PRESETS, preset_config, time_generate
from crossmap.models import fused, init_random, scanned, with_decode_attention
from crossmap.verbalize import Injection, generate, mean_embedding_norm

preset = sys.argv[1] if len(sys.argv) > 1 else "27b"
layouts = (sys.argv[2] if len(sys.argv) > 2 else "unrolled,scanned").split(",")
out_dir = os.environ.get("OUT", "/tmp")
stop_check = int(os.environ.get("STOP_CHECK", "1"))
suffix = f"-check{stop_check}" if stop_check != 1 else ""
cfg = preset_config(PRESETS[preset])
model = init_random(cfg, seed=0, dtype="bfloat16")
rng = np.random.default_rng(0)
batch, prompt_len, new_tokens = 128, 64, 64
prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
vectors = rng.normal(size=(batch, cfg.d_model)).astype(np.float32)
vectors *= mean_embedding_norm(model) / np.linalg.norm(vectors, axis=1, keepdims=True)
inj = Injection(vectors, [prompt_len // 2] * batch)


def trace_events(folder):
    path = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]
    data = json.load(gzip.open(path))
    events = data["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return events, names, threads


def summarise(layout, wall_step_ms):
    folder = f"/tmp/trace-{preset}-{layout}{suffix}"
    events, names, threads = trace_events(folder)
    gpu_pids = {p for p, n in names.items() if "GPU" in n or "device" in n.lower()}
    per_op = collections.defaultdict(lambda: [0.0, 0])
    busy = []
    kinds = collections.Counter()
    examples = collections.defaultdict(set)
    for e in events:
        if e.get("ph") != "X" or e["pid"] not in gpu_pids:
            continue
        tname = threads.get((e["pid"], e["tid"]), "")
        args = e.get("args", {})
        op = args.get("hlo_op") or args.get("long_name") or e["name"]
        key = re.sub(r"[.\d]+$", "", str(op))
        kind = "memcpy" if "emcpy" in e["name"] or "emset" in e["name"] else "kernel"
        kinds[(kind, tname[:40])] += 1
        examples[(key, e["name"][:60])].add(str(op))
        per_op[(key, e["name"][:60])][0] += e["dur"]
        per_op[(key, e["name"][:60])][1] += 1
        busy.append((e["ts"], e["ts"] + e["dur"]))
    steps = new_tokens - 1
    loop = {k: v for k, v in per_op.items() if v[1] >= steps}
    loop_us = sum(v[0] for v in loop.values()) / steps
    busy.sort()
    merged, end, start = 0.0, None, None
    for s, t in busy:
        if end is None or s > end:
            if end is not None:
                merged += end - start
            start, end = s, t
        else:
            end = max(end, t)
    if end is not None:
        merged += end - start
    span = (busy[-1][1] - busy[0][0]) if busy else 0.0
    lines = [f"== {preset} {layout}: wall step {wall_step_ms:.2f} ms; loop kernels {loop_us / 1e3:.2f} ms/step; "
             f"GPU busy {merged / 1e3:.1f} ms of a {span / 1e3:.1f} ms call span; events {dict(kinds)}"]
    top = sorted(loop.items(), key=lambda kv: -kv[1][0])[:40]
    for (key, kname), (dur, count) in top:
        lines.append(f"  {dur / steps:9.1f} us/step  x{count / steps:6.1f}/step  {dur / count:8.2f} us each  "
                     f"{key[:50]:50s} {kname}  e.g. {sorted(examples[(key, kname)])[:3]}")
    sample = [e for e in events if e.get("ph") == "X" and e["pid"] in gpu_pids][:20]
    with open(f"{out_dir}/decode-profile-{preset}-{layout}{suffix}-sample.json", "w") as f:
        json.dump({"processes": names, "events": sample}, f, indent=1)
    text = "\n".join(lines)
    print(text, flush=True)
    return {"wall_step_ms": wall_step_ms, "loop_kernels_ms": loop_us / 1e3, "busy_ms": merged / 1e3,
            "span_ms": span / 1e3, "ops": {f"{k[0]}|{k[1]}": [v[0] / steps, v[1] / steps] for k, v in loop.items()}}


if os.environ.get("DUMP_HLO"):  # the optimised HLO of each generate program, to name what the trace shows
    from crossmap.verbalize import engine
    compiled_program = engine._generate_program
    dumped = []

    def spy(*a, **k):
        if not dumped:  # the first program is the full-length one
            with gzip.open(f"{out_dir}/hlo-{preset}.txt.gz", "wt") as f:
                f.write(compiled_program.lower(*a, **k).compile().as_text())
            dumped.append(1)
        return compiled_program(*a, **k)
    engine._generate_program = spy

result = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "preset": preset, "batch": batch, "new_tokens": new_tokens,
          "stop_check_every": stop_check}
for layout in layouts:
    if layout == "fast":
        variant = with_decode_attention(fused(model, consume=True), "pallas")
    else:
        variant = scanned(model, layout, consume=True) if layout == "scanned" else model
    timing, _ = time_generate(variant, prompts, inj, new_tokens, None, 2, stop_check_every=stop_check)
    wall = timing["decode_step_s"] * 1e3
    print(f"[{layout}] compile {timing['first_call_s'] - timing['total_s']:.1f} s, step {wall:.2f} ms", flush=True)
    jax.profiler.start_trace(f"/tmp/trace-{preset}-{layout}{suffix}")
    generate(variant, prompts, max_new_tokens=new_tokens, stop_token_ids=[], use_model_eos=False, pad_id=0,
             injection=inj, length_bucket_min=1, key=0, stop_check_every=stop_check)
    jax.profiler.stop_trace()
    time.sleep(1)
    result[layout] = summarise(layout, wall)
    model = variant
with open(f"{out_dir}/decode-profile-{preset}{suffix}.json", "w") as f:
    json.dump(result, f)
