"""Batched autoregressive generation on the Flax ports, with vectors injected during prefill.

One jitted function does the whole generation: prefill of the (left-padded) prompts into a
preallocated KV cache, then a `lax.while_loop` of single-token decode steps that stops when
every row has produced a stop token or `max_new_tokens` tokens exist (tested every
`stop_check_every` steps).  Nothing but that test's flag leaves the device between steps.

Layout of one batch (B rows, prompt bucket P, N = max_new_tokens, cache length S = P + N):

    slot      0 .. P-1                      P .. P+N-1
    row r     [pad ... pad | prompt tokens] [generated tokens]
    position  0 ...  0     | 0 1 .. len-1   len len+1 ...          (rope position, per row)

* Prompts are LEFT padded so every row's next token goes to the same cache slot (P + t); rope
  positions start at 0 at each row's first real token; `kv_valid` is False on pad slots.
* The cache holds every slot for every layer, sliding-window layers included: the ports mask
  keys more than `sliding_window` slots back (slot distance equals position distance for real
  tokens, since pads only precede them), so a full-length cache with the window mask is exact;
  it costs memory (S slots instead of the window) but not correctness.
* Slots P.. are marked valid from the start: causality (key slot <= query slot) hides the
  future ones, so `kv_valid` is a loop constant.
* Rows come in *groups* of `group_size` consecutive rows that share every chosen token: the
  next-token logits of a group are combined as sum_r w_r * logits_r (`group_weights`) before
  choosing.  Plain generation is group_size 1; background washout (see verbalizer.py) puts a
  direction-plus-background and a background-only row in one group with weights (1/n, -a/n).
  Combining raw logits or log-probabilities gives the same choice (they differ by one constant
  per row, and the weights sum to a constant), so raw logits are used.
* Shapes are bucketed (batch up to a power of two that the data axes divide, prompt length up
  to a power of two >= 16) so a run over many batches compiles a handful of programs only.

The KV cache never crosses the jit boundary: it is created inside the function and carried by
the while loop, which XLA updates in place (dynamic_update_slice on a loop carry), so there is
nothing to donate and no per-step copy.

Prefill and every decode step run through `Transformer.run` (the model's own blocks; the cache
is kept heads-major, [B, K, S, H], so a decode step's attention needs no transpose of the cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .. import sharding as shd

Array = jax.Array

INJECTION_MODES = ("replace", "add")
# decode steps between tests of "has every row stopped?" (`generate`'s stop_check_every)
STOP_CHECK_EVERY = 1
MIN_LENGTH_BUCKET = 16


@dataclass(frozen=True)
class Injection:
    """Vectors placed into the prompts during prefill (never during decode).

    vectors: [B, D] float, already scaled (see `verbalizer.scale_vectors`).
    positions: [B] int, index of the injected token in each row's *unpadded* prompt; -1 = none.
    layer: 0 = the input embeddings; L >= 1 = the residual stream after decoder block L-1,
        i.e. what transformers calls `hidden_states[L]` (so layer L is the input of block L).
    mode: "replace" (the embedding / residual at that token becomes the vector) or "add".
    """

    vectors: np.ndarray | Array
    positions: np.ndarray | Sequence[int]
    layer: int = 0
    mode: str = "replace"


@dataclass
class GenerationResult:
    """Output of `generate` for the caller's rows (bucket padding removed).

    tokens: [B, N] int32 generated tokens; the stop token is kept, later slots hold `pad_id`.
    lengths: [B] tokens generated, the stop token included.
    stopped: [B] True where a stop token ended the row (False: it hit max_new_tokens).
    logits: [B // group_size, N, V] float32 combined next-token logits that chose each token
        (only with return_logits=True; rows past `lengths` hold the logits of done rows).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    logits: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# buckets

def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def length_bucket(n: int, minimum: int = MIN_LENGTH_BUCKET) -> int:
    """Prompt-length bucket: the next power of two, at least `minimum`."""
    return max(minimum, _next_pow2(n))


def batch_bucket(n_groups: int, shards: int = 1) -> int:
    """Group-count bucket: next power of two, rounded up to a multiple of `shards` (data axes)."""
    b = max(_next_pow2(n_groups), 1)
    return int(math.ceil(b / shards) * shards)


# ---------------------------------------------------------------------------------------------
# token choice

def top_p_filter(logits: Array, top_p: Array, *, arity: int = 4) -> Array:
    """Keep the smallest set of highest-probability tokens whose mass reaches `top_p` (nucleus).

    logits [n, V] (already divided by the temperature); the rest become -inf.  A token is kept
    when the probability mass strictly above it is < top_p, so the top token always stays (and
    tokens tied with the last one kept stay too).  top_p >= 1 keeps every token.

    No sort and no cumulative sum over the vocabulary: with the vocabulary split over a tensor
    axis (a tensor-parallel verbalizer's LM head leaves it so), sort-and-cumsum took 1.2 s per
    [128, 152k] block on 2 H100s, some 150 decode steps of the 7B; on one GPU it is 1.7x this search
    (`crossmap bench top-p`, BENCHMARKS.md).  Instead the cut-off probability is found by searching
    its float32 bit pattern (for non-negative floats the integer order is the numeric order): the
    mass strictly above a candidate is one masked row sum, which splits over the vocabulary like
    any sum.  Each pass tests `arity - 1` candidates, so the 2**31 patterns close in
    ceil(31 / log2(arity)) passes over the row; 4 (16 passes) was among the fastest measured on
    an H100: wider passes re-read the row once per candidate.
    """
    if arity < 2:
        raise ValueError(f"top_p_filter: arity must be >= 2, got {arity}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # >= 0, ordered like probs
    steps = jnp.arange(1, arity, dtype=jnp.int32)  # candidate j splits the range at j / arity

    def narrow(_, bounds):
        lo, hi = bounds  # mass_above(hi) < top_p <= mass_above(lo) (lo = -1 stands for "below every token")
        d = hi - lo
        # lo + floor(d * j / arity), exactly and without overflowing int32
        cand = lo[:, None] + (d // arity)[:, None] * steps + ((d % arity)[:, None] * steps) // arity  # [n, k-1]
        mass = jnp.sum(jnp.where(bits[:, None, :] > cand[:, :, None], probs[:, None, :], 0.0), axis=-1)
        below = mass < top_p  # false ... false, true ... true along the candidates (mass falls as they rise)
        new_lo = jnp.max(jnp.where(below, lo[:, None], cand), axis=1)
        new_hi = jnp.min(jnp.where(below, cand, hi[:, None]), axis=1)
        return new_lo, new_hi

    hi = jnp.max(bits, axis=-1)  # nothing lies strictly above the top token
    lo = jnp.full_like(hi, -1)
    passes, width = 0, 2 ** 31  # the range is < 2**31 wide; each pass leaves at most ceil(width / arity)
    while width > 1:
        width, passes = -(-width // arity), passes + 1
    _, cut = jax.lax.fori_loop(0, passes, narrow, (lo, hi))
    return jnp.where((bits >= cut[:, None]) | (top_p >= 1.0), logits, -jnp.inf)


def invert_cdf(probs: Array, uniforms: Array, *, chunks: int = 512) -> Array:
    """Entries [n, K] of probs [n, V] at the uniforms [n, K] (in [0, 1)), by inverting each row's cumulative
    distribution: the entry where the running mass first exceeds u * (the row's mass).

    In two levels: the row's `chunks` chunk sums (one pass over the row with n * chunks outputs, where a
    cumsum over the whole row is a long scan per row; BENCHMARKS.md, "Nucleus sampling without the
    filter"), the chunk in their short cumsum, then the cumsum inside that chunk alone.  An entry without mass is never
    returned: a rounding past the last chunk or entry with mass is clipped to it.
    """
    if chunks < 1:
        raise ValueError(f"invert_cdf: chunks must be >= 1, got {chunks}")
    n, v = probs.shape
    length = -(-v // chunks)
    padded = jnp.pad(probs, ((0, 0), (0, chunks * length - v))).reshape(n, chunks, length)
    sums = jnp.sum(padded, axis=-1)  # [n, m]
    running = jnp.cumsum(sums, axis=-1)
    u = uniforms * running[:, -1:]
    last_chunk = chunks - 1 - jnp.argmax(sums[:, ::-1] > 0, axis=-1)
    chunk = jnp.minimum(jnp.sum(running[:, None, :] <= u[:, :, None], axis=-1), last_chunk[:, None])  # [n, K]
    before = jnp.where(chunk > 0, jnp.take_along_axis(running, jnp.maximum(chunk - 1, 0), axis=1), 0.0)
    rows = jnp.take_along_axis(padded, chunk[:, :, None], axis=1)  # [n, K, length]
    last_entry = length - 1 - jnp.argmax(rows[..., ::-1] > 0, axis=-1)
    entry = jnp.minimum(jnp.sum(jnp.cumsum(rows, axis=-1) <= (u - before)[..., None], axis=-1), last_entry)
    return chunk * length + entry


def sample_categorical(key: Array, logits: Array) -> Array:
    """One draw per row of logits [B, V] from softmax(logits), by inverting the row's cumulative
    distribution at one uniform number per row (`invert_cdf`).

    The same distribution as `jax.random.categorical`, which draws a Gumbel number for every
    vocabulary entry: at Qwen's 152k and Gemma's 262k entries those draws cost more on a CPU than
    the rest of the choice.  Entries at -inf (the top-p filter's) have no mass and are never drawn.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return invert_cdf(probs, jax.random.uniform(key, (logits.shape[0], 1), jnp.float32))[:, 0]


def sample_nucleus(key: Array, logits: Array, top_p: Array, *, candidates: int = 4) -> Array:
    """One draw per row of logits [B, V] from the nucleus of softmax(logits): the distribution of
    `sample_categorical(key, top_p_filter(logits, top_p))`, without the filter's 16 passes.

    Each row draws `candidates` tokens from the whole softmax and keeps the first that lies in the
    nucleus (by the filter's rule: less than top_p of mass strictly above it, one pass of K masked
    sums).  Every nucleus token keeps its relative weight, so what is kept is distributed as the
    renormalised nucleus.  A row misses all K with odds (1 - its nucleus mass)^K <= (1 - top_p)^K;
    rows that miss take the filter and sampler, in a branch that runs only when some row missed.
    """
    if candidates < 1:
        raise ValueError(f"sample_nucleus: candidates must be >= 1, got {candidates}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    draw_key, fallback_key = jax.random.split(key)
    tokens = invert_cdf(probs, jax.random.uniform(draw_key, (logits.shape[0], candidates), jnp.float32))
    p_token = jnp.take_along_axis(probs, tokens, axis=1)
    mass_above = jnp.sum(jnp.where(probs[:, None, :] > p_token[:, :, None], probs[:, None, :], 0.0), axis=-1)
    inside = (mass_above < top_p) | (top_p >= 1.0)
    chosen = jnp.take_along_axis(tokens, jnp.argmax(inside, axis=1)[:, None], axis=1)[:, 0]
    missed = ~jnp.any(inside, axis=1)
    return jax.lax.cond(
        jnp.any(missed),
        lambda: jnp.where(missed, sample_categorical(fallback_key, top_p_filter(logits, top_p)), chosen),
        lambda: chosen)


def _choose(logits: Array, key: Array, group_weights: Array, temperature: Array, top_p: Array, *,
            group_size: int, greedy: bool, use_top_p: bool) -> tuple[Array, Array]:
    """Combine logits [B, V] over groups and choose one token per group, repeated to [B]."""
    b, v = logits.shape
    if group_size == 1:
        combined = logits
    else:
        combined = jnp.einsum("ngv,g->nv", logits.reshape(b // group_size, group_size, v), group_weights)
    if greedy:
        chosen = jnp.argmax(combined, axis=-1)
    else:
        scaled = combined / temperature
        chosen = sample_nucleus(key, scaled, top_p) if use_top_p else sample_categorical(key, scaled)
    chosen = chosen.astype(jnp.int32)
    if group_size > 1:
        chosen = jnp.repeat(chosen, group_size, axis=0)
    return chosen, combined


# ---------------------------------------------------------------------------------------------
# the jitted program

@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "use_top_p", "inject_layer",
                                   "inject_mode", "group_size", "return_logits", "shared_prefix", "mesh",
                                   "rules_items", "stop_check_every"))
def _generate_program(state, tokens, valid, active, inj_vectors, inj_slots, group_weights, stop_ids, key,
                      temperature, top_p, pad_id, *, graphdef, max_new_tokens: int, greedy: bool,
                      use_top_p: bool, inject_layer: int | None, inject_mode: str, group_size: int,
                      return_logits: bool, shared_prefix: int, mesh: Mesh | None, rules_items: tuple | None,
                      stop_check_every: int):
    model = nnx.merge(graphdef, state)
    rules = dict(rules_items) if rules_items is not None else None
    batch, prompt_len = tokens.shape
    n_new = max_new_tokens
    cache_len = prompt_len + n_new

    def constrain_batch(x):
        return shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh, rules)

    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    row_lengths = valid.sum(axis=1).astype(jnp.int32)
    kv_valid = jnp.concatenate([valid, jnp.ones((batch, n_new), bool)], axis=1)

    # -- prefill, with the injection ---------------------------------------------------------
    x = model.embed_tokens(tokens)
    residual_add = None
    if inject_layer is not None:
        at_marker = (jnp.arange(prompt_len)[None, :] == inj_slots[:, None])[..., None]  # [B, P, 1]
        vec = inj_vectors[:, None, :]
        if inject_layer == 0:
            vec = vec.astype(x.dtype)
            x = jnp.where(at_marker, vec if inject_mode == "replace" else x + vec, x)
        else:
            delta = vec.astype(jnp.float32)
            if inject_mode == "replace":
                # The residual at the marker must *become* the vector: run the blocks before the
                # injection point once (no cache) to learn what is there, then add the difference.
                before, _ = model.run(x, positions, valid, stop_after=inject_layer - 1)
                delta = delta - before.astype(jnp.float32)
            residual_add = (inject_layer - 1, jnp.where(at_marker, delta, 0.0))
    # Slots 0..shared_prefix-1 hold the same tokens in every row and no injection: their keys and values
    # are computed once, for one row, and broadcast; the batch prefills only the rest of the prompt.
    n = shared_prefix
    if n:
        _, one = model.run(x[:1, :n], positions[:1, :n], kv_valid[:1], cache=model.init_cache(1, cache_len))
        cache = jax.tree.map(lambda a: jnp.broadcast_to(a, a.shape[:-4] + (batch,) + a.shape[-3:]), one)
    else:
        cache = model.init_cache(batch, cache_len)
    # the batch is axis -4 of every cache array; a scanned model's are stacked over its groups in front
    cache = jax.tree.map(lambda a: shd.constrain(a, ("layers",) * (a.ndim - 4) + ("batch", "kv_heads", "length",
                                                                                  "head_dim"), mesh, rules), cache)
    if residual_add is not None:
        residual_add = (residual_add[0], residual_add[1][:, n:])
    q_index = jnp.broadcast_to(jnp.arange(n, prompt_len, dtype=jnp.int32)[None], (batch, prompt_len - n))
    hidden, cache = model.run(x[:, n:], positions[:, n:], kv_valid, q_index=q_index, cache=cache,
                              residual_add=residual_add)
    logits = model.head(hidden[:, -1:])[:, 0]  # left padding: the last slot is every row's last token

    choose = partial(_choose, group_weights=group_weights, temperature=temperature, top_p=top_p,
                     group_size=group_size, greedy=greedy, use_top_p=use_top_p)

    def is_stop(tok):
        return (tok[:, None] == stop_ids[None, :]).any(axis=-1)

    done0 = ~active
    tok0, comb0 = choose(logits, jax.random.fold_in(key, 0))
    tok0 = jnp.where(done0, pad_id, tok0)
    out = jnp.full((batch, n_new), pad_id, jnp.int32).at[:, 0].set(tok0)
    lengths = jnp.where(done0, 0, 1).astype(jnp.int32)
    done = done0 | is_stop(tok0)
    logit_log = None
    if return_logits:
        logit_log = jnp.zeros((comb0.shape[0], n_new, comb0.shape[1]), jnp.float32).at[:, 0].set(comb0)

    # -- decode --------------------------------------------------------------------------------
    def running_before(end):
        """The loop condition: step t comes before `end` and some row is still generating."""
        def cond(carry):
            t, _, _, _, done, _, _ = carry
            return (t < end) & ~jnp.all(done)
        return cond

    def body(carry):
        t, cur, out, lengths, done, cache, logit_log = carry
        slot = prompt_len + t - 1  # where the token being fed (cur) goes
        x = model.embed_tokens(cur[:, None])
        pos = (row_lengths + t - 1)[:, None]
        q_idx = jnp.full((batch, 1), slot, jnp.int32)
        hidden, cache = model.run(x, pos, kv_valid, q_index=q_idx, cache=cache)
        step_logits = model.head(hidden)[:, 0]
        tok, comb = choose(step_logits, jax.random.fold_in(key, t))
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        if logit_log is not None:
            logit_log = jax.lax.dynamic_update_slice_in_dim(logit_log, comb[:, None], t, axis=1)
        return t + 1, tok, out, lengths, done | is_stop(tok), cache, logit_log

    carry = (jnp.int32(1), tok0, out, lengths, done, cache, logit_log)
    # A while loop whose condition reads device data makes the host wait for every step to finish before it
    # launches the next (XLA copies the predicate back), leaving the GPU idle meanwhile.  So the stop test runs
    # once every `stop_check_every` steps: an outer loop over whole chunks, each an inner loop of a fixed trip
    # count, which XLA runs without asking the device; the steps left over (fewer than a chunk) test every step.
    # Rows that stop inside a chunk write pad_id, as above, so only time is spent, at most a chunk's worth.
    steps = n_new - 1
    chunk = min(stop_check_every, steps)
    if chunk > 1:  # steps 1 .. whole in chunks, then the rest
        whole = steps - steps % chunk
        carry = jax.lax.while_loop(running_before(whole + 1),
                                   lambda c: jax.lax.fori_loop(0, chunk, lambda _, c: body(c), c), carry)
    carry = jax.lax.while_loop(running_before(n_new), body, carry)
    _, _, out, lengths, done, _, logit_log = carry
    stopped = done & active
    out, lengths, stopped = constrain_batch(out), constrain_batch(lengths), constrain_batch(stopped)
    return out, lengths, stopped, logit_log


# ---------------------------------------------------------------------------------------------
# host side

def shared_prefix_length(tokens: np.ndarray, valid: np.ndarray, inj_slots: np.ndarray) -> int:
    """Leading slots identical in every row (tokens and padding) and before every injected slot,
    rounded down to a multiple of MIN_LENGTH_BUCKET (few compiled variants), leaving at least one slot.

    A verbalizer's rows share their whole prompt up to the marker (the release template: 111 of 125
    tokens), so prefill computes that part once instead of once per row.
    """
    same = (tokens == tokens[:1]).all(axis=0) & (valid == valid[:1]).all(axis=0)
    n = int(np.argmin(same)) if not same.all() else tokens.shape[1]
    injected = inj_slots[inj_slots >= 0]
    if injected.size:
        n = min(n, int(injected.min()))
    n = min(n, tokens.shape[1] - 1)
    return n // MIN_LENGTH_BUCKET * MIN_LENGTH_BUCKET


def _as_key(seed_or_key) -> Array:
    """An int seed or a PRNG key (typed, or raw uint32 data from jax.random.PRNGKey) -> typed key."""
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    if jnp.issubdtype(seed_or_key.dtype, jax.dtypes.prng_key):
        return seed_or_key
    return jax.random.wrap_key_data(jnp.asarray(seed_or_key))


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        raise ValueError("prompts must be a batch: a list of token-id sequences or a 2-D array, got a 1-D array")
    rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: nothing to generate")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of token ids, got shape {r.shape}")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"prompt {i} holds {r.dtype} values; token ids must be integers")
        if r.min() < 0 or r.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token id {int(r.max() if r.max() >= vocab_size else r.min())} "
                             f"outside the vocabulary [0, {vocab_size})")
    return rows


def generate(model, prompts: Sequence[Sequence[int]] | np.ndarray, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, key: int | Array = 0,
             stop_token_ids: Sequence[int] | None = None, use_model_eos: bool = True,
             injection: Injection | None = None, group_size: int = 1,
             group_weights: Sequence[float] | None = None, pad_id: int | None = None,
             mesh: Mesh | None = None, rules: dict | None = None, length_bucket_min: int = MIN_LENGTH_BUCKET,
             batch_size_bucket: int | None = None, return_logits: bool = False,
             share_prefix: bool = True, stop_check_every: int = STOP_CHECK_EVERY) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after each prompt (ragged lengths are left padded).

    model: a crossmap `Transformer`.  prompts: B token-id sequences (or a [B, T] array, every row
    real).  temperature <= 0 is greedy (argmax); otherwise softmax sampling at `temperature`,
    restricted to the top-`top_p` nucleus when top_p < 1, with `key` (an int seed or a jax PRNG
    key; step t uses fold_in(key, t)).  A row stops after a token in `stop_token_ids` (plus the
    model config's `eos_token_ids` when `use_model_eos`); later slots hold `pad_id`.

    group_size / group_weights: consecutive groups of rows share each chosen token, picked from
    sum_r w_r * logits_r (see the module docstring); B must be a multiple of group_size.
    mesh: batch split over the data axes (parameters stay where they are placed).  Batch and
    prompt length are padded up to buckets so repeated calls reuse compiled programs;
    `batch_size_bucket` fixes the padded group count instead (>= the groups in this call).
    share_prefix: prefill the leading slots that every row shares (same tokens, before any injection)
    once and broadcast their cache (`shared_prefix_length`); False prefills every row in full.
    stop_check_every: steps between tests of "has every row stopped?" (1: every step).  Each test is a
    host-device round trip; a larger value lets the steps between run back to back, at the cost of up to
    stop_check_every - 1 steps run after the last row stopped.  The tokens do not depend on it.
    """
    cfg = model.config
    rows = _check_prompts(prompts, cfg.vocab_size)
    n_rows = len(rows)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise ValueError(f"stop_check_every must be an int >= 1, got {stop_check_every!r}")
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"{n_rows} prompts do not split into groups of group_size={group_size}")
    weights = np.ones(group_size, np.float32) if group_weights is None else np.asarray(group_weights, np.float32)
    if weights.shape != (group_size,):
        raise ValueError(f"group_weights has shape {weights.shape}, expected ({group_size},)")
    if not np.isfinite(temperature) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need a finite temperature and 0 < top_p <= 1, got temperature={temperature}, "
                         f"top_p={top_p}")
    stops = list(stop_token_ids or []) + (list(cfg.eos_token_ids) if use_model_eos else [])
    stop_ids = np.asarray(sorted(set(int(s) for s in stops)), np.int32)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0)

    # -- buckets: pad the prompt length and the number of groups ---------------------------------
    shards = shd.batch_shards(mesh, rules)
    n_groups = n_rows // group_size
    groups_bucket = batch_bucket(n_groups, shards) if batch_size_bucket is None else int(batch_size_bucket)
    if groups_bucket < n_groups or groups_bucket * group_size % shards:
        raise ValueError(f"batch_size_bucket={batch_size_bucket} cannot hold {n_groups} groups split {shards} ways")
    batch = groups_bucket * group_size
    longest = max(len(r) for r in rows)
    prompt_len = length_bucket(longest, length_bucket_min)
    tokens = np.full((batch, prompt_len), pad_id, np.int32)
    valid = np.zeros((batch, prompt_len), bool)
    for i in range(batch):
        r = rows[i] if i < n_rows else rows[i % group_size]  # filler rows copy a real group
        tokens[i, prompt_len - len(r):] = r
        valid[i, prompt_len - len(r):] = True
    active = np.arange(batch) < n_rows

    # -- injection --------------------------------------------------------------------------------
    inject_layer = None
    inject_mode = "replace"
    inj_vectors = np.zeros((batch, 1), np.float32)
    inj_slots = np.full((batch,), -1, np.int32)
    if injection is not None:
        inject_layer, inject_mode = int(injection.layer), injection.mode
        if inject_mode not in INJECTION_MODES:
            raise ValueError(f"injection.mode must be one of {INJECTION_MODES}, got {inject_mode!r}")
        if not 0 <= inject_layer <= cfg.n_layers:
            raise ValueError(f"injection.layer={inject_layer} out of range: 0 (embeddings) .. {cfg.n_layers} "
                             f"(after the last of {cfg.n_layers} blocks)")
        vec = np.asarray(injection.vectors, np.float32)
        if vec.shape != (n_rows, cfg.d_model):
            raise ValueError(f"injection.vectors has shape {vec.shape}, expected ({n_rows}, {cfg.d_model}) "
                             f"(one d_model={cfg.d_model} vector per prompt)")
        bad = np.flatnonzero(~np.isfinite(vec).all(axis=1))
        if bad.size:
            raise ValueError(f"injection.vectors row {int(bad[0])} contains NaN or inf")
        pos = np.asarray(injection.positions, np.int64).reshape(-1)
        if pos.shape != (n_rows,):
            raise ValueError(f"injection.positions has {pos.size} entries for {n_rows} prompts")
        inj_vectors = np.zeros((batch, cfg.d_model), np.float32)
        for i in range(batch):
            src = i if i < n_rows else i % group_size
            p = int(pos[src])
            if p < -1 or p >= len(rows[src]):
                raise ValueError(f"injection.positions[{src}]={p} is outside prompt {src} "
                                 f"(length {len(rows[src])}); use -1 for no injection")
            inj_vectors[i] = vec[src]
            inj_slots[i] = -1 if p == -1 else prompt_len - len(rows[src]) + p

    shared = shared_prefix_length(tokens, valid, inj_slots) if share_prefix else 0
    greedy = temperature <= 0.0
    args = [tokens, valid, active, inj_vectors, inj_slots]
    if mesh is not None:
        args = [shd.shard_batch(a, mesh, rules) for a in args]
    graphdef, state = nnx.split(model)
    out, lengths, stopped, logit_log = _generate_program(
        state, *args, jnp.asarray(weights), jnp.asarray(stop_ids), _as_key(key),
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), jnp.int32(pad_id),
        graphdef=graphdef, max_new_tokens=int(max_new_tokens), greedy=greedy, use_top_p=(top_p < 1.0 and not greedy),
        inject_layer=inject_layer, inject_mode=inject_mode, group_size=group_size, return_logits=return_logits,
        shared_prefix=shared, mesh=mesh, rules_items=None if rules is None else tuple(sorted(rules.items())),
        stop_check_every=stop_check_every)
    out, lengths, stopped = (shd.to_host(a)[:n_rows] for a in (out, lengths, stopped))
    logits = None if logit_log is None else shd.to_host(logit_log)[:n_groups]
    return GenerationResult(tokens=out, lengths=lengths, stopped=stopped, logits=logits)
