"""The house (issue 28): every import in ``src/fdg_dist`` points down the layers, no folder imports itself in a
circle, and no project import hides inside a function.

Layers, bottom to top (RESTRUCTURE.md; docs: the architecture page): ``util``, ``config`` (0); ``data``,
``models`` (1); ``engine`` (2); ``split`` (3); ``observe`` (4); ``run`` (5); the entry points at the top level
(6).  A module may import from a lower layer, or from its own folder if that closes no circle; two folders of
one layer never import each other.  ``TYPE_CHECKING`` imports count.  The function-local project imports
allowed: ``fdg_dist/__init__.py`` loading ``load_model`` and ``sample`` on first use, so that ``import fdg_dist``
stays free of torch, and ``fdg_dist/train.py`` importing the launcher after it started the warm fork server.

The checker is applied to this repository and, so that it is seen to fail, to small packages under
``tmp_path`` with an upward import (plain and under ``TYPE_CHECKING``), a sideways one, circles inside a folder,
a function-local import and a module in no layer: each is named with its file and line.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = "fdg_dist"
FOLDERS = {"util": 0, "config": 0, "data": 1, "models": 1, "engine": 2, "split": 3, "observe": 4, "run": 5}
TOP = 6
ENTRY_POINTS = {"__init__", "cli", "validation", "inference", "sampling", "convert", "sweep", "train", "rendezvous"}
LAZY = {(f"{PACKAGE}/__init__.py", f"{PACKAGE}.inference"),  # (file, module): the allowed function-local imports
        (f"{PACKAGE}/__init__.py", f"{PACKAGE}.sampling"),
        (f"{PACKAGE}/train.py", f"{PACKAGE}.cli")}  # after the warm fork server started (run/warm.py)


@dataclass(frozen=True)
class Import:
    file: str  # relative to the source root, e.g. fdg_dist/run/trainer.py
    line: int
    source: str  # importing module, e.g. fdg_dist.run.trainer
    target: str  # imported project module, e.g. fdg_dist.engine.stage
    local: bool  # inside a function


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, package: str) -> tuple[set[str], list[Import]]:
    """Every module of ``root/package`` and every import of a project module in them (module-level, nested in
    ``if``/``try``/``TYPE_CHECKING``, and inside functions), resolved to the module it loads."""
    files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    found = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node, local in _walk(tree, local=False):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [_longest_module(a.name, files) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[:len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                for alias in node.names:  # ``from pkg import mod`` loads pkg.mod; ``from pkg import name``, pkg
                    targets.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else
                                   _longest_module(base, files))
            rel = str(path.relative_to(root))
            found += [Import(rel, node.lineno, name, t, local) for t in dict.fromkeys(targets)
                      if t is not None and t != name]
    return set(files), found


def _walk(node: ast.AST, local: bool):
    """(import node, whether it sits inside a function) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _longest_module(dotted: str, files: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in files:
            return ".".join(parts[:n])
    return None


def room(module: str, package: str = PACKAGE) -> tuple[int, str] | None:
    """(layer, folder) of a module: its folder's layer, or the top level for the entry points; None for a module
    the table does not place (a new top-level file, or a folder of its own)."""
    parts = module.split(".")[1:]
    if parts and parts[0] in FOLDERS:
        return FOLDERS[parts[0]], parts[0]
    return (TOP, "top level") if (parts or ["__init__"])[0] in ENTRY_POINTS else None


def _cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """The circles of a directed graph: one per strongly connected component of more than one module (Tarjan),
    each as a path that returns to its start, with the component's modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [(_circle(c, edges), c) for c in components]


def _circle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One circle through the first module of a strongly connected component (breadth-first back to it)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ()) & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def check(root: Path, package: str = PACKAGE) -> list[str]:
    """Every breach of the house rules under ``root/package``, one line each naming the file and line."""
    modules, imports = _imports(root, package)
    problems = []
    for module in sorted(modules):
        if room(module, package) is None:
            problems.append(f"{module}: in no layer; move it into a layer folder ({', '.join(FOLDERS)}) or make it "
                            f"an entry point at the top level ({', '.join(sorted(ENTRY_POINTS))})")
    edges: dict[str, set[str]] = {}
    first: dict[tuple[str, str], Import] = {}  # (source, target): the first import of it, to name a circle's hops
    for imp in imports:
        where = f"{imp.file}:{imp.line}: {imp.source} imports {imp.target}"
        if (imp.file, imp.target) in LAZY:
            continue
        edges.setdefault(imp.source, set()).add(imp.target)
        first.setdefault((imp.source, imp.target), imp)
        if imp.local:
            problems.append(f"{where} inside a function; import it at the top of the module")
        src, dst = room(imp.source, package), room(imp.target, package)
        if src is None or dst is None:
            continue
        (src_layer, src_folder), (dst_layer, dst_folder) = src, dst
        if src_folder == dst_folder:
            continue  # allowed unless it closes a circle (below)
        if dst_layer > src_layer:
            problems.append(f"{where}: upward, from {src_folder} (layer {src_layer}) to {dst_folder} "
                            f"(layer {dst_layer})")
        elif dst_layer == src_layer:
            problems.append(f"{where}: sideways, between {src_folder} and {dst_folder} (both layer {src_layer})")
    for circle, members in _cycles(edges):  # inside a folder; across folders one also breaks the order above
        hops = [first[a, b] for a, b in zip(circle, circle[1:])]
        more = f" (one of the circles through {len(members)} modules: {', '.join(members)})" \
            if len(members) > len(circle) - 1 else ""
        problems.append("import circle: " + ", ".join(f"{h.file}:{h.line} imports {h.target}" for h in hops) + more)
    return problems


# ------------------------------------------------------------------------------------------------ this repo
def test_every_import_points_down_the_layers() -> None:
    problems = check(REPO / "src")
    assert not problems, "\n".join(problems)


def test_every_folder_and_module_says_what_it_owns_and_must_not_touch() -> None:
    """A reader who opens a room learns what belongs there and what does not: every module's docstring, and
    every folder's ``__init__.py``, names what it must not do."""
    silent = []
    for path in sorted((REPO / "src" / PACKAGE).rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not re.search(r"\bmust not\b", doc, re.IGNORECASE):
            silent.append(str(path.relative_to(REPO)))
    assert not silent, f"modules whose docstring does not say what they must not touch: {silent}"


def test_console_scripts_hydra_targets_and_module_entries_resolve() -> None:
    """``fdg-train``, ``fdg-report``, ``fdg-checkpoint``, ``fdg-sample`` (setup.cfg), the callbacks conf/ names and the modules
    users run with ``python -m`` exist where they are named."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(scripts) == {"fdg-train", "fdg-report", "fdg-checkpoint", "fdg-sample"}
    targets = [value.replace(":", ".") for value in scripts.values()]
    for yaml in sorted((REPO / "conf").rglob("*.yaml")):
        targets += re.findall(rf"_target_:\s*({PACKAGE}\.[\w.]+)", yaml.read_text())
    assert f"{PACKAGE}.sweep.SweepCallback" in targets
    for target in targets:
        module, _, attr = target.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), target
    for module in (f"{PACKAGE}.train", f"{PACKAGE}.rendezvous"):  # python -m ... in launch/, docs and tests
        assert importlib.util.find_spec(module) is not None, module


# ---------------------------------------------------------------------------------------- the checker fails
def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


HOUSE = {
    "__init__.py": "def __getattr__(name):\n    from fdg_dist.inference import load_model\n    return load_model\n",
    "inference.py": "from fdg_dist.run import trainer\n",
    "cli.py": "from fdg_dist import inference, validation\nfrom fdg_dist.run.worker import run\n",
    "validation.py": "from fdg_dist.config import Config\nfrom fdg_dist.split import partition\n",
    "config/__init__.py": "from fdg_dist.config.schema import Config\n",
    "config/schema.py": "import dataclasses\n",
    "util/__init__.py": "",
    "util/files.py": "import os\n",
    "data/__init__.py": "from fdg_dist.data.images import ImageSet\n",
    "data/images.py": "from fdg_dist.config import Config\nfrom fdg_dist.util.files import os\n",
    "models/__init__.py": "from fdg_dist.config import Config\n",
    "engine/__init__.py": "",
    "engine/stage.py": "from fdg_dist import models\nfrom . import schedule\n",
    "engine/schedule.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fdg_dist.config import Config\n",
    "split/__init__.py": "",
    "split/partition.py": "import fdg_dist.models\nfrom fdg_dist.engine.schedule import Kind\n",
    "observe/__init__.py": "",
    "observe/metrics.py": "from fdg_dist.engine import stage\nfrom fdg_dist.util import files\n",
    "run/__init__.py": "",
    "run/checkpoint.py": "from fdg_dist.util.files import atomic_write\nfrom .unsplit import cut\n",
    "run/unsplit.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fdg_dist.engine.stage import Stage\n",
    "run/trainer.py": "from fdg_dist.run import checkpoint\nfrom fdg_dist.observe.metrics import RunLog\n",
    "run/worker.py": "from fdg_dist.run.trainer import Trainer\n",
}


def test_the_checker_passes_a_house_that_keeps_the_rules(tmp_path: Path) -> None:
    assert check(_package(tmp_path, HOUSE)) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"run/unsplit.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from fdg_dist.validation import validate\n"},
     r"^fdg_dist/run/unsplit\.py:3: fdg_dist\.run\.unsplit imports fdg_dist\.validation: upward, from run \(layer 5\) "
     r"to top level \(layer 6\)$"),
    ({"observe/metrics.py": "import os\nfrom fdg_dist.run.checkpoint import atomic_write\n"},
     r"^fdg_dist/observe/metrics\.py:2: fdg_dist\.observe\.metrics imports fdg_dist\.run\.checkpoint: upward, from "
     r"observe \(layer 4\) to run \(layer 5\)$"),
    ({"data/images.py": "from fdg_dist import models\n"},
     r"^fdg_dist/data/images\.py:1: fdg_dist\.data\.images imports fdg_dist\.models: sideways, between data and "
     r"models \(both layer 1\)$"),
    ({"run/unsplit.py": "from fdg_dist.run.checkpoint import FILE\n"},
     r"^import circle: fdg_dist/run/checkpoint\.py:2 imports fdg_dist\.run\.unsplit, fdg_dist/run/unsplit\.py:1 "
     r"imports fdg_dist\.run\.checkpoint$"),
    ({"run/checkpoint.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    from fdg_dist.run.trainer import Trainer\n"},
     r"^import circle: fdg_dist/run/checkpoint\.py:3 imports fdg_dist\.run\.trainer, fdg_dist/run/trainer\.py:1 "
     r"imports fdg_dist\.run\.checkpoint$"),
    ({"data/images.py": "from fdg_dist.data import stable_seed\n"},
     r"^import circle: fdg_dist/data/__init__\.py:1 imports fdg_dist\.data\.images, fdg_dist/data/images\.py:1 "
     r"imports fdg_dist\.data$"),
    ({"validation.py": "def validate(cfg):\n    from fdg_dist.split import partition\n"},
     r"^fdg_dist/validation\.py:2: fdg_dist\.validation imports fdg_dist\.split\.partition inside a function; "
     r"import it at the top of the module$"),
    ({"helpers.py": "import os\n"},
     r"^fdg_dist\.helpers: in no layer; move it into a layer folder"),
], ids=["upward-type-checking", "upward", "sideways", "circle", "circle-type-checking", "circle-through-init",
        "function-local", "no-layer"])
def test_the_checker_names_each_breach(tmp_path: Path, change: dict[str, str], expected: str) -> None:
    problems = check(_package(tmp_path, {**HOUSE, **change}))
    assert len(problems) == 1 and re.search(expected, problems[0]), problems


def test_the_checker_fails_the_flat_tree_of_before(tmp_path: Path) -> None:
    """The 17-file circle of the flat package (checkpoint imports the trainer, config validates through data,
    models, partition and distributed by function-local imports), in miniature."""
    flat = {
        "__init__.py": "",
        "config.py": "def validate(cfg):\n    from fdg_dist import data, partition\n",
        "data.py": "from fdg_dist.config import DataConfig\n",
        "partition.py": "from fdg_dist import models\n",
        "models.py": "from fdg_dist.config import ModelConfig\n",
        "checkpoint.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fdg_dist.trainer import Trainer\n",
        "trainer.py": "from fdg_dist import checkpoint, config\n",
    }
    problems = check(_package(tmp_path, flat))
    assert "fdg_dist/config.py:2: fdg_dist.config imports fdg_dist.data inside a function; import it at the top " \
           "of the module" in problems
    assert "import circle: fdg_dist/checkpoint.py:3 imports fdg_dist.trainer, fdg_dist/trainer.py:1 imports " \
           "fdg_dist.checkpoint" in problems
    assert sorted(p.split(":")[0] for p in problems if "in no layer" in p) == [
        "fdg_dist.checkpoint", "fdg_dist.partition", "fdg_dist.trainer"]  # config, data, models: names of folders
