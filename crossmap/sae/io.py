"""Readers for public SAE formats (SAE-Lens, Gemma Scope 1/2, EleutherAI sparsify) and an SAE-Lens writer.

Every reader returns the one normal form `crossmap.sae.core.SAE`; `load_sae` detects the format
from the files present, then checks the SAE against the run (width and layer).

Formats (file layouts as the projects publish them):
    sae_lens     DIR/cfg.json + DIR/sae_weights.safetensors; W_enc [d_in, d_sae], W_dec [d_sae, d_in],
                 b_enc, b_dec, threshold (jumprelu); architecture standard|topk|jumprelu; hook name in
                 cfg (top level, or under "metadata" in SAE-Lens >= 6).
    gemma_scope  DIR/params.npz (Gemma Scope) or DIR/params.safetensors (Gemma Scope 2); W_enc/w_enc,
                 W_dec/w_dec, b_enc, b_dec, threshold; JumpReLU, no b_dec subtraction; layer and model
                 come from the path (.../gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71,
                 .../resid_post/layer_12_width_16k_l0_small) unless given explicitly.
    sparsify     DIR/cfg.json (d_in, num_latents or expansion_factor, k) + DIR/sae.safetensors
                 (encoder.weight [n, d_in], encoder.bias, W_dec [n, d_in], b_dec); hookpoint = DIR's
                 name ('layers.20'); x - b_dec is encoded, ReLU then top-k.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as st_np

from crossmap.sae.core import SAE, make_sae

FORMATS = ("sae_lens", "gemma_scope", "sparsify")
# accepted spellings of `format` (lower-cased, '-' and ' ' read as '_')
_FORMAT_ALIASES = {
    "sae_lens": "sae_lens", "saelens": "sae_lens",
    "gemma_scope": "gemma_scope", "gemmascope": "gemma_scope", "gemma_scope_2": "gemma_scope",
    "gemma_scope2": "gemma_scope",
    "sparsify": "sparsify", "eleuther": "sparsify", "eleutherai": "sparsify",
}
SAE_LENS_CFG, SAE_LENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_FILES = ("params.npz", "params.safetensors")


# ----------------------------------------------------------------------------- hook names
def parse_hook(hook: str) -> tuple[int | None, str]:
    """(layer, site) of a hook name, layer in crossmap's block-output convention.

    site is 'resid' for the residual stream between blocks, 'other' for anything else
    (mlp_out, attn z, ...), '' when the name says nothing.  Examples:
    'blocks.20.hook_resid_post' -> (20, 'resid'); 'blocks.20.hook_resid_pre' -> (19, 'resid');
    'layers.20' / 'model.layers.20' -> (20, 'resid'); 'hook_embed' / 'embed_tokens' -> (-1, 'resid');
    'blocks.20.hook_mlp_out' -> (20, 'other').
    """
    hook = hook.strip()
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook):
        return int(m.group(1)), "resid"
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook):
        return int(m.group(1)) - 1, "resid"
    if m := re.fullmatch(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)[._](\d+)(?:\.output)?", hook):
        return int(m.group(1)), "resid"
    if hook in ("hook_embed", "embed_tokens", "model.embed_tokens", "embedding"):
        return -1, "resid"
    if m := re.search(r"(?:blocks|layers|layer|h)[._](\d+)", hook):
        return int(m.group(1)), "other"
    return None, ""


def _check_against_run(sae: SAE, where: str, site: str, d_model: int | None, layer: int | None,
                       allow_layer_mismatch: bool) -> None:
    """Raise (or warn, for the layer with the override) when the SAE does not fit the run."""
    if d_model is not None and sae.d_model != d_model:
        raise ValueError(f"{where}: SAE width d_model={sae.d_model} (W_enc {tuple(sae.W_enc.shape)}, "
                         f"W_dec {tuple(sae.W_dec.shape)}) does not match the run's d_model={d_model}")
    if layer is None:
        return
    problem = None
    if sae.layer is None:
        problem = (f"the SAE's layer is unknown (hook {sae.hook_name!r}); pass sae_layer= to state it")
    elif site == "other":
        problem = (f"the SAE reads hook {sae.hook_name!r} (not the residual stream after a block), "
                   f"while the run uses the output of block {layer}")
    elif sae.layer != layer:
        problem = (f"the SAE was trained on the output of block {sae.layer} (hook {sae.hook_name!r}), "
                   f"but the run uses block {layer}")
    if problem is None:
        return
    if not allow_layer_mismatch:
        raise ValueError(f"{where}: {problem}. Pass allow_layer_mismatch=True to use it anyway.")
    warnings.warn(f"{where}: {problem}; using it anyway (allow_layer_mismatch=True).", stacklevel=3)


# ----------------------------------------------------------------------------- detection
def _kind_of_dir(d: Path) -> str | None:
    if (d / SAE_LENS_CFG).is_file() and (d / SAE_LENS_WEIGHTS).is_file():
        return "sae_lens"
    if (d / SAE_LENS_CFG).is_file() and (d / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if any((d / f).is_file() for f in GEMMA_SCOPE_FILES):
        return "gemma_scope"
    return None


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """(format, directory) of the SAE at `path` (a directory or one of its weight files)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"SAE path {p} does not exist")
    if p.is_file():
        by_name = {SAE_LENS_WEIGHTS: "sae_lens", SPARSIFY_WEIGHTS: "sparsify", "params.npz": "gemma_scope",
                   "params.safetensors": "gemma_scope"}
        if p.name in by_name:
            return by_name[p.name], p.parent
        if p.suffix == ".npz":
            return "gemma_scope", p
        if p.name == SAE_LENS_CFG:
            p = p.parent
        else:
            raise ValueError(f"{p}: cannot tell the SAE format from this file name; expected one of "
                             f"{sorted(by_name)} or a directory holding them")
    kind = _kind_of_dir(p)
    if kind is None:
        found = sorted(x.name for x in p.iterdir())[:20]
        raise ValueError(f"{p}: no SAE files found (want {SAE_LENS_CFG}+{SAE_LENS_WEIGHTS} for SAE-Lens, "
                         f"{SAE_LENS_CFG}+{SPARSIFY_WEIGHTS} for sparsify, or params.npz / "
                         f"params.safetensors for Gemma Scope); directory holds {found}")
    return kind, p


def _pick_subdir(p: Path, layer: int | None) -> Path:
    """For a directory of per-hookpoint SAE folders (sparsify runs, SAE-Lens releases), the one to load."""
    subs = sorted(d for d in p.iterdir() if d.is_dir() and _kind_of_dir(d) is not None)
    if not subs:
        return p
    if len(subs) == 1:
        return subs[0]
    if layer is not None:
        hits = [d for d in subs if parse_hook(d.name) == (layer, "resid")]
        if len(hits) == 1:
            return hits[0]
    raise ValueError(f"{p}: holds {len(subs)} SAEs ({[d.name for d in subs][:12]}); point at one of them"
                     + ("" if layer is None else f" (none is unambiguously the output of block {layer})"))


# ----------------------------------------------------------------------------- loading helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    return dict(st_np.load_file(str(path)))


def _take(tensors: dict[str, np.ndarray], names: tuple[str, ...], where: Path, required: bool = True):
    for n in names:
        if n in tensors:
            return tensors[n].astype(np.float32)
    if required:
        raise KeyError(f"{where}: missing tensor {names[0]!r} (looked for {list(names)}; file has "
                       f"{sorted(tensors)})")
    return None


def _reject_extra(tensors: dict[str, np.ndarray], names: tuple[str, ...], where: Path, why: str) -> None:
    present = [n for n in names if n in tensors]
    if present:
        raise ValueError(f"{where}: tensor(s) {present} present: {why} are not supported")


# ----------------------------------------------------------------------------- SAE-Lens
def _read_sae_lens(d: Path) -> tuple[SAE, str]:
    cfg = _read_json(d / SAE_LENS_CFG)
    wfile = d / SAE_LENS_WEIGHTS
    meta = cfg.get("metadata") or {}
    t = _read_tensors(wfile)
    _reject_extra(t, ("W_skip", "b_gate", "r_mag", "b_mag"), wfile, "transcoders / gated SAEs")

    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    arch = cfg.get("architecture") or ("topk" if act_fn == "topk" else "standard")
    if arch == "standard" and act_fn == "topk":
        arch = "topk"  # pre-6.0 configs mark topk SAEs by activation_fn only
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(arch)
    if activation is None:
        raise ValueError(f"{d / SAE_LENS_CFG}: architecture {arch!r} is not supported "
                         f"(supported: standard, topk, jumprelu)")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations", "none")
    if norm in ("expected_average_only_in", True):
        warnings.warn(f"{d / SAE_LENS_CFG}: normalize_activations={norm!r}; its scaling factor is not "
                      f"stored in the file, so activations are used unscaled (SAE-Lens folds the factor "
                      f"into the weights when it saves)", stacklevel=3)
    elif norm not in ("none", None, False):
        raise ValueError(f"{d / SAE_LENS_CFG}: normalize_activations={norm!r} is not supported")
    if cfg.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise ValueError(f"{d / SAE_LENS_CFG}: per-head SAEs (hook_head_index set) are not supported")

    W_enc = _take(t, ("W_enc",), wfile)
    W_dec = _take(t, ("W_dec",), wfile)
    b_enc = _take(t, ("b_enc",), wfile, required=False)
    b_enc = np.zeros(W_enc.shape[-1], np.float32) if b_enc is None else b_enc
    b_dec = _take(t, ("b_dec",), wfile)
    threshold = None
    if activation == "jumprelu":
        threshold = _take(t, ("threshold",), wfile, required=False)
        if threshold is None and "log_threshold" in t:
            threshold = np.exp(t["log_threshold"].astype(np.float32))
        if threshold is None and cfg.get("jump_relu_threshold") is not None:
            threshold = np.float32(cfg["jump_relu_threshold"])
        if threshold is None:
            raise KeyError(f"{wfile}: jumprelu SAE without 'threshold' / 'log_threshold' tensor")
    for name, want in (("d_in", W_dec.shape[-1]), ("d_sae", W_dec.shape[0])):
        if cfg.get(name) is not None and int(cfg[name]) != want:
            raise ValueError(f"{d}: cfg.json says {name}={cfg[name]} but {SAE_LENS_WEIGHTS} has W_dec "
                             f"{W_dec.shape} and W_enc {W_enc.shape}")
    # finetuning scale multiplies feature activations before decoding: fold it into W_dec's rows
    sf = t.get("finetuning_scaling_factor", t.get("scaling_factor"))
    if sf is not None:
        W_dec = W_dec * sf.astype(np.float32).reshape(-1, 1)
    # rescale_acts_by_decoder_norm: pre *= |W_dec_i|, decode divides acts by it; folding the norms
    # into the encoder (and out of the decoder) gives the identical function
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = np.linalg.norm(W_dec, axis=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        if threshold is not None:
            threshold = threshold * norms

    input_scale = 1.0
    extra = cfg.get("crossmap") or {}
    if extra.get("input_scale"):
        # written by save_sae_lens, which folded crossmap's input scale s into the weights; unfold
        s = float(extra["input_scale"])
        W_enc, b_dec, W_dec, input_scale = W_enc / s, b_dec * s, W_dec * s, s
    hook = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name") or ""
    layer, site = parse_hook(hook) if hook else (None, "")
    if layer is None and cfg.get("hook_layer") is not None:
        layer, site = int(cfg["hook_layer"]), site or "resid"
    sae = make_sae(W_enc, b_enc, W_dec, b_dec, activation=activation, k=k, threshold=threshold,
                   input_scale=input_scale, apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
                   layer=layer, hook_name=hook,
                   model_id=str(cfg.get("model_name") or meta.get("model_name") or ""),
                   source_format="sae_lens", source_path=str(d), where=str(wfile))
    return sae, site


# ----------------------------------------------------------------------------- Gemma Scope
def _gemma_scope_model_id(parts: list[str]) -> str:
    for part in reversed(parts):
        if m := re.search(r"gemma-scope-2-(\d+(?:\.\d+)?[mb])-(pt|it)", part):
            return f"google/gemma-3-{m.group(1)}-{m.group(2)}"
        if m := re.search(r"gemma-scope-(\d+b)-(pt|it)", part):
            return f"google/gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "")
    return ""


def _read_gemma_scope(d: Path) -> tuple[SAE, str]:
    wfile = d if d.is_file() else next(d / f for f in GEMMA_SCOPE_FILES if (d / f).is_file())
    folder = wfile.parent
    t = _read_tensors(wfile)
    _reject_extra(t, ("affine_skip_connection", "W_skip", "w_skip"), wfile, "skip transcoders")
    W_enc = _take(t, ("W_enc", "w_enc"), wfile)
    W_dec = _take(t, ("W_dec", "w_dec"), wfile)
    b_enc = _take(t, ("b_enc",), wfile)
    b_dec = _take(t, ("b_dec",), wfile)
    threshold = _take(t, ("threshold",), wfile)
    cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}

    parts = list(folder.resolve().parts)
    layer = None
    for part in reversed(parts):
        if m := re.search(r"layer_(\d+)", part):
            layer = int(m.group(1))
            break
    site = "resid" if layer is not None else ""
    joined = "/".join(parts[-4:]).lower()
    if re.search(r"mlp_out|attn_out|transcoder|-mlp\b|-att\b|-mlp-|-att-", joined):
        site = "other"
    elif re.search(r"embedding", joined):
        layer, site = -1, "resid"
    hook = str(cfg.get("hook_name") or "")
    if hook:
        layer, site = parse_hook(hook)
    elif layer is not None:
        hook = f"blocks.{layer}.hook_resid_post" if site == "resid" else "/".join(parts[-3:])
    model_id = str(cfg.get("model_name") or cfg.get("model") or _gemma_scope_model_id(parts))
    sae = make_sae(W_enc, b_enc, W_dec, b_dec, activation="jumprelu", threshold=threshold,
                   apply_b_dec_to_input=False, layer=layer, hook_name=hook, model_id=model_id,
                   source_format="gemma_scope", source_path=str(folder), where=str(wfile))
    return sae, site


# ----------------------------------------------------------------------------- sparsify
def _read_sparsify(d: Path) -> tuple[SAE, str]:
    cfg_path, wfile = d / SAE_LENS_CFG, d / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    for flag, why in (("transcode", "transcoders"), ("skip_connection", "skip connections"),
                      ("embed_skip", "embedding skip connections"), ("gram_lookup", "n-gram lookups")):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: {flag}=true: {why} are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation {cfg.get('activation')!r} is not supported (only topk)")
    if "d_in" not in cfg or "k" not in cfg:
        raise KeyError(f"{cfg_path}: sparsify cfg needs 'd_in' and 'k', has {sorted(cfg)}")
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 0))
    t = _read_tensors(wfile)
    _reject_extra(t, ("W_skip",), wfile, "skip connections")
    enc = _take(t, ("encoder.weight",), wfile)
    W_dec = _take(t, ("W_dec",), wfile)
    b_enc = _take(t, ("encoder.bias",), wfile, required=False)
    b_enc = np.zeros(enc.shape[0], np.float32) if b_enc is None else b_enc
    b_dec = _take(t, ("b_dec",), wfile)
    if enc.shape != (n, d_in) or W_dec.shape != (n, d_in):
        raise ValueError(f"{d}: cfg.json implies [num_latents, d_in] = {(n, d_in)} but "
                         f"{SPARSIFY_WEIGHTS} has encoder.weight {enc.shape} and W_dec {W_dec.shape}")
    hook = d.resolve().name
    layer, site = parse_hook(hook)
    run_cfg = d.parent / "config.json"
    model_id = str(_read_json(run_cfg).get("model", "")) if run_cfg.is_file() else ""
    sae = make_sae(enc.T, b_enc, W_dec, b_dec, activation="topk", k=int(cfg["k"]), apply_b_dec_to_input=True,
                   layer=layer, hook_name=hook, model_id=model_id, source_format="sparsify",
                   source_path=str(d), where=str(wfile))
    return sae, site


_READERS = {"sae_lens": _read_sae_lens, "gemma_scope": _read_gemma_scope, "sparsify": _read_sparsify}


def load_sae(path: str | os.PathLike, d_model: int | None = None, layer: int | None = None,
             allow_layer_mismatch: bool = False, format: str | None = None, *,
             sae_layer: int | None = None, model_id: str | None = None) -> SAE:
    """Load an SAE from SAE-Lens, Gemma Scope (1 or 2) or sparsify files into crossmap's `SAE`.

    path: the SAE's directory or its weight file; a directory of several per-hookpoint SAE
        folders is accepted when `layer` picks exactly one of them.
    d_model: the run's residual width; a different SAE width is an error naming file and shapes.
    layer: the run's layer (output of block `layer`, 0-based); an SAE trained elsewhere is an error
        unless `allow_layer_mismatch=True`, which warns instead.
    format: 'sae_lens' | 'gemma_scope' | 'sparsify'; detected from the files when None.
    sae_layer / model_id: state the SAE's layer / model where its files do not (or override them).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_sae: SAE path {p} does not exist")
    if p.is_dir() and _kind_of_dir(p) is None:
        p = _pick_subdir(p, layer)
    if format is None:
        fmt, d = detect_format(p)
    else:
        fmt = _FORMAT_ALIASES.get(format.lower().replace(" ", "_").replace("-", "_"))
        if fmt is None:
            raise ValueError(f"load_sae: unknown format {format!r}; known: {FORMATS}")
        d = p if p.is_dir() or fmt == "gemma_scope" else p.parent
    sae, site = _READERS[fmt](d)
    if sae_layer is not None:
        sae = sae.replace(layer=int(sae_layer), hook_name=sae.hook_name or f"blocks.{sae_layer}.hook_resid_post")
        site = "resid" if site in ("", "resid") else site
    if model_id is not None:
        sae = sae.replace(model_id=model_id)
    _check_against_run(sae, str(d), site, d_model, layer, allow_layer_mismatch)
    return sae


# ----------------------------------------------------------------------------- writer
def save_sae_lens(sae: SAE, directory: str | os.PathLike, extra_cfg: dict[str, Any] | None = None) -> Path:
    """Write `sae` as SAE-Lens files (cfg.json + sae_weights.safetensors) that other tools can read.

    crossmap's input scale s is folded into the weights (W_enc * s, W_dec / s, b_dec / s; the
    function on raw activations is unchanged), so SAE-Lens and friends need no extra step; s is
    also recorded under cfg['crossmap'] so `load_sae` restores the unit-norm decoder rows.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    s = float(sae.input_scale)
    W_enc = np.asarray(sae.W_enc, np.float32) * s
    W_dec = np.asarray(sae.W_dec, np.float32) / s
    b_dec = np.asarray(sae.b_dec, np.float32) / s
    tensors = {"W_enc": W_enc, "b_enc": np.asarray(sae.b_enc, np.float32), "W_dec": W_dec, "b_dec": b_dec}
    if sae.activation == "jumprelu":
        tensors["threshold"] = np.asarray(sae.threshold, np.float32)
    hook = sae.hook_name or (f"blocks.{sae.layer}.hook_resid_post" if sae.layer is not None else "")
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.activation]
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_model,
        "d_sae": sae.n_features,
        "dtype": "float32",
        "device": "cpu",
        "model_name": sae.model_id,
        "hook_name": hook,
        "hook_layer": sae.layer,
        "hook_head_index": None,
        "activation_fn_str": "topk" if sae.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": sae.k} if sae.activation == "topk" else {},
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "crossmap": {"input_scale": s, "source_format": sae.source_format},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
    cfg.update(extra_cfg or {})
    st_np.save_file(tensors, str(out / SAE_LENS_WEIGHTS))
    with open(out / SAE_LENS_CFG, "w") as f:
        json.dump(cfg, f, indent=2)
    return out
