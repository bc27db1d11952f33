"""`crossmap bench scaling` run as a user runs it on a node (launch/gpu_node.sh), on 8 forced CPU
devices at tiny shapes: every layout gives the single-device numbers back (float32), and the JSON
carries the figures BENCHMARKS.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_bench_on_eight_devices_equals_one_device(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_node.sh"), "bench", "scaling", "--model", "tiny-gemma3", "--layer", "5",
         "--dtype", "float32", "--layouts", '[{"data": -1}, {"tensor": -1}, {"data": 4, "tensor": 2}]',
         "--batch", "8", "--seq", "32", "--repeats", "1", "--ridge-d-in", "24", "--ridge-d-out", "16",
         "--ridge-pairs", "2048", "--ridge-chunk", "256", "--verbalize-batch", "8", "--prompt-len", "12",
         "--new-tokens", "5", "--copy-mib", "8", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"]["n_devices"] == 8
    layouts = result["layouts"]
    assert set(layouts) == {"one", "data8", "tensor8", "data4xtensor2"}
    assert layouts["one"]["forward"]["tokens_per_s"] > 0 and layouts["one"]["verbalize"]["explanations_per_s"] > 0
    for name in ("data8", "tensor8", "data4xtensor2"):
        entry = layouts[name]
        assert entry["n_devices"] == 8
        assert entry["forward"]["max_row_rel_diff_vs_one_device"] < 1e-5, name
        assert entry["forward"]["scaling_efficiency"] > 0
        assert entry["verbalize"]["tokens_equal_to_one_device"] == 1.0, name
        assert entry["verbalize"]["floor_step_s"] > 0
    # weights split 8 ways on the tensor layout: each device reads an eighth (the embedding table too)
    one_w = layouts["one"]["verbalize"]["weight_bytes_per_device_step"]
    assert abs(layouts["tensor8"]["verbalize"]["weight_bytes_per_device_step"] - one_w / 8) < 1
    assert "skipped" in layouts["tensor8"]["ridge"]  # the batch is not split: nothing to reduce
    for name in ("data8", "data4xtensor2"):
        rd = layouts[name]["ridge"]
        assert rd["accumulate_on_devices_psum"]["device_slots"] == (8 if name == "data8" else 4)
        for key in ("accumulate_sharded_batch", "accumulate_on_devices_psum"):
            assert max(rd[key]["rel_diff_vs_one_device"].values()) < 1e-5, (name, key)
        assert rd["solve_vs_one_device"]["lambda_one"] == rd["solve_vs_one_device"]["lambda_mesh"]
        assert rd["solve_vs_one_device"]["W_max_rel_diff"] < 1e-4


def test_scaling_bench_rejects_bad_arguments(tmp_path):
    from crossmap.cli import main

    assert main(["bench", "scaling", "--parts", "forward,sing", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["bench", "scaling", "--layouts", '{"data": 2}', "--out", str(tmp_path / "x.json")]) == 2
