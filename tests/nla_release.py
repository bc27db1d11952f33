"""Release-layout NLA checkpoints for tests, and the published recipe in PyTorch (the oracle).

`write_release_pair(root, arch)` writes an AV and an AR directory the way kitft's release lays them
out: tiny random decoders (float32) sized to the REAL shipped tokenizers (Qwen2.5's 151,936 ids, Gemma
3's 262,144), the tokenizer files, `nla_meta.yaml` of schema version 2, and for the AR the truncated
backbone (K+1 blocks) plus `value_head.safetensors`.  Gemma's AV and AR are in the multimodal layout
(`gemma3` config with `text_config`, tensors under `language_model.`, a vision tensor to skip).

`TorchAV` / `TorchAR` follow docs/inference.md of kitft/natural_language_autoencoders step by step,
written here from the contract: transformers models, `inputs_embeds`, the same float32 rescale.  They
share no code with crossmap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

from crossmap.models import hf_config
from crossmap.models.loading import load_tokenizer, resolve_model_path
from crossmap.models.synthetic import tiny_config, write_random_checkpoint

AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from a "
    "language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets describing "
    "that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation.")
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
MARKERS = {"qwen2": "\u320e", "gemma3": "\u321c"}  # the release's marker characters
SHIPPED = {"qwen2": "shipped:qwen2.5-coder-0.5b-instruct", "gemma3": "shipped:gemma-3-270m"}
# Gemma 3's chat template for a conversation of user turns (the shipped Gemma-3-270M is a base model
# without one; the released Gemma AVs are -it models whose tokenizer has this form).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
INJECTION_SCALE = {"qwen2": 4.0, "gemma3": 6.0}
EXPLANATION_RE = re.compile(r"<explanation>\s*(.*?)\s*</explanation>", re.DOTALL)


def real_tokenizer(arch: str):
    tokenizer = load_tokenizer(resolve_model_path(SHIPPED[arch]))
    if arch == "gemma3":
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def _chat_ids(tokenizer, content: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                        add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _decoder_config(arch: str, vocab: int, n_layers: int) -> dict:
    if arch == "qwen2":
        cfg = tiny_config("qwen2", vocab_size=vocab, n_layers=n_layers, name="nla-qwen")
    else:
        cfg = tiny_config("gemma3", vocab_size=vocab, n_layers=n_layers, name="nla-gemma", sliding_window=16,
                          layer_types=tuple("full" if i == n_layers - 1 else "sliding" for i in range(n_layers)),
                          bos_token_id=2, eos_token_ids=(1, 106), pad_token_id=0)
    return hf_config(cfg)


def sidecar(arch: str, role: str, tokenizer, layer: int, d_model: int) -> dict:
    """An nla_meta.yaml of the published schema; the neighbour ids and suffix computed from the
    tokenizer as the authors' datagen does (canonical prompt; template suffix minus its first token)."""
    char = MARKERS[arch]
    token_id = tokenizer(char, add_special_tokens=False)["input_ids"]
    assert len(token_id) == 1, token_id
    ids = _chat_ids(tokenizer, AV_TEMPLATE.format(injection_char=char))
    p = ids.index(token_id[0])
    suffix = tokenizer(AR_TEMPLATE.split("{explanation}")[-1], add_special_tokens=False)["input_ids"][1:]
    meta = {
        "kind": "nla_model", "schema_version": 2, "role": role, "stage": "rl" if role == "av" else "ar_sft",
        "base_checkpoint": f"test/{arch}", "d_model": d_model,
        "extraction": {"injection_scale": INJECTION_SCALE[arch] if role == "av" else None,
                       "mse_scale": float(np.sqrt(d_model))},
        "tokens": {"injection_char": char, "injection_token_id": token_id[0],
                   "injection_left_neighbor_id": ids[p - 1], "injection_right_neighbor_id": ids[p + 1],
                   "critic_suffix_ids": suffix},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
        "trained_on": ["test corpus"], "parent_checkpoints": [f"test/{arch}"],
        "created_at": "2026-12-01T00:00:00+00:00", "created_by": "crossmap tests",
    }
    if role == "ar":
        meta["extraction_layer_index"] = layer
        meta["critic"] = {"extraction_layer_index": layer}
    return meta


def write_sidecar(directory: Path, meta: dict) -> None:
    (directory / "nla_meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True),
                                             encoding="utf-8")


def write_release_pair(root: Path, arch: str, *, layer: int = 1, av_layers: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """(AV dir, AR dir) of one released pair at tiny width with the real tokenizer."""
    from safetensors.numpy import save_file

    tokenizer = real_tokenizer(arch)
    vocab = len(tokenizer)
    multimodal = arch == "gemma3"
    dirs = []
    for role, n_layers in (("av", av_layers), ("ar", layer + 1)):
        out = Path(root) / f"nla-{arch}-L{layer}-{role}"
        hf = _decoder_config(arch, vocab, n_layers)
        write_random_checkpoint(hf, out, dtype="float32", seed=seed + (role == "ar"), std=0.05,
                                multimodal=multimodal, progress=False)
        tokenizer.save_pretrained(out)
        write_sidecar(out, sidecar(arch, role, tokenizer, layer, hf["hidden_size"]))
        if role == "ar":
            d = hf["hidden_size"]
            head = np.random.default_rng(seed + 7).standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
            save_file({"weight": head}, str(out / "value_head.safetensors"))
        dirs.append(out)
    return dirs[0], dirs[1]


# ------------------------------------------------------------------------------------------------ oracle
def _torch_decoder(directory: Path, drop_final_norm: bool = False):
    """The text decoder of a release directory as a transformers CausalLM, float32 (Gemma's multimodal
    layout read the way the authors' SGLang patch runs it: straight to the language model)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((directory / "config.json").read_text())
    text = config.get("text_config", config)
    text = {**text, "model_type": "gemma3_text" if config["model_type"] == "gemma3" else config["model_type"]}
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    state = {}
    for f in sorted(directory.glob("model*.safetensors")):
        for name, value in load_file(str(f)).items():
            if name.startswith("vision_tower."):
                continue
            state[name.removeprefix("language_model.")] = torch.from_numpy(value.copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied heads are not stored
    if "lm_head.weight" in missing:
        model.tie_weights()
    if drop_final_norm:
        model.model.norm = torch.nn.Identity()
    return model.eval()


class TorchAV:
    """docs/inference.md steps 1-5 with a transformers model."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = yaml.safe_load((self.directory / "nla_meta.yaml").read_text(encoding="utf-8"))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.model = _torch_decoder(self.directory)

    def prompt_ids(self) -> list[int]:
        t = self.meta["tokens"]
        return _chat_ids(self.tokenizer, self.meta["prompt_templates"]["av"].format(injection_char=t["injection_char"]))

    def slot(self, ids: list[int]) -> int:
        t = self.meta["tokens"]
        for p, tok in enumerate(ids):
            if tok == t["injection_token_id"] and 0 < p < len(ids) - 1 and \
                    ids[p - 1] == t["injection_left_neighbor_id"] and ids[p + 1] == t["injection_right_neighbor_id"]:
                return p
        raise AssertionError("no injection slot")

    def injected_embeddings(self, vector: np.ndarray):
        import torch

        ids = self.prompt_ids()
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(torch.tensor([ids])).float()  # Gemma: times sqrt(d) inside
            v = torch.as_tensor(np.asarray(vector, np.float32))[None]
            scaled = v / (v.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) / self.meta["extraction"]["injection_scale"])
            embeds[0, self.slot(ids)] = scaled[0]
        return ids, embeds

    def greedy(self, vector: np.ndarray, n_new: int) -> tuple[np.ndarray, list[int]]:
        """(first-step logits, n_new greedy tokens), every step a full forward on the embeddings."""
        import torch

        _, embeds = self.injected_embeddings(vector)
        tokens, first = [], None
        with torch.no_grad():
            for _ in range(n_new):
                logits = self.model(inputs_embeds=embeds).logits[0, -1]
                first = logits.numpy().copy() if first is None else first
                tok = int(torch.argmax(logits))
                tokens.append(tok)
                embeds = torch.cat([embeds, self.model.get_input_embeddings()(torch.tensor([[tok]])).float()], dim=1)
        return first, tokens


class TorchAR:
    """The AR recipe: raw prompt with BOS, truncated backbone without its final norm, head on the last token."""

    def __init__(self, directory: Path):
        import torch
        from safetensors.numpy import load_file
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.meta = yaml.safe_load((self.directory / "nla_meta.yaml").read_text(encoding="utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.model = _torch_decoder(self.directory, drop_final_norm=True)
        w = load_file(str(self.directory / "value_head.safetensors"))["weight"]
        self.head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(w))

    def reconstruct(self, explanation: str) -> np.ndarray:
        import torch

        ids = self.tokenizer(self.meta["prompt_templates"]["ar"].format(explanation=explanation),
                             add_special_tokens=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = self.model.model(ids, use_cache=False).last_hidden_state[0, -1]
            return self.head(h).numpy()
