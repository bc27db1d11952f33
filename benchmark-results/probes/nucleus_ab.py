"""Probe (issue 18, 2026-12-07): the sampled decode step with the committed samplers and with the ones before them,
in one process each, for an A/B on one machine. `old` puts back what `_choose` ran before: with top-p the 16-pass
filter, then one inversion of the whole row's cumsum; without it that inversion alone. `new` runs the package as it
is (`engine.sample_nucleus`; `engine.sample_categorical` inverting in two levels).
Usage: nucleus_ab.py old|new CLI-ARGS...   (e.g. bench verbalize --preset 7b ... --temperature 1.0 --top-p 0.9)"""
import sys

from top_p_rejection import sample_whole_row

from crossmap import cli
from crossmap.verbalize import engine

if __name__ == "__main__":
    way, argv = sys.argv[1], sys.argv[2:]
    if way == "old":
        engine.sample_nucleus = lambda key, logits, top_p: sample_whole_row(key, engine.top_p_filter(logits, top_p))
        engine.sample_categorical = sample_whole_row
    elif way != "new":
        sys.exit(f"nucleus_ab.py: way must be old or new, got {way!r}")
    sys.exit(cli.main(argv))
