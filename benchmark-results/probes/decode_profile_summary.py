"""Kernel time per decode step by kind, from decode_profile.py's JSON: decode_profile_summary.py FILE.json ...

A kernel that runs less than 1.5 times a step is once-a-step work (LM head, sampling, loop); one longer than
500 µs that runs fewer than 6 times a step is the prompt's prefill and is left out. For the blocks' kernels the
count per step and the mean time are printed, for reading against the shapes."""
import json
import sys


def kind(name: str, per_step: float, each_us: float) -> str:
    if each_us > 500 and 1.5 <= per_step < 6:
        return "prefill (left out)"
    if per_step < 1.5:
        return "once a step"
    if "nvjet" in name or "splitK" in name:
        return "GEMM"
    if "memcpy" in name.lower() or "Memset" in name or "Memcpy" in name:
        return "copy or memset"
    return "other fusions"


for path in sys.argv[1:]:
    data = json.load(open(path))
    for layout in ("unrolled", "scanned", "fast"):
        if layout not in data:
            continue
        run = data[layout]
        totals: dict[str, float] = {}
        for key, (us, per_step) in run["ops"].items():
            k = kind(key.split("|")[1], per_step, us / per_step)
            totals[k] = totals.get(k, 0.0) + us
        counted = sum(v for k, v in totals.items() if k != "prefill (left out)")
        print(f"{path} {layout}: wall step {run['wall_step_ms']:.2f} ms, kernels {counted / 1e3:.2f} ms a step")
        for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {k:20s} {v / 1e3:7.2f} ms")
        gemms = [(key.split("|")[1], us, n) for key, (us, n) in run["ops"].items()
                 if kind(key.split("|")[1], n, us / n) == "GEMM"]
        for name, us, n in sorted(gemms, key=lambda g: -g[1])[:8]:
            print(f"    {n:6.1f} a step x {us / n:7.2f} us  {name}")
