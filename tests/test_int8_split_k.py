"""The split-K Mosaic GPU int8 kernel (models.int8_split_k): its tiling rule, its lowering for a Hopper GPU (on the
CPU), the arithmetic around it (padding, slices, scales, transposes) against the XLA reference with the kernel
replaced by its definition, and (on a GPU) the kernel itself against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossmap.models import int8_split_k
from crossmap.models.int8_matmul import int8_matmul_reference
from crossmap.models.int8_split_k import SplitKTiling, choose_tiling, int8_matmul_split_k


@pytest.mark.parametrize("m,k,n,splits", [
    (32, 18944, 3584, 4),  # the 7B's down: 28 row tiles, 148 K steps; 4 slices fill 112 of 132 multiprocessors
    (128, 3584, 3584, 4),  # o: 28 K steps, 7 each
    (32, 3584, 4608, 7),  # fused q/k/v: 36 tiles; 7 slices of 4 steps run in two waves, shorter than 2 of 14
    (128, 3584, 37888, 1),  # gate+up: 296 tiles already fill the grid
    (256, 3584, 3584, 2),  # two column tiles: 56 tiles, 2 slices
])
def test_tiling_splits_k_until_the_multiprocessors_are_busy(m, k, n, splits):
    tiling = choose_tiling(m, k, n, multiprocessors=132)
    assert tiling.splits == splits
    assert tiling.cols == min(128, m)
    stage = 2 * int8_split_k.ROWS_PER_WARPGROUP * int8_split_k.DEPTH + int8_split_k.DEPTH * tiling.cols * 2
    epilogue = int8_split_k._epilogue_bytes(tiling.cols, 4 if splits > 1 else 2)
    assert 2 <= tiling.stages <= 6 and tiling.stages * stage + epilogue <= int8_split_k._SHARED_BYTES


def _definition(w_t, xt, tiling, multiprocessors):
    """What split_k_product computes, in XLA: slice s's partial product in rows s*N to (s+1)*N."""
    n, k = w_t.shape
    slices = jnp.stack([jnp.dot(w_t[:, s * k // tiling.splits:(s + 1) * k // tiling.splits].astype(xt.dtype),
                                xt[s * k // tiling.splits:(s + 1) * k // tiling.splits],
                                preferred_element_type=jnp.float32) for s in range(tiling.splits)])
    return slices.reshape(tiling.splits * n, -1).astype(jnp.float32 if tiling.splits > 1 else xt.dtype)


@pytest.mark.parametrize("m,splits", [(5, 4), (100, 2), (128, 1)])
def test_the_arithmetic_around_the_kernel_matches_the_reference(m, splits, monkeypatch):
    """Rows padded to whole column tiles and cut back, K slices summed, scales applied, result transposed."""
    monkeypatch.setattr(int8_split_k, "split_k_product", _definition)
    rng = np.random.default_rng(0)
    k, n = 1024, 256
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w_t = jnp.asarray(rng.integers(-127, 128, size=(n, k)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, size=n), jnp.float32)
    cols = 128 if m > 64 else 16 * -(-m // 16)
    got = int8_matmul_split_k(x, w_t, scale, multiprocessors=132, tiling=SplitKTiling(splits, cols, 3))
    want = int8_matmul_reference(x, w_t.T, scale)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


def test_kernel_lowers_for_a_hopper_on_cpu():
    """The kernel's Mosaic GPU lowering runs without a GPU: each of the 7B's products at 32 and 128 rows becomes
    one Mosaic GPU custom call; operands it cannot take are refused with their shapes named."""
    shapes = {"qkv": (3584, 4608), "o": (3584, 3584), "down": (18944, 3584), "gate_up": (3584, 37888)}
    for (k, n), m in [(shape, m) for shape in shapes.values() for m in (32, 128)]:
        lowered = int8_matmul_split_k.trace(
            jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.int8),
            jax.ShapeDtypeStruct((n,), jnp.float32), multiprocessors=132).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("custom_call @mosaic_gpu") == 1
    x = jax.ShapeDtypeStruct((32, 3584), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"needs int8 w_t \[N, 3584\] and scale \[N\]"):
        int8_matmul_split_k.trace(x, jax.ShapeDtypeStruct((3584, 3584), jnp.bfloat16),
                                  jax.ShapeDtypeStruct((3584,), jnp.float32), multiprocessors=132)
    with pytest.raises(ValueError, match="bfloat16 or float16 activations"):
        int8_matmul_split_k.trace(jax.ShapeDtypeStruct((32, 3584), jnp.float32),
                                  jax.ShapeDtypeStruct((3584, 3584), jnp.int8),
                                  jax.ShapeDtypeStruct((3584,), jnp.float32), multiprocessors=132)
    with pytest.raises(ValueError, match=r"do not tile by 128 rows"):
        int8_matmul_split_k.trace(x, jax.ShapeDtypeStruct((3600, 3584), jnp.int8),
                                  jax.ShapeDtypeStruct((3600,), jnp.float32), multiprocessors=132)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(32, 18944, 3584), (128, 3584, 4608), (100, 3584, 16384)])
def test_kernel_matches_the_reference_on_a_gpu(m, k, n):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w_t = jnp.asarray(rng.integers(-127, 128, size=(n, k)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, size=n), jnp.float32)
    got = np.asarray(int8_matmul_split_k(x, w_t, scale), np.float32)
    want = np.asarray(jnp.dot(x, w_t.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * scale)
    assert np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2)) < 1e-2
