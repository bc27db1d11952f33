"""Tiny random checkpoints with real tokenizers, for tests and configs/tiny.py.

`tiny:<arch>` (arch: llama, qwen2, gemma3_text) resolves to a HF-layout checkpoint directory in
the crossmap cache: random weights at a tiny shape plus a small BPE tokenizer trained on the
shipped corpus (fast tokenizer with offsets and a ChatML-like chat template), so the whole
pipeline (cross-tokenizer pairing included) runs in seconds.  The two tokenizers differ on
purpose: llama/qwen2 get a byte-level BPE, gemma3_text a whitespace-split BPE of another size.
"""

from __future__ import annotations

import json
from pathlib import Path

from .registry import hf_config
from .shipped import cache_dir
from .synthetic import random_hf_arrays, tiny_config

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "<concept>"]


def _train_tokenizer(arch: str, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import corpus_texts

    byte_level = arch in ("llama", "qwen2")
    vocab = 400 if byte_level else 700
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus_texts()[:2000], trainer=trainer)
    if not byte_level:  # gemma-style: BOS prepended
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<concept>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(fast)


def tiny_checkpoint(arch: str, seed: int = 0) -> Path:
    """Directory of the tiny random `arch` checkpoint (built once, then cached)."""
    from safetensors.numpy import save_file

    out = cache_dir() / "tiny" / f"tiny-{arch}-{seed}"
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(arch, out)
    cfg = tiny_config(arch, vocab_size=vocab, tie_embeddings=arch == "gemma3_text", name=f"tiny-{arch}",
                      bos_token_id=1, eos_token_ids=(5,), pad_token_id=0, max_position_embeddings=2048)
    save_file(random_hf_arrays(cfg, seed), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    (out / ".complete").write_text("ok")
    return out
