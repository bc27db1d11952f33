"""`crossmap bench int8-fidelity`: what weight-only int8 costs the shipped NLAs, on the real small models.

For each NLA pair shipped with crossmap (an AV and an AR over Qwen2.5-Coder-0.5B-Instruct and over
Gemma-3-270M), `--vectors` activations of the base model at the pair's layer (one random position in each of
`--vectors` documents of the shipped corpus from `--first-document` on: the shipped NLAs trained on its first
3000 documents, `configs/nla_demo.py`, so these are text neither NLA has seen) are explained by the AV
twice, greedily: with its float32 weights and with int8 kernels (`models.quantize`).  Both explanations are
read back by the same float32 AR.  Reported:

    token agreement    explanations identical token for token; the mean share of each float explanation's
                       tokens generated before the int8 one first differs; first tokens equal
    round trip         mean cosine of AR(AV(v)) with v, float and int8 AV, and their paired difference with a
                       95% bootstrap interval over the vectors

The release's temperature (0.7) would make the two explanations differ by chance as much as by the weights;
greedy decoding leaves only the weights' effect.  Runs on any backend (CPU: minutes).

    crossmap bench int8-fidelity --out int8_fidelity.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from crossmap.benchmarks.common import device_info, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", default="",
                        help="comma-separated shipped NLA pairs (without -av/-ar; default: every shipped pair)")
    parser.add_argument("--vectors", type=int, default=64, help="activations explained per pair")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per explanation")
    parser.add_argument("--first-document", type=int, default=3000,
                        help="the first corpus document used (the shipped NLAs trained on documents 0..2999)")
    parser.add_argument("--batch", type=int, default=32, help="explanations per generation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="int8_fidelity.json", help="JSON output path")


def shipped_pairs() -> list[str]:
    from crossmap.nla import shipped_nla_names

    names = shipped_nla_names()
    return sorted({n.removesuffix("-av") for n in names if n.endswith("-av") and n.removesuffix("-av") + "-ar" in names})


def token_agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """How far `other`'s token sequences follow `reference`'s, sequence by sequence."""
    identical, shares, first = [], [], []
    for a, b in zip(reference, other, strict=True):
        agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        identical.append(a == b)
        shares.append(agree / max(len(a), 1))
        first.append(bool(a) and bool(b) and a[0] == b[0])
    return {"identical_fraction": float(np.mean(identical)), "mean_agreeing_prefix_share": float(np.mean(shares)),
            "first_token_agreement": float(np.mean(first))}


def measure_pair(pair: str, args: argparse.Namespace, documents: list[str]) -> dict[str, Any]:
    from crossmap.evaluate import bootstrap_ci
    from crossmap.models import load_model, make_hidden_fn
    from crossmap.models.quantize import quantized
    from crossmap.nla import Reconstructor, load_nla_verbalizer, shipped_nla
    from crossmap.nla.adapted import read_manifest
    from crossmap.nla.train_data import collect_examples
    from crossmap.verbalize import Verbalizer

    t0 = time.perf_counter()
    av = load_nla_verbalizer(shipped_nla(f"{pair}-av"), dtype="float32")
    ar = Reconstructor(shipped_nla(f"{pair}-ar"), dtype="float32", batch_size=args.batch)
    layer = av.meta.extraction_layer
    base = load_model(read_manifest(shipped_nla(f"{pair}-av"))["base"], dtype="float32")
    examples = collect_examples(make_hidden_fn(base.model, layer), base.tokenizer, documents, positions_per_doc=1,
                                seed=args.seed, min_per_split=0, progress=False)
    vectors = examples.vectors[:args.vectors]
    del base
    float_av = av.verbalizer
    int8_av = Verbalizer(quantized(float_av.model, "int8"), float_av.tokenizer, float_av.spec)
    runs = {}
    for name, verbalizer in (("float32", float_av), ("int8", int8_av)):
        t = time.perf_counter()
        explanations = verbalizer.explain(vectors, temperature=0.0, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch, progress=False)
        seconds = time.perf_counter() - t
        texts = [e.parsed[0] for e in explanations]
        runs[name] = {"tokens": [e.tokens[0] for e in explanations], "texts": texts, "explain_s": seconds,
                      "cosine": ar.score(texts, vectors)}
    diff = runs["int8"]["cosine"] - runs["float32"]["cosine"]
    low, high = bootstrap_ci(diff, rng=args.seed)
    result = {
        "layer": layer, "vectors": len(vectors), "max_new_tokens": args.max_new_tokens,
        "token_agreement": token_agreement(runs["float32"]["tokens"], runs["int8"]["tokens"]),
        "round_trip": {"float32_mean_cosine": float(runs["float32"]["cosine"].mean()),
                       "int8_mean_cosine": float(runs["int8"]["cosine"].mean()),
                       "int8_minus_float32": float(diff.mean()), "difference_ci95": [low, high]},
        "explain_s": {k: v["explain_s"] for k, v in runs.items()},
        "examples": [{"float32": a, "int8": b} for a, b in zip(runs["float32"]["texts"][:5], runs["int8"]["texts"][:5], strict=True)],
        "seconds": time.perf_counter() - t0,
    }
    agree, trip = result["token_agreement"], result["round_trip"]
    print(f"[int8-fidelity bench] {pair}: identical {agree['identical_fraction']:.2f}, agreeing prefix "
          f"{agree['mean_agreeing_prefix_share']:.2f}, first token {agree['first_token_agreement']:.2f}; round trip "
          f"{trip['float32_mean_cosine']:.3f} -> {trip['int8_mean_cosine']:.3f} ({trip['int8_minus_float32']:+.3f} "
          f"[{low:+.3f}, {high:+.3f}])", flush=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from crossmap.activations import read_corpus
    from crossmap.activations.corpus import default_corpus_path

    if args.vectors < 1 or args.max_new_tokens < 1 or args.batch < 1:
        raise ValueError("--vectors, --max-new-tokens and --batch must be >= 1")
    known = shipped_pairs()
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()] or known
    unknown = [p for p in pairs if p not in known]
    if unknown:
        raise ValueError(f"--pairs: {unknown} are not shipped NLA pairs; shipped: {known}")
    documents = read_corpus(default_corpus_path())[args.first_document:args.first_document + args.vectors]
    if len(documents) < args.vectors:
        raise ValueError(f"the shipped corpus has {len(documents)} documents from --first-document "
                         f"{args.first_document} on, fewer than --vectors {args.vectors}")
    result = {"benchmark": "int8-fidelity", "device": device_info(), "decoding": "greedy",
              "pairs": {p: measure_pair(p, args, documents) for p in pairs}}
    write_json(result, args.out, echo=False)
    return result
