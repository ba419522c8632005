"""Trainer backends: the TrainJob builder against the Trainer v2 API, phases from each
controller's status, and one launch for the local executor whatever the backend."""

from __future__ import annotations

import copy
from typing import Any, get_args

import jsonschema
import kubernetes_validate
import pytest

from helpers import BASE, make_run, manifest
from rlhf_operator import api, backends, builders
from rlhf_operator.planner import Observed, config_hash, plan

pytestmark = pytest.mark.unit

K8S_VERSION = "1.34"
Obj = dict[str, Any]

# The trainer.kubeflow.org/v1alpha1 TrainJob envelope of Kubeflow Trainer v2.2+, written from
# its Go API types (TrainJobSpec, RuntimeRef, Trainer, RuntimePatch, TrainingRuntimeSpecPatch,
# JobSetTemplatePatch, ReplicatedJobPatch, JobTemplatePatch, PodTemplatePatch, PodSpecPatch,
# ContainerPatch). The Kubernetes types inside (EnvVar, Volume, VolumeMount, SecurityContext,
# ResourceRequirements) are checked with kubernetes-validate below.
NAMED = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
META_PATCH = {"type": "object", "additionalProperties": False, "properties": {
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}}


def patch_of(**properties: Obj) -> Obj:
    return {"type": "object", "additionalProperties": False, "properties": properties}


CONTAINER_PATCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": NAMED},
        "volumeMounts": {"type": "array", "items": NAMED},
        "securityContext": {"type": "object"},
    },
}
POD_SPEC_PATCH = patch_of(
    serviceAccountName={"type": "string"},
    nodeSelector={"type": "object"},
    affinity={"type": "object"},
    tolerations={"type": "array"},
    volumes={"type": "array", "items": NAMED},
    initContainers={"type": "array", "items": CONTAINER_PATCH},
    containers={"type": "array", "items": CONTAINER_PATCH},
    schedulingGates={"type": "array", "items": NAMED},
    imagePullSecrets={"type": "array", "items": NAMED},
    securityContext={"type": "object"},
    terminationGracePeriodSeconds={"type": "integer"},
)
REPLICATED_JOB_PATCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "template": patch_of(metadata=META_PATCH, spec=patch_of(
            template=patch_of(metadata=META_PATCH, spec=POD_SPEC_PATCH),
        )),
    },
}
RUNTIME_PATCH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["manager"],
    "properties": {
        "manager": {"type": "string", "minLength": 1, "maxLength": 253},
        "time": {"type": "string"},
        "trainingRuntimeSpec": patch_of(template=patch_of(
            metadata=META_PATCH,
            spec=patch_of(replicatedJobs={"type": "array", "items": REPLICATED_JOB_PATCH}),
        )),
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
                "runtimePatches": {"type": "array", "maxItems": 16, "items": RUNTIME_PATCH},
                "suspend": {"type": "boolean"},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
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
        stages=[{**s, "hyperparameters": {"batchSize": 64}}
                for s in BASE["spec"]["stages"]],  # a batch that splits over the 32 ranks
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
    patch = backends.node_pod_patch(job)
    [node] = patch["spec"]["containers"]
    container = {
        "name": node["name"],
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
        "volumeMounts": node["volumeMounts"],
        "securityContext": node["securityContext"],
    }
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    spec: Obj = {**patch["spec"], "containers": [container]}
    metadata = {"name": "node-0", "labels": patch["metadata"]["labels"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def validate_trainjob(job: Obj) -> None:
    jsonschema.validate(job, TRAINJOB_SCHEMA)
    kubernetes_validate.validate(as_pod(job), K8S_VERSION, strict=True)
    managers = [p["manager"] for p in job["spec"]["runtimePatches"]]
    assert managers.count(backends.TRAINJOB_MANAGER) == 1, managers
    # Trainer refuses env patches on `node`: env goes through spec.trainer.env.
    assert all("env" not in c for c in backends.node_pod_patch(job)["spec"]["containers"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_trainjob_children_validate(scenario: str) -> None:
    children = plan(make_run(SCENARIOS[scenario]), Observed()).children
    assert [c["kind"] for c in children] == ["ConfigMap", "TrainJob"]
    kubernetes_validate.validate(children[0], K8S_VERSION, strict=True)
    validate_trainjob(children[1])


def test_schema_catches_a_broken_trainjob() -> None:
    run = make_run(SCENARIOS["default"])
    job = backends.build_trainjob(run, run.spec.stages[0])
    backends.node_pod_patch(job)["spec"]["containers"][0]["image"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate_trainjob(job)
    job = backends.build_trainjob(run, run.spec.stages[0])
    job["spec"]["podTemplateOverrides"] = job["spec"].pop("runtimePatches")  # Trainer v2.1
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
    [entry] = spec["runtimePatches"]
    assert entry["manager"] == "rlhf.dev/operator"
    [replicated] = entry["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    pod = replicated["template"]["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "rlhf-trainer"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["workspace"] == {
        "name": "workspace", "persistentVolumeClaim": {"claimName": "rlhf-workspace"}
    }
    assert volumes["config"]["configMap"]["name"] == "demo-sft-config"
    assert pod["metadata"]["labels"]["rlhf.dev/run"] == "demo"
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


def test_trainjob_pods_get_what_pytorchjob_pods_get() -> None:
    """Labels (so progress is read and pods are scraped), volumes and mounts, and the pod and
    container securityContext with fsGroup: the runtime patch carries the PyTorchJob pod's."""
    for scenario in SCENARIOS.values():
        run = make_run(scenario)
        stage = run.spec.stages[0]
        master = builders.build_pytorchjob(run, stage)["spec"]["pytorchReplicaSpecs"]["Master"]
        want = master["template"]
        have = backends.node_pod_patch(backends.build_trainjob(run, stage))
        assert have["metadata"]["labels"] == want["metadata"]["labels"]
        assert have["metadata"]["labels"]["rlhf.dev/component"] == "trainer"
        for key in ("volumes", "securityContext"):
            assert have["spec"][key] == want["spec"][key], key
        assert have["spec"]["securityContext"]["fsGroup"] == builders.TRAINER_UID
        [node], [pytorch] = have["spec"]["containers"], want["spec"]["containers"]
        assert node["name"] == "node"
        assert node["volumeMounts"] == pytorch["volumeMounts"]
        assert node["securityContext"] == pytorch["securityContext"]
        assert node["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_queue_label_is_on_the_job_and_never_on_its_pods() -> None:
    """On a pod the queue label makes Kueue admit that pod alone (its pod integration)."""
    queue = builders.KUEUE_QUEUE_LABEL
    for backend in ("pytorchjob", "trainjob"):
        doc = manifest(trainer={"backend": backend, "nodes": 2})
        doc["metadata"]["labels"] = {queue: "gpus"}
        job = plan(make_run(doc), Observed()).children[1]
        assert job["metadata"]["labels"][queue] == "gpus"
        if backend == "trainjob":
            templates = [backends.node_pod_patch(job)]
        else:
            templates = [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
        assert len(templates) == (1 if backend == "trainjob" else 2)
        for template in templates:
            assert queue not in template["metadata"]["labels"], backend
            assert template["metadata"]["labels"]["rlhf.dev/run"] == "demo"


def test_trainjob_runtime_patch_is_the_operators_own_entry() -> None:
    run = make_run(SCENARIOS["default"])
    job = backends.build_trainjob(run, run.spec.stages[0])
    assert [p["manager"] for p in job["spec"]["runtimePatches"]] == ["rlhf.dev/operator"]
    kueue = {"manager": "kueue.x-k8s.io/manager", "trainingRuntimeSpec": {"template": {}}}
    job["spec"]["runtimePatches"].insert(0, kueue)
    launch = backends.TrainJobBackend().local_launch(job)  # finds ours among others
    assert launch.pod["volumes"] == backends.node_pod_patch(job)["spec"]["volumes"]
