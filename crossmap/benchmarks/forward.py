"""`crossmap bench forward`: tokens/s and MFU of the truncated forward, side by side with
transformers' PyTorch forward (output_hidden_states) on the same device.

Weights are random at the real shapes of a shipped shape config (crossmap/models/shapes/; no checkpoint needed).
MFU counts matmul FLOPs (2 x params touched + causal attention) against the bf16 matmul peak
measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import jax
import numpy as np

from ..models import (
    config_from_hf,
    init_random,
    make_hidden_fn,
    scanned,
    shape_config,
    tiny_config,
)
from ..sharding import make_mesh
from .common import (
    device_info,
    layer_layouts,
    measured_matmul_peak,
    time_jax,
    torch_cuda_available,
    write_json,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-7b-instruct",
                   help="a shipped shape config (qwen2.5-7b-instruct, gemma-3-27b-it) or a config.json path, or "
                        "tiny-<arch> for a smoke run")
    p.add_argument("--layer", type=int, default=20, help="truncate after this block (0-based; default: paper's 20)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"],
                   help="auto: fused cuDNN flash attention on GPU, explicit-mask XLA elsewhere")
    p.add_argument("--layers", default="unrolled",
                   help="comma-separated block layouts (models.scan.LAYER_LAYOUTS) timed in this run, e.g. "
                        "unrolled,scanned: compile seconds and run time of each, and the largest difference of "
                        "their outputs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the transformers peer")
    p.add_argument("--full-model-peer", action="store_true",
                   help="also time transformers' whole model with output_hidden_states (every block and the LM "
                        "head), the way a user reads one layer's hidden states without a truncated forward")
    p.add_argument("--mesh", default="", help='mesh axis sizes as JSON, e.g. {"data": 1, "tensor": 2}')
    p.add_argument("--out", default="bench-forward.json")


def model_config(name: str):
    if name.startswith("tiny-"):
        return tiny_config(name[5:]), None
    try:
        hf, stem = shape_config(name)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--model: {err}") from None
    return config_from_hf(hf, stem), hf


def _torch_forward(hf: dict, n_layers: int, batch: int, seq: int, dtype: str, repeats: int,
                   full: bool = False) -> dict:
    """transformers' forward at the same shape with output_hidden_states, on CUDA.

    full=False: the decoder cut to the blocks the truncated forward runs (equal work, the strict peer).
    full=True: the whole model as a user calls it to read hidden_states[n_layers] (every block and the
    LM head over all positions).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {k: v for k, v in hf.items() if not k.startswith("_") and k != "architectures"}
    if not full:
        hf["num_hidden_layers"] = n_layers  # equal work: only the blocks the truncated forward runs
    cfg = AutoConfig.for_model(**hf)
    cfg._attn_implementation = "sdpa"
    tdtype = getattr(torch, dtype)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=tdtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.no_grad():
            if full:
                return model(input_ids=tokens, output_hidden_states=True).hidden_states[n_layers]
            out = model.model(input_ids=tokens, output_hidden_states=True)  # decoder only: no LM head
        return out.hidden_states[-1]

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model = None  # free the GPU memory before the JAX run
    gc.collect()
    torch.cuda.empty_cache()
    times.sort()
    note = ("whole transformers model with output_hidden_states (every block, LM head), as a user reads "
            f"hidden_states[{n_layers}]" if full else
            "transformers decoder (model.model) with output_hidden_states, same blocks, no LM head")
    return {"median_s": times[len(times) // 2], "layers": cfg.num_hidden_layers, "attention": "sdpa", "note": note}


def time_forward(model, layer: int, mesh, batch: tuple, attention: str, repeats: int) -> tuple[dict, jax.Array]:
    """Compile and time `make_hidden_fn(model, layer)` on batch = (tokens, positions, valid).

    attention "cudnn" (fused flash attention) falls back to "xla" (explicit mask) if it fails, and says
    so under "attention_errors".  Returns ({attention, compile_s, median_s, min_s, ...}, the output).
    """
    errors = {}
    for impl in [attention] + (["xla"] if attention == "cudnn" else []):
        model.attention_impl = None if impl == "xla" else impl
        fn = make_hidden_fn(model, layer, mesh=mesh)
        try:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*batch))
            compile_s = time.perf_counter() - t0
            t = time_jax(lambda fn=fn: fn(*batch), warmup=1, repeats=repeats)
        except Exception as err:  # noqa: BLE001 - e.g. cuDNN missing: fall back, and say so
            errors[impl] = f"{type(err).__name__}: {str(err)[:400]}"
            continue
        timing = {"attention": impl, "compile_s": compile_s, "median_s": t["median_s"], "min_s": t["min_s"]}
        if errors:
            timing["attention_errors"] = errors
        return timing, out
    raise RuntimeError(f"forward failed with every attention implementation: {errors}")


def run(args: argparse.Namespace) -> dict:
    # The transformers peer runs first and frees its memory; JAX then allocates on demand rather
    # than grabbing 75% of the GPU up front, so the two never compete for memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg, hf = model_config(args.model)
    layer = min(args.layer, cfg.n_layers - 1)
    on_gpu = jax.devices()[0].platform == "gpu"
    attention = args.attention if args.attention != "auto" else ("cudnn" if on_gpu else "xla")
    mesh = make_mesh(json.loads(args.mesh) if args.mesh else None)
    result = {"bench": "forward", "model": args.model, "layer": layer, "batch": args.batch, "seq": args.seq,
              "dtype": args.dtype, "mesh": dict(mesh.shape), "device": device_info()}
    n_tokens = args.batch * args.seq
    flops = cfg.forward_flops_per_token(args.seq, upto_layer=layer) * n_tokens
    result["model_flops_per_token"] = flops / n_tokens
    ref = None
    if not args.no_torch and hf is not None and torch_cuda_available():
        try:
            ref = _torch_forward(hf, layer + 1, args.batch, args.seq, args.dtype, args.repeats)
        except Exception as err:  # noqa: BLE001 - report the peer's failure, keep our numbers
            result["transformers"] = {"error": f"{type(err).__name__}: {err}"}
        if args.full_model_peer:
            try:
                result["transformers_full_model"] = _torch_forward(hf, layer + 1, args.batch, args.seq, args.dtype,
                                                                   args.repeats, full=True)
            except Exception as err:  # noqa: BLE001
                result["transformers_full_model"] = {"error": f"{type(err).__name__}: {err}"}
    peak = measured_matmul_peak(args.dtype)
    result["measured_peak_tflops"] = peak["tflops"]
    layouts = layer_layouts(args.layers)
    model = init_random(cfg, seed=0, dtype=args.dtype, mesh=mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy()
    valid = np.ones(tokens.shape, bool)
    per_layout, first_out = {}, None
    for n, layout in enumerate(layouts):
        # the last layout may take the model's blocks (stacking in place: no second copy of a 27B model)
        variant = scanned(model, layout, consume=n == len(layouts) - 1)
        t, out = time_forward(variant, layer, mesh, (tokens, positions, valid), attention, args.repeats)
        entry = {k: t[k] for k in ("compile_s", "median_s", "min_s", "attention", "attention_errors") if k in t}
        entry["tokens_per_s"] = n_tokens / t["median_s"]
        entry["tflops"] = flops / t["median_s"] / 1e12
        entry["mfu"] = entry["tflops"] / peak["tflops"]
        if first_out is None:
            first_out = np.asarray(out, np.float32)
        else:
            diff = np.abs(np.asarray(out, np.float32) - first_out)
            entry[f"vs_{layouts[0]}"] = {"compile": t["compile_s"] / per_layout[layouts[0]]["compile_s"],
                                         "run": t["median_s"] / per_layout[layouts[0]]["median_s"],
                                         "max_abs_output_difference": float(diff.max()),
                                         "output_max_abs": float(np.abs(first_out).max())}
        print(f"[forward bench] {layout}: compile {t['compile_s']:.1f} s, {t['median_s'] * 1e3:.1f} ms", flush=True)
        per_layout[layout] = entry
        del variant, out
    del model
    t = per_layout[layouts[0]]
    result.update({k: t[k] for k in ("compile_s", "attention_errors", "attention") if k in t})
    ours = {k: t[k] for k in ("median_s", "tokens_per_s", "tflops", "mfu")}
    result["crossmap"] = ours
    result["layers"] = per_layout
    if ref is not None:
        ref["tokens_per_s"] = n_tokens / ref["median_s"]
        ref["tflops"] = flops / ref["median_s"] / 1e12
        ref["mfu"] = ref["tflops"] / peak["tflops"]
        result["transformers"] = ref
        result["speedup_vs_transformers"] = ref["median_s"] / ours["median_s"]
    full = result.get("transformers_full_model", {})
    if "median_s" in full:
        full["tokens_per_s"] = n_tokens / full["median_s"]
        result["speedup_vs_transformers_full_model"] = full["median_s"] / ours["median_s"]
    write_json(result, args.out)
    return result
