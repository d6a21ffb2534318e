"""Imports point down only: every import of the package is read and checked against the layer rules
of docs/ARCHITECTURE.md (core knows no robots; data/ and envs/ never import nn/ or policies/;
commands/ is the only place that joins train/ and evaluation/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffpolicy"
SHARED = {"errors", "config", "fsutil", "episode_meta"}  # top-level helper modules every layer may use

# layer -> the other layers it may import (besides itself and SHARED). A layer missing from a set
# is forbidden; a new top-level package or module must be added here (the test says so).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "fsutil": set(),
    "episode_meta": set(),
    "core": set(),
    "nn": {"core"},
    "data": set(),
    "envs": set(),
    "policies": {"core", "nn"},
    "collection": {"envs", "data"},
    "train": {"policies", "core", "nn", "data", "envs"},
    "evaluation": {"policies", "core", "nn", "envs", "control"},
    "control": {"policies", "core", "nn", "envs"},
    "rl": {"policies", "core", "nn", "data", "envs", "evaluation", "control", "train"},
    "worldmodel": {"rl", "policies", "core", "nn", "data", "envs", "evaluation", "control", "train"},
    "deploy": {"control", "policies", "core", "nn", "envs"},
    "generative": {"core", "nn", "data", "envs"},
    "commands": {"core", "nn", "data", "envs", "policies", "collection", "train", "evaluation", "control", "rl",
                 "worldmodel", "deploy", "generative"},
    "cli": set(),  # imports commands lazily by name (importlib), never at module level
    "__init__": set(),
}
# Third-party packages that mean "robots": the generative core must not know them.
ROBOT_PACKAGES = {"gymnasium", "gym", "robosuite", "mujoco", "pymunk", "stable_baselines3", "zarr", "h5py"}


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["diffpolicy", *path.relative_to(PACKAGE).parts[:-1]]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(path)
        if layer not in ALLOWED:
            problems.append(f"{path.relative_to(PACKAGE.parent)}: layer {layer!r} has no rule in tests/test_layers.py")
            continue
        for line, module in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            top = module.split(".")[0]
            if layer == "core" and top in ROBOT_PACKAGES:
                problems.append(f"{where}: core/ imports {module} (the core knows no robots)")
            if top != "diffpolicy" or module == "diffpolicy":
                continue
            target = module.split(".")[1]
            if target != layer and target not in SHARED and target not in ALLOWED[layer]:
                problems.append(f"{where}: {layer}/ imports {module} ({target}/ is not below {layer}/)")
    return problems


def test_imports_point_down_only():
    assert violations() == []


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing a policy and gymnasium is reported."""
    fake = tmp_path / "diffpolicy"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("import gymnasium\nfrom diffpolicy.policies import ChunkPolicy\n"
                                          "from ..train import trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = violations()
    assert len(found) == 3
    assert "core/ imports gymnasium" in found[0]
    assert "core/ imports diffpolicy.policies" in found[1]
    assert "core/ imports diffpolicy.train" in found[2]


@pytest.mark.parametrize("layer, forbidden", [("data", "nn"), ("data", "policies"), ("envs", "nn"),
                                              ("envs", "policies"), ("envs", "data"), ("train", "evaluation"),
                                              ("evaluation", "train"), ("core", "nn")])
def test_the_architecture_rules_are_encoded(layer, forbidden):
    assert forbidden not in ALLOWED[layer]
