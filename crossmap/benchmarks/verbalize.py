"""`crossmap bench verbalize`: explanation throughput of the generation engine vs transformers' generate.

A verbalizer-shaped workload on random weights (no checkpoint needed): `--batch` prompts of
`--prompt-len` random tokens, a vector injected at the middle token (replace, input embeddings),
`--new-tokens` tokens per prompt (greedy, or sampled with `--temperature` / `--top-p` as the
paper config's verbalizers sample), no stop token (every row does the full length).

What it reports (JSON at --out):
1. crossmap: `crossmap.verbalize.generate` (one jitted prefill + while-loop decode, batch over the
   mesh's data axes).  Compile time, the wall time of the whole call (host transfer included),
   the time of a 1-token call (prefill + first token), and the decode step time
   (t_full - t_one) / (new_tokens - 1).  explanations/s = batch / t_full.
2. floor: the memory-bandwidth floor of one decode step = (weight bytes read per step + KV-cache
   bytes read per step) / copy bandwidth.  Weight bytes exclude the input-embedding table (a
   decode step gathers `batch` rows of it; a tied table is read as the LM head and counted);
   KV bytes are the K and V of every layer over the *valid* context, averaged over the decode
   steps (prompt + new_tokens / 2 slots).  The copy bandwidth is measured in this run by a
   large device-to-device elementwise copy (bytes read + written / time).  Also given: the floor
   if the whole preallocated cache (prompt + new_tokens slots) is read, which is what the
   engine's attention does.  ratio_to_floor = decode step / floor.
3. transformers (torch, same config, random init, bf16, sdpa attention, default dynamic cache):
   `generate(inputs_embeds=..., min_new_tokens=max_new_tokens, do_sample=False)` with the same
   injected row, so both do equal work; the same timings and its explanations/s.  Runs on CUDA when
   present (`--torch-device`), on the CPU for the tiny preset, else is skipped.
speedup_vs_transformers = our explanations/s / transformers' explanations/s.

    python -m crossmap.benchmarks.verbalize --preset 7b --out verbalize_bench.json    # on a GPU
    python -m crossmap.benchmarks.verbalize --preset tiny --out /tmp/v.json             # CPU smoke run
JAX does not preallocate GPU memory here (XLA_PYTHON_CLIENT_PREALLOCATE=false is set before jax
loads, if this module loads first), so PyTorch finds room next to it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from crossmap.benchmarks.common import (
    device_info,
    layer_layouts,
    measured_copy_bandwidth,
    measured_matmul_peak,
    median_time,
    write_json,
)
from crossmap.models import ModelConfig, config_from_hf, hf_config, init_random, shape_config, tiny_config
from crossmap.models.attention import IMPLEMENTATIONS as DECODE_ATTENTION
from crossmap.models.fuse import PROJECTION_LAYOUTS, fused
from crossmap.models.int8_matmul import IMPLEMENTATIONS
from crossmap.models.layers import with_decode_attention, with_down_slices
from crossmap.models.quantize import WEIGHT_FORMATS, quantized
from crossmap.models.scan import scanned
from crossmap.nla.meta import default_av_render
from crossmap.sharding import make_mesh
from crossmap.verbalize import Injection, generate, mean_embedding_norm
from crossmap.verbalize.engine import STOP_CHECK_EVERY

# Qwen2.5-7B(-Instruct) shapes: the reference source model and its NLA verbalizer.
QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                 head_dim=128, d_ff=18944, qkv_bias=True, rope_theta=1_000_000.0, rms_eps=1e-6,
                 tie_embeddings=False, eos_token_ids=(151645,), name="qwen2.5-7b-shaped")
# nla: the released AV/AR pair of that base model (notes/nla-release.md): the extraction layer K (the AR keeps
# blocks 0..K) and the norm every injected vector is rescaled to
QWEN25_7B_NLA = dict(layer=20, injection_scale=150.0)
PRESETS: dict[str, dict[str, Any]] = {
    "7b": dict(config=QWEN25_7B, batch=128, prompt_len=64, new_tokens=128, dtype="bfloat16", copy_mib=4096,
               nla=QWEN25_7B_NLA),
    # Gemma-3-27B(-it): the reference target model (its shipped config.json shape); 62 blocks, 5:1 local/global
    "27b": dict(config="gemma-3-27b-it", batch=128, prompt_len=64, new_tokens=128, dtype="bfloat16", copy_mib=4096,
                nla=dict(layer=41, injection_scale=60000.0)),
    "tiny": dict(config="tiny-qwen2", batch=4, prompt_len=12, new_tokens=8, dtype="float32", copy_mib=16,
                 nla=dict(QWEN25_7B_NLA, layer=2)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b",
                        help="7b: Qwen2.5-7B shapes, batch 128, 64+128 tokens, bf16; 27b: Gemma-3-27B shapes, the "
                             "same workload; tiny: a CPU smoke run")
    parser.add_argument("--batch", type=int, default=None, help="prompts per call (preset default)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (preset default)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per prompt (preset default)")
    parser.add_argument("--dtype", default=None, help="parameter dtype (preset default)")
    parser.add_argument("--weights", default="float",
                        help="comma-separated weight formats timed side by side in this run (models.quantize."
                             "WEIGHT_FORMATS): float (the dtype), int8 (weight-only int8 kernels); int8:IMPL picks "
                             "how its products run (models.int8_matmul.IMPLEMENTATIONS), e.g. float,int8,int8:reference; "
                             "int8:mosaic (Hopper) runs the wide products through JAX's Mosaic GPU kernel")
    parser.add_argument("--layers", default="unrolled",
                        help="comma-separated block layouts (models.scan.LAYER_LAYOUTS), each timed with every "
                             "--weights format in this run: unrolled, scanned (one loop over groups of blocks); "
                             "each variant's compile_s is its first call minus a warm call")
    parser.add_argument("--projections", default="separate",
                        help="comma-separated projection layouts (models.fuse.PROJECTION_LAYOUTS), each timed with every "
                             "format and layout: separate, fused (q/k/v as one kernel, gate/up as one)")
    parser.add_argument("--decode-attention", default="auto",
                        help="comma-separated decode-attention implementations (models.attention.IMPLEMENTATIONS), "
                             "each timed with every other choice: auto (pallas on GPU for 16-bit caches), reference "
                             "(the XLA definition), pallas (the attention kernel), pallas-step (the step's biases, "
                             "rotation, cache writes and attention in one kernel), interpret, interpret-step")
    parser.add_argument("--stop-check-every", default=str(STOP_CHECK_EVERY),
                        help="comma-separated decode steps between tests of whether every row has stopped (generate's "
                             "stop_check_every), each timed with every other choice: each test is a host-device round "
                             "trip that leaves the GPU idle while the host reads the flag")
    parser.add_argument("--down-slices", default="1",
                        help="comma-separated K slices of each decode step's down product (verbalizers.<side>."
                             "down_slices; models.layers.sliced_product), each timed with every other choice")
    parser.add_argument("--logit-error", action=argparse.BooleanOptionalAction, default=True,
                        help="compare each variant's logits (prefill and first decode step) with the first variant's: "
                             "one more compiled program per variant (about a minute each at the 27B shape); every "
                             "variant's generated tokens are compared either way")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth-probe copy")
    parser.add_argument("--torch-device", default="auto", help="auto | cuda | cpu | none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (the default; with --nla the release's 0.7); > 0 samples, in both crossmap "
                             "and transformers")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling when < 1 (with --temperature > 0), e.g. the paper config's 0.95")
    parser.add_argument("--nla", action="store_true",
                        help="the released NLA workload: the real AV prompt (from --tokenizer, the base model's tokenizer "
                             "directory) with the vector at its marker slot rescaled to the release's norm (7b: 150, "
                             "27b: 60000), 200 new tokens at the release's temperature 0.7, then the AR (the first "
                             "K+1 blocks + value head; 7b: K=20, 27b: K=41) scoring --ar-explanations explanations; "
                             "both side by side with transformers")
    parser.add_argument("--tokenizer", default=None, help="--nla: the tokenizer directory whose chat template and "
                                                          "marker give the real prompt")
    parser.add_argument("--ar-explanations", type=int, default=1024, help="--nla: explanations the AR scores")
    parser.add_argument("--ar-batch", type=int, default=64, help="--nla: explanations per AR forward")
    parser.add_argument("--ar-explanation-tokens", type=int, default=150,
                        help="--nla: tokens per explanation (the release's RL cap)")
    parser.add_argument("--out", default="verbalize_bench.json", help="JSON output path")


def preset_config(preset: dict) -> ModelConfig:
    if preset["config"] == "tiny-qwen2":
        return tiny_config("qwen2", eos_token_ids=(1,))
    if isinstance(preset["config"], str):  # a shipped shape config (models/shapes/*.json)
        hf, name = shape_config(preset["config"])
        return config_from_hf(hf).replace(name=f"{name}-shaped")
    return ModelConfig(**preset["config"])


def param_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes of the input-embedding table)."""
    _, state = nnx.split(model)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    embed = model.embed[...]
    return total, int(np.prod(embed.shape)) * embed.dtype.itemsize


def _floor(cfg: ModelConfig, model, batch: int, prompt_len: int, new_tokens: int, bandwidth: float,
           step_s: float, matmul_flops_per_s: float | None = None) -> dict[str, Any]:
    """Per-device floor: every device reads the weights it holds (all of them when only the batch is
    split) and its share of the KV cache, at one device's copy bandwidth.  With `matmul_flops_per_s`,
    also the compute floor: a step's matmul FLOPs (2 x batch x kernel entries) at that rate."""
    total, embed = param_bytes(model)
    batch = batch // jax.device_count()  # the batch is split over every device (make_mesh() = data axis)
    itemsize = model.embed[...].dtype.itemsize
    # the embedding table is read as a head only when tied and not given its own (int8) head
    table_is_head = cfg.tie_embeddings and model.lm_head is None
    weights = total - (0 if table_is_head else embed) + batch * cfg.d_model * itemsize
    per_slot = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * itemsize  # K and V, all layers
    kv_avg = per_slot * (prompt_len + new_tokens / 2)
    kv_full = per_slot * (prompt_len + new_tokens)
    floor = (weights + kv_avg) / bandwidth
    result = {"weight_bytes_per_step": weights, "kv_bytes_per_step_avg_valid": kv_avg,
              "kv_bytes_per_step_full_cache": kv_full, "copy_bandwidth_GBps": bandwidth / 1e9,
              "step_s": floor, "step_s_full_cache": (weights + kv_full) / bandwidth,
              "ratio_to_floor": step_s / floor if step_s > 0 else None}
    if matmul_flops_per_s:
        entries = cfg.param_count() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
        result["compute_step_s"] = 2 * batch * entries / matmul_flops_per_s
        result["bf16_matmul_tflops"] = matmul_flops_per_s / 1e12
    return result


def time_generate(model, prompts, inj, new_tokens, mesh, reps, *, temperature: float = 0.0,
                  top_p: float = 1.0, stop_check_every: int = STOP_CHECK_EVERY) -> tuple[dict[str, Any], Any]:
    """Time `generate` (first call, median full call, median 1-token call); returns (timings, first result).
    temperature 0 is greedy; otherwise sampling (nucleus when top_p < 1) with a fixed key."""
    def call(n):
        return generate(model, prompts, max_new_tokens=n, stop_token_ids=[], use_model_eos=False, pad_id=0,
                        injection=inj, mesh=mesh, length_bucket_min=1, temperature=temperature, top_p=top_p,
                        key=0, stop_check_every=stop_check_every)

    t0 = time.perf_counter()
    res = call(new_tokens)
    compile_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    call(1)
    compile_one = time.perf_counter() - t0
    assert (res.lengths == new_tokens).all(), "every row must generate the full length"
    t_full = median_time(lambda: call(new_tokens), reps)
    t_one = median_time(lambda: call(1), reps)
    step = (t_full - t_one) / max(new_tokens - 1, 1)
    batch = len(prompts)
    return {"first_call_s": compile_full, "first_call_1_token_s": compile_one, "total_s": t_full,
            "prefill_plus_first_token_s": t_one, "decode_step_s": step, "new_tokens": new_tokens,
            "explanations_per_s": batch / t_full, "tokens_per_s": batch * new_tokens / t_full,
            "distinct_tokens_generated": int(len(np.unique(res.tokens)))}, res


def weight_formats(text: str) -> dict[str, tuple[str, str]]:
    """--weights: {as written: (weight format, int8 implementation)}, in order; "int8:IMPL" names the
    implementation, plain "int8" is "auto"."""
    refusal = (f"--weights must list distinct formats of {WEIGHT_FORMATS} (int8 optionally as int8:IMPL, IMPL one "
               f"of {IMPLEMENTATIONS}), got {text!r}")
    formats = {}
    for item in (f.strip() for f in text.split(",")):
        if not item:
            continue
        weights, colon, implementation = item.partition(":")
        known = weights in WEIGHT_FORMATS and (not colon or weights == "int8" and implementation in IMPLEMENTATIONS)
        if not known or item in formats:
            raise ValueError(refusal)
        formats[item] = (weights, implementation or "auto")
    if not formats:
        raise ValueError(refusal)
    return formats


def variant_names(formats: dict[str, tuple[str, str]], layouts: list[str], projections: tuple[str, ...] = ("separate",),
                  attention: tuple[str, ...] = ("auto",), stop_checks: tuple[int, ...] = (STOP_CHECK_EVERY,),
                  down_slices: tuple[int, ...] = (1,)) -> list[tuple[str, str, str, str, str, int, int]]:
    """(name, weight format as written, layout, projections, decode attention, steps between stop tests, down
    slices) for every combination, in that nesting order.  A name is the format, then "/scanned", "/fused",
    "/attention-IMPL", "/stop-check-N" and "/down-slices-N" where those differ from the defaults (unrolled,
    separate, auto, STOP_CHECK_EVERY, 1)."""
    variants = []
    for fmt, layout, proj, impl, every, slices in itertools.product(formats, layouts, projections, attention,
                                                                     stop_checks, down_slices):
        parts = [fmt] + [layout] * (layout != "unrolled") + [proj] * (proj != "separate") \
            + [f"attention-{impl}"] * (impl != "auto") \
            + [f"stop-check-{every}"] * (every != STOP_CHECK_EVERY) + [f"down-slices-{slices}"] * (slices != 1)
        variants.append(("/".join(parts), fmt, layout, proj, impl, every, slices))
    return variants


def positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of distinct ints >= 1; anything else is refused naming `flag`."""
    try:
        items = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        items = ()
    if not items or len(set(items)) < len(items) or min(items) < 1:
        raise ValueError(f"{flag} must list distinct integers >= 1, got {text!r}")
    return items


def comma_choices(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of distinct values of `allowed`, in order; anything else is refused naming `flag`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or len(set(items)) < len(items) or any(x not in allowed for x in items):
        raise ValueError(f"{flag} must list distinct values of {allowed}, got {text!r}")
    return tuple(items)


def step_logits(model, prompts: np.ndarray, inj: Injection) -> np.ndarray:
    """Next-token logits [B, 2, V]: after each prompt with the injection (the prefill's), then after its greedy
    first token (the first decode step's, through the cache)."""
    res = generate(model, prompts, max_new_tokens=2, stop_token_ids=[], use_model_eos=False, pad_id=0,
                   injection=inj, length_bucket_min=1, return_logits=True)
    return res.logits[:, :2]


def logit_error(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far `logits` [B, V] are from `reference`: relative errors and top-1 agreement."""
    diff = logits.astype(np.float64) - reference
    return {"relative_rms_error": float(np.sqrt((diff ** 2).mean() / (reference.astype(np.float64) ** 2).mean())),
            "max_abs_error": float(np.abs(diff).max()), "reference_max_abs": float(np.abs(reference).max()),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean())}


def _torch_device(choice: str, preset: str) -> str | None:
    if choice == "none":
        return None
    try:
        import torch
    except ImportError:
        return None
    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu" if preset == "tiny" else None
    return choice


def _transformers_config(cfg: ModelConfig):
    """transformers' config of the same architecture and shape, as config.json describes it, with SDPA."""
    from transformers import AutoConfig

    described = hf_config(cfg)
    described.pop("architectures", None)
    hf_cfg = AutoConfig.for_model(described.pop("model_type"), **described)
    hf_cfg._attn_implementation = "sdpa"
    return hf_cfg


def _run_transformers(cfg: ModelConfig, prompts: np.ndarray, marker: int, vectors: np.ndarray, new_tokens: int,
                      dtype: str, device: str, reps: int, temperature: float = 0.0,
                      top_p: float = 1.0) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    hf_cfg = _transformers_config(cfg)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype).eval()
    init_s = time.perf_counter() - t0
    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        embeds[:, marker] = torch.as_tensor(vectors, device=device, dtype=torch_dtype)
    mask = torch.ones(ids.shape, dtype=torch.long, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def call(n):
        with torch.no_grad():
            # sampling as crossmap samples: temperature and nucleus only (transformers' top_k=50 default off)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
                else dict(do_sample=False)
            out = hf.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=0, pad_token_id=0, **sampling)
        sync()
        return out

    t0 = time.perf_counter()
    out = call(new_tokens)
    first = time.perf_counter() - t0
    assert out.shape[1] == new_tokens, f"transformers generated {out.shape[1]} tokens, expected {new_tokens}"
    t_full = median_time(lambda: call(new_tokens), reps)
    t_one = median_time(lambda: call(1), reps)
    result = {"device": device, "dtype": dtype, "attention": "sdpa", "cache": "dynamic (default)",
              "init_s": init_s, "first_call_s": first, "total_s": t_full, "prefill_plus_first_token_s": t_one,
              "decode_step_s": (t_full - t_one) / max(new_tokens - 1, 1),
              "explanations_per_s": len(prompts) / t_full, "tokens_per_s": len(prompts) * new_tokens / t_full,
              "torch_version": torch.__version__}
    if device == "cuda":
        n = 1 << 30
        src = torch.ones(n // 2, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        seconds = median_time(lambda: (dst.copy_(src), sync()), 5)
        result["torch_copy_bandwidth_GBps"] = 2 * n / seconds / 1e9
        del src, dst
    hf = embeds = out = None  # the peer's weights and cache go before JAX needs the memory
    if device == "cuda":
        torch.cuda.empty_cache()  # back to the device, for JAX
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    # transformers runs in the same process: JAX allocates on demand instead of taking 75% up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.temperature is None:
        args.temperature = 0.7 if args.nla else 0.0
    preset = PRESETS[args.preset]
    cfg = preset_config(preset)
    nla = preset["nla"]
    if args.nla and cfg.vocab_size < QWEN25_7B["vocab_size"]:  # the tiny smoke run reads the real tokenizer's ids
        cfg = cfg.replace(vocab_size=QWEN25_7B["vocab_size"])
    batch = preset["batch"] if args.batch is None else args.batch
    prompt_len = preset["prompt_len"] if args.prompt_len is None else args.prompt_len
    new_tokens = (NLA_NEW_TOKENS if args.nla else preset["new_tokens"]) if args.new_tokens is None else args.new_tokens
    for flag, value in (("--batch", batch), ("--prompt-len", prompt_len), ("--new-tokens", new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    dtype = args.dtype or preset["dtype"]
    formats = weight_formats(args.weights)
    variants = variant_names(formats, layer_layouts(args.layers),
                             comma_choices(args.projections, "--projections", PROJECTION_LAYOUTS),
                             comma_choices(args.decode_attention, "--decode-attention", DECODE_ATTENTION),
                             positive_ints(args.stop_check_every, "--stop-check-every"),
                             positive_ints(args.down_slices, "--down-slices"))
    copy_mib = args.copy_mib or preset["copy_mib"]
    mesh = make_mesh()
    if args.nla:
        print(f"[verbalize bench] --nla: the release's prompt through {args.tokenizer}", flush=True)
    print(f"[verbalize bench] {cfg.name or cfg.model_type}: batch {batch}, prompt "
          f"{'(the release AV prompt)' if args.nla else prompt_len}, "
          f"{new_tokens} new tokens, {dtype}, {len(jax.devices())} x {jax.devices()[0].device_kind}", flush=True)

    t0 = time.perf_counter()
    # On one device the plain init is already on that device; init_random's mesh path compiles one
    # program per parameter (minutes for a 7B model), worth it only when weights must be sharded.
    def base_model():
        return init_random(cfg, seed=args.seed, dtype=dtype, mesh=mesh if jax.device_count() > 1 else None)

    model = base_model()
    jax.block_until_ready(nnx.split(model)[1])
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    vectors = rng.normal(size=(batch, cfg.d_model)).astype(np.float32)
    if args.nla:
        prompt, marker, tokenizer = nla_prompt(args.tokenizer)
        prompt_len = len(prompt)
        print(f"[verbalize bench] --nla: the AV prompt is {prompt_len} tokens ({default_av_render(tokenizer)} "
              f"render), the marker at slot {marker}", flush=True)
        prompts = np.asarray([prompt] * batch, np.int32)
        vectors *= nla["injection_scale"] / np.linalg.norm(vectors, axis=1, keepdims=True)
    else:
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, prompt_len)).astype(np.int32)
        marker = prompt_len // 2
        vectors *= mean_embedding_norm(model) / np.linalg.norm(vectors, axis=1, keepdims=True)
    inj = Injection(vectors, [marker] * batch)

    if args.top_p < 1.0 and args.temperature <= 0:
        raise ValueError("--top-p < 1 needs --temperature > 0 (greedy decoding ignores the nucleus)")
    # transformers first: PyTorch hands its memory back (empty_cache), where JAX's allocator keeps what it freed
    # for itself, so at the 27B shape the two copies of the weights fit only in this order
    device = _torch_device(args.torch_device, args.preset)
    hf = None
    if device is not None:
        hf = _run_transformers(cfg, prompts, marker, vectors, new_tokens, dtype, device, args.reps,
                               args.temperature, args.top_p)
        print(f"[verbalize bench] transformers on {device}: {hf['total_s']:.3f} s per call, decode step "
              f"{hf['decode_step_s'] * 1e3:.2f} ms", flush=True)
    if args.nla:
        ar_cfg, ar_prompts, ar_batches = ar_workload(cfg, tokenizer, args, nla["layer"])
        ar_peer = None if device is None else ar_transformers(ar_cfg, ar_batches, dtype, device, args.reps)
    copy_probe = measured_copy_bandwidth(copy_mib << 20, repeats=max(args.reps, 5))
    bandwidth = copy_probe["gb_per_s"] * 1e9
    matmul_rate = measured_matmul_peak(dtype)["tflops"] * 1e12
    per_format: dict[str, Any] = {}
    first = variants[0][0]
    reference_logits = reference_tokens = None
    for name, fmt, layout, projections, attention, stop_check_every, down_slices in variants:
        weights, implementation = formats[fmt]
        # Every variant takes the float model's kernels (fused or stacked in place), so that at the 27B shape no
        # second copy of the weights sits beside the one timed; the next variant gets the same weights back from
        # the same seed (seconds, where a second copy would not fit beside a scanned variant and its cache).
        if model is None:
            model = base_model()
        variant = fused(with_down_slices(with_decode_attention(model, attention), down_slices), projections,
                        consume=True)
        variant = quantized(variant, weights, implementation=implementation)
        variant = scanned(variant, layout, consume=True)
        model = None  # the variant alone holds the weights now
        ours, generated = time_generate(variant, prompts, inj, new_tokens, mesh, args.reps,
                                        temperature=args.temperature, top_p=args.top_p,
                                        stop_check_every=stop_check_every)
        ours["layers"], ours["projections"], ours["decode_attention"] = layout, projections, attention
        ours["stop_check_every"], ours["down_slices"] = stop_check_every, down_slices
        ours["compile_s"] = ours["first_call_s"] - ours["total_s"]
        floor = _floor(cfg, variant, batch, prompt_len, new_tokens, bandwidth, ours["decode_step_s"], matmul_rate)
        ours["ratio_to_floor"] = floor["ratio_to_floor"]
        # a decode step timed at <= 0 (a loaded CPU: the 1-token call took as long as the full one) has no ratio
        ratio = "n/a" if floor["ratio_to_floor"] is None else f"{floor['ratio_to_floor']:.3f}"
        print(f"[verbalize bench] crossmap ({name}): compile {ours['compile_s']:.1f} s, {ours['total_s']:.3f} s "
              f"per call, decode step {ours['decode_step_s'] * 1e3:.2f} ms, {ours['explanations_per_s']:.1f} "
              f"explanations/s; floor {floor['step_s'] * 1e3:.3f} ms/step at {floor['copy_bandwidth_GBps']:.0f} "
              f"GB/s: ratio {ratio}", flush=True)
        entry = {"crossmap": ours, "floor": floor}
        logits = step_logits(variant, prompts, inj) if args.logit_error else None
        if reference_tokens is None:
            reference_logits, reference_tokens = logits, generated.tokens
        else:  # against the first variant, measured in this run
            base = per_format[first]
            # the timed call's tokens (greedy, or sampled with the same key)
            equal = generated.tokens == reference_tokens
            entry["tokens_vs_" + first] = {"agreement": float(equal.mean()),
                                           "rows_identical": float(equal.all(axis=1).mean())}
            if logits is not None:
                entry["logits_vs_" + first] = logit_error(logits[:, 0], reference_logits[:, 0])
                # the decode step's logits, over the rows whose first token both variants chose alike
                same = logits[:, 0].argmax(-1) == reference_logits[:, 0].argmax(-1)
                entry["decode_logits_vs_" + first] = {"rows": int(same.sum()), **(
                    logit_error(logits[same, 1], reference_logits[same, 1]) if same.any() else {})}
            entry["decode_step_vs_" + first] = ours["decode_step_s"] / base["crossmap"]["decode_step_s"]
            entry["decode_step_vs_" + first + "_floor"] = ours["decode_step_s"] / base["floor"]["step_s"]
            entry["compile_vs_" + first] = ours["compile_s"] / base["crossmap"]["compile_s"]
        per_format[name] = entry
        del variant
    ours, floor = per_format[first]["crossmap"], per_format[first]["floor"]
    ours["init_random_s"] = init_s
    result: dict[str, Any] = {
        "benchmark": "verbalize", "preset": args.preset, "model": cfg.name or cfg.model_type,
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                "head_dim", "d_ff", "qkv_bias", "rope_theta", "tie_embeddings")},
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": dtype,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else "greedy",
        "injection": {"mode": "replace", "layer": 0, "position": marker},
        "devices": [str(d.device_kind) for d in jax.devices()], "device": device_info(),
        # the first variant; "weights" holds every variant's (format, layout) timings, floor and logit error
        "crossmap": ours, "floor": floor, "weights": per_format, "copy_probe": copy_probe,
    }
    if hf is None:
        result["transformers"] = {"skipped": "no torch device (CUDA absent; pass --torch-device cpu to force)"}
    else:
        result["transformers"] = hf
        result["speedup_vs_transformers"] = ours["explanations_per_s"] / hf["explanations_per_s"]
        if "torch_copy_bandwidth_GBps" in hf:  # the floor again at torch's copy bandwidth, if higher
            torch_bw = hf["torch_copy_bandwidth_GBps"] * 1e9
            floor["step_s_at_torch_copy_bandwidth"] = floor["step_s"] * bandwidth / torch_bw
            floor["ratio_to_floor_at_torch_copy_bandwidth"] = ours["decode_step_s"] / floor[
                "step_s_at_torch_copy_bandwidth"]
        print(f"[verbalize bench] speedup over transformers {result['speedup_vs_transformers']:.2f}x", flush=True)
    if args.nla:
        result["nla"] = {"prompt_tokens": prompt_len, "marker_slot": marker, "injection_scale": nla["injection_scale"],
                         "prompt_render": default_av_render(tokenizer)}
        result["reconstructor"] = bench_reconstructor(ar_cfg, ar_prompts, ar_batches, args, dtype, ar_peer)
    write_json(result, args.out, echo=False)
    return result


NLA_NEW_TOKENS = 200  # the release's generation length


def nla_prompt(tokenizer_dir: str | None) -> tuple[list[int], int, object]:
    """The release's AV prompt through a real tokenizer of the base model: (token ids, marker slot, tokenizer).
    Rendered as a chat turn where the tokenizer has a chat template, else raw (the release's rule, nla.meta)."""
    from ..models import load_tokenizer
    from ..nla.meta import RELEASE_AV_TEMPLATE, default_av_render, pick_marker
    from ..verbalize import VerbalizerSpec, build_prompt

    if not tokenizer_dir:
        raise ValueError("--nla needs --tokenizer: the base model's tokenizer directory (its chat template and "
                         "marker make the real prompt)")
    tokenizer = load_tokenizer(tokenizer_dir)
    render = default_av_render(tokenizer)
    marker = pick_marker(tokenizer, render=render)
    token_id = tokenizer(marker, add_special_tokens=False)["input_ids"][0]
    spec = VerbalizerSpec(injection_token=marker, injection_token_id=token_id,
                          prompt_template=RELEASE_AV_TEMPLATE.format(injection_char=marker),
                          use_chat_template=render == "chat")
    built = build_prompt(tokenizer, spec)
    return list(built.token_ids), built.marker_index, tokenizer


def _ar_prompts(tokenizer, n: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    """AR prompts of the release's form: template prefix, `tokens` explanation tokens, template suffix."""
    from ..nla.meta import RELEASE_AR_TEMPLATE

    head, tail = RELEASE_AR_TEMPLATE.split("{explanation}")
    prefix = tokenizer(head, add_special_tokens=True)["input_ids"]
    suffix = tokenizer(tail, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens // 2, tokens + 1, size=n)  # explanations end where they end
    return [list(prefix) + rng.integers(1000, min(vocab, 100_000), size=int(k)).tolist() + list(suffix)
            for k in lengths]


def ar_workload(cfg: ModelConfig, tokenizer, args, layer: int) -> tuple[ModelConfig, list, list]:
    """The AR bench's truncated config, its prompts of the release's form and their padded batches (numpy)."""
    from ..nla.reconstructor import padded_batch

    ar_cfg = cfg.through_block(layer, tie_embeddings=True, name=f"{cfg.name or cfg.model_type}-ar-shaped")
    prompts = _ar_prompts(tokenizer, args.ar_explanations, args.ar_explanation_tokens, cfg.vocab_size, args.seed)
    order = np.argsort([len(p) for p in prompts])
    batches = [padded_batch([prompts[r] for r in order[i:i + args.ar_batch]], args.ar_batch)
               for i in range(0, len(order), args.ar_batch)]
    return ar_cfg, prompts, batches


def ar_transformers(ar_cfg: ModelConfig, batches: list, dtype: str, device: str, reps: int) -> dict[str, Any]:
    """The AR peer: transformers' backbone of the same truncated shape, final norm removed, and a value head,
    batched with right padding to each batch's longest prompt. The authors' NLACritic scores one explanation per
    forward; batching is the fair peer for throughput. Runs before JAX allocates (PyTorch hands its memory back;
    JAX keeps what it freed), which is what lets the 27B shape's two copies fit."""
    import torch
    from transformers import AutoModel

    hf_cfg = _transformers_config(ar_cfg)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        backbone = AutoModel.from_config(hf_cfg, dtype=torch_dtype).eval()
        backbone.norm = torch.nn.Identity()  # the AR has no final norm
        value_head = torch.nn.Linear(ar_cfg.d_model, ar_cfg.d_model, bias=False, dtype=torch_dtype)
    torch_batches = []
    for tokens, _, valid, last in batches:
        width = int(valid.sum(1).max())
        torch_batches.append((torch.as_tensor(tokens[:, :width], device=device, dtype=torch.long),
                              torch.as_tensor(valid[:, :width], device=device, dtype=torch.long),
                              torch.as_tensor(last, device=device, dtype=torch.long)))

    def torch_all():
        out = []
        with torch.no_grad():
            for ids, mask, last in torch_batches:
                h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                out.append(value_head(h[torch.arange(len(last), device=device), last]).float().cpu())
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    t0 = time.perf_counter()
    torch_all()
    first = time.perf_counter() - t0
    seconds = median_time(torch_all, max(reps, 1))
    backbone = value_head = torch_batches = None  # the peer's weights go before JAX needs the memory
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"[verbalize bench] AR transformers: {seconds:.2f} s per pass", flush=True)
    return {"device": device, "attention": "sdpa", "first_call_s": first, "total_s": seconds,
            "padding": "to each batch's longest"}


def bench_reconstructor(ar_cfg: ModelConfig, prompts: list, batches: list, args, dtype: str,
                        peer: dict[str, Any] | None) -> dict[str, Any]:
    """AR scoring: explanations/s of crossmap's jitted, bucketed reconstructor forward against the peer measured
    before (`ar_transformers`, None when no torch device) and the compute floor (matmul FLOPs at the measured
    bf16 rate)."""
    import jax.numpy as jnp

    from ..nla.reconstructor import reconstruct_batch
    from .common import measured_matmul_peak

    model = init_random(ar_cfg, seed=args.seed + 1, dtype=dtype)
    d = ar_cfg.d_model
    head = jnp.asarray(np.random.default_rng(1).standard_normal((d, d)) / np.sqrt(d), dtype=dtype)
    graphdef, state = nnx.split(model)
    device_batches = [tuple(jnp.asarray(a) for a in b) for b in batches]
    layer = ar_cfg.n_layers - 1

    def score_all():
        return [np.asarray(reconstruct_batch(state, head, *b, graphdef=graphdef, layer=layer))
                for b in device_batches]

    t0 = time.perf_counter()
    score_all()
    first = time.perf_counter() - t0
    seconds = median_time(score_all, max(args.reps, 1))
    real_tokens = sum(len(p) for p in prompts)
    # the blocks' matmuls and causal attention per token, plus the value head on each last token
    flops = sum(ar_cfg.forward_flops_per_token(len(p), with_head=False) * len(p) + 2 * d ** 2 for p in prompts)
    peak = measured_matmul_peak(dtype)
    ours = {"first_call_s": first, "total_s": seconds, "explanations_per_s": len(prompts) / seconds,
            "tokens_per_s": real_tokens / seconds, "batch": args.ar_batch,
            "buckets": sorted({int(b[0].shape[1]) for b in batches})}
    floor_s = flops / (peak["tflops"] * 1e12)
    result = {"layers": ar_cfg.n_layers, "explanations": len(prompts), "mean_prompt_tokens": real_tokens / len(prompts),
              "crossmap": ours, "floor": {"matmul_flops": flops, "bf16_matmul_tflops": peak["tflops"],
                                          "seconds": floor_s, "ratio_to_floor": seconds / floor_s}}
    print(f"[verbalize bench] AR: {ours['explanations_per_s']:.0f} explanations/s, {seconds / floor_s:.2f}x the "
          f"compute floor", flush=True)
    if peer is None:
        result["transformers"] = {"skipped": "no torch device"}
        return result
    result["transformers"] = dict(peer, explanations_per_s=len(prompts) / peer["total_s"])
    result["speedup_vs_transformers"] = peer["total_s"] / seconds
    print(f"[verbalize bench] AR transformers: {len(prompts) / peer['total_s']:.0f} explanations/s; speedup "
          f"{result['speedup_vs_transformers']:.2f}x", flush=True)
    return result
