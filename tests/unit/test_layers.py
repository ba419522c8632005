"""The trainer's import contract (ARCHITECTURE.md, docs/DESIGN.md "The trainer's packages"): its
packages form layers that import downward only, the stage packages do not import each other,
and no module imports itself back through others, not even for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TRAINER = Path(__file__).resolve().parents[2] / "trainer" / "rlhf_trainer"
# Bottom to top. A module may import from its own layer and the layers below it.
LAYERS: list[set[str]] = [
    {"rlhf_trainer", "config", "errors"},  # the package root holds only __version__
    {"algos", "environments", "tasks"},  # pure: torch or the standard library
    {"data"},
    {"runtime"},
    {"models"},
    {"training", "rollout"},
    {"rewards"},
    {"offline", "online", "feedback", "evaluate"},  # the stages
    {"preflight", "plan_check", "__main__", "evaluate.cli"},  # entry points and checks
]
STAGES = LAYERS[-2]


def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINER.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def unit(module: str) -> str:
    """The layer entry a module belongs to: its package, or an entry point by name."""
    parts = module.split(".")
    if ".".join(parts[1:3]) in LAYERS[-1]:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    name = unit(module)
    return next(i for i, entries in enumerate(LAYERS) if name in entries)


def trainer_imports(path: Path, modules: set[str]) -> set[str]:
    """Every rlhf_trainer module `path` imports, at any depth (lazy and TYPE_CHECKING too):
    `from rlhf_trainer.pkg import mod` names the module `mod`, otherwise the module itself."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("rlhf_trainer"):
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                out.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("rlhf_trainer"))
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in TRAINER.rglob("*.py")}
    return {
        name: {t for t in trainer_imports(path, set(modules)) if t in modules} - {name}
        for name, path in modules.items()
    }


def test_every_module_has_a_layer() -> None:
    for name in graph():
        assert any(unit(name) in entries for entries in LAYERS), f"{name}: add it to LAYERS"


def test_layers_import_downward_only() -> None:
    for name, targets in graph().items():
        for target in targets:
            assert layer(target) <= layer(name), f"{name} imports {target}, a layer above it"
            if unit(name) in STAGES and unit(target) in STAGES:
                assert unit(target) == unit(name), f"stage {name} imports stage {target}"


def test_no_import_cycles() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(edges.get(name, ())):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])
