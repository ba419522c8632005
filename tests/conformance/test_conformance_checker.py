"""The checker itself: it refuses what the API server would, so a pass means something."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from scrape import POD_IP, relabel, scraped
from upstream import DNS1035, K8S_VERSIONS, Upstream, evaluated_rule, version_of

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
TRAINJOB: Obj = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "TrainJob",
    "metadata": {"name": "ok", "namespace": "default", "labels": {"a": "b"}},
    "spec": {
        "runtimeRef": {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"},
        "trainer": {"numNodes": 2, "resourcesPerNode": {"limits": {"cpu": 2, "memory": "1Gi"}}},
        "runtimePatches": [{"manager": "rlhf.dev/operator"}],
    },
}
PODMONITOR: Obj = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PodMonitor",
    "metadata": {"name": "ok", "namespace": "default"},
    "spec": {
        "selector": {"matchLabels": {"a": "b"}},
        "podMetricsEndpoints": [{"port": "metrics", "interval": "30s"}],
    },
}
PYTORCHJOB: Obj = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": "ok", "namespace": "default"},
    "spec": {
        "runPolicy": {"cleanPodPolicy": "None"},
        "pytorchReplicaSpecs": {
            "Master": {
                "replicas": 1,
                "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}},
            }
        },
    },
}


def set_path(obj: Obj, path: str, value: Any) -> Obj:
    out = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[leaf]
    elif isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return out


DELETE = object()
Case = tuple[Obj, str, Any, str]
REFUSED: dict[str, Case] = {
    "unknown field": (TRAINJOB, "spec.podTemplateOverrides", [], "podTemplateOverrides"),
    "unknown metadata field": (TRAINJOB, "metadata.nam", "x", "nam"),
    "wrong type": (TRAINJOB, "spec.trainer.numNodes", "two", "numNodes"),
    "int-or-string": (TRAINJOB, "spec.trainer.resourcesPerNode.limits.cpu", [2], "cpu"),
    "required": (TRAINJOB, "spec.runtimeRef", DELETE, "runtimeRef"),
    "enum": (PODMONITOR, "spec.podMetricsEndpoints.0.scheme", "ftp", "scheme"),
    "PyTorchJob unknown field": (PYTORCHJOB, "spec.runPolicy.cleanPodPolicies", "All", "clean"),
    "pattern": (PODMONITOR, "spec.podMetricsEndpoints.0.interval", "5 minutes", "interval"),
    "maxLength": (TRAINJOB, "spec.runtimePatches.0.manager", "m" * 254, "manager"),
    "list-map key": (
        TRAINJOB, "spec.runtimePatches", [{"manager": "a"}, {"manager": "a"}], "duplicate"
    ),
    "CEL name pattern": (TRAINJOB, "metadata.name", "Not_DNS", "RFC 1035"),
    "CEL name length": (TRAINJOB, "metadata.name", "a" * 64, "63 characters"),
    "CEL managedBy": (TRAINJOB, "spec.managedBy", "someone", "ManagedBy"),
    "apiVersion": (TRAINJOB, "apiVersion", "trainer.kubeflow.org/v1", "has no"),
}


@pytest.mark.parametrize("base", [TRAINJOB, PODMONITOR, PYTORCHJOB], ids=lambda o: o["kind"])
def test_valid_objects_pass(upstream: Upstream, base: Obj) -> None:
    assert upstream.problems(base, K8S_VERSIONS) == []


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_checker_refuses(upstream: Upstream, case: str) -> None:
    base, path, value, needle = REFUSED[case]
    problems = upstream.problems(set_path(base, path, value), K8S_VERSIONS)
    assert any(needle in p for p in problems), problems


BUILTIN: dict[str, Callable[[Obj], None]] = {
    "unknown field": lambda o: o["spec"].update(replica=1),
    "wrong type": lambda o: o["spec"].update(replicas="one"),
    "unknown kind": lambda o: o.update(kind="Deploymnt"),
}


@pytest.mark.parametrize("case", sorted(BUILTIN))
def test_builtin_kinds_are_strict(upstream: Upstream, case: str) -> None:
    deployment: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "ok"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    assert upstream.problems(deployment, K8S_VERSIONS) == []
    BUILTIN[case](deployment)
    assert len(upstream.problems(deployment, K8S_VERSIONS)) == len(K8S_VERSIONS)


def test_helpers() -> None:
    assert version_of("vllm/vllm-openai:v0.32.0") == (0, 32, 0)
    assert version_of("openmmlab/lmdeploy:v0.10.1-cu12") == (0, 10, 1)
    assert version_of("registry:5000/x:latest") is None
    assert not evaluated_rule("self == oldSelf")
    assert DNS1035.match("a-1") and not DNS1035.match("1a")


def test_scrape_simulation() -> None:
    """A named-port endpoint finds declared ports only; relabeling can give a port-free
    target an address; keep rules filter."""
    by_port = {"metadata": {"name": "p"}, "spec": {
        "selector": {"matchLabels": {"a": "b"}},
        "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
    }}
    by_address = {"metadata": {"name": "q"}, "spec": {
        "selector": {"matchLabels": {"a": "b"}},
        "podMetricsEndpoints": [{"relabelings": [
            {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "regex": "c",
             "action": "keep"},
            {"sourceLabels": ["__meta_kubernetes_pod_ip"], "targetLabel": "__address__",
             "replacement": "${1}:9400"},
        ]}],
    }}
    declared = {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
        {"name": "c", "ports": [{"name": "metrics", "containerPort": 9400}]}]}}
    bare = {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c"}]}}
    other = {"metadata": {"labels": {"a": "x"}}, "spec": {"containers": [{"name": "c"}]}}
    ip = f"{POD_IP}:9400"
    assert scraped(declared, [by_port]) == [("p", "/metrics", ip)]
    assert scraped(bare, [by_port]) == []
    assert scraped(bare, [by_address]) == [("q", "/metrics", ip)]
    assert scraped(other, [by_port, by_address]) == []
    assert relabel({"x": "1"}, {"sourceLabels": ["x"], "regex": "1", "action": "drop"}) is None
