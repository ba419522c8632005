"""Prometheus operator (v0.93) scrapes every pod the operator runs, and the chart's RBAC lets
the operator create children that block their owner's deletion.

Scraping is worked out as Prometheus and prometheus-operator do it (scrape.py): a pod is
scraped where a PodMonitor's selector, port and relabelings lead, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import pytest
from render import (
    EXAMPLES,
    StageRender,
    chart_values,
    containers,
    pod_templates,
    rank0_pod,
    trainer_replicated_job,
)
from scrape import POD_IP, scraped, trainjob_rank0_labels

from rlhf_operator import builders

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
MONITORING = "monitoring"  # the chart scenario with the workload PodMonitors on
SCENARIOS = sorted(chart_values())
TRAINJOB_PORTS = (
    "(a TrainJob's pods get their container ports from its ClusterTrainingRuntime: in Trainer "
    "v2.3 a runtimePatches container patch holds only env, securityContext and volumeMounts)"
)


def metrics_port(pod: Obj, port_name: str) -> str | None:
    """Where the pod serves /metrics: the trainer's RLHF_METRICS_PORT, else the port named
    `port_name` it declares."""
    for container in containers(pod):
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        if env.get(builders.METRICS_PORT_ENV):
            return str(env[builders.METRICS_PORT_ENV])
    declared = [p for c in containers(pod) for p in c.get("ports") or []]
    return next((str(p["containerPort"]) for p in declared if p.get("name") == port_name), None)


def scrape_problems(pod: Obj, port_name: str, monitors: list[Obj]) -> list[str]:
    """Exactly one PodMonitor makes Prometheus scrape the pod's /metrics (none: the pod is not
    monitored; two: every series twice)."""
    port = metrics_port(pod, port_name)
    if port is None:
        return [f"the pod serves no /metrics: no {builders.METRICS_PORT_ENV}, no port {port_name}"]
    address = f"{POD_IP}:{port}"
    found = scraped(pod, monitors)
    hits = [(m, path) for m, path, a in found if a == address]
    if len(hits) != 1 or hits[0][1] != "/metrics":
        labels = (pod.get("metadata") or {}).get("labels") or {}
        return [f"{len(hits)} PodMonitor endpoints scrape /metrics at {address} ({hits}); all "
                f"targets: {found}; pod labels {labels}"]
    return []


def pods_of(child: Obj, render: StageRender, runtimes: dict[str, Obj]) -> list[tuple[str, Obj]]:
    """(where, pod) of the pods to check: a server Deployment's, and rank 0's of a job as the
    cluster labels it."""
    if child["kind"] == "Deployment":
        return list(pod_templates(child))
    if child not in render.jobs():
        return []
    pod = rank0_pod(child, runtimes)
    assert pod is not None, f"{render.where}: runtime {child['spec']['runtimeRef']} is unknown"
    if child["kind"] == "TrainJob":
        rjob = trainer_replicated_job(runtimes[child["spec"]["runtimeRef"]["name"]])
        pod["metadata"]["labels"].update(trainjob_rank0_labels(child, rjob["name"]))
    return [("rank 0 pod", pod)]


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_every_pod_the_operator_runs_is_scraped(
    renders: dict[str, list[StageRender]],
    chart: dict[str, list[Obj]],
    runtimes: dict[str, Obj],
    example: str,
) -> None:
    """Rank 0 of each trainer job (PyTorchJob: the Master; TrainJob: its runtime's trainer
    node with the job's patches, labelled by JobSet) is scraped at its metrics port; each
    rollout and judge pod at its `http` port. A PyTorchJob's pod is found by its declared
    `metrics` port; a TrainJob's pod cannot declare one (TRAINJOB_PORTS), so a PodMonitor
    must reach it by address."""
    monitors = [o for o in chart[MONITORING] if o["kind"] == "PodMonitor"]
    found = []
    for render in renders[example]:
        for child in render.children:
            port = builders.METRICS_PORT_NAME if child["kind"] != "Deployment" else "http"
            for where, pod in pods_of(child, render, runtimes):
                problems = scrape_problems(pod, port, monitors)
                if problems and child["kind"] == "TrainJob":
                    problems = [f"{p} {TRAINJOB_PORTS}" for p in problems]
                found += [f"{render.where}: {child['kind']} {where}: {p}" for p in problems]
    assert not found, "\n".join(found)


def grants(rules: list[Obj], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", [])
        and verb in r.get("verbs", [])
        for r in rules
    )


def rules_in(objs: list[Obj], namespace: str | None) -> list[Obj]:
    """The rules bound to subjects cluster-wide, or in `namespace` through RoleBindings."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs
             if o["kind"] in ("Role", "ClusterRole")}
    out: list[Obj] = []
    for binding in objs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"].get("namespace") != namespace:
            continue
        ref = binding["roleRef"]
        scope = None if ref["kind"] == "ClusterRole" else binding["metadata"].get("namespace")
        role = roles.get((ref["kind"], scope, ref["name"]))
        out += role.get("rules", []) if role else []
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_may_block_owner_deletion(chart: dict[str, list[Obj]], scenario: str) -> None:
    """Children carry ownerReferences with blockOwnerDeletion: true; with the API server's
    OwnerReferencesPermissionEnforcement admission plugin that needs `update` on
    rlhfruns/finalizers in each namespace the operator works in."""
    objs = chart[scenario]
    namespaces = chart_values()[scenario].get("watchNamespaces") or [None]
    for namespace in namespaces:
        rules = rules_in(objs, namespace)
        assert grants(rules, "rlhf.dev", "rlhfruns/finalizers", "update"), (scenario, namespace)


def test_children_block_owner_deletion(renders: dict[str, list[StageRender]]) -> None:
    """What the finalizers grant is for: every child is owned by its run, blocking deletion."""
    for stages in renders.values():
        for render in stages:
            for child in render.children:
                refs = child["metadata"].get("ownerReferences") or []
                assert [r["kind"] for r in refs] == ["RLHFRun"], (render.where, child["kind"])
                assert refs[0]["blockOwnerDeletion"] is True and refs[0]["uid"], render.where
