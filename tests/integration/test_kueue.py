"""Kueue and the operator (kopf, a subprocess) over HTTP against the Kubernetes API emulator.

The test plays Kueue for the shipped queued example (manifests/examples/kueue-queued.yaml:
the queue label and `spec.suspend: true`): it admits the job by un-suspending it (for a
TrainJob also writing Kueue's own `spec.runtimePatches` entry), then preempts it by
suspending it again. Kueue owns a queued job's suspend field once the job exists, so the
operator, reconciling every second meanwhile, must write nothing to the job either time.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from test_operator import EXAMPLES, JOBS, TRAINJOBS, Cluster, running_operator

from kube_emulator import TEST_AGENT, wait_for
from rlhf_operator import backends, builders

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
KUEUE_ENTRY: Obj = {
    "manager": "kueue.x-k8s.io/manager",
    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
        "name": "node",
        "template": {"spec": {"template": {"spec": {
            "nodeSelector": {"cloud.google.com/gke-accelerator": "a100"},
        }}}},
    }]}}},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_operator(tmp_path_factory.mktemp("kueue")) as cluster:
        try:
            yield cluster
        finally:
            print("--- operator log ---\n" + cluster.log_tail(60))  # shown when a test fails


def queued_run(kind: str) -> Obj:
    doc = yaml.safe_load((EXAMPLES / "kueue-queued.yaml").read_text())
    assert doc["spec"]["suspend"] is True
    assert builders.KUEUE_QUEUE_LABEL in doc["metadata"]["labels"]
    doc["spec"]["trainer"]["backend"] = kind.lower()
    return dict(doc)


def pod_labels(job: Obj) -> list[dict[str, str]]:
    """The labels of every pod template the job gives its trainer pods."""
    if job["kind"] == "TrainJob":
        return [backends.node_pod_patch(job)["metadata"]["labels"]]
    return [r["template"]["metadata"]["labels"]
            for r in job["spec"]["pytorchReplicaSpecs"].values()]


def as_kueue(cluster: Cluster, path: str, job: Obj, suspend: bool) -> None:
    """Kueue's write: the suspend field; on a TrainJob's admission, also its runtime patch
    beside the operator's (a merge patch sends the whole list)."""
    patch: Any = suspend
    for name in reversed(backends.for_kind(job["kind"]).suspend_path):
        patch = {name: patch}
    if job["kind"] == "TrainJob" and not suspend:
        patch["spec"]["runtimePatches"] = [KUEUE_ENTRY, *job["spec"]["runtimePatches"]]
    cluster.client.call("PATCH", path, patch)


def operator_writes(
    cluster: Cluster, since: int, ns: str, kopf: bool = True
) -> list[tuple[str, str, Obj]]:
    """(method, path with query, body) of the operator's writes into `ns` from request
    `since` on; without kopf's own (its finalizer and bookkeeping on the run) if not `kopf`."""
    out = []
    for request in list(cluster.emulator.handler)[since:]:
        agent = request.headers.get("User-Agent", "")
        if agent == TEST_AGENT or (not kopf and agent.startswith("kopf/")):
            continue
        if request.method.value in ("POST", "PATCH", "PUT", "DELETE") and (
            f"/namespaces/{ns}/" in request.url.path
        ):
            body = json.loads(request.body) if request.body else {}
            out.append((request.method.value, str(request.url.path_qs), body))
    return out


def hold(cluster: Cluster, ns: str, run: str, seconds: float = 3.5) -> int:
    """Let the operator reconcile for `seconds` (its resync is 1 s); the run reads it made."""
    mark = cluster.emulator.request_count()
    time.sleep(seconds)
    return sum(1 for r in list(cluster.emulator.handler)[mark:]
               if r.method.value == "GET"
               and r.url.path.endswith(f"/namespaces/{ns}/rlhfruns/{run}"))


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_kueue_admits_and_preempts_and_the_operator_never_undoes_it(
    cluster: Cluster, kind: str
) -> None:
    ns = f"kueue-{kind.lower()}"
    doc = queued_run(kind)
    run = doc["metadata"]["name"]
    path = f"{(JOBS if kind == 'PyTorchJob' else TRAINJOBS).format(ns=ns)}/{run}-sft"
    cluster.apply_run(ns, doc)
    job = wait_for(f"the {kind}", lambda: cluster.client.get(path))
    assert backends.is_suspended(job), "created suspended (spec.suspend)"
    assert job["metadata"]["labels"][builders.KUEUE_QUEUE_LABEL] == "team-a-queue"
    labels = pod_labels(job)
    assert labels and all(builders.KUEUE_QUEUE_LABEL not in pod for pod in labels), (
        "pods without the queue label: Kueue admits the job, not each pod by itself"
    )
    cluster.settle()

    for suspend, phase in ((False, "Running"), (True, "Suspended")):  # admission, preemption
        mark = cluster.emulator.request_count()
        as_kueue(cluster, path, copy.deepcopy(cluster.client.get(path) or {}), suspend)
        cluster.set_job_phase(ns, f"{run}-sft", phase, kind=kind)  # as its controller reports
        assert hold(cluster, ns, run) >= 3, "the operator reconciled meanwhile"
        to_job = [w for w in operator_writes(cluster, mark, ns) if f"/{run}-sft" in w[1]]
        assert to_job == [], f"the operator wrote to the {kind} after Kueue did: {to_job}"
        job = cluster.client.get(path) or {}
        assert backends.is_suspended(job) is suspend
    if kind == "TrainJob":
        managers = [p["manager"] for p in job["spec"]["runtimePatches"]]
        assert managers == ["kueue.x-k8s.io/manager", "rlhf.dev/operator"]

    writes = operator_writes(cluster, 0, ns, kopf=False)
    plural = backends.for_kind(kind).plural
    assert any(m == "POST" and f"/{plural}?" in p for m, p, _ in writes), "the job was sent"
    loose = [p for m, p, _ in writes if m in ("POST", "PATCH") and "fieldValidation=Strict"
             not in p]
    assert loose == [], "every create and patch of the operator's asks for strict validation"
