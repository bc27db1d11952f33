"""A released NLA reconstructor (AR): explanation text -> the vector it describes.

    ar = Reconstructor("/ckpt/nla-qwen2.5-7b-L20-ar", dtype="bfloat16", mesh=mesh)
    vectors = ar.reconstruct(explanations)          # [N, d_model] float32
    cos = round_trip_cosine(vectors, originals)     # the release's score; MSE = 2 (1 - cos)

The AR is the base model truncated to its first K+1 blocks (config.json says K+1 layers), with no
final norm and no LM head, plus `value_head.safetensors`, one bias-free d x d linear map.  Its input
is the raw string `prompt_templates.ar` with the explanation filled in, tokenised with the
tokenizer's special tokens (BOS where the model has one) and no chat template; every tokenised
prompt must end with the sidecar's `critic_suffix_ids`, so its last token is the one the head reads.

Prompts are sorted by length, batched, and padded on the right to a multiple of LENGTH_STEP tokens and
a fixed batch, so a run over many explanations compiles one program per length step; the batch is
split over the mesh's data axes like every forward.  Steps rather than powers of two: explanations
run 50-200 tokens, where the next power of two would pad a 130-token prompt to 256 and double the
work (`crossmap bench verbalize --nla`, BENCHMARKS.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from .. import sharding as shd
from ..models import load_model, scanned
from ..models.checkpoint_files import iter_safetensors_file
from ..verbalize.engine import batch_bucket
from .adapted import is_adapted, load_adapted
from .meta import check_model_width, read_nla_meta
from .objectives import ar_vectors

VALUE_HEAD_FILE = "value_head.safetensors"
LENGTH_STEP = 32


def ar_length_bucket(n: int) -> int:
    """Padded prompt length: the next multiple of LENGTH_STEP."""
    return max(LENGTH_STEP, -(-int(n) // LENGTH_STEP) * LENGTH_STEP)


def read_value_head(path: str | os.PathLike, d_model: int) -> np.ndarray:
    """The head's weight [d_out, d_in] (PyTorch Linear layout: reconstruction = W @ h)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an NLA reconstructor ships its trained head in this file beside "
                                "the truncated backbone")
    tensors = dict(iter_safetensors_file(path))
    names = sorted(tensors)
    if "bias" in tensors:
        raise ValueError(f"{path}: the value head has a bias; the release's head is bias-free (Linear(d, d, bias=False))")
    weight = tensors.get("weight")
    if weight is None:
        raise ValueError(f"{path}: expected one tensor named 'weight', found {names}")
    if weight.shape != (d_model, d_model):
        raise ValueError(f"{path}: tensor 'weight' has shape {tuple(weight.shape)}; the head maps the backbone's "
                         f"d_model={d_model} to itself, so it must be ({d_model}, {d_model})")
    return np.asarray(weight)


def round_trip_cosine(reconstructed: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [N, d] reconstructions with [N, d] originals (float64)."""
    a = np.asarray(reconstructed, np.float64)
    b = np.asarray(original, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"round_trip_cosine: reconstructions {a.shape} and originals {b.shape} differ in shape")
    denom = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return np.sum(a * b, axis=-1) / denom


def round_trip_mse(cosine: np.ndarray) -> np.ndarray:
    """The release's MSE of both vectors normalised to sqrt(d): 2 (1 - cos), in [0, 4]."""
    return 2.0 * (1.0 - np.asarray(cosine, np.float64))


def padded_batch(prompts: Sequence[Sequence[int]], batch: int) -> tuple[np.ndarray, ...]:
    """(tokens, positions, valid, last) for up to `batch` prompts, right-padded to `ar_length_bucket`;
    filler rows hold one real token, so no row attends to nothing."""
    length = ar_length_bucket(max(len(p) for p in prompts))
    tokens = np.zeros((batch, length), np.int32)
    valid = np.zeros((batch, length), bool)
    last = np.zeros(batch, np.int32)
    for slot, ids in enumerate(prompts):
        tokens[slot, :len(ids)] = ids
        valid[slot, :len(ids)] = True
        last[slot] = len(ids) - 1
    valid[len(prompts):, 0] = True
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    return tokens, positions, valid, last


@partial(jax.jit, static_argnames=("graphdef", "layer"))
def reconstruct_batch(state, head, tokens, positions, valid, last, *, graphdef, layer: int):
    """Jitted `objectives.ar_vectors` of one padded batch (`padded_batch`); `state` an nnx State or pure dict."""
    return ar_vectors(nnx.merge(graphdef, state), head, tokens, valid, last, positions=positions, layer=layer)


class Reconstructor:
    """A loaded AR: `token_ids`, `reconstruct`, `score`."""

    def __init__(self, checkpoint: str | os.PathLike, *, dtype: str = "bfloat16", mesh: Mesh | None = None,
                 rules: dict | None = None, batch_size: int = 32, layers: str = "unrolled"):
        self.meta = read_nla_meta(checkpoint, role="ar")  # before any weight is read
        directory = self.meta.directory
        if is_adapted(directory):  # LoRA adapters over a base model, hashes checked (see `adapted`)
            lm = load_adapted(directory, role="ar", layer=self.meta.extraction_layer, dtype=dtype, mesh=mesh,
                              rules=rules)
        else:
            lm = load_model(directory, dtype=dtype, mesh=mesh, rules=rules, backbone_only=True)
        cfg = lm.config
        check_model_width(self.meta, cfg.d_model, f"the backbone in {directory} (config.json hidden_size)")
        k = self.meta.extraction_layer
        if cfg.n_layers != k + 1:
            raise ValueError(f"{self.meta.path}: extraction layer K={k}, so the truncated backbone must have K+1={k + 1} "
                             f"blocks, but {directory / 'config.json'} says num_hidden_layers={cfg.n_layers}")
        head = read_value_head(directory / VALUE_HEAD_FILE, cfg.d_model)
        self.head = jnp.asarray(head.astype(lm.model.embed[...].dtype))
        if mesh is not None:
            self.head = jax.device_put(self.head, shd.named_sharding(mesh, (None, None), rules))
        # models.scan.LAYER_LAYOUTS; the AR's blocks are its own, so they are stacked in place
        lm.model = scanned(lm.model, layers, consume=True)
        self.model, self.tokenizer, self.config = lm.model, lm.tokenizer, cfg
        self.model_id = lm.model_id
        self.mesh, self.rules = mesh, rules
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"Reconstructor: batch_size must be >= 1, got {batch_size}")
        self._graphdef, self._state = nnx.split(lm.model)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def token_ids(self, explanations: Sequence[str]) -> list[list[int]]:
        """Each explanation's AR prompt, tokenised; each must end with the sidecar's suffix ids."""
        suffix = list(self.meta.critic_suffix_ids)
        out = []
        for i, text in enumerate(explanations):
            if not isinstance(text, str):
                raise ValueError(f"explanation {i} is {type(text).__name__}, not text")
            ids = [int(t) for t in self.tokenizer(self.meta.ar_prompt(text), add_special_tokens=True)["input_ids"]]
            if ids[-len(suffix):] != suffix:
                raise ValueError(f"{self.meta.path}: the AR prompt of explanation {i} ends with tokens "
                                 f"{ids[-len(suffix):]}, but field 'tokens.critic_suffix_ids' is {suffix} (template "
                                 "drift, or a tokenizer that is not the checkpoint's): its last token would not be "
                                 "the one the head was trained on")
            out.append(ids)
        return out

    def reconstruct(self, explanations: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """[N, d_model] float32 reconstructions, in the order given."""
        prompts = self.token_ids(explanations)
        out = np.zeros((len(prompts), self.d_model), np.float32)
        if not prompts:
            return out
        shards = shd.batch_shards(self.mesh, self.rules)
        batch = batch_bucket(self.batch_size, shards)
        order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths share a bucket
        chunks = [order[i:i + batch] for i in range(0, len(order), batch)]
        for rows in tqdm(chunks, desc="reconstruct", unit="batch", disable=not progress):
            args = list(padded_batch([prompts[r] for r in rows], batch))
            if self.mesh is not None:
                args = [shd.shard_batch(a, self.mesh, self.rules) for a in args]
            values = reconstruct_batch(self._state, self.head, *args, graphdef=self._graphdef,
                                  layer=self.config.n_layers - 1)
            out[rows] = shd.to_host(values)[:len(rows)]
        return out

    def score(self, explanations: Sequence[str], originals: np.ndarray, *, progress: bool = False) -> np.ndarray:
        """Round-trip cosine of each explanation's reconstruction with its original vector."""
        originals = np.asarray(originals, np.float32)
        if originals.shape != (len(explanations), self.d_model):
            raise ValueError(f"score: originals must be [{len(explanations)}, {self.d_model}], got {originals.shape}")
        return round_trip_cosine(self.reconstruct(explanations, progress=progress), originals)
