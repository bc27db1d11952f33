"""The embedded demo with self-verbalizers instead of trained NLAs: the same models, corpus, map, SAE,
features and controls as configs/demo.py, so the two reports compare verbalizers on the same vectors.

Verbalizers: each model explains vectors injected into its own prompt (Patchscopes-style
self-verbalizer: chat prompt for the instruct Qwen, few-shot definition prompt for the base Gemma).
The shipped NLA reconstructors still read the explanations back, so the round trips are scored too.

    crossmap run --config configs/demo_self.py
"""

from pathlib import Path

from crossmap.pipeline import load_config

# Gemma-3-270M is a base model: a few-shot *definition* prompt (the vector injected at "?") makes it
# answer in the same form as the instruct Qwen's 'What does "X" mean?' answers; the plain identity
# preset ("cat -> cat ...") mostly echoes its own examples at this size.
DEFINITION_PROMPT = ('"cat" means a small domesticated feline animal.\n'
                     '"run" means to move quickly on foot.\n'
                     '"bank" means a financial institution that keeps money.\n'
                     '"?" means')


def get_config():
    c = load_config(Path(__file__).with_name("demo.py"))
    with c.unlocked():
        c.name = "demo-self"
    for side, prompt in (("source", "chat"), ("target", "base")):
        v = c.verbalizers[side]
        v.kind, v.checkpoint, v.prompt = "self", "", prompt
        v.max_new_tokens = 16  # the presets answer in a phrase
        v.batch_size = 32
    with c.verbalizers.target.unlocked():
        c.verbalizers.target.spec = {"prompt_template": DEFINITION_PROMPT, "stop_strings": ("\n",)}
    return c
