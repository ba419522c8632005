"""One reconcile against an in-memory API: writes only on change, events once, errors mapped."""

from __future__ import annotations

import asyncio
import copy
import itertools
from typing import Any

import kopf
import kubernetes_validate
import pytest

from helpers import manifest, merge
from rlhf_operator import backends
from rlhf_operator.controller import PERSISTENT_DELAY, TRANSIENT_DELAY, Controller
from rlhf_operator.kube import BY_KIND, RUNS, ApiKube, Kube, KubeError, Resource, has_labels
from rlhf_operator.planner import Event
from rlhf_operator.reconcile import Reconciler, event_object

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
Key = tuple[str, str, str]


class FakeKube(Kube):
    """A dict of objects behind the `Kube` protocol; counts every write."""

    def __init__(self) -> None:
        self.objects: dict[Key, Obj] = {}
        self.writes: list[str] = []
        self.versions = itertools.count(1)
        self.fail_next: KubeError | None = None

    def _check(self) -> None:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err

    def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        self._check()
        found = self.objects.get((resource.kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def list(self, resource: Resource, namespace: str, labels: dict[str, str]) -> list[Obj]:
        return [
            copy.deepcopy(obj)
            for (kind, ns, _), obj in sorted(self.objects.items())
            if kind == resource.kind and ns == namespace and has_labels(obj, labels)
        ]

    def create(self, obj: Obj) -> Obj:
        self._check()
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.writes.append(f"create {key[0]} {key[2]}")
        if key in self.objects:
            raise KubeError(409, "exists")
        stored = copy.deepcopy(obj)
        stored["metadata"].update(uid=f"u{next(self.versions)}", resourceVersion="1")
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: Obj, sub: str | None = None
    ) -> Obj:
        self._check()
        self.writes.append(f"patch {resource.kind} {name}{'/' + sub if sub else ''}")
        key = (resource.kind, namespace, name)
        self.objects[key] = merge(self.objects[key], patch)
        return copy.deepcopy(self.objects[key])

    def delete(self, resource: Resource, namespace: str, name: str) -> None:
        self._check()
        self.writes.append(f"delete {resource.kind} {name}")
        self.objects.pop((resource.kind, namespace, name), None)

    # -- the other parties --------------------------------------------------------------
    def add_run(self, doc: Obj) -> None:
        self.objects[("RLHFRun", doc["metadata"]["namespace"], doc["metadata"]["name"])] = doc

    def set_job(self, name: str, phase: Any, kind: str = "PyTorchJob") -> None:
        status = backends.for_kind(kind).status_for(phase, "boom" if phase == "Failed" else "")
        self.objects[(kind, "team-a", name)]["status"] = status

    def kinds(self, kind: str) -> list[str]:
        return sorted(name for (k, _, name) in self.objects if k == kind)


def clock() -> str:
    return "2026-01-01T00:00:00Z"


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add_run(manifest())
    return fake


def reconcile(kube: FakeKube) -> list[str]:
    """The writes of one reconcile; events by kind only (their names are random)."""
    mark = len(kube.writes)
    Reconciler(kube, clock=clock, instance="test").reconcile("team-a", "demo")
    return [w.split(" demo.")[0] for w in kube.writes[mark:]]


def events(kube: FakeKube) -> list[str]:
    return [obj["reason"] for (kind, _, _), obj in kube.objects.items() if kind == "Event"]


def status(kube: FakeKube) -> Obj:
    return dict(kube.objects[("RLHFRun", "team-a", "demo")]["status"])


def test_first_reconcile_creates_children_and_status_second_writes_nothing(
    kube: FakeKube,
) -> None:
    assert reconcile(kube) == [
        "create ConfigMap demo-sft-config",
        "create PyTorchJob demo-sft",
        "patch RLHFRun demo/status",
    ]
    assert status(kube)["phase"] == "Pending" and status(kube)["currentStage"] == "sft"
    assert reconcile(kube) == [], "a steady state makes no write call"


def test_a_job_status_change_writes_only_status_and_events(kube: FakeKube) -> None:
    reconcile(kube)
    kube.set_job("demo-sft", "Running")
    assert reconcile(kube) == ["patch RLHFRun demo/status", "create Event"]
    assert status(kube)["phase"] == "Running"
    assert events(kube) == ["StageStarted"]
    assert reconcile(kube) == []
    kube.set_job("demo-sft", "Succeeded")
    writes = reconcile(kube)
    assert "create PyTorchJob demo-sft2" in writes
    assert kube.kinds("PyTorchJob") == ["demo-sft", "demo-sft2"]
    assert sorted(events(kube)) == ["StageStarted", "StageSucceeded"]
    assert reconcile(kube) == []


def test_a_failed_stage_posts_one_warning(kube: FakeKube) -> None:
    reconcile(kube)
    kube.set_job("demo-sft", "Failed")
    reconcile(kube)
    reconcile(kube)
    assert status(kube)["phase"] == "Failed"
    posted = [o for (k, _, _), o in kube.objects.items() if k == "Event"]
    warnings = sorted(e["reason"] for e in posted if e["type"] == "Warning")
    assert warnings == ["RunFailed", "StageFailed"]


def test_a_spec_edit_to_the_running_stage_writes_only_degraded(kube: FakeKube) -> None:
    reconcile(kube)
    kube.set_job("demo-sft", "Running")
    reconcile(kube)
    run = kube.objects[("RLHFRun", "team-a", "demo")]
    run["metadata"]["generation"] = 2
    run["spec"]["stages"][0]["hyperparameters"] = {"learningRate": 2e-5}
    assert reconcile(kube) == ["patch RLHFRun demo/status", "create Event"]
    degraded = next(c for c in status(kube)["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "RunningStageEdited" and degraded["observedGeneration"] == 2
    assert reconcile(kube) == []


def test_a_spec_edit_replaces_a_pending_job_and_patches_the_config(kube: FakeKube) -> None:
    reconcile(kube)
    run = kube.objects[("RLHFRun", "team-a", "demo")]
    run["metadata"]["generation"] = 2
    run["spec"]["stages"][0]["hyperparameters"] = {"learningRate": 2e-5}
    writes = reconcile(kube)
    assert writes[:3] == [
        "patch ConfigMap demo-sft-config",
        "delete PyTorchJob demo-sft",
        "create PyTorchJob demo-sft",
    ]
    assert "status" not in kube.objects[("PyTorchJob", "team-a", "demo-sft")]
    assert status(kube)["observedGeneration"] == 2
    assert reconcile(kube) == []


def test_removed_stage_children_are_deleted(kube: FakeKube) -> None:
    reconcile(kube)
    run = kube.objects[("RLHFRun", "team-a", "demo")]
    run["spec"]["stages"] = [{"name": "other", "type": "sft", "dataset": {"path": "d.jsonl"}}]
    writes = reconcile(kube)
    assert writes[:2] == ["delete ConfigMap demo-sft-config", "delete PyTorchJob demo-sft"]
    assert kube.kinds("PyTorchJob") == ["demo-other"]


def test_a_bad_spec_is_degraded_naming_the_field_and_creates_nothing(kube: FakeKube) -> None:
    doc = manifest()
    doc["spec"]["stages"][0]["hyperparameters"] = {"learningRate": -1}
    kube.add_run(doc)
    assert reconcile(kube) == ["patch RLHFRun demo/status", "create Event"]
    degraded = next(c for c in status(kube)["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert degraded["message"].startswith("spec.stages[0].hyperparameters.learningRate:")
    assert kube.kinds("PyTorchJob") == [] and kube.kinds("ConfigMap") == []
    assert events(kube) == ["InvalidSpec"]
    assert reconcile(kube) == [], "the same refusal is written and announced once"


def test_status_kopf_or_others_keep_in_the_run_is_left_alone(kube: FakeKube) -> None:
    kube.objects[("RLHFRun", "team-a", "demo")]["status"] = {"kopf": {"progress": {}}}
    reconcile(kube)
    assert status(kube)["kopf"] == {"progress": {}}
    assert reconcile(kube) == []


def test_a_deleted_or_deleting_run_is_left_to_garbage_collection(kube: FakeKube) -> None:
    reconcile(kube)
    kube.objects[("RLHFRun", "team-a", "demo")]["metadata"]["deletionTimestamp"] = "t"
    assert reconcile(kube) == []
    del kube.objects[("RLHFRun", "team-a", "demo")]
    assert reconcile(kube) == []


def test_a_conflict_on_create_is_normal(kube: FakeKube) -> None:
    kube.objects[("ConfigMap", "team-a", "demo-sft-config")] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "demo-sft-config", "namespace": "team-a"},  # not labelled: unseen
    }
    writes = reconcile(kube)
    assert "create PyTorchJob demo-sft" in writes and "patch RLHFRun demo/status" in writes


def test_a_lost_event_does_not_fail_the_reconcile(kube: FakeKube) -> None:
    reconcile(kube)
    kube.set_job("demo-sft", "Running")
    original = kube.create

    def no_events(obj: Obj) -> Obj:
        if obj["kind"] == "Event":
            raise KubeError(403, "events are forbidden")
        return original(obj)

    kube.create = no_events  # type: ignore[method-assign]
    reconcile(kube)
    assert status(kube)["phase"] == "Running"


@pytest.mark.parametrize(
    ("status_code", "delay"), [(None, TRANSIENT_DELAY), (503, TRANSIENT_DELAY),
                               (429, TRANSIENT_DELAY), (403, PERSISTENT_DELAY)]
)
def test_api_failures_become_temporary_errors(
    kube: FakeKube, status_code: int | None, delay: float
) -> None:
    kube.fail_next = KubeError(status_code, "GET ...: nope")
    controller = Controller(Reconciler(kube, clock=clock))
    with pytest.raises(kopf.TemporaryError) as caught:
        asyncio.run(controller.reconcile("team-a", "demo"))
    assert caught.value.delay == delay
    assert "RLHFRun team-a/demo" in str(caught.value)


def test_event_object_is_a_valid_core_v1_event(kube: FakeKube) -> None:
    run = kube.objects[("RLHFRun", "team-a", "demo")]
    event = event_object(run, Event("Warning", "StageFailed", "Stage sft failed"), clock(), "op-0")
    kubernetes_validate.validate(event, "1.34", strict=True)
    assert event["involvedObject"] == {
        "apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFRun", "name": "demo",
        "namespace": "team-a", "uid": "uid-1",
    }


def test_resource_paths() -> None:
    assert RUNS.path("ns", "r", "status") == (
        "/apis/rlhf.dev/v1alpha1/namespaces/ns/rlhfruns/r/status"
    )
    assert BY_KIND["ConfigMap"].path("ns") == "/api/v1/namespaces/ns/configmaps"
    assert BY_KIND["TrainJob"].path("ns", "j") == (
        "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/j"
    )


class FakePool:
    """The urllib3 pool under ApiKube: records requests, answers from a script."""

    def __init__(self, answers: list[tuple[int, bytes] | Exception]) -> None:
        self.answers = answers
        self.sent: list[tuple[str, str, Any, dict[str, str]]] = []

    def request(self, method: str, url: str, body: Any, headers: dict[str, str], **_: Any) -> Any:
        self.sent.append((method, url, body, headers))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, data = answer
        return type("Response", (), {"status": status, "data": data})()


def api_kube(answers: list[tuple[int, bytes] | Exception]) -> tuple[ApiKube, FakePool]:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "https://k8s:6443"
    configuration.api_key = {"BearerToken": "Bearer t0ken"}
    pool = FakePool(answers)
    fake = type("Client", (), {"configuration": configuration,
                               "rest_client": type("Rest", (), {"pool_manager": pool})()})()
    return ApiKube(fake), pool


def test_api_client_requests() -> None:
    import urllib3

    kube, pool = api_kube([
        (200, b'{"items": [{"metadata": {"name": "a", "labels": {"rlhf.dev/run": "r"}}},'
              b' {"metadata": {"name": "b"}}]}'),
        (404, b'{"kind": "Status", "message": "not found"}'),
        (409, b'{"kind": "Status", "message": "already exists"}'),
        (200, b"{}"),
        urllib3.exceptions.NewConnectionError(None, "refused"),  # type: ignore[arg-type]
        (404, b"{}"),
    ])
    listed = kube.list(BY_KIND["PyTorchJob"], "ns", {"rlhf.dev/run": "r"})
    assert [o["metadata"]["name"] for o in listed] == ["a"], "labels filtered client-side too"
    assert listed[0]["kind"] == "PyTorchJob"
    assert kube.get(RUNS, "ns", "gone") is None
    with pytest.raises(KubeError) as conflict:
        kube.create({"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}})
    assert conflict.value.status == 409 and "already exists" in str(conflict.value)
    kube.patch(RUNS, "ns", "r", {"status": {"phase": "Running"}}, sub="status")
    with pytest.raises(KubeError) as unreachable:
        kube.get(RUNS, "ns", "r")
    assert unreachable.value.transient
    kube.delete(RUNS, "ns", "gone")  # already gone is fine
    method, url, body, headers = pool.sent[0]
    assert (method, url) == (
        "GET", "https://k8s:6443/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs"
        "?labelSelector=rlhf.dev%2Frun%3Dr",
    )
    assert headers["authorization"] == "Bearer t0ken"
    method, url, body, headers = pool.sent[2]
    assert (method, url) == (
        "POST", "https://k8s:6443/api/v1/namespaces/ns/configmaps?fieldValidation=Strict"
    ), "a field the server's schema lacks is an error, not a warning"
    method, url, body, headers = pool.sent[3]
    assert (method, url) == ("PATCH", "https://k8s:6443/apis/rlhf.dev/v1alpha1/namespaces/ns"
                                      "/rlhfruns/r/status?fieldValidation=Strict")
    assert all("fieldValidation" not in url for method, url, *_ in pool.sent
               if method in ("GET", "DELETE")), "reads and deletes validate no fields"
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert body == '{"status": {"phase": "Running"}}'


def test_a_rejected_child_degrades_the_run_until_it_is_accepted(kube: FakeKube) -> None:
    original = kube.create
    rejected = KubeError(403, 'POST .../pytorchjobs: pytorchjobs is forbidden: User "op" '
                              'cannot create resource "pytorchjobs"')

    def refuse_jobs(obj: Obj) -> Obj:
        if obj["kind"] == "PyTorchJob":
            kube.writes.append("create PyTorchJob (refused)")
            raise rejected
        return original(obj)

    kube.create = refuse_jobs  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(KubeError):
            reconcile(kube)
    degraded = next(c for c in status(kube)["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ChildRejected"
    assert "cannot create resource" in degraded["message"]
    assert events(kube) == ["ChildRejected"], "announced once"
    kube.create = original  # type: ignore[method-assign]
    reconcile(kube)
    degraded = next(c for c in status(kube)["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"
    assert reconcile(kube) == []


class CountingKube(FakeKube):
    """FakeKube that also counts reads, as 'get Kind' and 'list Kind'."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        self.reads.append(f"get {resource.kind}")
        return super().get(resource, namespace, name)

    def list(self, resource: Resource, namespace: str, labels: dict[str, str]) -> list[Obj]:
        self.reads.append(f"list {resource.kind}")
        return super().list(resource, namespace, labels)


def test_after_creates_the_status_comes_from_the_api_answers_not_a_second_read() -> None:
    kube = CountingKube()
    kube.add_run(manifest())
    reconciler = Reconciler(kube, clock=clock, instance="test")
    reconciler.reconcile("team-a", "demo")
    assert kube.reads.count("get RLHFRun") == 1 and kube.reads.count("list ConfigMap") == 1
    assert status(kube)["stages"][0]["jobName"] == "demo-sft", "planned with the created job"
    kube.reads.clear()
    # A delete leaves open whether the object is gone or terminating: that one is read again.
    kube.objects[("RLHFRun", "team-a", "demo")]["spec"]["stages"] = [
        {"name": "other", "type": "sft", "dataset": {"path": "d.jsonl"}}
    ]
    reconciler.reconcile("team-a", "demo")
    assert kube.reads.count("list ConfigMap") == 2
    assert reconciler.reconcile("team-a", "demo").writes == 0


def test_events_that_echo_the_operators_own_writes_cost_no_reconcile() -> None:
    kube = CountingKube()
    kube.add_run(manifest())
    controller = Controller(Reconciler(kube, clock=clock, instance="test"))
    asyncio.run(controller.reconcile("team-a", "demo"))
    job = copy.deepcopy(kube.objects[("PyTorchJob", "team-a", "demo-sft")])
    kube.reads.clear()
    # The watch event of the job the reconcile created: nothing new to plan with.
    asyncio.run(controller.reconcile("team-a", "demo", coalesce=True, child=job))
    assert kube.reads == []
    # The training operator's status update has another resourceVersion: reconciled.
    kube.set_job("demo-sft", "Running")
    changed = copy.deepcopy(kube.objects[("PyTorchJob", "team-a", "demo-sft")])
    changed["metadata"]["resourceVersion"] = "2"
    asyncio.run(controller.reconcile("team-a", "demo", coalesce=True, child=changed))
    assert "get RLHFRun" in kube.reads and status(kube)["phase"] == "Running"
    # Forgotten with its run: after a re-creation, nothing is taken for an echo.
    controller.forget("team-a", "demo")
    assert not controller.reconciler.wrote_last(job)


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_kueues_admission_and_preemption_are_never_undone(kind: str) -> None:
    """A queued run starting suspended (manifests/examples/kueue-queued.yaml): Kueue un-suspends
    its job (admission, and for a TrainJob its own runtime patch) and later suspends it again
    (preemption); the operator's reconciles write nothing to the job either time."""
    kube = FakeKube()
    doc = manifest(trainer={"backend": kind.lower()}, suspend=True)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a-queue"}
    kube.add_run(doc)
    assert f"create {kind} demo-sft" in reconcile(kube)
    job = kube.objects[(kind, "team-a", "demo-sft")]
    assert backends.is_suspended(job), "created suspended, from spec.suspend"
    path = backends.for_kind(kind).suspend_path
    for suspend in (False, True):  # admission, then preemption
        node = job
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = suspend
        if kind == "TrainJob" and not suspend:
            kueue = {"manager": "kueue.x-k8s.io/manager", "trainingRuntimeSpec": {}}
            job["spec"]["runtimePatches"].insert(0, kueue)
        for _ in range(2):
            assert [w for w in reconcile(kube) if kind in w] == []
        assert backends.is_suspended(kube.objects[(kind, "team-a", "demo-sft")]) is suspend
    assert [p["manager"] for p in job["spec"].get("runtimePatches", [])] == (
        ["kueue.x-k8s.io/manager", "rlhf.dev/operator"] if kind == "TrainJob" else []
    )
