"""`crossmap bench features-per-hour`: features explained per GPU-hour, from measured `bench verbalize --nla` rates.

Reads one or more `bench verbalize --nla` results (the release's AV prompt, 200 new tokens at temperature 0.7,
every row run to the full length; with its AR scoring rate) and turns their rates into the cost of the paper's
experiment on one side, the one GPU the result was measured on:

    vectors     each feature comes with one control (the paper's 45 and 45)
    rows        n_samples explanations per vector; washout "on" adds 2 x n_backgrounds rows per sample (the
                direction-plus-background and background-only rows, combined into one explanation), "both" is
                the paper config's washout.compare (off and on)
    AV seconds  rows / (batch / seconds per generate call)
    AR seconds  explanations / the AR's explanations per second (each explanation read back once)

Rows run to the full 200 tokens here. Real explanations stop at their closing tag, so these are upper
bounds on the time.

    crossmap bench features-per-hour --verbalize benchmark-results/verbalize-7b-nla-h200-prefix-cdf.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from crossmap.benchmarks.common import write_json
from crossmap.jsonio import load_json

WASHOUT_SETTINGS = ("off", "on", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbalize", nargs="+", required=True,
                        help="bench verbalize --nla JSON results (one per AV shape)")
    parser.add_argument("--features", type=int, nargs="+", default=[45, 10_000], help="feature counts to cost")
    parser.add_argument("--samples", type=int, default=4, help="explanations per vector (the paper's 4)")
    parser.add_argument("--backgrounds", type=int, default=4, help="washout backgrounds (the paper's 4)")
    parser.add_argument("--out", default="features_per_hour.json", help="JSON output path")


def rows_per_vector(samples: int, backgrounds: int, washout: str) -> tuple[int, int]:
    """(generation rows, explanations) for one vector under a washout setting."""
    off, on = samples, samples * 2 * backgrounds
    rows = {"off": off, "on": on, "both": off + on}[washout]
    explanations = {"off": samples, "on": samples, "both": 2 * samples}[washout]
    return rows, explanations


def cost(result: dict, features: list[int], samples: int, backgrounds: int) -> dict[str, Any]:
    if result.get("benchmark") != "verbalize" or "nla" not in result:
        raise ValueError("needs a `crossmap bench verbalize --nla` result (release prompt, 200 new tokens)")
    ours = result["crossmap"]
    rows_per_s = result["batch"] / ours["total_s"]
    ar = result.get("reconstructor", {}).get("crossmap")
    ar_per_s = ar["explanations_per_s"] if ar else None
    settings = {}
    for washout in WASHOUT_SETTINGS:
        rows, explanations = rows_per_vector(samples, backgrounds, washout)
        av_s = 2 * rows / rows_per_s  # a feature and its control
        ar_s = 2 * explanations / ar_per_s if ar_per_s else 0.0
        per_feature = av_s + ar_s
        settings[washout] = {
            "generation_rows_per_feature": 2 * rows, "av_seconds_per_feature": av_s,
            "ar_seconds_per_feature": ar_s if ar_per_s else None,
            "features_per_gpu_hour": 3600.0 / per_feature,
            "hours": {str(n): n * per_feature / 3600.0 for n in features},
        }
    return {"model": result["model"], "device": result["device"]["device_kind"], "date": result["device"]["date"],
            "batch": result["batch"], "new_tokens": result["new_tokens"], "prompt_tokens": result["prompt_len"],
            "av_rows_per_s": rows_per_s, "ar_explanations_per_s": ar_per_s, "washout": settings}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.samples < 1 or args.backgrounds < 1 or any(n < 1 for n in args.features):
        raise ValueError("--samples, --backgrounds and --features must be >= 1")
    out = {"benchmark": "features-per-hour", "samples": args.samples, "backgrounds": args.backgrounds,
           "features": args.features, "controls": "one per feature", "sources": {}}
    for path in args.verbalize:
        entry = cost(load_json(Path(path)), args.features, args.samples, args.backgrounds)
        out["sources"][str(path)] = entry
        for washout, s in entry["washout"].items():
            hours = ", ".join(f"{n} features {h * 60:.1f} min" for n, h in s["hours"].items())
            print(f"[features-per-hour] {entry['model']} on {entry['device']}, washout {washout}: "
                  f"{s['features_per_gpu_hour']:.0f} features per GPU-hour ({hours})", flush=True)
    write_json(out, args.out, echo=False)
    return out
