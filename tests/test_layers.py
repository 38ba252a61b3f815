"""The import graph, read with ``ast`` (imports inside functions included): no cycle but the recipe's own, lower
floors never import higher ones, and the bundle's readers never import training. CONTRIBUTING.md draws the floors."""
import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mmtune"

LOW = ("mmtune.data", "mmtune.modalities", "mmtune.encoders", "mmtune.fusion", "mmtune.heads", "mmtune.losses",
       "mmtune.models", "mmtune.finetune", "mmtune.synthesis")
"""The parts: what a model is made of and how rows are read."""
HIGH = ("mmtune.training", "mmtune.recipe", "mmtune.evaluation", "mmtune.serving", "mmtune.explain", "mmtune.bundle", "mmtune.prune",
        "mmtune.search", "mmtune.crossval", "mmtune.ensemble", "mmtune.distill", "mmtune.cli", "mmtune.demo")
"""Everything that trains, evaluates, stores or serves a model."""
READERS = ("mmtune.bundle", "mmtune.serving", "mmtune.explain", "mmtune.evaluation.report", "mmtune.ensemble")
"""What reads a bundle: it must not need the code that trains one."""
TRAINING = ("mmtune.training", "mmtune.recipe", "mmtune.prune", "mmtune.search", "mmtune.crossval", "mmtune.distill")
RECIPE = {"mmtune.recipe.fit", "mmtune.search", "mmtune.crossval", "mmtune.recipe.baselines"}
"""The one cycle allowed: the recipe (``fit``) hands a ``best`` preset to the search, ``--cv`` to the folds and
``--baselines`` to the one-modality fits, and each of them runs the recipe again."""


def _modules():
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name, path):
    pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - (0 if pkg else 1)]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t.startswith("mmtune") and t != name and t in MODULES:
                yield t


GRAPH = {m: set(_imports(m, p)) for m, p in MODULES.items()}


def _under(m, floors):
    return any(m == f or m.startswith(f + ".") for f in floors)


def test_the_parts_never_import_what_trains_evaluates_stores_or_serves():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if _under(m, LOW) for d in deps if _under(d, HIGH)]
    assert not bad, bad


def test_what_reads_a_bundle_never_imports_training():
    bad = [f"{m} -> {d}" for m, deps in GRAPH.items() if _under(m, READERS) for d in deps if _under(d, TRAINING)]
    assert not bad, bad


def test_no_import_cycle_but_the_recipes():
    index, low, stack, on, cycles = {}, {}, [], set(), []
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(comp)

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert all(c <= RECIPE for c in cycles), [sorted(c) for c in cycles]


def test_importing_the_lightning_module_does_not_load_the_bundle_or_the_recipe():
    code = ("import sys, mmtune.training.module; "
            "print(sorted(m for m in ('mmtune.bundle', 'mmtune.recipe.fit', 'mmtune.evaluation.report', "
            "'mmtune.explain', 'mmtune.presets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


FLOORS = [  # bottom to top, as CONTRIBUTING.md draws them
    ("ground", ["mmtune.schema", "mmtune.registry", "mmtune.tasks", "mmtune.io", "mmtune.version", "mmtune.logs",
                "mmtune.extras", "mmtune.memory", "mmtune.values"]),
    ("rows", ["mmtune.encoders", "mmtune.modalities", "mmtune.data", "mmtune.distributed"]),
    ("parts", ["mmtune.models", "mmtune.fusion", "mmtune.heads", "mmtune.losses", "mmtune.finetune", "mmtune.synthesis",
               "mmtune.optim"]),
    ("feeding", ["mmtune.data.datamodule", "mmtune.inference"]),
    ("config", ["mmtune.config", "mmtune.presets", "mmtune.autoconfig"]),
    ("measuring", ["mmtune.evaluation"]),
    ("readers", ["mmtune.bundle", "mmtune.ensemble", "mmtune.serving", "mmtune.explain", "mmtune.evaluation.report"]),
    ("training", ["mmtune.training", "mmtune.prune"]),
    ("recipe", ["mmtune.recipe", "mmtune.search", "mmtune.crossval", "mmtune.distill"]),
    ("commands", ["mmtune.cli", "mmtune.demo", "mmtune"]),
]


def _floor(m):
    """The floor of a module: the longest prefix named in FLOORS."""
    hits = [(len(p), i) for i, (_, prefixes) in enumerate(FLOORS) for p in prefixes if _under(m, [p])]
    return max(hits)[1] if hits else None


def test_every_module_has_a_floor_and_imports_only_its_own_or_lower():
    unplaced = [m for m in GRAPH if _floor(m) is None]
    assert not unplaced, unplaced
    up = [f"{m} ({FLOORS[_floor(m)][0]}) -> {d} ({FLOORS[_floor(d)][0]})"
          for m, deps in GRAPH.items() for d in deps if _floor(d) > _floor(m)]
    assert not up, up
    floors = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    assert all(f"  {name}" in floors for name, _ in FLOORS)  # the picture names every floor


def test_the_graph_is_read_whole():
    # the reader finds imports inside functions too: the recipe's lazy import of the search is an edge
    assert "mmtune.search" in GRAPH["mmtune.recipe.fit"] and len(GRAPH) > 60
