"""The reference experiment at full scale: Qwen2.5-7B-Instruct (output of block 20) ->
Gemma-3-27B-it (output of block 41), 45 features of a public Qwen2.5-7B-Instruct SAE at layer 20,
explained by the released NLA verbalizers of both models, against random-direction controls, and
scored again without a sentence embedder by the released reconstructors (round trips).

Only paths change for a researcher with the weights on disk, e.g.

    crossmap run --config configs/paper.py \\
        --config.models.source.path=/ckpt/Qwen2.5-7B-Instruct \\
        --config.models.target.path=/ckpt/gemma-3-27b-it \\
        --config.sae.path=/ckpt/qwen2.5-7b-instruct-sae/blocks.20.hook_resid_post \\
        --config.verbalizers.source.checkpoint=/ckpt/nla-qwen2.5-7b-L20-av \\
        --config.verbalizers.target.checkpoint=/ckpt/nla-gemma3-27b-L41-av \\
        --config.reconstructors.source.checkpoint=/ckpt/nla-qwen2.5-7b-L20-ar \\
        --config.reconstructors.target.checkpoint=/ckpt/nla-gemma3-27b-L41-ar \\
        --config.corpus.path=/data/corpus.jsonl

or edit the PATHS block below.  On a multi-GPU node or a TPU slice use launch/ (the mesh spans
all devices; tensor parallelism inside a host, data parallelism across).
"""

from crossmap.pipeline import base_config

PATHS = {
    "source": "/models/Qwen2.5-7B-Instruct",
    "target": "/models/gemma-3-27b-it",
    "sae": "/models/saes/qwen2.5-7b-instruct/blocks.20.hook_resid_post",
    "source_verbalizer": "/models/nla-qwen2.5-7b-L20-av",
    "target_verbalizer": "/models/nla-gemma3-27b-L41-av",
    "source_reconstructor": "/models/nla-qwen2.5-7b-L20-ar",  # "" = no round trip on that side
    "target_reconstructor": "/models/nla-gemma3-27b-L41-ar",
    "corpus": "",  # "" = the shipped corpus; a real run wants ~1M+ paired tokens of chat-shaped text
}


def get_config():
    c = base_config()
    c.name = "paper"
    # tensor parallel over the devices of each host (0 = jax.local_device_count()), data parallel across
    # hosts: the same config on a 4- or 8-GPU node, several nodes, or a TPU slice
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 0}
    c.models.source.path = PATHS["source"]
    c.models.source.layer = 20
    c.models.source.dtype = "bfloat16"
    c.models.source.chat = True
    c.models.target.path = PATHS["target"]
    c.models.target.layer = 41
    c.models.target.dtype = "bfloat16"
    c.models.target.chat = True
    c.corpus.path = PATHS["corpus"]
    c.corpus.max_length = 1024
    # padded lengths; 128 for short documents: at the 7B/27B shapes on the shipped corpus (45-70 tokens
    # a document) a 256 floor left most of every batch as padding (BENCHMARKS.md, "The paper config")
    c.corpus.buckets = (128, 256, 512, 1024)
    c.corpus.batch_size = 64
    c.ridge.folds = 5
    c.ridge.lambdas = tuple(float(10.0 ** (e / 2)) for e in range(0, 16))  # 16 lambdas, 1 .. 3e7
    c.ridge.keep_pairs = 200_000  # host sample for SAE stats and evaluation: 200k x (3584 + 5376) floats = 7 GB
    c.sae.path = PATHS["sae"]
    c.features.method = "random"
    c.features.n = 45
    c.controls.n = 45
    c.controls.mode = "source"
    c.mapping.scale = "target_norm"
    for side in ("source", "target"):
        v = c.verbalizers[side]
        v.kind = "nla"
        v.checkpoint = PATHS[f"{side}_verbalizer"]
        v.scale = ""  # the sidecar's extraction.injection_scale (150 for Qwen2.5-7B, 60000 for Gemma-3-27B)
        # the release's generation settings: 200 new tokens at the authors' command-line temperature, no nucleus
        v.max_new_tokens = 200
        v.temperature = 0.7
        v.top_p = 1.0
        v.n_samples = 4
        v.batch_size = 128
        v.dtype = "bfloat16"
        # q/k/v and gate/up as one product each (the AV's own model, fused in place); BENCHMARKS.md, "Fused
        # projections and the decode-attention kernel"
        v.projections = "fused"
        # the 7B AV's down product in 2 slices of d_ff (1.5% off its decode step on an H100); the 27B's is unmeasured
        # (BENCHMARKS.md, "Slicing the down product")
        v.down_slices = 2 if side == "source" else 1
        r = c.reconstructors[side]
        r.checkpoint = PATHS[f"{side}_reconstructor"]
        r.dtype = "bfloat16"
        r.batch_size = 64
    # random source directions explained too: the controls of the source self round trip (the target's
    # verbalizer always explains its controls)
    c.verbalizers.source.explain_controls = True
    c.washout.alpha = 0.0
    c.washout.compare = True
    c.washout.compare_alpha = 0.5
    c.washout.n_backgrounds = 4
    return c
