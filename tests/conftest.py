"""Shared test helpers.

Multi-device tests run in a subprocess: jax fixes its device count at import, so 8 forced CPU
devices need a fresh interpreter with XLA_FLAGS set before jax loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# In-process CLI calls would otherwise fill ~/.cache/crossmap/xla; the test that checks the
# persistent compile cache points it at a temporary directory itself.
os.environ.setdefault("CROSSMAP_COMPILE_CACHE", "off")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.  The suite runs in one process on a 24 GiB CI machine;
    kept for its whole run, the programs of every model shape and variant it compiles brought that process to the
    machine's limit (24 GB resident, and XLA's CPU compiler crashed in the last module)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def run_with_devices(code: str, n_devices: int = 8, timeout: float = 300) -> dict:
    """Run `code` in a fresh Python with `n_devices` forced CPU devices.

    The code must print one JSON object on its last line of stdout; it is returned parsed.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pytest_collection_modifyitems(config, items):
    try:
        import jax

        has_accel = any(d.platform != "cpu" for d in jax.devices())
    except Exception:  # pragma: no cover - jax missing entirely
        has_accel = False
    if has_accel:
        return
    skip = pytest.mark.skip(reason="needs an accelerator (GPU/TPU); results live in BENCHMARKS.md")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shipped_model():
    """Load a shipped real model once per test session: shipped_model(name) -> (LoadedModel, gguf path).

    The GGUF is dequantised once into the crossmap cache (CROSSMAP_CACHE), so later sessions and
    the demo reuse the converted safetensors.
    """
    from crossmap.models import load_model, shipped_gguf

    loaded = {}

    def get(name: str):
        if name not in loaded:
            path = shipped_gguf(name)
            loaded[name] = (load_model(path), path)
        return loaded[name]

    return get
