"""Import boundaries (ARCHITECTURE.md): the operator image carries no torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "datasets", "safetensors", "tokenizers", "peft", "vllm"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_operator_imports_only_trainer_config() -> None:
    files = sorted((ROOT / "operator" / "rlhf_operator").rglob("*.py"))
    assert files
    for path in files:
        for name in imports(path):
            if name.startswith("rlhf_trainer"):
                config = name == "rlhf_trainer.config" or name.startswith("rlhf_trainer.config.")
                assert config, f"{path.name} imports {name}"
            assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"


def test_trainer_config_is_torch_free() -> None:
    """The config package imports nothing heavy, and nothing of the trainer outside it."""
    files = sorted((ROOT / "trainer" / "rlhf_trainer" / "config").glob("*.py"))
    assert len(files) >= 2
    for path in files:
        names = imports(path)
        assert not {n.split(".")[0] for n in names} & HEAVY, path.name
        outside = {n for n in names if n.startswith("rlhf_trainer")} - {"rlhf_trainer.config"}
        assert all(n.startswith("rlhf_trainer.config.") for n in outside), (path.name, outside)


def test_algos_import_only_torch() -> None:
    """The algorithms' math (losses, advantages, reward shaping) is pure: torch and a few
    standard modules, and each other."""
    files = sorted((ROOT / "trainer" / "rlhf_trainer" / "algos").glob("*.py"))
    assert len(files) >= 5
    allowed = {"torch", "__future__", "typing", "dataclasses", "math", "collections"}
    for path in files:
        names = imports(path)
        own = {n for n in names if n.startswith("rlhf_trainer")}
        assert all(n.startswith("rlhf_trainer.algos.") for n in own), (path.name, own)
        assert {n.split(".")[0] for n in names - own} <= allowed, path.name
