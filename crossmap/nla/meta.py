"""The released NLA checkpoints' sidecar, `nla_meta.yaml`: read it, check it, and check it against the
live tokenizer.

The sidecar is the contract (docs/inference.md of kitft/natural_language_autoencoders): the marker
character and its token id, the two ids either side of it in the canonical prompt, the AV's fixed
injection norm, the prompt templates, the AR's extraction layer and prompt suffix.  crossmap loads
these and never substitutes a default of its own: a missing or ill-typed field is an error naming
the file and the field.

Schema version 2, as the release writes it: `kind: nla_model`, `role: av | ar` (older files:
`actor` / `critic`), `d_model`, `extraction.{injection_scale, mse_scale}`, `tokens.*`,
`prompt_templates.{av, ar}` (older: `actor` / `critic`); the AR's layer K as a top-level
`extraction_layer_index`, `critic.extraction_layer_index` or `ar.num_hidden_layers`; provenance
(`stage`, `base_checkpoint`, `training`, `trained_on`, `parent_checkpoints`, `created_at`,
`created_by`) kept as given.

One field is crossmap's own, for AVs trained on base models that have no chat template (the shipped
Gemma-3-270M): `prompt_templates.av_render: raw` means the AV prompt is the filled template followed by
`prompt_templates.av_raw_suffix`, tokenised as plain text with the tokenizer's BOS, no chat template.
Absent (every released sidecar) means `chat`: one user message through the chat template.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..verbalize.spec import chat_token_ids

SIDECAR_NAME = "nla_meta.yaml"
NLA_KIND = "nla_model"
NLA_ROLES = ("av", "ar")
SCHEMA_VERSIONS = (1, 2)
ROLE_ALIASES = {"actor": "av", "critic": "ar"}  # what schema 1 and the training code call them
TEMPLATE_ALIASES = {"av": "actor", "ar": "critic"}
SQRT_D_SENTINEL = "sqrt_d_model"  # a scale the sidecar leaves to sqrt(d_model)
AV_PLACEHOLDER = "{injection_char}"
AR_PLACEHOLDER = "{explanation}"
AV_RENDERS = ("chat", "raw")  # how the AV prompt is tokenised: the chat template, or raw text with BOS
RAW_AV_SUFFIX = "\n\n"  # what a raw-rendered AV prompt ends with, before the explanation starts
PROVENANCE_FIELDS = ("stage", "base_checkpoint", "training", "trained_on", "parent_checkpoints", "created_at",
                     "created_by", "git_commit")
# The release's generation settings: the authors' command line samples at 0.7 with 200 new tokens
# (their client's default temperature is 1.0; RL rollouts were capped at 150 tokens).
RELEASE_MAX_NEW_TOKENS = 200
RELEASE_TEMPERATURE = 0.7


@dataclass(frozen=True)
class NLAMeta:
    """One checkpoint's `nla_meta.yaml`, checked.

    injection_scale: the L2 norm every injected vector is rescaled to (AV; None for an AR).
    mse_scale: both vectors' norm before the AR's MSE (sqrt(d_model) when the sidecar says so).
    extraction_layer: the layer K the vectors come from (the AR keeps blocks 0..K); None if absent.
    """

    path: Path
    role: str
    d_model: int
    schema_version: int
    injection_char: str
    injection_token_id: int
    injection_left_neighbor_id: int
    injection_right_neighbor_id: int
    critic_suffix_ids: tuple[int, ...] | None
    av_template: str | None
    ar_template: str | None
    injection_scale: float | None
    mse_scale: float | None
    extraction_layer: int | None
    provenance: dict = field(default_factory=dict)
    av_render: str = "chat"
    av_raw_suffix: str = ""

    @property
    def directory(self) -> Path:
        return self.path.parent

    def av_prompt(self) -> str:
        """The AV's user message: the template with the marker character filled in (str.format, as published);
        for a raw-rendered AV, the whole prompt text (the tokenizer adds BOS)."""
        text = self.av_template.format(injection_char=self.injection_char)
        return text + self.av_raw_suffix if self.av_render == "raw" else text

    def ar_prompt(self, explanation: str) -> str:
        """The AR's raw input for one explanation (no chat template; the tokenizer adds BOS)."""
        return self.ar_template.format(explanation=explanation)


class _Fields:
    """Typed access to a parsed sidecar; every error names the file and the dotted field."""

    def __init__(self, data: dict, path: Path):
        self.data, self.path = data, path

    def fail(self, name: str, why: str) -> ValueError:
        return ValueError(f"{self.path}: field {name!r} {why}")

    def get(self, name: str, default: Any = KeyError) -> Any:
        node: Any = self.data
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is KeyError:
                    raise self.fail(name, "is missing (the released sidecars always have it)")
                return default
            node = node[part]
        return node

    def integer(self, name: str, default: Any = KeyError) -> int | None:
        value = self.get(name, default)
        if value is None and default is not KeyError:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        return value

    def text(self, name: str, default: Any = KeyError) -> str | None:
        value = self.get(name, default)
        if value is None and default is not KeyError:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"must be a non-empty string, got {value!r}")
        return value

    def scale(self, name: str, d_model: int) -> float | None:
        """A norm: a positive number, the sqrt(d_model) sentinel, or null."""
        value = self.get(name, None)
        if value is None:
            return None
        if value == SQRT_D_SENTINEL:
            return math.sqrt(d_model)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self.fail(name, f"must be a positive number, {SQRT_D_SENTINEL!r} or null, got {value!r}")
        return float(value)


def _template(fields: _Fields, role: str, placeholder: str, required: bool) -> str | None:
    name = f"prompt_templates.{role}"
    old = f"prompt_templates.{TEMPLATE_ALIASES[role]}"
    value = fields.get(name, None)
    if value is None:
        name, value = old, fields.get(old, None)
    if value is None:
        if required:
            raise fields.fail(f"prompt_templates.{role}", f"is missing (nor is the older {old!r} there)")
        return None
    if not isinstance(value, str) or placeholder not in value:
        raise fields.fail(name, f"must be a template string containing {placeholder!r}, got {value!r}")
    try:  # the release fills it with str.format: any other brace is an error there too
        value.format(**{placeholder.strip("{}"): "x"})
    except (KeyError, IndexError, ValueError) as err:
        raise fields.fail(name, f"does not format with only {placeholder!r} ({err!r}): {value!r}") from None
    return value


def read_nla_meta(checkpoint: str | os.PathLike, role: str | None = None) -> NLAMeta:
    """Read and check `<checkpoint>/nla_meta.yaml` (or a sidecar file given directly).

    role: "av" or "ar" to require that role (an AV sidecar given as a reconstructor is an error).
    """
    import yaml

    given = Path(checkpoint)
    path = given if given.is_file() else given / SIDECAR_NAME
    if not given.exists():
        raise FileNotFoundError(f"NLA checkpoint not found: {given}")
    if not path.is_file():
        raise FileNotFoundError(f"{given}: no {SIDECAR_NAME}; a released NLA checkpoint carries its contract in that "
                                "sidecar (config.json and weights alone do not say the marker, the prompt or the "
                                "injection norm), so crossmap refuses to guess them")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    f = _Fields(data, path)
    kind = f.get("kind")
    if kind != NLA_KIND:
        raise f.fail("kind", f"is {kind!r}; an NLA checkpoint's sidecar says {NLA_KIND!r}"
                             + (" (this is a dataset sidecar)" if kind == "nla_dataset" else ""))
    version = f.integer("schema_version", 2)
    if version not in SCHEMA_VERSIONS:
        raise f.fail("schema_version", f"is {version}; crossmap reads versions {SCHEMA_VERSIONS}")
    raw_role = f.text("role")
    found = ROLE_ALIASES.get(raw_role, raw_role)
    if found not in NLA_ROLES:
        raise f.fail("role", f"is {raw_role!r}; expected one of {NLA_ROLES} (or the older actor/critic)")
    if role is not None and found != role:
        want = {"av": "a verbalizer (AV)", "ar": "a reconstructor (AR)"}
        raise f.fail("role", f"is {raw_role!r}, but this checkpoint was given as {want[role]}: swap the two paths?")
    d_model = f.integer("d_model")
    if d_model <= 0:
        raise f.fail("d_model", f"must be positive, got {d_model}")
    injection_scale = f.scale("extraction.injection_scale", d_model)
    if found == "av" and injection_scale is None:
        raise f.fail("extraction.injection_scale", "is missing or null; an AV was trained with vectors at that exact "
                                                   "norm and cannot be run without it")
    suffix = f.get("tokens.critic_suffix_ids", None)
    if suffix is not None:
        if not isinstance(suffix, list) or not suffix or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in suffix):
            raise f.fail("tokens.critic_suffix_ids", f"must be a non-empty list of token ids, got {suffix!r}")
        suffix = tuple(suffix)
    elif found == "ar":
        raise f.fail("tokens.critic_suffix_ids", "is missing; the AR reads the last token of a prompt that must end "
                                                 "with these ids")
    layer = None
    for name in ("extraction_layer_index", "critic.extraction_layer_index", "ar.num_hidden_layers",
                 "ar.extraction_layer_index"):
        layer = f.integer(name, None)
        if layer is not None:
            break
    if found == "ar" and layer is None:
        raise f.fail("extraction_layer_index", "is missing (nor is critic.extraction_layer_index or "
                                               "ar.num_hidden_layers there): the AR's layer K is unknown")
    char = f.text("tokens.injection_char")
    render = f.get("prompt_templates.av_render", "chat")
    if render not in AV_RENDERS:
        raise f.fail("prompt_templates.av_render", f"is {render!r}; expected one of {AV_RENDERS}")
    raw_suffix = f.get("prompt_templates.av_raw_suffix", "") if render == "raw" else ""
    if not isinstance(raw_suffix, str):
        raise f.fail("prompt_templates.av_raw_suffix", f"must be a string, got {raw_suffix!r}")
    return NLAMeta(
        path=path, role=found, d_model=d_model, schema_version=version, injection_char=char,
        injection_token_id=f.integer("tokens.injection_token_id"),
        injection_left_neighbor_id=f.integer("tokens.injection_left_neighbor_id"),
        injection_right_neighbor_id=f.integer("tokens.injection_right_neighbor_id"),
        critic_suffix_ids=suffix,
        av_template=_template(f, "av", AV_PLACEHOLDER, required=found == "av"),
        ar_template=_template(f, "ar", AR_PLACEHOLDER, required=found == "ar"),
        injection_scale=injection_scale,
        mse_scale=f.scale("extraction.mse_scale", d_model) if found == "ar" else None,
        extraction_layer=layer,
        provenance={k: data[k] for k in PROVENANCE_FIELDS if k in data},
        av_render=render, av_raw_suffix=raw_suffix,
    )


def check_marker_token(meta: NLAMeta, tokenizer) -> None:
    """The tokenizer must encode the marker character as the pinned id, alone (encode, not
    convert_tokens_to_ids: byte-level BPE vocabularies key on bytes)."""
    ids = list(tokenizer(meta.injection_char, add_special_tokens=False)["input_ids"])
    if ids != [meta.injection_token_id]:
        raise ValueError(f"{meta.path}: field 'tokens.injection_token_id' is {meta.injection_token_id}, but the "
                         f"checkpoint's tokenizer encodes tokens.injection_char {meta.injection_char!r} "
                         f"(U+{ord(meta.injection_char[0]):04X}) as {ids}: the tokenizer is not the one this NLA was "
                         "trained with (or normalises the character away)")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"{meta.path}: tokens.injection_char {meta.injection_char!r} is the unknown token")


def check_model_width(meta: NLAMeta, d_model: int, what: str) -> None:
    if meta.d_model != d_model:
        raise ValueError(f"{meta.path}: field 'd_model' is {meta.d_model}, but {what} is {d_model} wide: the sidecar "
                         "belongs to another model")


# The templates of the released checkpoints (docs/inference.md): a sidecar crossmap writes uses them.
RELEASE_AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from a "
    "language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets describing "
    "that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>\n\nPlease provide an explanation.")
RELEASE_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
MARKER_RANGE = (0x3200, 0x33FF)  # CJK enclosed / compatibility characters: the release's markers live here


def canonical_av_ids(tokenizer, user_message: str, render: str = "chat") -> list[int]:
    """The AV prompt's token ids: one user message through the chat template (the release), or the raw
    text plus RAW_AV_SUFFIX with the tokenizer's BOS (a base model without a chat template)."""
    if render == "raw":
        return [int(t) for t in tokenizer(user_message + RAW_AV_SUFFIX, add_special_tokens=True)["input_ids"]]
    return chat_token_ids(tokenizer, [{"role": "user", "content": user_message}], "")


def default_av_render(tokenizer) -> str:
    """chat where the tokenizer has a chat template, else raw."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def pick_marker(tokenizer, av_template: str = RELEASE_AV_TEMPLATE, render: str = "chat") -> str:
    """A marker for a new AV: the first character of U+3200..U+33FF the tokenizer encodes as one token
    (the authors' rule, which gives the release's U+320E for Qwen and U+321C for Gemma), else -- small
    test vocabularies have none -- the first vocabulary entry that is one token on its own; either way
    one that occurs exactly once in the canonical chat prompt."""
    def once(text: str) -> bool:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            return False
        return canonical_av_ids(tokenizer, av_template.format(injection_char=text), render).count(ids[0]) == 1
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    candidates = (chr(c) for c in range(MARKER_RANGE[0], MARKER_RANGE[1] + 1))
    vocabulary = (tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in specials)
    for text in (*candidates, *vocabulary):
        if text.strip() and not (text.startswith("<") and text.endswith(">")) and once(text):
            return text
    raise ValueError("no token of this tokenizer can serve as a marker (none is one token occurring once in the "
                     "canonical prompt)")


def write_nla_meta(directory: str | os.PathLike, *, role: str, tokenizer, d_model: int, injection_char: str,
                   injection_scale: float | None, extraction_layer: int, av_template: str = RELEASE_AV_TEMPLATE,
                   ar_template: str = RELEASE_AR_TEMPLATE, provenance: dict | None = None,
                   av_render: str = "chat") -> Path:
    """Write `<directory>/nla_meta.yaml` in the release's schema (version 2), the pinned ids computed from
    `tokenizer` as the authors' datagen does: the marker's neighbours in the canonical chat prompt, and the
    AR template's suffix without its first token (which can merge with the explanation's last character)."""
    import yaml

    if role not in NLA_ROLES:
        raise ValueError(f"write_nla_meta: role must be one of {NLA_ROLES}, got {role!r}")
    (token_id,) = tokenizer(injection_char, add_special_tokens=False)["input_ids"] or [None]
    if av_render not in AV_RENDERS:
        raise ValueError(f"write_nla_meta: av_render must be one of {AV_RENDERS}, got {av_render!r}")
    ids = canonical_av_ids(tokenizer, av_template.format(injection_char=injection_char), av_render)
    sites = [p for p, t in enumerate(ids) if t == token_id]
    if len(sites) != 1 or not 0 < sites[0] < len(ids) - 1:
        raise ValueError(f"write_nla_meta: marker {injection_char!r} (id {token_id}) occurs at {sites} in the canonical "
                         "prompt; it must occur once, inside the prompt")
    suffix = tokenizer(ar_template.split(AR_PLACEHOLDER)[-1], add_special_tokens=False)["input_ids"][1:]
    meta = {"kind": NLA_KIND, "schema_version": 2, "role": role, "d_model": int(d_model),
            "extraction": {"injection_scale": None if injection_scale is None else float(injection_scale),
                           "mse_scale": math.sqrt(d_model)},
            "tokens": {"injection_char": injection_char, "injection_token_id": int(token_id),
                       "injection_left_neighbor_id": int(ids[sites[0] - 1]),
                       "injection_right_neighbor_id": int(ids[sites[0] + 1]),
                       "critic_suffix_ids": [int(t) for t in suffix]},
            "prompt_templates": {"av": av_template, "ar": ar_template,
                                 **({"av_render": "raw", "av_raw_suffix": RAW_AV_SUFFIX} if av_render == "raw" else {})},
            "extraction_layer_index": int(extraction_layer), **(provenance or {})}
    path = Path(directory) / SIDECAR_NAME
    path.write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
