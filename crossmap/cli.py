"""`crossmap`: the command line.

    crossmap run --config configs/demo.py                 # the whole experiment, staged and resumable
    crossmap run --config configs/demo.py --only map      # one stage
    crossmap run --config configs/paper.py --config.models.source.path=/ckpt/Qwen2.5-7B-Instruct
    crossmap bench forward|ridge|verbalize|decode-parts|top-p|scaling|paper [...]  # benchmarks that write JSON
    crossmap convert model.gguf OUT_DIR                   # GGUF -> HF-layout safetensors directory
    crossmap explain --verbalizer AV_DIR --vectors acts.npy --out explanations.jsonl  # a released NLA, alone
    crossmap train-nla --config configs/nla_demo.py:qwen  # train an AV and an AR for a model (SFT, GRPO)
    crossmap compare checkpoints/demo checkpoints/demo-self  # finished runs side by side
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = """\
crossmap fits a ridge map between the residual streams of two LLMs, maps one model's SAE
feature directions through it, has each model's activation verbalizer explain them, and scores
how much closer matched explanations are than explanations of random control directions.
Every stage writes its result under the run directory and is skipped when it already exists,
so a killed run resumes where it stopped."""

EXAMPLES = """\
examples:
  crossmap run --config configs/demo.py                  the embedded demo (real small models, CPU is enough)
  crossmap run --config configs/demo.py --only map       one stage (its inputs must exist)
  crossmap run --config configs/paper.py --config.models.source.path=/ckpt/Qwen2.5-7B-Instruct ...
  crossmap run --config configs/demo.py --print-config   every field, with its value
  crossmap bench forward --model qwen2.5-7b-instruct --layer 20 --batch 32 --seq 1024
  launch/gpu_node.sh bench scaling --out scaling.json   27B-shaped workloads over every GPU of a node
  crossmap convert shipped:gemma-3-270m /tmp/gemma-3-270m
  crossmap train-nla --config configs/nla_demo.py:gemma   train an NLA pair for the shipped Gemma-3-270M
  crossmap compare checkpoints/demo checkpoints/demo-self  NLAs vs self-verbalizers on the same features
  crossmap explain --verbalizer /ckpt/nla-qwen2.5-7b-L20-av --reconstructor /ckpt/nla-qwen2.5-7b-L20-ar \
      --vectors acts.parquet --out explanations.jsonl      explain vectors with a released NLA pair
Run `crossmap COMMAND --help` for a command's options."""

BENCHES = {
    "forward": "tokens/s and MFU of the truncated forward vs transformers (random weights, real shapes)",
    "ridge": "streaming accumulation + closed-form CV ridge solve vs scikit-learn and a PyTorch solve",
    "verbalize": "batched generation with injected vectors: explanations/s and decode step vs bandwidth floor",
    "top-p": "the nucleus (top-p) filter alone at a decode step's shape: search arities vs sort-and-cumsum",
    "int8-matmul": "the weight-only int8 kernel at a decode step's matmul shapes vs bf16 and the XLA int8 path, "
                   "against the bytes and compute floors",
    "int8-fidelity": "what weight-only int8 costs the shipped NLAs: greedy token agreement with float32 and the "
                     "change in round-trip cosine (real small models, any backend)",
    "features-per-hour": "features explained per GPU-hour at the paper's setting, from measured bench verbalize --nla "
                         "rates (reads their JSON)",
    "decode-parts": "one decode step taken apart (blocks, head, MLPs, projections, attention), each part against "
                    "its bytes' time at the measured copy bandwidth",
    "scaling": "forward, ridge statistics and verbalization on one device vs a mesh over all devices "
               "(scaling efficiency, equality with one device)",
    "train-nla": "NLA training: AV SFT, AR SFT and GRPO step times and MFU, LoRA and full (random weights, real "
                 "shapes)",
    "paper": "configs/paper.py end to end at the 7B/27B shapes on random checkpoints written to disk "
             "(seconds and peak memory per stage)",
}


def _bench_module(name: str) -> str:
    return f"crossmap.benchmarks.{name.replace('-', '_')}"  # `top-p` lives in top_p.py


def _stage_lines() -> str:
    from .pipeline import STAGES

    return "\n".join(f"  {s.name:<17} {s.summary}" for s in STAGES)


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; a bench module (and the pipeline, for `run`) is imported only when that command is
    the one asked for, so `crossmap --help` stays fast and works without any bench's dependencies."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="crossmap", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    stages = f"\n\nstages, in the order data flows:\n{_stage_lines()}" if command == "run" else ""
    run = sub.add_parser(
        "run", help="run an experiment config (all stages, or --only some)",
        description="Run an experiment described by an ml_collections config file. Any field can be "
                    "overridden as --config.FIELD=VALUE (e.g. --config.ridge.folds=10); unknown fields are "
                    "errors. `crossmap run --help` lists the stages." + stages,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", required=True, help="path to a config .py file exposing get_config()")
    run.add_argument("--only", default="", help="comma-separated stages to run (their inputs must exist)")
    run.add_argument("--force", default="", help="comma-separated stages to recompute even if done (their "
                                                  "partial state, e.g. SAE training checkpoints, is cleared too)")
    run.add_argument("--resume-only", action="store_true",
                     help="continue stages whose directories belong to this config, but refuse (saying what "
                          "changed) rather than clear a stage started under another config")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.add_argument("--compile-cache", default=None, metavar="DIR",
                     help="keep compiled programs here so a resumed or repeated run skips compiling (default: "
                          "$CROSSMAP_COMPILE_CACHE, else ~/.cache/crossmap/xla; 'off' disables); benches read "
                          "$CROSSMAP_COMPILE_CACHE")
    run.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() first: one process per host on a multi-host GPU "
                          "cluster or TPU pod slice (see launch/)")

    bench = sub.add_parser("bench", help="benchmarks (write JSON)", description="Benchmarks; each writes JSON.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    rest = argv[argv.index("bench") + 1:] if command == "bench" else []
    chosen = next((a for a in rest if not a.startswith("-")), None)
    for name, text in BENCHES.items():
        bp = bench_sub.add_parser(name, help=text, description=text)
        bp.set_defaults(_bench_module=_bench_module(name))
        if name == chosen:
            try:
                importlib.import_module(_bench_module(name)).add_arguments(bp)
            except ImportError as err:  # a missing optional dependency: say so instead of a traceback
                bp.set_defaults(_bench_error=str(err))

    explain = sub.add_parser(
        "explain", help="explain vectors from a file with a released NLA verbalizer (and score them with its "
                        "reconstructor)",
        description="Explain every vector of a .npy, .safetensors or parquet file (an `activation_vector` column) "
                    "with a released NLA verbalizer, run as its nla_meta.yaml prescribes, into a JSONL file: one "
                    "row per vector and sample with index, sample, raw (the generated text, special tokens "
                    "kept), explanation, truncated (no closing tag) and, with a reconstructor, round_trip_cos "
                    "(cosine of its reconstruction with the vector; MSE = 2(1 - cos)). A killed run continues "
                    "where it stopped; a rerun with other settings or inputs refuses unless --restart.")
    explain.add_argument("--verbalizer", "--verbaliser", required=True, metavar="DIR",
                         help="the AV checkpoint directory (HF weights, tokenizer, nla_meta.yaml)")
    explain.add_argument("--reconstructor", default=None, metavar="DIR",
                         help="the AR checkpoint directory (truncated backbone, value_head.safetensors, "
                              "nla_meta.yaml): adds round_trip_cos")
    explain.add_argument("--vectors", required=True, metavar="FILE", help=".npy, .safetensors or .parquet")
    explain.add_argument("--out", required=True, metavar="FILE.jsonl")
    explain.add_argument("--max-new-tokens", type=int, default=None, help="default: the release's 200")
    explain.add_argument("--temperature", type=float, default=None,
                         help="default: the release's 0.7 (the authors' command line); 0 = greedy")
    explain.add_argument("--samples", type=int, default=1, help="explanations per vector")
    explain.add_argument("--batch-size", type=int, default=64, help="generation rows per batch")
    explain.add_argument("--dtype", default="bfloat16", help="weights' dtype on the device")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--restart", action="store_true", help="discard an existing --out and start over")
    explain.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = sub.add_parser(
        "train-nla", help="train an NLA verbalizer (AV) and reconstructor (AR) for a model: SFT, then GRPO",
        description="Train an AV and an AR for one model and layer from a config (configs/nla_*.py): activations "
                    "at a few positions per document of a corpus, split by document into AV-SFT, AR-SFT, RL and "
                    "held-out sets; SFT of both on explanation targets; GRPO of the AV with the AR's round trip as "
                    "the reward; release-layout checkpoints (config.json, safetensors, tokenizer, nla_meta.yaml) "
                    "under RUN_DIR/export; held-out round-trip cosines after SFT and after RL, with baselines, in "
                    "RUN_DIR/eval.json. Override any field as --config.FIELD=VALUE. A killed run resumes at its "
                    "last checkpoint; a run directory started with other settings is refused unless --restart.")
    train.add_argument("--config", required=True, help="a config file exposing get_config(), or FILE.py:ARG")
    train.add_argument("--restart", action="store_true", help="delete the run directory and start afresh")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    compare = sub.add_parser(
        "compare", help="finished runs side by side: headline tables, and per-feature explanations and scores",
        description="Put finished runs side by side (from each run's report/report.json): their cross-model "
                    "tables in one, and, when they explained the same features, each feature's explanations, "
                    "lift and cross round trip from every run in one row. Writes markdown and prints the "
                    "headline table.")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their report.json)")
    compare.add_argument("--out", default="compare.md", metavar="FILE.md", help="default: compare.md")

    conv = sub.add_parser("convert", help="dequantise a GGUF file into a HF-layout checkpoint directory",
                          description="Dequantise a GGUF (llama, qwen2, gemma3) with the gguf package into "
                                      "config.json + model.safetensors + tokenizer files.")
    conv.add_argument("gguf", help="path to a .gguf file, or shipped:<name> for a model shipped in a package")
    conv.add_argument("out", nargs="?", default=None, help="output directory (default: the crossmap cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command not in ("run", "train-nla") and extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if args.command in ("run", "bench", "train-nla"):
        from .sharding import enable_compile_cache

        enable_compile_cache(getattr(args, "compile_cache", None))
    if args.command == "bench":
        if not getattr(args, "_bench_module", None):
            parser.parse_args(["bench", "--help"])
        if getattr(args, "_bench_error", None):
            print(f"crossmap bench {args.bench}: unavailable ({args._bench_error})", file=sys.stderr)
            return 2
        try:
            importlib.import_module(args._bench_module).run(args)
        except (ValueError, FileNotFoundError) as err:  # bad arguments: say which, no traceback
            print(f"crossmap bench {args.bench}: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "explain":
        from .nla import explain_to_jsonl

        try:
            summary = explain_to_jsonl(args.verbalizer, args.vectors, args.out, reconstructor=args.reconstructor,
                                       n_samples=args.samples, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, seed=args.seed, dtype=args.dtype,
                                       batch_size=args.batch_size, restart=args.restart,
                                       progress=not args.no_progress)
        except (ValueError, FileNotFoundError, ImportError) as err:
            print(f"crossmap explain: {err}", file=sys.stderr)
            return 2
        print(f"{summary['out']}: {summary['explained']} vectors explained now, {summary['already_done']} "
              f"already there, of {summary['vectors']}; {summary['truncated']} explanations truncated (no closing "
              "tag)")
        return 0
    if args.command == "train-nla":
        return _train_nla(args, extra)
    if args.command == "compare":
        from .report.compare import write_comparison

        try:
            out = write_comparison(args.runs, args.out)
        except (ValueError, FileNotFoundError) as err:
            print(f"crossmap compare: {err}", file=sys.stderr)
            return 2
        text = out.read_text(encoding="utf-8")
        print(text.split("## Cross-model result")[1].split("\n- ")[0].strip())
        print(f"comparison: {out}")
        return 0
    if args.command == "convert":
        from .models import convert_gguf, resolve_model_path

        print(convert_gguf(resolve_model_path(args.gguf), args.out))
        return 0
    if args.distributed:
        from .sharding import initialize_distributed

        initialize_distributed()
    from . import pipeline

    try:
        return pipeline.main_from_cli(args, extra)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as err:
        # config and input errors name the field or file at fault: print them without a traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"crossmap run: {message}", file=sys.stderr)
        return 2


def _train_nla(args: argparse.Namespace, extra: list[str]) -> int:
    from .nla.train import train_nla
    from .pipeline.config import apply_overrides, load_config

    try:
        config = apply_overrides(load_config(args.config), extra)
        if args.print_config:
            print(config)
            return 0
        summary = train_nla(config, restart=args.restart, progress=not args.no_progress)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"crossmap train-nla: {message}", file=sys.stderr)
        return 2
    for name in ("after_sft", "after_rl"):
        if name in summary:
            r = summary[name]
            print(f"held-out round-trip cosine {name.replace('_', ' ')}: {r['mean_cosine']:+.3f} "
                  f"[95% CI {r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] (n={r['n']})")
    for name, r in summary["baselines"].items():
        print(f"baseline {name}: {r['mean_cosine']:+.3f} [95% CI {r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]")
    print(f"checkpoints: {summary['export']['av']} (AV), {summary['export']['ar']} (AR); "
          f"summary: {summary['run_dir']}/eval.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
