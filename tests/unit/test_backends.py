"""Trainer backends: the TrainJob builder against the Trainer v2 API, phases from each
controller's status, and one launch for the local executor whatever the backend."""

from __future__ import annotations

import copy
from typing import Any, get_args

import jsonschema
import kubernetes_validate
import pytest

from helpers import make_run, manifest
from rlhf_operator import api, backends, builders
from rlhf_operator.planner import Observed, config_hash, plan

pytestmark = pytest.mark.unit

K8S_VERSION = "1.34"
Obj = dict[str, Any]

# The trainer.kubeflow.org/v1alpha1 TrainJob envelope, written from the Go API types of
# Kubeflow Trainer (TrainJobSpec, RuntimeRef, Trainer, PodTemplateOverride,
# PodTemplateSpecOverride, ContainerOverride). The Kubernetes types inside (EnvVar, Volume,
# VolumeMount, ResourceRequirements) are checked with kubernetes-validate below.
NAMED = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CONTAINER_OVERRIDE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": NAMED},
        "volumeMounts": {"type": "array", "items": NAMED},
    },
}
POD_TEMPLATE_OVERRIDE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["targetJobs"],
    "properties": {
        "targetJobs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}},
        }},
        "metadata": {"type": "object", "additionalProperties": False, "properties": {
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        }},
        "spec": {"type": "object", "additionalProperties": False, "properties": {
            "serviceAccountName": {"type": "string"},
            "nodeSelector": {"type": "object"},
            "affinity": {"type": "object"},
            "tolerations": {"type": "array"},
            "volumes": {"type": "array", "items": NAMED},
            "initContainers": {"type": "array", "items": CONTAINER_OVERRIDE},
            "containers": {"type": "array", "items": CONTAINER_OVERRIDE},
            "schedulingGates": {"type": "array", "items": NAMED},
            "imagePullSecrets": {"type": "array", "items": NAMED},
        }},
    },
}
TRAINJOB_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "trainer.kubeflow.org/v1alpha1"},
        "kind": {"const": "TrainJob"},
        "metadata": {"type": "object", "required": ["name", "namespace"], "properties": {
            # RFC 1035 label: the TrainJob CRD's own CEL rule.
            "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                     "maxLength": 63},
        }},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["runtimeRef"],
            "properties": {
                "runtimeRef": {"type": "object", "additionalProperties": False,
                               "required": ["name"], "properties": {
                                   "name": {"type": "string", "minLength": 1},
                                   "apiGroup": {"type": "string"},
                                   "kind": {"enum": ["ClusterTrainingRuntime", "TrainingRuntime"]},
                               }},
                "initializer": {"type": "object"},
                "trainer": {"type": "object", "additionalProperties": False, "properties": {
                    "image": {"type": "string"},
                    "command": {"type": "array", "items": {"type": "string"}},
                    "args": {"type": "array", "items": {"type": "string"}},
                    "env": {"type": "array", "items": NAMED},
                    "numNodes": {"type": "integer", "minimum": 1},
                    "resourcesPerNode": {"type": "object"},
                    "numProcPerNode": {"type": ["integer", "string"]},
                }},
                "labels": {"type": "object"},
                "annotations": {"type": "object"},
                "podTemplateOverrides": {"type": "array", "items": POD_TEMPLATE_OVERRIDE},
                "suspend": {"type": "boolean"},
                "managedBy": {"enum": ["trainer.kubeflow.org/trainjob-controller",
                                       "kueue.x-k8s.io/multikueue"]},
            },
        },
    },
}

SCENARIOS = {
    "default": manifest(trainer={"backend": "trainjob"}),
    "gpus-multinode": manifest(
        trainer={
            "backend": "trainjob",
            "nodes": 4,
            "gpusPerNode": 8,
            "resources": {"requests": {"cpu": "16", "memory": "200Gi"}, "limits": {"cpu": 32}},
            "serviceAccountName": "rlhf-trainer",
        },
        workspace={"claimName": "rlhf-workspace"},
    ),
    "hub-token": manifest(
        trainer={"backend": "trainjob"},
        model={"name": "Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": {"name": "hf", "key": "t"}},
    ),
}


def as_pod(job: Obj) -> Obj:
    """The pod that the `node` job of the torch-distributed runtime gets from this TrainJob:
    every Kubernetes type the TrainJob carries, in the place a Pod carries it."""
    trainer = job["spec"]["trainer"]
    [override] = job["spec"]["podTemplateOverrides"]
    [mounts] = override["spec"]["containers"]
    container = {
        "name": mounts["name"],
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
        "volumeMounts": mounts["volumeMounts"],
    }
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    spec: Obj = {"containers": [container], "volumes": override["spec"]["volumes"]}
    if "serviceAccountName" in override["spec"]:
        spec["serviceAccountName"] = override["spec"]["serviceAccountName"]
    metadata = {"name": "node-0", "labels": override["metadata"]["labels"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def validate_trainjob(job: Obj) -> None:
    jsonschema.validate(job, TRAINJOB_SCHEMA)
    kubernetes_validate.validate(as_pod(job), K8S_VERSION, strict=True)
    [override] = job["spec"]["podTemplateOverrides"]
    # Trainer v2 refuses env overrides on `node`: env goes through spec.trainer.env.
    assert all("env" not in c for c in override["spec"]["containers"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_trainjob_children_validate(scenario: str) -> None:
    children = plan(make_run(SCENARIOS[scenario]), Observed()).children
    assert [c["kind"] for c in children] == ["ConfigMap", "TrainJob"]
    kubernetes_validate.validate(children[0], K8S_VERSION, strict=True)
    validate_trainjob(children[1])


def test_schema_catches_a_broken_trainjob() -> None:
    run = make_run(SCENARIOS["default"])
    job = backends.build_trainjob(run, run.spec.stages[0])
    job["spec"]["podTemplateOverrides"][0]["spec"]["containers"][0]["image"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate_trainjob(job)
    job = backends.build_trainjob(run, run.spec.stages[0])
    job["spec"]["trainer"]["env"][0]["valueFrom"] = "not an EnvVarSource"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_trainjob(job)


def test_trainjob_shape() -> None:
    run = make_run(SCENARIOS["gpus-multinode"])
    job = backends.build_trainjob(run, run.spec.stages[0])
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert spec["trainer"]["numNodes"] == 4 and spec["trainer"]["numProcPerNode"] == 8
    assert spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert spec["trainer"]["command"] == [
        "torchrun", "-m", "rlhf_trainer", "sft", "--config", "/etc/rlhf/sft.yaml"
    ], "torchrun reads nnodes, node rank and rendezvous from Trainer's PET_* env"
    [override] = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["spec"]["serviceAccountName"] == "rlhf-trainer"
    volumes = {v["name"]: v for v in override["spec"]["volumes"]}
    assert volumes["workspace"] == {
        "name": "workspace", "persistentVolumeClaim": {"claimName": "rlhf-workspace"}
    }
    assert volumes["config"]["configMap"]["name"] == "demo-sft-config"
    assert override["metadata"]["labels"]["rlhf.dev/run"] == "demo"
    assert spec["suspend"] is False
    assert job["metadata"]["annotations"][builders.ANNOTATION_HASH]


def test_trainjob_suspension_keeps_the_hash() -> None:
    run = make_run(SCENARIOS["default"])
    suspended = make_run(manifest(trainer={"backend": "trainjob"}, suspend=True))
    a = backends.build_trainjob(run, run.spec.stages[0])
    b = backends.build_trainjob(suspended, suspended.spec.stages[0])
    assert b["spec"]["suspend"] is True and backends.is_suspended(b)
    assert config_hash(a) == config_hash(b)


def test_trainjob_refuses_scheduler_name() -> None:
    run = make_run(manifest(trainer={"backend": "trainjob", "schedulerName": "volcano"}))
    p = plan(run, Observed())
    assert p.children == []
    degraded = next(c for c in p.status.conditions if c.type == "Degraded")
    assert degraded.message.startswith("spec.trainer.schedulerName:")


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({}, "Pending"),
        ({"jobsStatus": [{"name": "node", "active": 0, "ready": 0}]}, "Pending"),
        ({"jobsStatus": [{"name": "node", "active": 2}]}, "Running"),
        ({"conditions": [{"type": "Suspended", "status": "True"}]}, "Suspended"),
        ({"conditions": [{"type": "Suspended", "status": "False", "reason": "Resumed"}],
          "jobsStatus": [{"name": "node", "ready": 1}]}, "Running"),
        ({"conditions": [{"type": "Complete", "status": "True"},
                         {"type": "Suspended", "status": "False"}]}, "Succeeded"),
        ({"conditions": [{"type": "Failed", "status": "True", "message": "OOM"},
                         {"type": "Suspended", "status": "False"}]}, "Failed"),
    ],
)
def test_trainjob_phase(status: Obj, phase: str) -> None:
    job = {"kind": "TrainJob", "status": status}
    assert backends.TrainJobBackend().job_phase(job) == phase


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
@pytest.mark.parametrize("phase", get_args(api.Phase))
def test_status_for_reads_back(kind: str, phase: api.Phase) -> None:
    backend = backends.for_kind(kind)
    assert backend.job_phase({"kind": kind, "status": backend.status_for(phase)}) == phase


def test_the_failed_condition_names_the_failure_whatever_its_position() -> None:
    run = make_run(SCENARIOS["default"])
    p0 = plan(run, Observed())
    job = dict(p0.children[1])
    job["status"] = {"conditions": [
        {"type": "Failed", "status": "True", "message": "OOMKilled"},
        {"type": "Suspended", "status": "False", "message": "Resumed"},
    ]}
    observed = Observed(children=[p0.children[0], job])
    p1 = plan(run.model_copy(update={"status": p0.status}), observed)
    assert p1.status.stages[0].message == "OOMKilled"


def test_both_backends_launch_the_same_trainer_locally() -> None:
    doc = manifest(trainer={"nodes": 2, "nprocPerNode": 2})
    runs = {
        "PyTorchJob": make_run(doc),
        "TrainJob": make_run(manifest(trainer={"nodes": 2, "nprocPerNode": 2,
                                               "backend": "trainjob"})),
    }
    launches = {
        kind: backends.for_kind(kind).local_launch(plan(run, Observed()).children[1])
        for kind, run in runs.items()
    }
    torch, trainer = launches["PyTorchJob"], launches["TrainJob"]
    assert torch.replicas == trainer.replicas == 2
    assert torch.nproc_per_node == trainer.nproc_per_node == "2"
    assert torch.pod["volumes"] == trainer.pod["volumes"]
    a, b = torch.pod["containers"][0], trainer.pod["containers"][0]
    assert a["env"] == b["env"] and a["volumeMounts"] == b["volumeMounts"]
    rendezvous = ("--nnodes=", "--nproc-per-node=", "--node-rank=", "--master-")
    assert [x for x in a["command"] if not x.startswith(rendezvous)] == b["command"]


def test_trainer_pods_know_their_own_name() -> None:
    """The downward API env rank 0 needs to annotate its pod with progress."""
    for doc in SCENARIOS.values():
        for backend in ("pytorchjob", "trainjob"):
            variant = copy.deepcopy(doc)
            variant["spec"]["trainer"]["backend"] = backend
            job = plan(make_run(variant), Observed()).children[1]
            env = backends.for_kind(job["kind"]).local_launch(job).pod["containers"][0]["env"]
            refs = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                    for e in env}
            assert refs["POD_NAME"] == "metadata.name"
            assert refs["POD_NAMESPACE"] == "metadata.namespace"
