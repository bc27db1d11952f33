"""What the single-product probes (int8_ablation.py, split_k_int8.py, gate_up_silu.py) share: a way of computing a
product is timed per weight copy against its floor, and each way's entry is appended to the result and the JSON
rewritten at once, a failure recorded in the entry rather than ending the run (so a call cut off by its time limit
still returns what it measured)."""
import contextlib
import json
from collections.abc import Callable, Iterator

from crossmap.benchmarks.decode_parts import back_to_back


def time_per_copy(entry: dict, call: Callable, copies: int, floor: float, reps: int = 10) -> float:
    """Seconds per weight copy of `call` (which multiplies `copies` copies), dispatched `reps` times back to back;
    stored in `entry` beside the floor and their ratio."""
    seconds = back_to_back(call, reps) / copies
    entry |= {"s": seconds, "floor_s": floor, "ratio_to_floor": seconds / floor}
    return seconds


@contextlib.contextmanager
def recorded(result: dict, out_path: str, entry: dict, tag: str) -> Iterator[None]:
    """Around one way's measurement: an exception in it is recorded in `entry` and printed after `tag` (a probe
    records what failed and goes on); either way `entry` is appended to result["runs"] and the result written to
    `out_path`."""
    try:
        yield
    except Exception as error:  # noqa: BLE001
        entry["error"] = repr(error)[:800]
        print(f"{tag}: ERROR {entry['error'][:300]}", flush=True)
    result["runs"].append(entry)
    json.dump(result, open(out_path, "w"), indent=1)
