"""Every example in manifests/examples validates, and renders where the planner supports it.

The examples the planner refuses today are listed in NOT_RENDERED_YET with the reason it gives.
When a stage type or backend lands, its examples start to render and this test fails until the
list shrinks: the list is the record of what does not work yet, never a skip.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rlhf_operator import backends, builders, cli

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
CRD = ROOT / "manifests" / "crds" / "rlhf.dev_rlhfruns.yaml"
K8S_VERSION = "1.34"
Obj = dict[str, Any]

EXPECTED = {
    "quickstart.yaml",
    "sft-reward-ppo.yaml",
    "dpo.yaml",
    "rrhf.yaml",
    "rrhf-online.yaml",
    "grpo-reward-function.yaml",
    "grpo-trainer-engine.yaml",
    "grpo-judge.yaml",
    "ppo-tiny.yaml",
    "rlaif-self-reference.yaml",
    "rlaif-tiny.yaml",
    "multinode-fsdp.yaml",
    "trainjob-backend.yaml",
    "kueue-queued.yaml",
    "smollm2-rlhf.yaml",
    "smollm2-dpo.yaml",
    "smollm2-grpo.yaml",
    "smollm2-grpo-guess.yaml",
    "smollm2-calculator.yaml",
}

# Examples `rlhf render` refuses today, with the message it refuses them with.
NOT_RENDERED_YET: dict[str, str] = {}


def examples() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_the_examples_are_the_documented_set() -> None:
    assert set(examples()) == EXPECTED
    assert set(NOT_RENDERED_YET) <= EXPECTED


@pytest.mark.parametrize("name", examples())
def test_example_passes_rlhf_validate(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(EXAMPLES / name)]) == 0, capsys.readouterr().err
    assert f"{name}: valid" in capsys.readouterr().out


def pruned(doc: Any, schema: Obj, path: str = "") -> list[str]:
    """Fields the API server would silently prune: not in the structural schema."""
    out: list[str] = []
    if isinstance(doc, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return out
        for key, value in doc.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out.extend(pruned(value, schema["properties"][key], f"{path}.{key}"))
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in doc.items():
            out.extend(pruned(value, schema["additionalProperties"], f"{path}.{key}"))
    elif isinstance(doc, list) and "items" in schema:
        for i, value in enumerate(doc):
            out.extend(pruned(value, schema["items"], f"{path}[{i}]"))
    return out


@pytest.mark.parametrize("name", examples())
def test_example_fits_the_crd_schema(name: str) -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    # OpenAPI v3.0 keeps draft-4 semantics (boolean exclusiveMinimum).
    jsonschema.Draft4Validator(schema).validate(doc)
    assert pruned(doc, schema) == []


def test_pruning_check_catches_a_typo() -> None:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    doc = yaml.safe_load((EXAMPLES / "dpo.yaml").read_text())
    doc["spec"]["stages"][2]["dpo"]["betta"] = 0.2
    assert pruned(doc, schema) == [".spec.stages[2].dpo.betta"]


def render(name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["render", str(EXAMPLES / name)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def validate_pod_template(name: str, template: Obj) -> None:
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
         "template": template},
        K8S_VERSION,
        strict=True,
    )


def validate_child(child: Obj) -> None:
    """Core kinds against the upstream schemas; Kubeflow jobs through their pod templates."""
    kind = child["kind"]
    if kind == "PyTorchJob":
        assert child["apiVersion"] == "kubeflow.org/v1"
        for replica, spec in child["spec"]["pytorchReplicaSpecs"].items():
            validate_pod_template(f"{child['metadata']['name']}-{replica.lower()}",
                                  spec["template"])
    elif kind == "TrainJob":
        assert child["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        trainer = child["spec"]["trainer"]
        container = {k: trainer[k] for k in ("image", "command", "env") if k in trainer}
        if "resourcesPerNode" in trainer:
            container["resources"] = trainer["resourcesPerNode"]
        patch = backends.node_pod_patch(child)  # the operator's runtimePatches entry
        spec = patch["spec"]
        pod = {**spec, "containers": [{**c, **container} for c in spec["containers"]]}
        validate_pod_template(child["metadata"]["name"], {"metadata": patch["metadata"],
                                                          "spec": pod})  # fmt: skip
    else:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", examples())
def test_example_renders_or_is_listed_as_refused(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = render(name, capsys)
    if name in NOT_RENDERED_YET:
        assert code == 1, f"{name} renders now: remove it from NOT_RENDERED_YET"
        assert NOT_RENDERED_YET[name] in err
        return
    assert code == 0, err
    children = [doc for doc in yaml.safe_load_all(out) if doc]
    run = yaml.safe_load((EXAMPLES / name).read_text())
    assert {c["kind"] for c in children} >= {"ConfigMap"}
    for child in children:
        validate_child(child)
        labels = child["metadata"]["labels"]
        assert labels[builders.LABEL_RUN] == run["metadata"]["name"]
        queue = run["metadata"].get("labels", {}).get(builders.KUEUE_QUEUE_LABEL)
        assert labels.get(builders.KUEUE_QUEUE_LABEL) == queue


def jobs(name: str, capsys: pytest.CaptureFixture[str]) -> list[Obj]:
    code, out, err = render(name, capsys)
    assert code == 0, err
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("PyTorchJob", "TrainJob")]


def test_multinode_example_is_two_nodes_of_eight_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    [job] = jobs("multinode-fsdp.yaml", capsys)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_kueue_example_is_queued_and_suspended(capsys: pytest.CaptureFixture[str]) -> None:
    [job] = jobs("kueue-queued.yaml", capsys)
    assert job["metadata"]["labels"][builders.KUEUE_QUEUE_LABEL] == "team-a-queue"
    assert job["spec"]["runPolicy"]["suspend"] is True


def test_trainjob_example_uses_the_trainjob_backend(capsys: pytest.CaptureFixture[str]) -> None:
    [job] = jobs("trainjob-backend.yaml", capsys)
    assert job["kind"] == "TrainJob"


def test_judge_rewarded_grpo_brings_up_its_judge_with_its_rollout_servers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = render("grpo-judge.yaml", capsys)
    assert code == 0, err
    children = [d for d in yaml.safe_load_all(out) if d]
    servers = Counter(
        (c["kind"], c["metadata"]["labels"][builders.LABEL_COMPONENT])
        for c in children
        if c["kind"] in ("Deployment", "Service")
    )
    assert servers == {("Deployment", "judge"): 2, ("Service", "judge"): 2,
                       ("Deployment", "rollout"): 1, ("Service", "rollout"): 1}  # fmt: skip
    assert not any(c["kind"] == "PyTorchJob" for c in children)  # it waits for them
    [configmap] = [c for c in children if c["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["grpo.yaml"])
    assert config["judge"]["mode"] == "pairwise" and len(config["judge"]["urls"]) == 2


def test_examples_name_what_they_promise() -> None:
    def load(name: str) -> Obj:
        doc: Obj = yaml.safe_load((EXAMPLES / name).read_text())
        return doc

    grpo = load("grpo-reward-function.yaml")["spec"]["stages"][-1]
    assert grpo["type"] == "grpo" and grpo["reward"] == {"function": "animal_sounds"}
    judged = load("grpo-judge.yaml")["spec"]
    assert judged["stages"][0]["type"] == "grpo"
    assert judged["stages"][0]["reward"]["judge"]["mode"] == "pairwise"
    assert judged["judge"]["engine"] == "vllm"
    ppo = load("ppo-tiny.yaml")["spec"]["stages"]
    assert [s["type"] for s in ppo] == ["sft", "reward", "ppo"]
    assert ppo[-1]["reward"] == {"from": "rm"} and ppo[-1]["rollout"]["engine"] == "vllm"
    rlaif = load("rlaif-self-reference.yaml")["spec"]
    assert [s["type"] for s in rlaif["stages"]] == ["sft", "feedback", "reward", "ppo"]
    assert rlaif["judge"]["selfReference"] is True
    assert rlaif["judge"]["principle"] == "Which response is best for humanity?"
    pipeline = load("sft-reward-ppo.yaml")["spec"]["stages"]
    assert [s["type"] for s in pipeline] == ["sft", "reward", "ppo"]
    assert load("multinode-fsdp.yaml")["spec"]["trainer"]["gpusPerNode"] == 8
    assert load("trainjob-backend.yaml")["spec"]["trainer"]["backend"] == "trainjob"
    kueue = load("kueue-queued.yaml")
    assert kueue["spec"]["suspend"] is True
    assert builders.KUEUE_QUEUE_LABEL in kueue["metadata"]["labels"]
