"""The shape of the package: no import circles between files, imports only down the floors that
crossmap/__init__.py states, every stage declared once, each option's allowed values in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crossmap"

# crossmap/__init__.py's floors, lowest first (top-level module or subpackage -> floor)
FLOORS = {"jsonio": 0, "integrity": 0, "failpoints": 0, "sharding": 0, "checkpointing": 0, "data": 0, "models": 1, "activations": 2, "ridge": 2, "sae": 2,
          "verbalize": 3, "evaluate": 3, "nla": 4, "report": 4, "pipeline": 5, "benchmarks": 6, "cli": 6}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """File module -> the crossmap file modules it imports (imports inside functions included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_no_import_circles_between_files():
    assert _circles(_import_graph()) == []


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_imports_only_go_down_the_floors():
    graph = _import_graph()
    assert {m.split(".")[1] for m in graph if "." in m} <= set(FLOORS), "a new top-level module needs a floor"
    upward = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
              for m, targets in graph.items() for t in targets
              if _floor(m) is not None and _floor(t) is not None and _floor(t) > _floor(m)]
    assert upward == []


def test_every_stage_is_declared_once_and_the_runner_names_none():
    from crossmap.pipeline import STAGE_NAMES, STAGES

    assert len(set(STAGE_NAMES)) == len(STAGE_NAMES)
    for stage in STAGES:
        assert set(stage.inputs) <= set(STAGE_NAMES[:STAGE_NAMES.index(stage.name)]), stage.name  # data flows one way
    runner = (PACKAGE / "pipeline" / "run.py").read_text()
    assert [name for name in STAGE_NAMES if f'"{name}"' in runner] == []
    # no other file of the package spells out the stage list
    listed = re.compile(r'"map",\s*"sae",\s*"features"')
    assert [p.name for p in PACKAGE.rglob("*.py") if listed.search(p.read_text())] == []


def _allowed_values():
    # sae.CONTROL_MODES is ("source", "target"), the two sides of every map: that pair is spelt out
    # wherever both sides are visited, so it is not checked here.
    from crossmap import activations, evaluate, ridge, sae, verbalize
    from crossmap.models import config as model_config

    return {
        "activations.PAIRINGS": activations.PAIRINGS, "activations.CORPUS_SPLITS": activations.CORPUS_SPLITS,
        "evaluate.AGGREGATES": evaluate.AGGREGATES, "models.SUPPORTED_DTYPES": model_config.SUPPORTED_DTYPES,
        "ridge.NONFINITE_MODES": ridge.NONFINITE_MODES, "ridge.COMPUTE_DTYPES": ridge.COMPUTE_DTYPES,
        "ridge.ACCUMULATION_PRECISIONS": ridge.ACCUMULATION_PRECISIONS,
        "sae.SELECTION_METHODS": sae.SELECTION_METHODS, "sae.MAPPING_SCALES": sae.MAPPING_SCALES,
        "verbalize.SCALE_POLICIES": verbalize.SCALE_POLICIES,
        "verbalize.INJECTION_MODES": verbalize.INJECTION_MODES, "verbalize.SELF_PROMPTS": verbalize.SELF_PROMPTS,
        "verbalize.VERBALIZER_KINDS": verbalize.VERBALIZER_KINDS,
    }


@pytest.mark.parametrize("name", sorted(_allowed_values()))
def test_each_option_lists_its_allowed_values_in_one_place(name):
    values = _allowed_values()[name]
    # the tuple literal, however it is spaced: ("a", "b", "c")
    pattern = re.compile(r"\(\s*" + r",\s*".join(re.escape(f'"{v}"') for v in values) + r",?\s*\)")
    where = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert len(where) == 1, f"{name} {values} is spelt out in {where}"


def test_validate_takes_each_modules_own_values():
    from crossmap.pipeline import load_config, validate
    from crossmap.verbalize import SCALE_POLICIES

    for policy in SCALE_POLICIES:  # every policy the spec supports, "prompt" included
        c = load_config(ROOT / "configs" / "tiny.py")
        c.verbalizers.source.scale = policy
        validate(c)
    c = load_config(ROOT / "configs" / "tiny.py")
    c.verbalizers.source.scale = "loud"
    c.ridge.compute_dtype = "float16"
    with pytest.raises(ValueError) as err:
        validate(c)
    assert "verbalizers.source.scale must be one of '', 'fixed', 'embedding', 'prompt'" in str(err.value)
    assert "ridge.compute_dtype must be one of 'float64', 'float32' (got 'float16')" in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_architecture_files_give_both_directions(arch):
    from crossmap.models import config_from_hf, hf_config, tiny_config

    cfg = tiny_config(arch, bos_token_id=1, eos_token_ids=(5, 7), pad_token_id=0, max_position_embeddings=4096)
    assert config_from_hf(hf_config(cfg), cfg.name) == cfg
