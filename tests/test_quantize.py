"""Weight-only int8: the Pallas kernel against the XLA reference (interpret mode), quantisation against
its definition, and int8 models against float models holding the dequantised kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crossmap.models import init_random, tiny_config
from crossmap.models.int8_matmul import (
    KernelBlocks,
    default_blocks,
    int8_matmul,
    int8_matmul_pallas,
    int8_matmul_reference,
)
from crossmap.models.quantize import dequantize, is_quantized, quantize_int8, quantized
from crossmap.verbalize import Injection, generate


def _operands(rng, m, k, n, dtype):
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.integers(-127, 128, size=(k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, size=n), jnp.float32)
    return x, w, scale


@pytest.mark.parametrize("m,k,n,blocks", [
    (5, 64, 48, None),  # rows padded to 16, one K slice: scale applied in the kernel
    (128, 256, 128, KernelBlocks(block_n=32, block_k=32, splits=2)),  # split-K: partials summed after
    (20, 512, 64, KernelBlocks(block_n=16, block_k=64, splits=4)),
    (16, 128, 256, KernelBlocks(block_n=64, block_k=128, splits=1)),
    (200, 64, 32, None),  # more than 128 rows: two row blocks, the second padded
    (70, 128, 64, KernelBlocks(block_n=32, block_k=64, splits=2, block_m=32)),  # three row blocks, split-K
    (32, 256, 128, KernelBlocks(block_n=64, block_k=64, swap=True)),  # the transposed product, one K slice
    (70, 512, 64, KernelBlocks(block_n=32, block_k=64, splits=4, block_m=32, swap=True)),  # and split-K, row blocks
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_kernel_equals_the_xla_reference(m, k, n, blocks, dtype):
    rng = np.random.default_rng(m + k + n)
    x, w, scale = _operands(rng, m, k, n, dtype)
    got = int8_matmul_pallas(x, w, scale, blocks=blocks, interpret=True)
    ref = int8_matmul_reference(x, w, scale)
    assert got.shape == (m, n) and got.dtype == x.dtype
    exact = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)) * np.asarray(scale, np.float64)
    tol = 1e-6 if dtype == "float32" else 1e-2  # bf16 output rounding
    scale_of = np.abs(exact).max()
    assert np.abs(np.asarray(got, np.float64) - exact).max() / scale_of < tol
    assert np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max() / scale_of < tol
    f32 = int8_matmul_pallas(x, w, scale, blocks=blocks, interpret=True, out_dtype=jnp.float32)
    assert f32.dtype == jnp.float32


@pytest.mark.parametrize("blocks,half", [(KernelBlocks(128, 64), False), (KernelBlocks(128, 64, swap=True), False),
                                         (KernelBlocks(64, 64, splits=4, swap=True), False),
                                         (KernelBlocks(128, 64), True), (KernelBlocks(128, 64, splits=4), True)])
def test_kernel_lowers_for_a_gpu_on_cpu(blocks, half):
    """Pallas's Triton lowering runs here, where the interpreter does not: an operation it refuses fails on the
    CPU, not first on a GPU.  One Triton call per product, at the 7B's gate/up shape with 32 rows."""
    fn = jax.jit(lambda x, w, s: int8_matmul_pallas(x, w, s, blocks=blocks, half=half))
    operands = (jax.ShapeDtypeStruct((32, 3584), jnp.bfloat16), jax.ShapeDtypeStruct((3584, 18944), jnp.int8),
                jax.ShapeDtypeStruct((18944,), jnp.float32))
    text = fn.trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_int8_as_float16_is_exact_for_every_int8_value():
    from crossmap.models.int8_matmul import int8_as_float16

    values = np.arange(-128, 128, dtype=np.int8)
    got = np.asarray(int8_as_float16(jnp.asarray(values)))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.astype(np.int32), values.astype(np.int32))


@pytest.mark.parametrize("m,k,n,blocks", [(5, 128, 96, KernelBlocks(32, 32)), (32, 256, 64, KernelBlocks(32, 64, 4))])
def test_float16_kernel_equals_the_reference(m, k, n, blocks):
    """The float16 path (implementation "pallas-f16") in the interpreter, one slice and split-K: x prescaled by a
    power of two and the weights converted exactly, so it equals the float32 reference to summation order (and the
    few |x| under 2e-3 rounded by under 8e-6); x holds values up to 1e4, a residual stream's outliers."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[0, :4] = [1e4, -3e3, 1e-2, 5e2]
    x = jnp.asarray(x, jnp.bfloat16)
    w = jnp.asarray(rng.integers(-127, 128, size=(k, n)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, size=n), jnp.float32)
    want = np.asarray(int8_matmul_reference(x.astype(jnp.float32), w, scale))
    got = np.asarray(int8_matmul_pallas(x, w, scale, blocks=blocks, interpret=True, half=True,
                                        out_dtype=jnp.float32))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


def test_kernel_refuses_shapes_it_cannot_tile():
    rng = np.random.default_rng(0)
    x, w, scale = _operands(rng, 4, 40, 16, "float32")
    with pytest.raises(ValueError, match="multiples of 16"):
        int8_matmul_pallas(x, w, scale, interpret=True)
    x, w, scale = _operands(rng, 4, 64, 48, "float32")
    with pytest.raises(ValueError, match="do not tile"):
        int8_matmul_pallas(x, w, scale, blocks=KernelBlocks(block_n=32, block_k=16), interpret=True)
    with pytest.raises(ValueError, match="int8 w"):
        int8_matmul_pallas(x, w.astype(jnp.float32), scale, interpret=True)
    with pytest.raises(ValueError, match="implementation"):
        int8_matmul(x, w, scale, implementation="cuda")


@pytest.mark.parametrize("k,n", [(3584, 18944), (18944, 3584), (3584, 512), (5376, 262144), (1152, 256)])
def test_default_blocks_tile_the_released_shapes(k, n):
    blocks = default_blocks(128, k, n)
    assert k % (blocks.splits * blocks.block_k) == 0 and n % blocks.block_n == 0


def test_quantize_int8_is_symmetric_per_output_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(24, 3, 8)).astype(np.float32)
    w[:, 1, 2] = 0.0  # an all-zero channel stays zero
    values, scale = quantize_int8(jnp.asarray(w), 1)
    assert values.dtype == jnp.int8 and scale.shape == (3, 8)
    expected_scale = np.abs(w).max(axis=0) / 127
    expected_scale[1, 2] = 1.0
    np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(values), np.clip(np.round(w / expected_scale), -127, 127))
    assert np.abs(np.asarray(dequantize(values, scale)) - w).max() <= expected_scale.max() / 2 + 1e-7
    assert int(np.abs(np.asarray(values)).max()) == 127
    values, scale = quantize_int8(jnp.asarray(w), 2)  # two input axes: one scale per last-axis channel
    np.testing.assert_allclose(np.asarray(scale), np.abs(w).max(axis=(0, 1)) / 127, rtol=1e-6)


def dequantized_reference(model):
    """A float model whose kernels are the int8 model's values * scales (a tied table's head separate)."""
    ref = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_modules(ref):
        for name in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"):
            scale = getattr(module, f"{name}_scale", None)
            if scale is not None:
                param = getattr(module, name)
                setattr(module, name, nnx.data(nnx.Param(dequantize(param[...], scale[...]))))
                setattr(module, f"{name}_scale", None)
    return ref


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
def test_int8_model_equals_the_dequantised_float_model(arch):
    cfg = tiny_config(arch, eos_token_ids=(1,))
    model = init_random(cfg, seed=3, dtype="float32")
    q = quantized(model, "int8")
    assert is_quantized(q) and not is_quantized(model)
    assert model.layers[0].mlp.up[...].dtype == jnp.float32  # the float model keeps its kernels
    assert q.layers[0].mlp.up[...].dtype == jnp.int8 and q.lm_head[...].dtype == jnp.int8
    ref = dequantized_reference(q)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 11)))
    positions = jnp.broadcast_to(jnp.arange(11), (3, 11))
    valid = jnp.ones((3, 11), bool)
    got, want = q.logits(tokens, positions, valid), ref.logits(tokens, positions, valid)
    assert np.abs(np.asarray(got - want)).max() / np.abs(np.asarray(want)).max() < 1e-5
    through_kernel = quantized(model, "int8", implementation="interpret")  # every product in the Pallas kernel
    kernel = jax.jit(lambda t, p, v: through_kernel.logits(t, p, v))(tokens, positions, valid)
    assert np.abs(np.asarray(kernel - want)).max() / np.abs(np.asarray(want)).max() < 1e-5
    # quantising changes the model: the int8 logits are not the float ones
    assert np.abs(np.asarray(got - model.logits(tokens, positions, valid))).max() > 1e-4


def _with_implementation(model, implementation: str):
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "int8_implementation"):
            module.int8_implementation = implementation
    return model


@pytest.mark.parametrize("arch,projections,layers", [("qwen2", "fused", "unrolled"), ("gemma3_text", "fused", "scanned"),
                                                     ("qwen2", "separate", "scanned")])
def test_output_major_int8_kernels_compute_what_the_plain_layout_computes(arch, projections, layers, monkeypatch):
    """"mosaic" stores the wide kernels output-major ([lead..., out..., in...]) for the Mosaic GPU kernel.  That
    kernel runs only on Hopper, so here the layout goes through the XLA reference: the logits and the greedy
    tokens with an injection equal the plain int8 model's; quantizing before or after scanning stores the same
    arrays.  The thresholds are lowered so the tiny model's wider kernels (128 or more outputs: q/k/v fused,
    gate/up, the head, tied for gemma) qualify."""
    from crossmap.models import fused, scanned
    from crossmap.models import int8_matmul as kernels

    monkeypatch.setattr(kernels, "OUTPUT_MAJOR_MIN_COLUMNS", 128)
    monkeypatch.setattr(kernels, "_MOSAIC_TILE", 16)
    cfg = tiny_config(arch, eos_token_ids=(1,))
    model = fused(init_random(cfg, seed=4, dtype="float32"), projections)
    model = scanned(model, layers)
    plain = quantized(model, "int8", implementation="reference")
    stored = quantized(model, "int8", implementation="mosaic")
    marked = {path: v for path, v in nnx.to_flat_state(nnx.state(stored, nnx.Param))
              if v.get_metadata().get("output_major")}
    names = {path[-1] for path in marked}
    assert names == ({"qkv", "gate_up", "lm_head"} if projections == "fused" else {"gate", "up", "lm_head"})
    plain_state = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    for path, v in marked.items():  # the same int8 values, moved: [lead..., in, out...] -> [lead..., out..., in]
        lead = 1 if layers == "scanned" and path[0] == "layer_stacks" else 0
        want = np.asarray(plain_state[path][...])
        want = np.moveaxis(want, lead, -1)
        np.testing.assert_array_equal(np.asarray(v[...]), want, err_msg=str(path))
    _with_implementation(stored, "reference")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 9)))
    positions = jnp.broadcast_to(jnp.arange(9), (3, 9))
    valid = jnp.ones((3, 9), bool)
    want = np.asarray(plain.logits(tokens, positions, valid))
    got = np.asarray(stored.logits(tokens, positions, valid))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    inj = Injection(rng.normal(size=(2, cfg.d_model)).astype(np.float32), [1, 0])
    a = generate(stored, prompts, max_new_tokens=5, injection=inj, return_logits=True)
    b = generate(plain, prompts, max_new_tokens=5, injection=inj, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    if layers == "scanned":  # quantize first, then scan: the same stacks
        first = quantized(fused(init_random(cfg, seed=4, dtype="float32"), projections), "int8", implementation="mosaic")
        again = dict(nnx.to_flat_state(nnx.state(scanned(first), nnx.Param)))
        for path, v in marked.items():
            np.testing.assert_array_equal(np.asarray(again[path][...]), np.asarray(v[...]), err_msg=str(path))
    # the layout is refused by an implementation that does not store it
    _with_implementation(stored, "pallas")
    with pytest.raises(ValueError, match="output-major kernel runs with implementation 'mosaic' or 'reference'"):
        stored.logits(tokens, positions, valid)


def test_mosaic_kernel_lowers_for_a_gpu_on_cpu(monkeypatch):
    """The Mosaic GPU kernel's lowering (jaxlib's Mosaic GPU dialect), reachable without a GPU: the 7B's gate/up
    product at 128 rows, stored output-major, becomes one Mosaic GPU custom call; rows or dtypes it cannot take
    are refused with the shape named.  The kernel sizes its persistent grid from the default device's
    multiprocessors, which a CPU device lacks: it is told an H100's 132."""
    from types import SimpleNamespace

    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    from crossmap.models.int8_matmul import int8_matmul_mosaic

    monkeypatch.setattr(mixed, "backend", SimpleNamespace(get_default_device=lambda: SimpleNamespace(core_count=132)))

    operands = (jax.ShapeDtypeStruct((128, 3584), jnp.bfloat16), jax.ShapeDtypeStruct((37888, 3584), jnp.int8),
                jax.ShapeDtypeStruct((37888,), jnp.float32))
    for rows in (128, 20):  # 20: padded to a 32-row tile
        text = int8_matmul_mosaic.trace(jax.ShapeDtypeStruct((rows, 3584), jnp.bfloat16), *operands[1:]).lower(
            lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @mosaic_gpu") == 1
    with pytest.raises(ValueError, match="at most 256 rows"):
        int8_matmul_mosaic.trace(jax.ShapeDtypeStruct((300, 3584), jnp.bfloat16), *operands[1:])
    with pytest.raises(ValueError, match=r"needs int8 w_t \[N, 3584\] with N and K multiples of 128"):
        int8_matmul_mosaic.trace(operands[0], jax.ShapeDtypeStruct((100, 3584), jnp.int8), operands[2])
    with pytest.raises(ValueError, match="bfloat16 or float16 activations"):
        int8_matmul_mosaic.trace(jax.ShapeDtypeStruct((128, 3584), jnp.float32), *operands[1:])


@pytest.mark.parametrize("capability", ["8.0", "10.0"])
def test_mosaic_kernel_refuses_a_gpu_that_is_not_a_hopper(capability, monkeypatch):
    """The kernel is built on Hopper's wgmma: an Ampere or a Blackwell is named and refused before lowering."""
    from types import SimpleNamespace

    from crossmap.models.int8_matmul import int8_matmul_mosaic

    gpu = SimpleNamespace(platform="gpu", compute_capability=capability, device_kind="NVIDIA TEST GPU")
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [gpu])
    operands = (jax.ShapeDtypeStruct((32, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 256), jnp.int8),
                jax.ShapeDtypeStruct((256,), jnp.float32))
    with pytest.raises(ValueError, match=f"runs on Hopper GPUs .* NVIDIA TEST GPU has {capability}: use 'auto'"):
        int8_matmul_mosaic.trace(*operands)


def test_mosaic_kernel_names_the_missing_jax_module(monkeypatch):
    import sys

    from jax.experimental.pallas.ops import gpu as jax_gpu_kernels

    from crossmap.models.int8_matmul import int8_matmul_mosaic

    # as if this jax had no such module: neither the package attribute nor an importable submodule
    monkeypatch.delattr(jax_gpu_kernels, "hopper_mixed_type_matmul_mgpu", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu", None)
    operands = (jax.ShapeDtypeStruct((32, 256), jnp.bfloat16), jax.ShapeDtypeStruct((256, 256), jnp.int8),
                jax.ShapeDtypeStruct((256,), jnp.float32))
    with pytest.raises(ImportError, match=r"int8 implementation 'mosaic' needs JAX's Mosaic GPU mixed-type kernel "
                                          r"\(jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu\)"):
        int8_matmul_mosaic.trace(*operands)


def test_int8_generation_equals_the_dequantised_model_with_an_injection():
    cfg = tiny_config("qwen2", eos_token_ids=(1,))
    model = init_random(cfg, seed=5, dtype="float32")
    q = quantized(model, "int8")
    ref = dequantized_reference(q)
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    vectors = np.random.default_rng(2).normal(size=(3, cfg.d_model)).astype(np.float32)
    inj = Injection(vectors, [1, 0, 2])
    a = generate(q, prompts, max_new_tokens=6, injection=inj, return_logits=True)
    b = generate(ref, prompts, max_new_tokens=6, injection=inj, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_quantized_rejects_unknown_formats_and_double_quantisation():
    model = init_random(tiny_config("qwen2"), seed=0, dtype="float32")
    assert quantized(model, "float") is model
    with pytest.raises(ValueError, match="weights must be one of"):
        quantized(model, "int4")
    with pytest.raises(ValueError, match="implementation must be one of"):
        quantized(model, "int8", implementation="cuda")
    with pytest.raises(ValueError, match="already quantized"):
        quantized(quantized(model, "int8"), "int8")


def test_real_shipped_int8_model_equals_its_dequantised_reference(shipped_model):
    """Gemma-3-270M: a tied head (its own int8 copy), (1+w) norms, sliding layers, the real vocabulary; the tiny
    qwen2 and gemma3 models above cover both architectures' other paths."""
    for name in ("gemma-3-270m",):
        lm, _ = shipped_model(name)
        q = quantized(lm.model, "int8")
        ref = dequantized_reference(q)
        ids = lm.tokenizer("The river ran past the mill and into the town.")["input_ids"]
        tokens = jnp.asarray([ids])
        positions = jnp.arange(len(ids))[None]
        valid = jnp.ones_like(tokens, bool)
        got, want = q.logits(tokens, positions, valid), ref.logits(tokens, positions, valid)
        assert np.abs(np.asarray(got - want)).max() / np.abs(np.asarray(want)).max() < 1e-4, name


def test_config_selects_int8_per_verbalizer(tmp_path):
    """verbalizers.<side>.weights: the side's verbalizer runs int8 kernels, the shared model stays float, and a
    format the quantizer does not know is refused naming the field."""
    from pathlib import Path

    from crossmap.pipeline import load_config, validate
    from crossmap.pipeline.context import RunContext
    from crossmap.pipeline.stages import build_verbalizer

    c = load_config(Path(__file__).parent.parent / "configs" / "tiny.py")
    c.run_dir = str(tmp_path / "run")
    c.verbalizers.source.weights = "int8"
    ctx = RunContext(c)
    verbalizer, lm = build_verbalizer(ctx, "source")
    assert is_quantized(verbalizer.model) and not is_quantized(lm.model)
    target, _ = build_verbalizer(ctx, "target")
    assert not is_quantized(target.model)
    c.verbalizers.target.weights = "int4"
    with pytest.raises(ValueError, match="verbalizers.target.weights must be one of 'float', 'int8'"):
        validate(c)


def _bench_args(module, argv):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_verbalize_times_int8_beside_float(tmp_path):
    from crossmap.benchmarks import verbalize as bench

    # 96 tokens and the median of 3 calls keep the decode step (a difference of two call times) above noise
    result = bench.run(_bench_args(bench, ["--preset", "tiny", "--reps", "3", "--new-tokens", "96",
                                           "--torch-device", "none", "--weights", "float,int8",
                                           "--out", str(tmp_path / "v.json")]))
    assert list(result["weights"]) == ["float", "int8"]
    float_floor = result["weights"]["float"]["floor"]
    entry = result["weights"]["int8"]
    # int8 kernels: a quarter of the float32 kernels' bytes; the float embedding table is not read
    assert entry["floor"]["weight_bytes_per_step"] < 0.5 * float_floor["weight_bytes_per_step"]
    assert 0 < entry["logits_vs_float"]["relative_rms_error"] < 0.1
    assert entry["logits_vs_float"]["top1_agreement"] > 0.5
    assert entry["decode_step_vs_float_floor"] > 0
    assert entry["floor"]["compute_step_s"] > 0
    with pytest.raises(ValueError, match="--weights"):
        bench.run(_bench_args(bench, ["--preset", "tiny", "--weights", "float,int8:cuda"]))
    with pytest.raises(ValueError, match="--batch must be >= 1"):
        bench.run(_bench_args(bench, ["--preset", "tiny", "--batch", "0"]))


def test_bench_int8_matmul_checks_the_kernel_at_each_shape(tmp_path):
    from crossmap.benchmarks import int8_matmul as bench

    result = bench.run(_bench_args(bench, ["--preset", "tiny", "--reps", "1", "--rotate-mib", "1",
                                           "--out", str(tmp_path / "m.json")]))
    cfg = bench.preset_config(bench.PRESETS["tiny"])
    assert set(result["shapes"]) == set(bench.decode_shapes(cfg))
    for name, entry in result["shapes"].items():
        assert entry["pallas_max_error_vs_reference"] < 1e-2, name  # bf16 outputs
        k, n = entry["K"], entry["N"]
        assert entry["floor"]["bf16_bytes_s"] == pytest.approx(2 * k * n / (result["copy_bandwidth_GBps"] * 1e9))


def test_token_agreement_counts_the_agreeing_prefix():
    from crossmap.benchmarks.int8_fidelity import token_agreement

    got = token_agreement([[1, 2, 3, 4], [5, 6], [7, 8]], [[1, 2, 9, 4], [5, 6], [0, 8]])
    assert got == {"identical_fraction": pytest.approx(1 / 3), "mean_agreeing_prefix_share": pytest.approx((0.5 + 1 + 0) / 3),
                   "first_token_agreement": pytest.approx(2 / 3)}


def test_features_per_hour_counts_rows_per_washout_setting(tmp_path):
    """A known answer: 128 rows in 2 s is 64 rows/s; the AR reads 10 explanations/s."""
    import json

    from crossmap.benchmarks import features_per_hour as bench

    assert bench.rows_per_vector(4, 4, "off") == (4, 4)
    assert bench.rows_per_vector(4, 4, "on") == (32, 4)
    assert bench.rows_per_vector(4, 4, "both") == (36, 8)
    measured = {"benchmark": "verbalize", "nla": {}, "batch": 128, "new_tokens": 200, "prompt_len": 125,
                "model": "m", "device": {"device_kind": "gpu", "date": "today"}, "crossmap": {"total_s": 2.0},
                "reconstructor": {"crossmap": {"explanations_per_s": 10.0}}}
    path = tmp_path / "v.json"
    path.write_text(json.dumps(measured))
    out = bench.run(_bench_args(bench, ["--verbalize", str(path), "--features", "45", "--out", str(tmp_path / "f.json")]))
    off = out["sources"][str(path)]["washout"]["off"]
    assert off["av_seconds_per_feature"] == pytest.approx(2 * 4 / 64)  # a feature and its control, 4 rows each
    assert off["ar_seconds_per_feature"] == pytest.approx(2 * 4 / 10)
    assert off["features_per_gpu_hour"] == pytest.approx(3600 / (8 / 64 + 8 / 10))
    assert off["hours"]["45"] == pytest.approx(45 * (8 / 64 + 8 / 10) / 3600)
    path.write_text(json.dumps({**measured, "benchmark": "ridge"}))
    with pytest.raises(ValueError, match="bench verbalize --nla"):
        bench.run(_bench_args(bench, ["--verbalize", str(path), "--out", str(tmp_path / "f.json")]))


def test_quantized_refuses_a_model_spread_over_devices():
    from conftest import run_with_devices

    out = run_with_devices("""
        import json
        from crossmap.models import init_random, tiny_config
        from crossmap.models.quantize import quantized
        from crossmap.sharding import make_mesh
        model = init_random(tiny_config("qwen2"), seed=0, dtype="float32", mesh=make_mesh({"data": 1, "tensor": 2}))
        try:
            quantized(model, "int8")
            print(json.dumps({"refused": ""}))
        except NotImplementedError as err:
            print(json.dumps({"refused": str(err)}))
    """, n_devices=2)
    assert "one device" in out["refused"] and "2 devices" in out["refused"]


def test_an_int8_verbalizer_on_several_devices_is_refused_before_any_stage():
    from conftest import run_with_devices

    out = run_with_devices("""
        import json, tempfile
        from pathlib import Path
        from crossmap.pipeline import load_config
        from crossmap.pipeline.context import RunContext
        c = load_config(str(Path("configs") / "tiny.py"))
        c.run_dir = tempfile.mkdtemp()
        c.verbalizers.target.weights = "int8"
        try:
            RunContext(c)
            print(json.dumps({"refused": ""}))
        except ValueError as err:
            print(json.dumps({"refused": str(err)}))
    """, n_devices=2)
    assert "verbalizers.target.weights='int8' runs on one device" in out["refused"]


def test_int8_benches_refuse_bad_arguments_before_any_work(tmp_path):
    from crossmap.benchmarks import features_per_hour, int8_fidelity, int8_matmul

    with pytest.raises(ValueError, match="--batch must be >= 1"):
        int8_matmul.run(_bench_args(int8_matmul, ["--preset", "tiny", "--batch", "0"]))
    with pytest.raises(ValueError, match="are not shipped NLA pairs"):
        int8_fidelity.run(_bench_args(int8_fidelity, ["--pairs", "llama-70b-L40"]))
    with pytest.raises(ValueError, match="--vectors, --max-new-tokens and --batch must be >= 1"):
        int8_fidelity.run(_bench_args(int8_fidelity, ["--vectors", "0"]))
    with pytest.raises(ValueError, match="fewer than --vectors"):
        int8_fidelity.run(_bench_args(int8_fidelity, ["--first-document", "5990", "--vectors", "64"]))
    with pytest.raises(ValueError, match="--samples, --backgrounds and --features must be >= 1"):
        features_per_hour.run(_bench_args(features_per_hour, ["--verbalize", "x.json", "--samples", "0"]))
