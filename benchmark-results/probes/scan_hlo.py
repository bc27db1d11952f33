"""Dump the optimized HLO of the scanned generate program (flags from XLA_FLAGS) and summarise copies."""
import gzip, os, re, sys, collections
import jax, numpy as np
from crossmap.benchmarks.verbalize import PRESETS, preset_config
from crossmap.models import init_random, scanned
from crossmap.verbalize import engine, Injection
preset = sys.argv[1]
cfg = preset_config(PRESETS[preset])
m = scanned(init_random(cfg, seed=0, dtype="bfloat16"), consume=True)
cap = {}
orig = engine._generate_program
def spy(*a, **k):
    cap["c"] = orig.lower(*a, **k).compile()
    return orig(*a, **k)
engine._generate_program = spy
B = 128
prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, 64)).astype(np.int32)
engine.generate(m, prompts, max_new_tokens=int(os.environ.get("NEW_TOKENS", 4)), stop_token_ids=[], use_model_eos=False, pad_id=0, length_bucket_min=1)
txt = cap["c"].as_text()
out = os.environ["OUT"]
with gzip.open(f"{out}/hlo-{preset}.txt.gz", "wt") as f:
    f.write(txt)
big = collections.Counter()
for line in txt.splitlines():
    line = line.strip()
    mm = re.match(r"%?(\S+) = (\w+)\[([\d,]*)\]", line)
    if not mm: continue
    name, dt, shape = mm.groups()
    n = np.prod([int(x) for x in shape.split(",") if x]) if shape else 1
    nbytes = n * (2 if dt == "bf16" else 4 if dt in ("f32", "s32") else 1)
    kind = "copy" if " copy(" in line else "dus" if "dynamic-update-slice" in line else "ds" if "dynamic-slice" in line or "dynamic_slice" in name else "gemm" if "gemm" in line else "other"
    if nbytes > 8 << 20:
        big[(kind, name.split(".")[0][:40], dt, shape)] += 1
for k, v in sorted(big.items(), key=lambda kv: -kv[1])[:60]:
    print(v, k)
# computations that copy: concatenations (merged dots) and pads (cuBLAS alignment) of stacked arrays
for kind in ("fused_concatenate", "fused_pad", "dynamic-slice-fusion"):
    heads = [l[:200] for l in txt.splitlines() if l.startswith("%" + kind)]
    print(kind, len(heads))
    for h in heads[:4]:
        print("   ", h)
