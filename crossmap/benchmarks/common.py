"""Timing helpers shared by the `crossmap bench` commands."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from ..jsonio import dumps


def device_info() -> dict:
    """What a benchmark ran on: accelerator, counts, versions, host and date."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "backend": jax.default_backend(),
            "device_kind": getattr(dev, "device_kind", "cpu"), "n_devices": jax.device_count(),
            "jax": jax.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "os": platform.platform(), "host": platform.node(),
            # first-call (compile) times are warm-cache figures when this is set and already filled
            "compile_cache": jax.config.jax_compilation_cache_dir,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),  # XLA reads them once; they change what compiles
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def time_jax(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Median wall time of `fn()` (blocking on its outputs) after warm-up calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "all_s": times}


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` (blocking on its outputs): `time_jax`'s median alone."""
    return time_jax(fn, warmup=warmup, repeats=repeats)["median_s"]


def timed_loop(init: Callable[[], object], step: Callable[[object, int], object],
               finish: Callable[[object], object], n_steps: int) -> tuple[object, float]:
    """Time `finish(step(...step(init(), 0)..., n_steps - 1))`, after a warm-up of two steps and `finish`
    (so the step is also compiled for its own output, as in the timed loop).  Returns (result, seconds)."""
    jax.block_until_ready(finish(step(step(init(), 0), 1)))
    state = jax.block_until_ready(init())
    t0 = time.perf_counter()
    for i in range(n_steps):
        state = step(state, i)
    state = jax.block_until_ready(finish(state))
    return state, time.perf_counter() - t0


def measured_matmul_peak(dtype="bfloat16", n: int = 8192, precision=None) -> dict:
    """Measured TFLOP/s of an n x n x n matmul: the denominator of crossmap's MFU figures."""
    if jax.devices()[0].platform == "cpu":
        n = min(n, 1024)
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    t = time_jax(lambda: f(a, b), warmup=2, repeats=10)
    return {"dtype": str(dtype), "n": n, "precision": str(precision), "tflops": 2 * n**3 / t["median_s"] / 1e12}


def measured_copy_bandwidth(n_bytes: int = 2 << 30, repeats: int = 10, chain: int = 8) -> dict:
    """Measured device memory bandwidth (GB/s) of large on-device copies (read + write counted).

    Two probes: one copy per call, and one program running `chain` copies back to back (each reading the last
    one's output, in place), where the host's dispatch and synchronisation are paid once per `chain` copies.
    Either can read the higher on a given machine (in place or into a fresh buffer); `gb_per_s`, the floors'
    bandwidth, is the higher of the two, so a floor is never looser than a copy that ran."""
    if jax.devices()[0].platform == "cpu":
        n_bytes = min(n_bytes, 256 << 20)
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    one = jax.jit(lambda v: v + 1.0)  # reads and writes every element once
    chained = jax.jit(lambda v: jax.lax.fori_loop(0, chain, lambda _, w: w + 1.0, v))
    one_copy = 2 * n_bytes / time_jax(lambda: one(x), warmup=2, repeats=repeats)["median_s"] / 1e9
    in_chain = 2 * n_bytes * chain / time_jax(lambda: chained(x), warmup=2, repeats=repeats)["median_s"] / 1e9
    return {"bytes": n_bytes, "chain": chain, "gb_per_s": max(one_copy, in_chain), "gb_per_s_one_copy": one_copy,
            "gb_per_s_chained": in_chain}


def write_json(result: dict, out: str | None, *, echo: bool = True) -> None:
    """Write a benchmark result (numpy / jax arrays become lists) to `out`, and print it if `echo`."""
    text = dumps(result, strict=False, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    if echo:
        print(text)


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def layer_layouts(text: str) -> list[str]:
    """--layers: the distinct block layouts (models.scan.LAYER_LAYOUTS) as written, in order."""
    from ..models.scan import LAYER_LAYOUTS

    layouts = [item.strip() for item in text.split(",") if item.strip()]
    if not layouts or len(set(layouts)) < len(layouts) or any(x not in LAYER_LAYOUTS for x in layouts):
        raise ValueError(f"--layers must list distinct layouts of {LAYER_LAYOUTS}, got {text!r}")
    return layouts
