"""crossmap: carry interpretability tools between LLMs through ridge maps of their residual streams.

Floors, lowest first; a module imports only from its own floor or those below it (tests/test_architecture.py
checks this and that no two files import each other, directly or through others):
    jsonio, integrity, failpoints, sharding  plain JSON; content hashes and checksums; test kill points; the axis table
    models                                 Flax NNX ports, checkpoint formats, loading onto the mesh
    activations, ridge, sae                corpus and paired activations; the ridge map; SAEs
    verbalize, evaluate                    generation with injected vectors; metrics
    report                                 report.md / report.json / figures
    pipeline                               the config, the stage table and the runner
    benchmarks, cli                        `crossmap bench ...`; the command line
See ARCHITECTURE.md for what each module owns and where to add a stage, an architecture or a verbalizer.
"""

__version__ = "0.1.0"
