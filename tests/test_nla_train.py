"""NLA training (crossmap.nla.train): losses and one optimiser step against PyTorch, GRPO's pieces against
NumPy, kill and resume, export through the release loader, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nla_release import _torch_decoder

from crossmap.models import load_model
from crossmap.models.hf_layout import hf_param_table, to_hf_tensors
from crossmap.models.registry import architecture_for
from crossmap.models.synthetic import random_hf_arrays, tiny_config
from crossmap.models.tiny import tiny_checkpoint
from crossmap.nla import lora as lora_lib
from crossmap.nla.meta import pick_marker, read_nla_meta, write_nla_meta
from crossmap.nla.objectives import (
    ar_sft_loss,
    av_sft_loss,
    group_advantages,
    grpo_loss,
    kl_k3,
    response_logprobs,
)
from crossmap.nla.train import (
    AVData,
    Learner,
    NonFiniteStep,
    ar_batch,
    assistant_end_id,
    encode_ar,
    encode_responses,
    make_optimizer,
    stack,
    train_nla,
    truncated,
)
from crossmap.nla.train_config import base_train_config, validate_train_config
from crossmap.nla.train_data import collect_examples, wrap_explanation
from crossmap.verbalize.spec import build_prompt
from crossmap.verbalize.verbalizer import rescale_rows

ROOT = Path(__file__).resolve().parents[1]
LAYER = 1


def _pure(model):
    return nnx.to_pure_dict(nnx.split(model)[1])


def _av_setup(arch: str, tmp: Path, texts: list[str], seed: int = 0):
    """A tiny base model, its AV sidecar, and an encoded AV batch of `texts` with random vectors."""
    from crossmap.nla.verbalizer import nla_verbalizer_spec

    base = tiny_checkpoint(arch)
    lm = load_model(base, dtype="float32")
    tok = lm.tokenizer
    for role in ("av", "ar"):
        (tmp / role).mkdir(parents=True, exist_ok=True)
        write_nla_meta(tmp / role, role=role, tokenizer=tok, d_model=lm.config.d_model, injection_char=pick_marker(tok),
                       injection_scale=7.0, extraction_layer=LAYER)
    meta = read_nla_meta(tmp / "av", role="av")
    prompt = build_prompt(tok, nla_verbalizer_spec(meta))
    ids, lengths = encode_responses(tok, texts, assistant_end_id(tok, "chat"), 24, wrap_explanation)
    vectors = np.random.default_rng(seed).standard_normal((len(texts), lm.config.d_model)).astype(np.float32)
    data = AVData(np.asarray(prompt.token_ids, np.int32), prompt.marker_index, ids, lengths, rescale_rows(vectors, 7.0))
    return base, lm, data, vectors


def _torch_av_loss(model, batch, prompt_len: int, marker: int):
    """The same loss in PyTorch: the vector over the marker's input embedding (Gemma's scale inside the
    embedding module), cross-entropy on the response slots."""
    import torch

    tokens = torch.as_tensor(np.asarray(batch.tokens), dtype=torch.long)
    embeds = model.get_input_embeddings()(tokens).float().clone()
    embeds[:, marker] = torch.as_tensor(np.asarray(batch.vectors))
    logits = model(inputs_embeds=embeds, attention_mask=torch.as_tensor(np.asarray(batch.valid), dtype=torch.long)).logits
    logp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), dim=-1)
    picked = logp.gather(-1, tokens[:, prompt_len:, None])[..., 0]
    mask = torch.as_tensor(np.asarray(batch.loss_mask))
    return -(picked * mask).sum() / mask.sum()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_sft_losses_at_step_zero_equal_pytorch(arch, tmp_path):
    import torch

    texts = ['"...the cat sat"\n"sat"', '"...import os"\n"os"', '"a word"\n"word"']
    base, lm, data, vectors = _av_setup(arch, tmp_path, texts)
    batch = data.batch(np.arange(len(texts)))
    P, M = len(data.prompt), data.marker
    ours, _ = av_sft_loss(lm.model, batch, P, M)
    torch_model = _torch_decoder(base)
    with torch.no_grad():
        theirs = _torch_av_loss(torch_model, batch, P, M)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=2e-5)

    # the AR: blocks 0..K, no final norm, head on the last token, MSE of sqrt(d)-normalised vectors
    ar_meta = read_nla_meta(tmp_path / "ar", role="ar")
    tokens, valid, last = encode_ar(lm.tokenizer, ar_meta, texts, 64)
    abstract, params = truncated(lm.model, LAYER)
    head = np.random.default_rng(1).standard_normal((lm.config.d_model,) * 2).astype(np.float32) / 8
    ours_ar, _ = ar_sft_loss(nnx.merge(nnx.split(abstract)[0], params), jnp.asarray(head),
                             ar_batch(tokens, valid, last, vectors, np.arange(len(texts))))
    torch_model.model.layers = torch_model.model.layers[:LAYER + 1]
    torch_model.model.norm = torch.nn.Identity()  # the AR reads block K's output, never the final norm
    with torch.no_grad():
        hidden = torch_model.model(torch.as_tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.as_tensor(valid, dtype=torch.long)).last_hidden_state
    at_last = hidden[np.arange(len(texts)), last]
    predicted = at_last @ torch.as_tensor(head).T
    d = predicted.shape[-1]
    unit = lambda x: x * (d ** 0.5) / x.norm(dim=-1, keepdim=True)  # noqa: E731
    theirs_ar = ((unit(predicted) - unit(torch.as_tensor(vectors))) ** 2).mean()
    np.testing.assert_allclose(float(ours_ar), float(theirs_ar), rtol=2e-5)


def test_one_optimiser_step_equals_optax_on_pytorch_gradients(tmp_path):

    texts = ['"...the cat sat"\n"sat"', '"...import os"\n"os"']
    base, lm, data, _ = _av_setup("qwen2", tmp_path, texts)
    batch = data.batch(np.arange(len(texts)))
    P, M = len(data.prompt), data.marker
    c = base_train_config()
    c.av_sft.warmup_steps, c.av_sft.lr, c.av_sft.weight_decay = 0, 1e-3, 0.01
    params0 = jax.tree.map(np.asarray, _pure(lm.model))
    learner = Learner(nnx.split(lm.model)[0], None, {"model": jax.tree.map(jnp.array, params0)}, alpha=1.0,
                      compute_dtype="float32", optimizer=make_optimizer(c.av_sft),
                      loss_fn=lambda m, _t, b: av_sft_loss(m, b, P, M))
    learner.step(stack([batch]), "test")
    ours = jax.tree.map(np.asarray, learner.state["trainable"]["model"])

    torch_model = _torch_decoder(base)
    loss = _torch_av_loss(torch_model, batch, P, M)
    loss.backward()
    table = hf_param_table(lm.config, architecture_for("qwen2").NORM_NAMES)
    grads = jax.tree.map(np.zeros_like, params0)
    for name, p in torch_model.named_parameters():
        path, convert = table[name]
        node = grads
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = convert(p.grad.numpy()) if p.grad is not None else node[path[-1]]
    optimizer = make_optimizer(c.av_sft)
    updates, _ = optimizer.update(grads, optimizer.init(params0), params0)
    expected = jax.tree.map(lambda p, u: np.asarray(p + u), params0, updates)
    # Adam's first update is lr * g / (|g| + eps): entries whose gradient is float32 noise (|g| below 1e-5 of
    # the largest) may take either sign in two correct implementations, so they are left out, and counted
    flat_g = np.concatenate([np.abs(g).ravel() for g in jax.tree.leaves(grads)])
    floor = 1e-5 * flat_g.max()
    checked = skipped = 0
    for o, e, g in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), jax.tree.leaves(grads), strict=True):
        solid = np.abs(g) > floor
        np.testing.assert_allclose(o[solid], e[solid], rtol=1e-5, atol=1e-6)
        checked, skipped = checked + int(solid.sum()), skipped + int((~solid & (g != 0)).sum())
    assert checked > 0.9 * flat_g.size and skipped < 0.01 * flat_g.size


def test_grpo_advantages_kl_and_loss_equal_numpy(tmp_path):
    rng = np.random.default_rng(0)
    rewards = rng.standard_normal(12).astype(np.float32)
    r = rewards.reshape(3, 4).astype(np.float64)
    want = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).ravel()
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(rewards), 4)), want, rtol=1e-5, atol=1e-6)
    logp, ref = -rng.random((5, 7)).astype(np.float32) * 3, -rng.random((5, 7)).astype(np.float32) * 3
    np.testing.assert_allclose(np.asarray(kl_k3(jnp.asarray(logp), jnp.asarray(ref))),
                               np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-6)

    texts = ['"...the cat sat"\n"sat"', '"...import os"\n"os"', '"x"\n"y"', '"a"\n"b"']
    _, lm, data, _ = _av_setup("qwen2", tmp_path, texts)
    batch = data.batch(np.arange(4))
    P, M = len(data.prompt), data.marker
    adv = np.asarray(group_advantages(jnp.asarray(rng.standard_normal(4).astype(np.float32)), 2))
    ref_logp = np.asarray(response_logprobs(lm.model, batch, P, M)) - 0.1 * np.asarray(batch.loss_mask)
    loss, metrics = grpo_loss(lm.model, batch, P, M, jnp.asarray(adv), jnp.asarray(ref_logp), 0.05)
    lp = np.asarray(response_logprobs(lm.model, batch, P, M), np.float64)
    mask = np.asarray(batch.loss_mask, np.float64)
    k3 = np.exp(ref_logp - lp) - (ref_logp - lp) - 1
    per_seq = ((-adv[:, None] + 0.05 * k3) * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(float(loss), per_seq.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), ((k3 * mask).sum(1) / mask.sum(1)).mean(), rtol=1e-5)


def test_lora_merge_and_adapter_file_round_trip(tmp_path):
    cfg = tiny_config("qwen2")
    from crossmap.models import init_random

    params = _pure(init_random(cfg, seed=0))
    adapters = lora_lib.init_adapters(params, 4, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B is zero at init: make the update visible
    merged = lora_lib.merge_adapters(params, adapters, alpha=8.0)
    w = np.asarray(params["layers"][0]["attn"]["o"])
    a, b = (np.asarray(adapters["layers/0/attn/o"][k]) for k in "ab")
    want = w + 2.0 * np.einsum("nhr,rd->nhd", a, b)
    np.testing.assert_allclose(np.asarray(merged["layers"][0]["attn"]["o"]), want, rtol=1e-5, atol=1e-6)
    lora_lib.save_adapter_file(tmp_path, adapters, rank=4, alpha=8.0, dtype="float32")
    back, alpha = lora_lib.read_adapter_file(tmp_path, params)
    assert alpha == 8.0 and set(back) == set(adapters)
    for path in adapters:
        for k in "ab":
            np.testing.assert_array_equal(np.asarray(back[path][k]), np.asarray(adapters[path][k]))


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_hf_export_layout_inverts_the_loader(arch):
    cfg = tiny_config(arch)
    module = architecture_for(cfg.model_type)
    arrays = random_hf_arrays(cfg, seed=0)
    table = hf_param_table(cfg, module.NORM_NAMES)
    ours: dict = {}
    for name, (path, convert) in table.items():
        node = ours
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = convert(arrays[name])
    back = to_hf_tensors(cfg, module.NORM_NAMES, ours)
    assert set(back) == set(table)
    for name in table:
        np.testing.assert_array_equal(np.asarray(back[name]), arrays[name])


def test_a_step_sharded_over_data_and_fsdp_equals_one_device():
    from conftest import run_with_devices

    out = run_with_devices("""
        import json, sys
        sys.path.insert(0, TESTS_DIR)
        import jax, numpy as np
        from pathlib import Path
        import tempfile
        from crossmap import sharding as shd
        from crossmap.nla.train import Learner, _learner_parts, logical_tree, make_optimizer, stack, _pure
        from crossmap.nla.train_config import base_train_config
        from crossmap.nla.objectives import av_sft_loss
        from crossmap.models import load_model
        from flax import nnx
        from test_nla_train import _av_setup
        texts = ['"a b c"\\n"c"', '"d e"\\n"e"', '"f"\\n"g"', '"h i"\\n"i"']
        _, lm, data, _ = _av_setup("qwen2", Path(tempfile.mkdtemp()), texts)
        batch = stack([data.batch(np.arange(4))])
        P, M = len(data.prompt), data.marker
        losses, specs = [], []
        for mesh in (None, shd.make_mesh({"data": 2, "fsdp": 2})):
            for mode in ("full", "lora"):
                c = base_train_config()
                c.finetune.mode = mode
                model = load_model(lm.path, dtype="float32", mesh=mesh).model
                frozen, trainable = _learner_parts(c, _pure(model), logical_tree(model), mesh, jax.random.key(0))
                learner = Learner(nnx.split(model)[0], frozen, trainable, alpha=32.0, compute_dtype="float32",
                                  optimizer=make_optimizer(c.av_sft), loss_fn=lambda m, _t, b: av_sft_loss(m, b, P, M))
                losses.append([learner.step(batch, "t")["loss"] for _ in range(3)])
                leaf = jax.tree.leaves(learner.state["trainable"])[0]
                specs.append(str(leaf.sharding.spec) if mesh is not None else "")
        print(json.dumps({"losses": losses, "specs": specs}))
    """.replace("TESTS_DIR", repr(str(ROOT / "tests"))), n_devices=4)
    one, sharded = out["losses"][:2], out["losses"][2:]
    np.testing.assert_allclose(sharded, one, rtol=1e-4)
    assert "fsdp" in out["specs"][2] and "fsdp" in out["specs"][3]  # the embedding (full) and an adapter A (LoRA)


# ------------------------------------------------------------------------------------------ whole runs
def _raw_base(root: Path) -> Path:
    """The tiny Gemma checkpoint without its chat template: a base model the AV renders raw, with BOS."""
    out = root / "tiny-gemma-base"
    if not out.exists():
        shutil.copytree(tiny_checkpoint("gemma3"), out)
        (out / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _tiny_train_config(base: Path, run_dir: Path):
    c = base_train_config()
    c.model.path, c.model.layer = str(base), LAYER
    c.run_dir = str(run_dir)
    c.corpus.max_documents, c.corpus.positions_per_doc, c.corpus.max_length, c.corpus.buckets = 48, 4, 64, (64,)
    for phase in ("av_sft", "ar_sft"):
        c[phase].steps, c[phase].batch_size, c[phase].warmup_steps = 4, 4, 1
    c.rl.steps, c.rl.batch_size, c.rl.group_size = 3, 2, 2
    c.finetune.rank = 4
    c.nla.response_tokens, c.nla.ar_tokens = 40, 64
    c.eval.max_examples, c.eval.batch_size, c.eval.self_verbalizer = 6, 8, False
    c.checkpoint_every, c.log_every = 2, 1
    return c


_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_nla_train import _tiny_train_config
from crossmap.nla.train import train_nla
from pathlib import Path
c = _tiny_train_config(Path({base!r}), Path({run!r}))
train_nla(c, progress=False)
"""


def _run_in_subprocess(base: Path, run_dir: Path, failpoint: str | None) -> int:
    # the three runs share compiled programs through a cache kept beside the base model (the same programs, so the
    # same numbers: the resumed run is still compared with the uninterrupted one compiled in this process)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(base.parent / "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("CROSSMAP_FAILPOINT", None)
    if failpoint:
        env["CROSSMAP_FAILPOINT"] = failpoint
    code = _SCRIPT.format(tests=str(ROOT / "tests"), base=str(base), run=str(run_dir))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True).returncode


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nla-train")
    base = _raw_base(root)
    summary = train_nla(_tiny_train_config(base, root / "run"), progress=False)
    return base, root, summary


def _adapter_tensors(run_dir: Path) -> dict:
    from crossmap.models.checkpoint_files import iter_safetensors_file

    out = {}
    for role in ("av", "ar"):
        for name, value in iter_safetensors_file(run_dir / "export" / role / "adapter" / "adapter_model.safetensors"):
            out[f"{role}/{name}"] = np.asarray(value, np.float32)
        head = dict(iter_safetensors_file(run_dir / "export" / "ar" / "value_head.safetensors"))["weight"]
        out["ar/head"] = np.asarray(head, np.float32)
    return out


def test_a_run_killed_twice_resumes_to_the_same_weights(trained):
    base, root, summary = trained
    run_dir = root / "killed"
    # The failpoint fires after each step, before that step's checkpoint (every 2 steps and at the end).
    assert _run_in_subprocess(base, run_dir, "nla_train_step:3") == -9  # av_sft step 3; resumes at 2
    assert _run_in_subprocess(base, run_dir, "nla_train_step:9") == -9  # av 3-4, ar 1-4, rl 1-3: rl resumes at 2
    assert _run_in_subprocess(base, run_dir, None) == 0
    ours, want = _adapter_tensors(run_dir), _adapter_tensors(root / "run")
    assert set(ours) == set(want)
    for name in want:
        np.testing.assert_array_equal(ours[name], want[name], err_msg=name)
    resumed = json.loads((run_dir / "eval.json").read_text())
    assert resumed["after_rl"]["cosines"] == summary["after_rl"]["cosines"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [(p, s) for p, n in (("av_sft", 4), ("ar_sft", 4), ("rl", 3))
                                                        for s in range(1, n + 1)]


def test_exported_pair_loads_through_the_release_loader_and_reproduces_training(trained):
    from crossmap.nla import Reconstructor, load_nla_verbalizer

    _, root, summary = trained
    export = root / "run" / "export"
    nla = load_nla_verbalizer(export / "av", dtype="bfloat16")
    assert nla.meta.av_render == "raw" and not nla.verbalizer.spec.use_chat_template
    train_meta = read_nla_meta(root / "run" / "av", role="av")
    assert nla.meta.injection_char == train_meta.injection_char
    vectors = np.load(root / "run" / "data" / "examples.npz")["vectors"][summary["eval_rows"]]
    explained = nla.verbalizer.explain(vectors, max_new_tokens=40, temperature=0.0, batch_size=8, progress=False)
    assert [e.parsed[0] for e in explained] == summary["after_rl"]["explanations"]
    ar = Reconstructor(export / "ar", dtype="bfloat16")
    cos = ar.score(summary["after_rl"]["explanations"], vectors)
    np.testing.assert_allclose(cos, summary["after_rl"]["cosines"], atol=2e-3)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_training_input_is_refused_naming_the_cause(tmp_path, trained):
    base = _raw_base(tmp_path)
    c = _tiny_train_config(base, tmp_path / "a")
    c.model.layer = 9
    with pytest.raises(ValueError, match=r"model.layer=9 is out of range .* which has 7 blocks"):
        train_nla(c, progress=False)

    c = _tiny_train_config(base, tmp_path / "b")
    c.rl.group_size, c.corpus.split_fractions = 1, (0.5, 0.5, 0.2, 0.1)
    with pytest.raises(ValueError) as err:
        validate_train_config(c)
    assert "rl.group_size=1" in str(err.value) and "corpus.split_fractions" in str(err.value)

    lm = load_model(base, dtype="float32")
    from crossmap.models import make_hidden_fn

    fn = make_hidden_fn(lm.model, LAYER)
    with pytest.raises(ValueError, match="split 'eval' has 0 positions"):
        collect_examples(fn, lm.tokenizer, ["one two three four five six seven"] * 3, positions_per_doc=2, seed=0,
                         max_length=32, buckets=(32,), progress=False)
    with pytest.raises(ValueError, match="split 'av_sft' has 0 positions"):
        collect_examples(fn, lm.tokenizer, ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"], positions_per_doc=2,
                         seed=0, max_length=32, buckets=(32,), skip_first=2, progress=False)

    # a step whose loss is not finite is refused, named, and leaves the last checkpoint as it was
    c = _tiny_train_config(base, tmp_path / "c")
    c.av_sft.lr, c.av_sft.max_grad_norm, c.checkpoint_every = 1e38, 1e38, 1
    with pytest.raises(NonFiniteStep, match=r"av_sft step \d+") as err:
        train_nla(c, progress=False)
    failed = int(str(err.value).split("av_sft step ")[1].split(":")[0])
    steps = sorted(int(p.name) for p in (tmp_path / "c" / "ckpt" / "av_sft").iterdir() if p.name.isdigit())
    assert steps and max(steps) == failed - 1 and not (tmp_path / "c" / "export").exists()

    # a run directory started with other settings is not reused
    _, root, _ = trained
    c = _tiny_train_config(base, root / "run")
    c.av_sft.lr = 1e-3
    with pytest.raises(ValueError, match="av_sft changed"):
        train_nla(c, progress=False)


def test_generated_targets_are_the_instruct_models_greedy_answers(tmp_path):
    """targets.source='generated': the local instruct model's greedy answer to the generator prompt, through
    crossmap's engine, equals transformers' greedy decoding of the same chat prompt."""
    import torch

    from crossmap.nla.train_data import GENERATOR_PROMPT, Examples, generated_explanations

    base = tiny_checkpoint("qwen2")
    lm = load_model(base, dtype="float32")
    examples = Examples(np.zeros((2, lm.config.d_model), np.float32), np.zeros(2, np.int32), np.zeros(2, np.int32),
                        np.zeros(2, np.int8), ["the cat sat on the mat", "import os and sys"], ["mat", "sys"])
    ours = generated_explanations(lm.model, lm.tokenizer, examples, [0, 1], max_new_tokens=6, progress=False)
    torch_model = _torch_decoder(base)
    stop = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, context in enumerate(examples.contexts):
        ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": GENERATOR_PROMPT.format(context=context)}],
                                               tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        new = []
        with torch.no_grad():
            for _ in range(6):
                tok = int(torch_model(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(tok)
                if tok in (stop, *lm.config.eos_token_ids):
                    break
        want = " ".join(lm.tokenizer.decode(new, skip_special_tokens=True).split()).replace('"', "'")
        assert ours[row] == want
