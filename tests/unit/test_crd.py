"""The CRD: generated from the typed model, committed, structural, with CEL rules that work."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from helpers import manifest
from rlhf_operator import api, crd

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "manifests" / "crds" / "rlhf.dev_rlhfruns.yaml"


def test_committed_crd_matches_the_model() -> None:
    committed = yaml.safe_load(COMMITTED.read_text())
    assert committed == crd.build_crd(), "the CRD drifted from the model: run `make crd`"


def test_crd_is_a_valid_customresourcedefinition() -> None:
    kubernetes_validate.validate(crd.build_crd(), "1.34", strict=True)


def walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out.extend(walk(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(walk(value, f"{path}/{i}"))
    return out


def test_schema_is_structural() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        if path.endswith("/x-kubernetes-validations") or "/default" in path:
            continue
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if "properties" in node:
            assert node.get("type") == "object", path
            assert node.get("additionalProperties") is not False, path


def test_crd_surface() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Stage", "Step", "Reward", "Age"
    ]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["trainer"]["properties"]["backend"]["default"] == "pytorchjob"
    assert spec["stages"]["items"]["properties"]["hyperparameters"]["default"] == {}
    lr = spec["stages"]["items"]["properties"]["hyperparameters"]["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True


def _index_of(items: celtypes.ListType, value: Any) -> celtypes.IntType:
    """Kubernetes' CEL list library `indexOf`, which celpy lacks."""
    for i, item in enumerate(items):
        if item == value:
            return celtypes.IntType(i)
    return celtypes.IntType(-1)


def apply_rules(schema: dict[str, Any], value: Any, env: celpy.Environment) -> list[str]:
    """Evaluate the CEL rules of a schema node and its children against a value, as the API
    server does: each rule with `self` bound to the value at its node."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]), functions={"indexOf": _index_of})
        if not bool(program.evaluate({"self": celpy.json_to_cel(value)})):
            failures.append(rule["rule"])
    if isinstance(value, dict):
        for key, child in value.items():
            if key in schema.get("properties", {}):
                failures.extend(apply_rules(schema["properties"][key], child, env))
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            failures.extend(apply_rules(schema["items"], item, env))
    return failures


def cel_failures(doc_spec: dict[str, Any]) -> list[str]:
    version = crd.build_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return apply_rules(schema, doc_spec, celpy.Environment())


def test_cel_rules_accept_a_valid_spec() -> None:
    assert cel_failures(manifest()["spec"]) == []


def _grpo(environment: dict[str, Any]) -> Any:
    """Make the second stage a grpo stage with `environment`."""
    grpo = {"type": "grpo", "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
            "reward": {"function": "brief"}, "environment": environment}  # fmt: skip
    return lambda s: s["stages"][1].update(copy.deepcopy(grpo))


# What the API server fills in before it evaluates the rules (the CRD's defaults).
_SERVER_DEFAULTS = {"port": 8000, "replicas": 1, "env": [],
                    "resources": {"requests": {}, "limits": {}}}  # fmt: skip


@pytest.mark.parametrize(
    "environment",
    [
        {"command": ["rlhf", "env", "serve", "calculator", "--port", "$(PORT)"]},
        {"image": "example.com/env:1", "env": [{"name": "A", "value": "1"}, {"name": "B"}]},
        {"url": "http://env.example.com:8000"},
        {"url": "http://env.example.com:8000", **_SERVER_DEFAULTS},
    ],
)
def test_cel_rules_accept_environments(environment: dict[str, Any]) -> None:
    doc = manifest()
    _grpo(environment)(doc["spec"])
    assert cel_failures(doc["spec"]) == []
    api.parse_run(doc)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s["stages"].append(copy.deepcopy(s["stages"][0])), "exists_one"),
        (lambda s: s["stages"][1].update({"from": "nope"}), "indexOf(s.from)"),
        (lambda s: s["stages"].reverse(), "indexOf(s.from)"),
        (lambda s: s["stages"][0].pop("dataset"), "has(self.dataset)"),
        (lambda s: s["stages"][0].update({"type": "ppo"}), "has(self.reward)"),
        (lambda s: s["stages"][0].update({"dpo": {}}), "self.type == 'dpo'"),
        (lambda s: s["model"].update({"name": "org/m"}), "has(self.name) != has(self.path)"),
        (
            lambda s: s["stages"][1].update({"model": {"path": "models/other"}}),
            "has(self.from) && has(self.model)",
        ),
        (
            lambda s: s["stages"][0].update({"type": "feedback"}),
            "has(self.judge) ||",
        ),
        (
            lambda s: (
                s.update({"judge": {"model": {"path": "m"}}}),
                s["stages"][0].update({"type": "feedback"}),
            ),
            "has(self.rollout)",
        ),
        (lambda s: s["stages"][0].update({"environment": {"command": ["x"]}}),
         "self.type == 'grpo'"),
        (_grpo({"maxTurns": 2}), "has(self.url) || has(self.command) || has(self.image)"),
        (_grpo({"url": "http://e:1", "command": ["x"]}), "!has(self.url) || (!has(self.command))"),
        (_grpo({"url": "http://e:1", "replicas": 2}), "self.replicas == 1"),
        (_grpo({"url": "http://e:1", "resources": {"limits": {"cpu": 1}}}),
         "size(self.resources.limits) == 0"),
        (_grpo({"command": ["x"], "env": [{"name": "PORT", "value": "1"}]}), "e.name != 'PORT'"),
        (_grpo({"command": ["x"], "env": [{"name": "A"}, {"name": "A"}]}), "exists_one(f"),
    ],
)
def test_cel_rules_refuse_what_validate_refuses(mutate: Any, needle: str) -> None:
    doc = manifest()
    mutate(doc["spec"])
    failures = cel_failures(doc["spec"])
    assert any(needle in rule for rule in failures), failures
    with pytest.raises(api.SpecError):
        api.parse_run(doc)


def test_api_reference_matches_the_model() -> None:
    from rlhf_operator import apidoc

    committed = (ROOT / "docs" / "API.md").read_text()
    assert committed == apidoc.render(), "docs/API.md drifted from the model: run `make docs`"


def test_root_rules_read_the_run_name_and_accept_every_example() -> None:
    from test_upstream_names import root_rule_failures

    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert all("self.metadata.name" in r for r in rules) and len(rules) == 2
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    docs = [d for p in examples for d in yaml.safe_load_all(p.read_text()) if d]
    assert len(docs) >= len(examples) > 10
    assert [root_rule_failures(d) for d in docs] == [[] for _ in docs]
    doc = manifest()
    doc["metadata"]["name"] = "1st-run"
    assert root_rule_failures(doc) == [schema["x-kubernetes-validations"][0]["message"]]
