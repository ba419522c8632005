"""Builders: every child validates against upstream Kubernetes schemas and the PyTorchJob API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import BASE, make_run, manifest
from rlhf_operator import builders
from rlhf_operator.planner import Observed, plan

pytestmark = pytest.mark.unit

K8S_VERSION = "1.34"

# The kubeflow.org/v1 PyTorchJob envelope, written from the Go API types
# (PyTorchJobSpec, RunPolicy, ReplicaSpec). Pod templates inside are checked against the
# upstream Kubernetes schema with kubernetes-validate.
REPLICA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object"},
    },
}
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string"},
                "elasticPolicy": {"type": "object"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "ttlSecondsAfterFinished": {"type": "integer"},
                        "activeDeadlineSeconds": {"type": "integer"},
                        "backoffLimit": {"type": "integer"},
                        "suspend": {"type": "boolean"},
                        "managedBy": {"type": "string"},
                        "schedulingPolicy": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "minAvailable": {"type": "integer"},
                                "queue": {"type": "string"},
                                "minResources": {"type": "object"},
                                "priorityClass": {"type": "string"},
                                "scheduleTimeoutSeconds": {"type": "integer"},
                            },
                        },
                    },
                },
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["Master"],
                    "properties": {"Master": REPLICA, "Worker": REPLICA},
                },
            },
        },
    },
}


def validate_pytorchjob(job: dict[str, Any]) -> None:
    jsonschema.validate(job, PYTORCHJOB_SCHEMA)
    for name, replica in job["spec"]["pytorchReplicaSpecs"].items():
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{job['metadata']['name']}-{name.lower()}"},
            "template": replica["template"],
        }
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        containers = replica["template"]["spec"]["containers"]
        assert containers[0]["name"] == "pytorch", "Kubeflow requires the container `pytorch`"


SCENARIOS = {
    "default": manifest(),
    "gpus-multinode": manifest(
        trainer={
            "nodes": 2,
            "gpusPerNode": 8,
            "resources": {"requests": {"cpu": "16", "memory": "200Gi"}, "limits": {"cpu": 32}},
            "schedulerName": "volcano",
        },
        workspace={"claimName": "rlhf-workspace"},
        stages=[{**s, "hyperparameters": {"batchSize": 32}}
                for s in BASE["spec"]["stages"]],  # a batch that splits over the 16 ranks
    ),
    "hub-token": manifest(
        model={"name": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main",
               "tokenSecretRef": {"name": "hf", "key": "token"}},
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_children_validate(scenario: str) -> None:
    run = make_run(SCENARIOS[scenario])
    for child in plan(run, Observed()).children:
        if child["kind"] == "PyTorchJob":
            validate_pytorchjob(child)
        else:
            kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_schema_catches_a_broken_job() -> None:
    job = builders.build_pytorchjob(make_run(), make_run().spec.stages[0])
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "command"
    ] = "torchrun -m rlhf_trainer"  # a string where Kubernetes wants an argv list
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pytorchjob(job)
    job = builders.build_pytorchjob(make_run(), make_run().spec.stages[0])
    job["spec"]["runPolicy"]["cleanPodPolicy"] = "Never"
    with pytest.raises(jsonschema.ValidationError):
        validate_pytorchjob(job)


def test_multinode_job_shape() -> None:
    run = make_run(SCENARIOS["gpus-multinode"])
    job = builders.build_pytorchjob(run, run.spec.stages[0])
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2}
    pod = specs["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["cpu"] == "16"
    assert "--nnodes=2" in container["command"] and "--nproc-per-node=8" in container["command"]
    assert pod["schedulerName"] == "volcano"
    workspace = next(v for v in pod["volumes"] if v["name"] == "workspace")
    assert workspace["persistentVolumeClaim"]["claimName"] == "rlhf-workspace"


def test_secrets_travel_only_as_references() -> None:
    run = make_run(SCENARIOS["hub-token"])
    children = plan(run, Observed()).children
    env = children[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
        0
    ]["env"]
    token = next(e for e in env if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "value" not in token
    config = yaml.safe_load(children[0]["data"]["sft.yaml"])
    assert config["model"]["tokenSecretRef"] == {"name": "hf", "key": "token"}


def test_spec_strings_are_single_argv_items() -> None:
    doc = manifest()
    doc["spec"]["trainer"] = {"image": "repo/img:1; rm -rf /"}
    run = make_run(doc)
    command = builders.trainer_command(run, run.spec.stages[0])
    assert command[0] == "torchrun" and "sh" not in command and "-c" not in command
    assert command[-1] == "/etc/rlhf/sft.yaml"


def test_long_names_are_shortened_stably() -> None:
    doc = manifest()
    doc["metadata"]["name"] = "a" * 49  # the longest a run with stages sft, sft2 may have
    run = make_run(doc)
    assert builders.child_name(run, "sft2") == "a" * 49 + "-sft2"  # jobs are never shortened
    suffix = "rollout-1234567"
    name = builders.child_name(run, "sft", suffix)
    assert len(name) == 63 and name.endswith(f"-{suffix}") and name.startswith("a" * 30)
    assert name == builders.child_name(run, "sft", suffix)
    assert name != builders.child_name(run, "sft2", suffix)


def test_config_hash_ignores_suspension_only() -> None:
    run = make_run()
    suspended = make_run(manifest(suspend=True))
    a = builders.build_pytorchjob(run, run.spec.stages[0])
    b = builders.build_pytorchjob(suspended, suspended.spec.stages[0])
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]
    doc = manifest()
    doc["spec"]["stages"][0]["hyperparameters"] = {"seed": 7}
    c = builders.build_pytorchjob(make_run(doc), make_run(doc).spec.stages[0])
    assert a["metadata"]["annotations"] != c["metadata"]["annotations"]


def test_trainer_pods_run_restricted_as_the_image_user() -> None:
    """Pod Security `restricted`: non-root (the trainer image's own numeric user), no privilege
    escalation, no capabilities, RuntimeDefault seccomp, a read-only root filesystem with
    writable emptyDirs where torch writes (/tmp, HOME)."""
    run = make_run(SCENARIOS["gpus-multinode"])
    job = builders.build_pytorchjob(run, run.spec.stages[0])
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }  # fmt: skip
        [container] = pod["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in ("/tmp", builders.TRAINER_HOME, "/dev/shm", "/workspace"):
            assert "emptyDir" in volumes[mounts[path]] or mounts[path] == "workspace", path
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    trainer_stage = dockerfile.split("AS trainer")[1]
    assert f"USER {builders.TRAINER_UID}:{builders.TRAINER_UID}" in trainer_stage
    assert f"--uid {builders.TRAINER_UID} --create-home --home-dir {builders.TRAINER_HOME}" in (
        trainer_stage
    )


def test_a_stage_with_its_own_model_starts_from_it_with_its_token() -> None:
    """`stages[].model` (e.g. a judge's base): the stage's config and HF_TOKEN come from it; the
    stages after it still start from spec.model or their `from`."""
    doc = manifest()
    doc["spec"]["model"] = {"name": "org/policy"}
    doc["spec"]["stages"][0]["model"] = {
        "name": "org/judge-base",
        "tokenSecretRef": {"name": "judge-hf", "key": "token"},
    }
    run = make_run(doc)
    first, second = run.spec.stages[0], run.spec.stages[1]
    assert builders.stage_model(run, first).name == "org/judge-base"
    assert builders.stage_model(run, second).path == f"{run.metadata.name}/{second.from_}/final"
    pod = builders.trainer_pod_template(run, first)
    token = next(e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "judge-hf", "key": "token"}}
    pod = builders.trainer_pod_template(run, second)
    assert not [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "HF_TOKEN"]


def test_only_the_master_declares_the_metrics_port() -> None:
    """Only rank 0 serves /metrics: a Worker declaring the port would be a dead scrape target."""
    stages = [{**s, "hyperparameters": {"batchSize": 9}} for s in BASE["spec"]["stages"]]
    run = make_run(trainer={"nodes": 3, "gpusPerNode": 1}, stages=stages)  # 3 ranks
    job = builders.build_pytorchjob(run, run.spec.stages[0])
    replicas = job["spec"]["pytorchReplicaSpecs"]
    [master] = replicas["Master"]["template"]["spec"]["containers"]
    [worker] = replicas["Worker"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9400} in [
        {k: p[k] for k in ("name", "containerPort")} for p in master["ports"]
    ]
    assert "ports" not in worker and replicas["Worker"]["replicas"] == 2
