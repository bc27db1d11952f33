"""`crossmap bench paper`: configs/paper.py end to end at the reference shapes, on random weights.

What a researcher with the real checkpoints would run, with only the paths changed, against
stand-ins written at exactly the released shapes:

1. checkpoints: random bf16 weights at the Qwen2.5-7B-Instruct and Gemma-3-27B-it shapes
   (crossmap/models/shapes/*.json), sharded like hub checkpoints; Gemma in the multimodal layout of the
   released -it checkpoint (decoder under `language_model.`, a vision tensor to skip).  Tokenizers
   are copied in from --source-tokenizer / --target-tokenizer (the released ones, or the shipped
   small models' which share their vocabularies); a Gemma tokenizer without a chat template gets
   the -it turn format.
2. NLA verbalizers: directories holding the same weights (linked, not copied: the loader reads
   them again, as it would a fine-tuned copy) plus an nla_meta.yaml in the release's schema (its
   prompt, a single-token marker, the release's injection norm).  No reconstructors: the round-trip
   stage runs with none configured.
3. an SAE-Lens TopK SAE at blocks.20.hook_resid_post (d_in 3584, --sae-features wide).
4. the pipeline of configs/paper.py, one stage at a time, on a mesh over every local device:
   seconds per stage and the peak device memory reached by the end of each.

Random weights make the explanations and the lift meaningless; what this measures is that the
reference experiment runs at its real size on the hardware, and what each stage costs (the
map's cost was an open question of the reference experiment).  Everything under --workdir is
reused when present and stages resume, so a run cut short continues where it stopped.

    launch/gpu_node.sh bench paper --source-tokenizer TOK/qwen --target-tokenizer TOK/gemma \\
        --embedder /path/all-MiniLM-L6-v2 --out paper.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import device_info, write_json

# The -it turn format (the 270M base tokenizer shipped for the demo has no chat template).
GEMMA_TURNS = ("{{ bos_token }}{% for message in messages %}"
               "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
               "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/paper.py",
                   help="the experiment config to run (default: configs/paper.py of the checkout you run from)")
    p.add_argument("--source-model", default="qwen2.5-7b-instruct", help="shipped shape config (crossmap/models/shapes/) or path")
    p.add_argument("--target-model", default="gemma-3-27b-it", help="shipped shape config (crossmap/models/shapes/) or path")
    p.add_argument("--source-tokenizer", required=True,
                   help="tokenizer directory for the source (Qwen2.5 vocabulary), e.g. the converted shipped "
                        "Qwen2.5-Coder-0.5B-Instruct (`crossmap convert shipped:qwen2.5-coder-0.5b-instruct`)")
    p.add_argument("--target-tokenizer", required=True,
                   help="tokenizer directory for the target (Gemma 3 vocabulary), e.g. the converted shipped "
                        "Gemma-3-270M")
    p.add_argument("--embedder", default="", help="sentence-transformer directory for evaluate ('' = the config's)")
    p.add_argument("--workdir", default="/tmp/crossmap-paper-scale",
                   help="where the random checkpoints, SAE and run directory go (about 70 GB)")
    p.add_argument("--sae-features", type=int, default=65536, help="width of the random SAE")
    p.add_argument("--sae-k", type=int, default=64, help="TopK of the random SAE")
    p.add_argument("--override", action="append", default=[],
                   help="extra --config.FIELD=VALUE for the run (repeatable), e.g. --override=--config.features.n=8")
    p.add_argument("--out", default=None, help="write the JSON result here")


def _copy_tokenizer(src: Path, dst: Path, chat_template: str | None) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {src}")
    files = [f for f in src.iterdir() if f.name.startswith(("tokenizer", "special_tokens", "chat_template",
                                                             "vocab", "merges"))]
    if not any(f.name == "tokenizer.json" or f.name == "tokenizer.model" for f in files):
        raise FileNotFoundError(f"{src}: no tokenizer.json or tokenizer.model")
    for f in files:
        shutil.copy2(f, dst / f.name)
    config = dst / "tokenizer_config.json"
    has_template = (dst / "chat_template.jinja").exists() or bool(
        json.loads(config.read_text()).get("chat_template") if config.exists() else None)
    if not has_template and chat_template:
        (dst / "chat_template.jinja").write_text(chat_template)


def _write_sae(directory: Path, d_in: int, n_features: int, k: int, layer: int, model_id: str, seed: int) -> None:
    """A random TopK SAE in SAE-Lens files, as a public SAE release lays them out."""
    from ..models.checkpoint_files import write_safetensors

    cfg = directory / "cfg.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("d_sae") == n_features:
        return  # written by an earlier run at this width
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((n_features, d_in), dtype=np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    values = {"W_dec": w_dec, "W_enc": np.ascontiguousarray(w_dec.T),
              "b_enc": np.zeros(n_features, np.float32), "b_dec": np.zeros(d_in, np.float32)}
    write_safetensors(directory / "sae_weights.safetensors",
                      [(name, v.shape, np.float32) for name, v in values.items()], lambda name: [values[name]])
    (directory / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d_in, "d_sae": n_features, "dtype": "float32", "model_name": model_id,
        "hook_name": f"blocks.{layer}.hook_resid_post", "hook_layer": layer, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k}, "apply_b_dec_to_input": False, "normalize_activations": "none"}))


def _verbalizer_dir(base: Path, directory: Path, layer: int, injection_scale: float) -> None:
    """An NLA verbalizer checkpoint in the release's layout: the base weights (linked) plus an
    nla_meta.yaml with the release's prompt, a marker the tokenizer encodes as one token (the release's
    CJK characters for the real tokenizers) and the release's injection norm for that model."""
    from transformers import AutoTokenizer

    from ..nla.meta import pick_marker, write_nla_meta

    directory.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != ".complete" and not (directory / f.name).exists():
            (directory / f.name).symlink_to(f.resolve())
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    d_model = json.loads((base / "config.json").read_text())
    d_model = d_model.get("text_config", d_model)["hidden_size"]
    write_nla_meta(directory, role="av", tokenizer=tokenizer, d_model=d_model,
                   injection_char=pick_marker(tokenizer), injection_scale=injection_scale,
                   extraction_layer=layer, provenance={"created_by": "crossmap bench paper (random weights)"})


def _short(model: str) -> str:
    """A model's name for its directory: the config name, or a config file's name without .json
    (not Path.stem, which would cut 'qwen2.5-7b-instruct' at its dot)."""
    name = Path(model).name
    return name[:-5] if name.endswith(".json") else name


def prepare(args: argparse.Namespace, sae_layer: int, target_layer: int) -> dict[str, str]:
    """Write (or reuse) the stand-in checkpoints, verbalizers and SAE; returns the paths for the config."""
    from ..models import write_random_checkpoint
    from .forward import model_config

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if _short(args.source_model) == _short(args.target_model):
        raise ValueError(f"--source-model and --target-model share the name {_short(args.source_model)!r}; "
                         f"their checkpoints would overwrite each other under {work}")
    paths, shapes = {}, {}
    for side, name, tok, multimodal, layer, scale in (
            ("source", args.source_model, args.source_tokenizer, False, sae_layer, 150.0),
            ("target", args.target_model, args.target_tokenizer, True, target_layer, 60000.0)):
        shapes[side], hf = model_config(name)
        hf = {k: v for k, v in hf.items() if not k.startswith("_")}
        base = write_random_checkpoint(hf, work / _short(name), dtype="bfloat16", seed=1 if side == "source" else 2,
                                       multimodal=multimodal and hf["model_type"] == "gemma3_text")
        _copy_tokenizer(Path(tok), base, GEMMA_TURNS if hf["model_type"].startswith("gemma") else None)
        verbalizer = work / f"nla-{_short(name)}-av"
        _verbalizer_dir(base, verbalizer, layer, scale)
        paths[side], paths[f"{side}_verbalizer"] = str(base), str(verbalizer)
    sae = work / "saes" / _short(args.source_model) / f"blocks.{sae_layer}.hook_resid_post"
    _write_sae(sae, shapes["source"].d_model, args.sae_features, args.sae_k, sae_layer, _short(args.source_model), seed=3)
    paths["sae"] = str(sae)
    return paths


def _peak_memory() -> dict[str, float]:
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    return {"peak_gb_per_device": max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / 1e9,
            "limit_gb_per_device": min((s.get("bytes_limit", 0) for s in stats), default=0) / 1e9}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..pipeline import STAGE_NAMES, Run, apply_overrides, load_config
    from ..pipeline.outputs import Evaluation, MapSummary, StageDone

    result: dict[str, Any] = {"bench": "paper", "device": device_info(), "config": args.config}
    t0 = time.perf_counter()
    probe = load_config(args.config)
    apply_overrides(probe, list(args.override))
    paths = prepare(args, int(probe.models.source.layer), int(probe.models.target.layer))
    result["prepare_seconds"] = time.perf_counter() - t0
    overrides = [f"--config.models.source.path={paths['source']}", f"--config.models.target.path={paths['target']}",
                 f"--config.sae.path={paths['sae']}",
                 f"--config.verbalizers.source.checkpoint={paths['source_verbalizer']}",
                 f"--config.verbalizers.target.checkpoint={paths['target_verbalizer']}",
                 # no reconstructors: an AR is a second, truncated checkpoint per model (not written here)
                 "--config.reconstructors.source.checkpoint=", "--config.reconstructors.target.checkpoint=",
                 f"--config.run_dir={Path(args.workdir) / 'run'}"]
    if args.embedder:
        overrides.append(f"--config.evaluate.embedder={args.embedder}")
    overrides += list(args.override)
    result["overrides"] = overrides
    config = load_config(args.config)
    apply_overrides(config, overrides)
    run_ = Run(config)
    result["mesh"] = dict(run_.mesh.shape)
    result["stages"] = {}
    for stage in STAGE_NAMES:
        if run_.is_done(stage):
            result["stages"][stage] = {"seconds": StageDone.load(run_.stage_dir(stage)).seconds, "resumed": True}
            continue
        t = time.perf_counter()
        run_.execute(only=(stage,))
        result["stages"][stage] = {"seconds": time.perf_counter() - t, **_peak_memory()}
        write_json(result, args.out, echo=False)  # a run cut short keeps what finished
    summary = MapSummary.load(run_.stage_dir("map"))
    result["map"] = {"n_pairs": summary.n_pairs, "n_documents": summary.n_documents,
                     "solve_seconds": summary.solve_seconds, "collect": summary.collect,
                     "lambda": summary.fit["lambda"]}
    evaluation = Evaluation.load(run_.stage_dir("evaluate"))
    result["lift"] = {k: r["summary"] for k, r in evaluation.results.items()}
    result["report"] = str(run_.stage_dir("report") / "report.md")
    result["total_seconds"] = time.perf_counter() - t0
    write_json(result, args.out)
    return result
