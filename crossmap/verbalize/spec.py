"""What a verbalizer is: the prompt, where the vector goes, how it is scaled, how output is parsed.

`VerbalizerSpec` is crossmap's own description of an activation verbalizer (AV).  The released
NLA verbalizers describe themselves in an `nla_meta.yaml` sidecar, which `crossmap.nla` reads into
a spec (`crossmap.nla.nla_verbalizer_spec`); `self_verbalizer_spec` gives Patchscopes/SelfIE-style
presets for models without a trained AV.

`build_prompt` renders the template (through the tokenizer's chat template, or raw), tokenises
it once and finds the single token position of the marker, where the vector is injected: by the
marker's character span (presets), or, when the spec pins the marker's token id and its two
neighbours (NLA checkpoints), by that id with both neighbours checked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .engine import INJECTION_MODES

SCALE_POLICIES = ("fixed", "embedding", "prompt", "activation", "none")  # how an injected vector's norm is set
SELF_PROMPTS = ("chat", "base")  # the self-verbalizer presets (self_verbalizer_spec kind, "auto" picks one)
VERBALIZER_KINDS = ("self", "nla")  # the model itself with a preset prompt, or a trained NLA checkpoint
MULTI_TOKEN_MARKER_POLICIES = ("last", "error")
# The released NLAs' parse (docs/inference.md of kitft/natural_language_autoencoders): white space
# inside the tags is not part of the explanation; no match keeps the raw text.
DEFAULT_EXPLANATION_REGEX = r"<explanation>\s*(.*?)\s*</explanation>"
# End-of-turn tokens of common chat templates: generation stops on them when they exist.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
# Stands in for the marker while a template is rendered, so its character span can be found
# even when the marker text also occurs elsewhere (private-use code points; never in real text).
_SENTINEL = "\ue000crossmap-marker\ue000"


@dataclass
class VerbalizerSpec:
    """How to run an activation verbalizer.  Defaults are the documented fallback contract.

    injection_token: the marker text placed in the prompt at `{marker}`, where the vector is
        injected (a rare single-token character for NLA AVs, or a plain word / punctuation for
        self-verbalizers).  After tokenisation it must cover exactly one token; if it covers
        several, `multi_token_marker` decides ("last": inject at the last of them; "error").
    injection_token_id, injection_neighbor_ids: when set (NLA checkpoints pin them), the marker
        is found by its token id instead of its characters, and the tokens either side of it must
        be the two neighbour ids; exactly one position may pass, else the prompt is an error.
        Chat prompts are then tokenised in one step by the chat template (no second BOS).
    prompt_template: text with one `{marker}` placeholder (if absent, the first literal
        occurrence of `injection_token` is the marker).  A list of {"role", "content"} messages
        is also accepted (chat only).  Other braces are left alone (no str.format).
    use_chat_template: render as the user turn through tokenizer.apply_chat_template (with
        `system_prompt` if given, and the generation prompt); False tokenises the raw text.
    add_special_tokens: passed to the tokenizer; None means True for raw text (the tokenizer
        adds BOS if it does so by default) and False for chat-rendered text (the template has it).
    d_model: width of the vectors explained; must equal the verbalizer model's width.
        None: taken from the model.
    scale_policy: how a vector's norm is set before injection:
        "fixed"      -> norm `injection_scale`;
        "embedding"  -> the mean norm of the input embeddings over the whole vocabulary (Gemma's
                        sqrt(d_model) factor included; reserved/unused tokens are counted too);
        "prompt"     -> the mean input-embedding norm of the prompt's own real tokens (marker
                        and special tokens excluded);
        "activation" -> norm `injection_scale`, documented as the typical residual-stream norm at
                        the source layer the vectors come from (e.g. from activation stats);
        "none"       -> the vector as given.
        After the policy the vector is multiplied by `scale_multiplier`.
    injection_scale: the target norm for "fixed" / "activation" (required by those policies).
    injection_mode: "replace" the embedding / residual at the marker, or "add" to it.
    injection_layer: 0 = input embeddings; L >= 1 = the residual stream after block L-1
        (transformers' hidden_states[L]).
    explanation_regex: its first group (or whole match) is the parsed explanation, searched with
        re.DOTALL; no match (or None) falls back to the whole generated text, stripped.
    max_new_tokens, temperature, top_p: generation defaults (explain() arguments override).
    stop_strings: generated text is cut at the first of these (post hoc); a stop string that
        is a single token also stops generation early (`stop_strings_as_tokens`).
    stop_token_ids: extra stop tokens (the model's EOS ids and, for chat templates, end-of-turn
        tokens found in the vocabulary are always added by the Verbalizer).
    skip_special_tokens: passed to tokenizer.decode for the raw text.
    source: where the spec came from (sidecar path or preset name).  extra: unmapped sidecar keys.
    """

    injection_token: str = "<concept>"
    injection_token_id: int | None = None
    injection_neighbor_ids: tuple[int, int] | None = None
    prompt_template: str | list = "{marker}"
    use_chat_template: bool = True
    system_prompt: str | None = None
    add_special_tokens: bool | None = None
    multi_token_marker: str = "last"
    d_model: int | None = None
    scale_policy: str = "embedding"
    injection_scale: float | None = None
    scale_multiplier: float = 1.0
    injection_mode: str = "replace"
    injection_layer: int = 0
    explanation_regex: str | None = DEFAULT_EXPLANATION_REGEX
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    stop_strings_as_tokens: bool = True
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = False
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.stop_strings = tuple(self.stop_strings)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.injection_neighbor_ids is not None:
            self.injection_neighbor_ids = tuple(int(t) for t in self.injection_neighbor_ids)
        self.validate()

    def validate(self) -> VerbalizerSpec:
        """Raise ValueError naming every bad field; returns self."""
        where = f" (spec from {self.source})" if self.source else ""
        problems = []
        if not isinstance(self.injection_token, str) or not self.injection_token:
            problems.append(f"injection_token must be a non-empty string, got {self.injection_token!r}")
        if isinstance(self.prompt_template, list):
            if not self.use_chat_template:
                problems.append("prompt_template is a list of messages but use_chat_template is False")
            elif not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in self.prompt_template):
                problems.append("prompt_template messages must be dicts with 'role' and 'content'")
        elif not isinstance(self.prompt_template, str):
            problems.append(f"prompt_template must be a string or a list of messages, got "
                            f"{type(self.prompt_template).__name__}")
        if self.injection_token_id is not None and (not isinstance(self.injection_token_id, int)
                                                    or self.injection_token_id < 0):
            problems.append(f"injection_token_id must be a token id >= 0, got {self.injection_token_id!r}")
        if self.injection_neighbor_ids is not None and (self.injection_token_id is None
                                                        or len(self.injection_neighbor_ids) != 2):
            problems.append("injection_neighbor_ids must be two ids (left, right) and needs injection_token_id, "
                            f"got {self.injection_neighbor_ids!r}")
        if self.scale_policy not in SCALE_POLICIES:
            problems.append(f"scale_policy must be one of {SCALE_POLICIES}, got {self.scale_policy!r}")
        if self.scale_policy in ("fixed", "activation") and not (self.injection_scale and self.injection_scale > 0):
            problems.append(f"scale_policy {self.scale_policy!r} needs a positive injection_scale "
                            f"(the target norm), got {self.injection_scale!r}")
        if self.injection_mode not in INJECTION_MODES:
            problems.append(f"injection_mode must be one of {INJECTION_MODES}, got {self.injection_mode!r}")
        if not isinstance(self.injection_layer, int) or self.injection_layer < 0:
            problems.append(f"injection_layer must be an int >= 0, got {self.injection_layer!r}")
        if self.multi_token_marker not in MULTI_TOKEN_MARKER_POLICIES:
            problems.append(f"multi_token_marker must be one of {MULTI_TOKEN_MARKER_POLICIES}, "
                            f"got {self.multi_token_marker!r}")
        if self.d_model is not None and (not isinstance(self.d_model, int) or self.d_model <= 0):
            problems.append(f"d_model must be a positive int, got {self.d_model!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.explanation_regex is not None:
            try:
                re.compile(self.explanation_regex)
            except re.error as e:
                problems.append(f"explanation_regex {self.explanation_regex!r} does not compile: {e}")
        if problems:
            raise ValueError("invalid VerbalizerSpec" + where + ": " + "; ".join(problems))
        return self

    def replace(self, **changes) -> VerbalizerSpec:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown VerbalizerSpec field(s) {sorted(unknown)}; fields are "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def parse(self, text: str) -> str:
        """The explanation inside generated text (regex group 1 / whole match).  A truncated one (no
        closing part) is what follows the opening part, for regexes of the form OPEN(.*?)CLOSE such as
        the default; otherwise the whole text."""
        if self.explanation_regex:
            m = re.search(self.explanation_regex, text, flags=re.DOTALL)
            if m:
                return (m.group(1) if m.re.groups else m.group(0)).strip()
            opening, lazy, _ = self.explanation_regex.partition("(.*?)")
            if lazy:
                m = re.search(opening + "(.*)", text, flags=re.DOTALL)
                if m:
                    return m.group(1).strip()
        return text.strip()

    def is_truncated(self, text: str) -> bool:
        """True when the spec parses tagged explanations and `text` holds no complete one (the
        closing tag is missing: generation stopped at max_new_tokens inside the explanation)."""
        return bool(self.explanation_regex) and re.search(self.explanation_regex, text, flags=re.DOTALL) is None

    def truncate(self, text: str) -> str:
        """Cut `text` at the first occurrence of any stop string."""
        cut = len(text)
        for s in self.stop_strings:
            i = text.find(s)
            if s and 0 <= i < cut:
                cut = i
        return text[:cut]


# ---------------------------------------------------------------------------------------------
# self-verbalizer presets

BASE_IDENTITY_TEMPLATE = "cat -> cat\n1135 -> 1135\nhello -> hello\n{marker} ->"
CHAT_MEANING_TEMPLATE = 'What does "{marker}" mean? Answer in one short sentence.'


def self_verbalizer_spec(kind: str = "auto", tokenizer=None, **overrides) -> VerbalizerSpec:
    """Patchscopes / SelfIE-style prompt on the model itself (no trained AV; weaker than one).

    kind="base": few-shot identity prompt, raw text with the tokenizer's BOS:
        "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n? ->"  with the vector injected at "?";
        the model continues with what it reads at "?"; text is cut at the first newline.
    kind="chat": one user turn through the tokenizer's chat template (default system prompt):
        'What does "X" mean? Answer in one short sentence.'  with the vector injected at "X".
    kind="auto": "chat" when the tokenizer has a chat template, else "base".
    Both scale the vector to the mean vocabulary embedding norm ("embedding" policy) and inject
    at the input embeddings (replace).  Any spec field can be overridden.
    """
    if kind == "auto":
        if tokenizer is None:
            raise ValueError("self_verbalizer_spec(kind='auto') needs the tokenizer to pick base or chat")
        kind = "chat" if getattr(tokenizer, "chat_template", None) else "base"
    if kind == "base":
        spec = VerbalizerSpec(injection_token="?", prompt_template=BASE_IDENTITY_TEMPLATE, use_chat_template=False,
                              scale_policy="embedding", explanation_regex=None, max_new_tokens=12,
                              stop_strings=("\n",), source="self-verbalizer preset 'base' (identity few-shot)")
    elif kind == "chat":
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("self_verbalizer_spec(kind='chat'): the tokenizer has no chat template; "
                             "use kind='base' for base models")
        spec = VerbalizerSpec(injection_token="X", prompt_template=CHAT_MEANING_TEMPLATE, use_chat_template=True,
                              scale_policy="embedding", explanation_regex=None, max_new_tokens=32,
                              source="self-verbalizer preset 'chat' (what does X mean)")
    else:
        raise ValueError(f"self_verbalizer_spec: kind must be 'base', 'chat' or 'auto', got {kind!r}")
    return spec.replace(**overrides) if overrides else spec


# ---------------------------------------------------------------------------------------------
# prompt rendering

@dataclass(frozen=True)
class Prompt:
    """A rendered verbalizer prompt: token ids and the index of the injected token."""

    token_ids: tuple[int, ...]
    marker_index: int
    text: str
    marker_token_indices: tuple[int, ...]  # every token the marker covers (one, normally)


def _marker_template(spec: VerbalizerSpec) -> str | list:
    """The template with the marker replaced by the sentinel; errors if there is no marker."""
    where = f" (spec from {spec.source})" if spec.source else ""

    def sub(text: str) -> tuple[str, int]:
        if "{marker}" in text:
            return text.replace("{marker}", _SENTINEL), text.count("{marker}")
        if spec.injection_token in text:
            return text.replace(spec.injection_token, _SENTINEL, 1), 1
        return text, 0

    if isinstance(spec.prompt_template, str):
        out, n = sub(spec.prompt_template)
    else:
        out, n = [], 0
        for m in spec.prompt_template:
            content, k = sub(m["content"])
            out.append({**m, "content": content})
            n += k
    if n != 1:
        raise ValueError(f"prompt_template must contain exactly one '{{marker}}' placeholder (or the "
                         f"injection_token {spec.injection_token!r}); found {n}{where}: {spec.prompt_template!r}")
    return out


def chat_token_ids(tokenizer, messages: list, where: str) -> list[int]:
    """The chat template's token ids in one step (the template's own BOS, never a second one)."""
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    except Exception as e:  # jinja errors come in many types
        raise ValueError(f"the tokenizer's chat template could not render the prompt{where}: {e}") from e
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _build_prompt_by_id(tokenizer, spec: VerbalizerSpec, where: str) -> Prompt:
    """The NLA recipe: render, tokenise once, find the marker by id with both neighbours checked."""
    content = spec.prompt_template
    if isinstance(content, str) and "{marker}" in content:
        content = content.replace("{marker}", spec.injection_token)
    if spec.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"use_chat_template=True but the tokenizer has no chat template{where}")
        messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
        if spec.system_prompt is not None:
            messages = [{"role": "system", "content": spec.system_prompt}] + [
                m for m in messages if m["role"] != "system"]
        ids = chat_token_ids(tokenizer, messages, where)
        text = tokenizer.decode(ids, skip_special_tokens=False)
    else:
        add_special = True if spec.add_special_tokens is None else spec.add_special_tokens
        ids = [int(t) for t in tokenizer(content, add_special_tokens=add_special)["input_ids"]]
        text = content
    target = spec.injection_token_id
    sites = [p for p, t in enumerate(ids) if t == target]
    neighbours = spec.injection_neighbor_ids
    passing = [p for p in sites if neighbours is None
               or (0 < p < len(ids) - 1 and (ids[p - 1], ids[p + 1]) == tuple(neighbours))]
    if len(passing) != 1:
        seen = [(ids[p - 1] if p > 0 else None, ids[p + 1] if p + 1 < len(ids) else None) for p in sites]
        raise ValueError(
            f"the prompt has {len(passing)} injection slots where exactly one is needed{where}: token id {target} "
            f"({spec.injection_token!r}) occurs at positions {sites} with neighbours {seen}, and the spec requires "
            f"neighbours {tuple(neighbours) if neighbours else 'any'} (template drift, a tokenizer that is not the "
            "checkpoint's, or a second BOS)")
    return Prompt(token_ids=tuple(ids), marker_index=passing[0], text=text, marker_token_indices=(passing[0],))


def build_prompt(tokenizer, spec: VerbalizerSpec) -> Prompt:
    """Render `spec`'s template, tokenise it and locate the marker token.

    The marker's character span in the rendered text is found through the tokenizer's offset
    mapping; the tokens overlapping it are the marker tokens.  A token that also covers text
    next to the marker (e.g. a merged leading space) still counts as the marker token.
    """
    where = f" (spec from {spec.source})" if spec.source else ""
    if spec.injection_token_id is not None:
        return _build_prompt_by_id(tokenizer, spec, where)
    template = _marker_template(spec)
    if spec.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"use_chat_template=True but the tokenizer has no chat template{where}; "
                             f"set use_chat_template=False to tokenise the raw template")
        messages = template if isinstance(template, list) else [{"role": "user", "content": template}]
        if spec.system_prompt is not None:
            messages = [{"role": "system", "content": spec.system_prompt}] + [
                m for m in messages if m["role"] != "system"]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors come in many types
            raise ValueError(f"the tokenizer's chat template could not render the prompt{where}: {e}") from e
        add_special = False if spec.add_special_tokens is None else spec.add_special_tokens
    else:
        text = template
        add_special = True if spec.add_special_tokens is None else spec.add_special_tokens
    if text.count(_SENTINEL) != 1:
        raise ValueError(f"the marker placeholder appears {text.count(_SENTINEL)} times after rendering the "
                         f"template{where}; the chat template must keep the user text exactly once")
    start = text.index(_SENTINEL)
    text = text.replace(_SENTINEL, spec.injection_token)
    end = start + len(spec.injection_token)
    try:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers: encode the pieces
        before = tokenizer(text[:start], add_special_tokens=add_special)["input_ids"]
        marker = tokenizer(spec.injection_token, add_special_tokens=False)["input_ids"]
        after = tokenizer(text[end:], add_special_tokens=False)["input_ids"]
        ids = list(before) + list(marker) + list(after)
        offsets = [(0, 0)] * len(before) + [(start, end)] * len(marker) + [(0, 0)] * len(after)
    covered = tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)
    if not covered:
        raise ValueError(f"injection_token {spec.injection_token!r} maps to no token after tokenisation{where}")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and any(ids[i] == unk for i in covered):
        raise ValueError(f"the tokenizer cannot encode injection_token {spec.injection_token!r}: it became the "
                         f"unknown token{where}")
    if len(covered) > 1 and spec.multi_token_marker == "error":
        pieces = [tokenizer.decode([ids[i]]) for i in covered]
        raise ValueError(f"injection_token {spec.injection_token!r} spans {len(covered)} tokens {pieces}; it must be "
                         f"one token (or set multi_token_marker='last' to inject at the last){where}")
    return Prompt(token_ids=tuple(int(i) for i in ids), marker_index=covered[-1], text=text,
                  marker_token_indices=covered)


def stop_ids_for(tokenizer, spec: VerbalizerSpec, model_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Stop tokens: spec.stop_token_ids, the model's EOS ids, the tokenizer's EOS, end-of-turn
    tokens of chat templates (when the spec uses one), and single-token stop strings."""
    ids = set(spec.stop_token_ids) | set(model_eos)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if spec.use_chat_template:
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    if spec.stop_strings_as_tokens:
        for s in spec.stop_strings:
            enc = tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(int(enc[0]))
    return tuple(sorted(ids))
