"""Run and stage names that upstream would refuse in a derived name are refused up front, by
`rlhf validate`, the validating webhook and the CRD's CEL rules, naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from helpers import manifest
from rlhf_operator import api, backends, builders, cli, controller, crd, names

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
UPSTREAM = Path(__file__).resolve().parents[2].parent / "shared" / "upstream"
RUN_40 = "r" + "x" * 39
LONG_STAGE = "reward-from-human-preferences"  # 29 characters


def upstream_file(relative: str) -> Path:
    path = UPSTREAM / relative
    assert path.is_file(), f"the upstream facts are missing: {path} (see shared/upstream)"
    return path


def doc_with(name: str, stage: str = "sft2", **trainer: Any) -> Obj:
    doc = manifest(trainer=trainer) if trainer else manifest()
    doc["metadata"]["name"] = name
    doc["spec"]["stages"][1]["name"] = stage
    for each in doc["spec"]["stages"]:  # a batch that splits over every node's rank
        each["hyperparameters"] = {"batchSize": 8 * trainer.get("nodes", 1)}
    return doc


def root_rule_failures(doc: Obj) -> list[str]:
    """The CRD's root CEL rules (they read metadata.name) that refuse `doc`."""
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    env = celpy.Environment()
    failed = []
    for rule in schema["x-kubernetes-validations"]:
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(doc)})):
            failed.append(rule["message"])
    return failed


# name, stage, trainer, refused field (None: accepted), needles in the problem
CASES: list[tuple[str, str, Obj, str | None, list[str]]] = [
    ("7b-rlhf", "sft2", {}, "metadata.name", ["'7b-rlhf'", "start with a letter"]),
    ("hh-ppo", "sft2", {}, None, []),
    (RUN_40, LONG_STAGE, {}, "spec.stages[1].name",
     [f"'{RUN_40}-{LONG_STAGE}-master-0' (79 characters, over 63)", "PyTorchJob replica Service",
      "53 characters together"]),
    (RUN_40, "rm", {"nodes": 12}, None, []),
    (RUN_40, "reward-models", {"nodes": 12}, "spec.stages[1].name",
     [f"'{RUN_40}-reward-models-worker-10' (64", "12 node(s)"]),
    ("r" * 47, "sft2", {"backend": "trainjob"}, "metadata.name",
     ["even a one-letter stage", f"'{'r' * 47}-s-node-0-0-xxxxx'", "TrainJob pod"]),
    (RUN_40, "a" * 7, {"backend": "trainjob", "nodes": 4}, None, []),
    (RUN_40, "a" * 8, {"backend": "trainjob", "nodes": 4}, "spec.stages[1].name",
     [f"'{RUN_40}-{'a' * 8}-node-0-3-xxxxx' (64 characters, over 63)"]),
]


@pytest.mark.parametrize(("name", "stage", "trainer", "field", "needles"), CASES)
def test_names_upstream_refuses_are_refused_naming_the_field(
    name: str, stage: str, trainer: Obj, field: str | None, needles: list[str]
) -> None:
    doc = doc_with(name, stage, **trainer)
    webhook = controller.admission_problems(doc)
    if field is None:
        api.parse_run(doc)
        assert webhook == [] and root_rule_failures(doc) == []
        return
    with pytest.raises(api.SpecError) as err:
        api.parse_run(doc, "run.yaml")
    [problem] = [p for p in err.value.problems if "run.yaml: " + field + ":" in p]
    for needle in needles:
        assert needle in problem, problem
    assert any(field in p for p in webhook), webhook
    assert root_rule_failures(doc), "the CRD's CEL rules let it through"


@pytest.mark.parametrize(
    ("backend", "nodes"), [("pytorchjob", 1), ("pytorchjob", 2), ("pytorchjob", 102),
                           ("trainjob", 1), ("trainjob", 10), ("trainjob", 1024)]
)  # fmt: skip
def test_validate_and_cel_agree_at_the_limit_and_the_built_names_fit(
    backend: str, nodes: int
) -> None:
    suffix, _ = names.job_suffix(backend, nodes)
    longest = names.MAX_LABEL - 1 - len(suffix) - len("sft2")  # the longest run name that fits
    trainer = {"backend": backend, "nodes": nodes}
    fits, over = doc_with("r" * longest, **trainer), doc_with("r" * (longest + 1), **trainer)
    assert root_rule_failures(fits) == [] and len(root_rule_failures(over)) == 1
    with pytest.raises(api.SpecError, match=r"spec\.stages\[1\]\.name"):
        api.parse_run(over)
    run = api.parse_run(fits)
    job = backends.build_stage_children(run, run.spec.stages[1])[-1]
    assert job["metadata"]["name"] == builders.child_name(run, "sft2") == f"{'r' * longest}-sft2"
    derived = upstream_names(job)
    assert max(map(len, derived)) == names.MAX_LABEL
    assert all(names.DNS_1035.match(n) for n in derived)


def upstream_names(job: Obj) -> list[str]:
    """What upstream names after a built job, written from the conventions, not names.py."""
    name = job["metadata"]["name"]
    if job["kind"] == "PyTorchJob":
        return [f"{name}-{rtype.lower()}-{i}"
                for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items()
                for i in range(spec["replicas"])]  # fmt: skip
    pods = job["spec"]["trainer"]["numNodes"]
    return [f"{name}-{backends.TRAINJOB_NODE}-0-{i}-abcde" for i in range(pods)]


def test_the_naming_conventions_are_upstream_s() -> None:
    conventions = json.loads(upstream_file("conventions.json").read_text())
    assert "{job}-{replicaType lowercased}-{index}" in (
        conventions["training_operator_v1"]["service_name"]
    )
    assert "DNS1035" in conventions["training_operator_v1"]["name_rule"]
    assert "{jobset}-{replicatedJob}-{jobIndex}-{podIndex}-xxxxx" in (
        conventions["jobset"]["pod_name"]
    )
    runtime = yaml.safe_load(upstream_file(conventions["runtimes"]["torch-distributed"]["file"])
                             .read_text())  # fmt: skip
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == [names.TRAINJOB_REPLICATED_JOB]
    assert names.TRAINJOB_REPLICATED_JOB == backends.TRAINJOB_NODE
    assert runtime["metadata"]["name"] == backends.TRAINJOB_RUNTIME
    trainjob = yaml.safe_load(upstream_file(
        conventions["schemas"]["trainer.kubeflow.org/v1alpha1 TrainJob"]["file"]).read_text())
    rules = trainjob["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert f"self.metadata.name.matches('{names.DNS_1035.pattern}')" in [r["rule"] for r in rules]


def test_server_names_of_an_accepted_run_are_dns_1035_labels() -> None:
    doc = doc_with("r" * 49)
    doc["spec"]["stages"].append({
        "name": "ppo", "type": "ppo", "from": "sft", "reward": {"function": "animal_sounds"},
        "dataset": {"path": "p.jsonl", "format": "prompts"}, "rollout": {"replicas": 12},
    })  # fmt: skip
    run = api.parse_run(doc)
    servers = [builders.rollout_name(run, "ppo", i) for i in range(12)]
    assert all(len(n) <= names.MAX_LABEL and names.DNS_1035.match(n) for n in servers)
    assert servers[0] == f"{'r' * 49}-ppo-rollout-0" and len(set(servers)) == 12


def test_rlhf_validate_names_the_field_and_the_derived_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc_with(RUN_40, LONG_STAGE)))
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: spec.stages[1].name: '{LONG_STAGE}'" in err
    assert f"{RUN_40}-{LONG_STAGE}-master-0" in err
    bad = copy.deepcopy(doc_with("7b-rlhf"))
    path.write_text(yaml.safe_dump(bad))
    assert cli.main(["validate", str(path)]) == 1
    assert f"{path}: metadata.name: '7b-rlhf' must start with a letter" in capsys.readouterr().err
