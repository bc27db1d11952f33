"""Shipped demo data: `corpus.jsonl` (see README.md here for its source and licences).

`python -m crossmap.data.build_corpus` rebuilds the corpus from the Debian packages it came from.
"""

import json
from importlib import resources
from pathlib import Path


def corpus_path() -> Path:
    """Path of the shipped corpus.jsonl."""
    return Path(str(resources.files(__package__).joinpath("corpus.jsonl")))


def corpus_texts() -> list[str]:
    """The shipped corpus's document texts, in file order."""
    with corpus_path().open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
