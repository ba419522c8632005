"""The kube executor's pure arithmetic: drift, replacement, orphans, Kueue, status, progress."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from helpers import job_with, make_run, manifest, merge
from rlhf_operator import backends, sync
from rlhf_operator.planner import Observed, plan

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


def desired(doc: Obj | None = None) -> list[Obj]:
    return plan(make_run(doc), Observed()).children


def as_served(obj: Obj) -> Obj:
    """The object as the API server returns it: server fields, defaults from webhooks and
    other controllers, quantities as strings."""
    out = copy.deepcopy(obj)
    out["metadata"].update(uid="u-1", resourceVersion="7", creationTimestamp="t0", generation=1)
    out["metadata"]["labels"]["kueue.x-k8s.io/managed"] = "true"
    out["metadata"]["annotations"] = {**out["metadata"].get("annotations", {}), "note": "x"}
    if obj["kind"] == "PyTorchJob":
        master = out["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        container = master["containers"][0]
        # The training operator's webhook adds its rendezvous port to the container's own.
        container["ports"] = [
            {**port, "hostPort": 0} for port in container.get("ports", [])
        ] + [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
        container["imagePullPolicy"] = "IfNotPresent"
        master["nodeSelector"] = {"cloud.google.com/gke-accelerator": "a100"}
        out["status"] = {"conditions": [{"type": "Running", "status": "True"}]}
    return out


def test_what_the_server_and_other_controllers_add_is_not_drift() -> None:
    for child in desired():
        assert sync.merge_patch(child, as_served(child)) is None, child["kind"]


def test_changed_fields_are_patched_and_lists_go_whole() -> None:
    configmap, job = desired()
    served = as_served(job)
    served["metadata"]["labels"]["rlhf.dev/stage"] = "other"
    container = served["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    container[0]["env"] = container[0]["env"][:-1]
    patch = sync.merge_patch(job, served)
    assert patch is not None
    assert patch["metadata"] == {"labels": {"rlhf.dev/stage": "sft"}}
    env_patch = patch["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert env_patch == job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ], "a list is replaced as a whole (JSON merge patch)"
    assert "apiVersion" not in patch and "status" not in patch
    stale = as_served(configmap)
    stale["data"] = {"sft.yaml": "old"}
    assert sync.merge_patch(configmap, stale) == {"data": configmap["data"]}


@pytest.mark.parametrize(
    ("have", "want", "covered"),
    [
        ("8", 8, True),  # quantities come back as strings
        (8, 8, True),
        (8.0, 8, True),
        ("8", 9, False),
        (True, True, True),
        (1, True, False),  # a bool is not a number here
        (None, False, False),
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"b": 2}, {"a": 1}, False),
        ([{"a": 1, "x": 0}], [{"a": 1}], True),
        ([{"a": 1}, {"a": 2}], [{"a": 1}], False),
        ([{"name": "b"}, {"name": "a", "v": 1}], [{"name": "a", "v": 1}], True),  # a keyed list
        ([{"name": "a", "v": 2}], [{"name": "a", "v": 1}], False),
        ([{"name": "b"}], [{"name": "a"}], False),
        ([{"manager": "k"}, {"manager": "o", "t": 1}], [{"manager": "o"}], True),  # by manager
        ([{"manager": "k"}], [{"manager": "o"}], False),
        ({}, {}, True),
        (None, {}, False),
    ],
)
def test_covers(have: Any, want: Any, covered: bool) -> None:
    assert sync.covers(have, want) is covered


def test_a_changed_config_hash_replaces_the_job_not_the_configmap() -> None:
    configmap, job = desired()
    edited = manifest()
    edited["spec"]["stages"][0]["hyperparameters"] = {"learningRate": 1e-4}
    new_configmap, new_job = desired(edited)
    assert sync.needs_replace(new_job, as_served(job))
    assert not sync.needs_replace(job, as_served(job))
    assert not sync.needs_replace(new_configmap, as_served(configmap)), "no hash: patched"
    actions = sync.child_actions(
        [new_configmap, new_job], [as_served(configmap), as_served(job)], "uid-1"
    )
    verbs = [(a.verb, a.kind) for a in actions]
    assert verbs == [("patch", "ConfigMap"), ("replace", "PyTorchJob")]


def test_suspension_alone_is_patched_in_place() -> None:
    _, job = desired()
    _, suspended_job = desired(manifest(suspend=True))
    assert not sync.needs_replace(suspended_job, as_served(job))
    patch = sync.merge_patch(suspended_job, as_served(job))
    assert patch == {"spec": {"runPolicy": {"suspend": True}}}


def test_missing_children_are_created_in_order_and_a_steady_state_does_nothing() -> None:
    children = desired()
    actions = sync.child_actions(children, [], "uid-1")
    assert [(a.verb, a.kind, a.name) for a in actions] == [
        ("create", "ConfigMap", "demo-sft-config"),
        ("create", "PyTorchJob", "demo-sft"),
    ]
    assert sync.child_actions(children, [as_served(c) for c in children], "uid-1") == []


def test_orphans_are_deleted_only_when_this_run_controls_them() -> None:
    children = desired()
    orphan = as_served(children[1])
    orphan["metadata"]["name"] = "demo-old"
    foreign = copy.deepcopy(orphan)
    foreign["metadata"]["name"] = "demo-theirs"
    foreign["metadata"]["ownerReferences"] = [{"uid": "someone-else", "controller": True}]
    leaving = copy.deepcopy(orphan)
    leaving["metadata"]["name"] = "demo-leaving"
    leaving["metadata"]["deletionTimestamp"] = "t9"
    observed = [as_served(c) for c in children] + [orphan, foreign, leaving]
    actions = sync.child_actions(children, observed, "uid-1")
    assert [(a.verb, a.name) for a in actions] == [("delete", "demo-old")]


def test_a_child_of_an_earlier_run_of_the_same_name_waits_for_gc() -> None:
    children = desired()
    stale = [as_served(c) for c in children]
    for child in stale:
        child["metadata"]["ownerReferences"][0]["uid"] = "uid-of-the-deleted-run"
        child["metadata"]["labels"]["rlhf.dev/stage"] = "renamed"
    assert sync.child_actions(children, stale, "uid-1") == []


def test_a_terminating_child_is_recreated_only_once_gone() -> None:
    children = desired()
    terminating = as_served(children[1])
    terminating["metadata"]["deletionTimestamp"] = "t9"
    terminating["metadata"]["annotations"]["rlhf.dev/config-hash"] = "stale"
    observed = [as_served(children[0]), terminating]
    assert sync.child_actions(children, observed, "uid-1") == []


def kueue_doc(**spec: Any) -> Obj:
    doc = manifest(**spec)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpus"}
    return doc


def set_suspend(job: Obj, value: bool) -> Obj:
    out = copy.deepcopy(job)
    node = out
    *parents, leaf = backends.for_kind(job["kind"]).suspend_path
    for name in parents:
        node = node[name]
    node[leaf] = value
    return out


def job_patch(desired_job: Obj, observed: Obj) -> Obj | None:
    """What `child_actions` patches on an observed job that this run controls."""
    observed = copy.deepcopy(observed)
    observed["metadata"]["ownerReferences"] = desired_job["metadata"]["ownerReferences"]
    [action] = sync.child_actions([desired_job], [observed], "uid-1") or [None]
    assert action is None or action.verb == "patch", action
    return action.body if action is not None else None


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("spec_suspend", [True, False])
@pytest.mark.parametrize("kueue_suspends", [True, False])
def test_kueue_owns_a_queued_jobs_suspend_field(
    backend: str, spec_suspend: bool, kueue_suspends: bool
) -> None:
    """Admission (Kueue un-suspends) and preemption (Kueue suspends): whatever spec.suspend
    says, the operator patches nothing back, so the two never flip the field."""
    _, job = desired(kueue_doc(trainer={"backend": backend}, suspend=spec_suspend))
    assert backends.is_suspended(job), "a queued job is created suspended, for Kueue to admit"
    observed = set_suspend(as_served(job), kueue_suspends)
    assert sync.merge_patch(sync.kueue_owns_suspend(job, observed), observed) is None
    assert job_patch(job, observed) is None


def suspend_patch(kind: str, value: bool) -> Obj:
    patch: Any = value
    for name in reversed(backends.for_kind(kind).suspend_path):
        patch = {name: patch}
    return dict(patch)


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_without_a_queue_the_operator_owns_suspend(backend: str) -> None:
    _, job = desired(manifest(trainer={"backend": backend}))
    kind = job["kind"]
    assert job_patch(job, set_suspend(as_served(job), True)) == suspend_patch(kind, False)
    _, suspended = desired(manifest(trainer={"backend": backend}, suspend=True))
    assert job_patch(suspended, as_served(job)) == suspend_patch(kind, True)


def test_a_queued_job_is_still_patched_for_other_drift() -> None:
    _, job = desired(kueue_doc(suspend=True))
    observed = set_suspend(as_served(job), False)  # admitted
    observed["metadata"]["labels"]["rlhf.dev/stage"] = "other"
    assert job_patch(job, observed) == {"metadata": {"labels": {"rlhf.dev/stage": "sft"}}}


KUEUE_ENTRY: Obj = {
    "manager": "kueue.x-k8s.io/manager",
    "time": "2026-01-01T00:00:00Z",
    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
        "name": "node",
        "template": {"spec": {"template": {"spec": {
            "nodeSelector": {"cloud.google.com/gke-accelerator": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }}}},
    }]}}},
}


def admitted_trainjob(job: Obj) -> Obj:
    """The TrainJob after Kueue's admission: un-suspended, Kueue's runtime patch first, and
    the Trainer webhook's `time` on every entry."""
    served = set_suspend(as_served(job), False)
    ours = [{**p, "time": "2026-01-01T00:00:01Z"} for p in served["spec"]["runtimePatches"]]
    served["spec"]["runtimePatches"] = [copy.deepcopy(KUEUE_ENTRY), *ours]
    return served


def test_kueues_runtime_patch_is_not_drift() -> None:
    _, job = desired(kueue_doc(trainer={"backend": "trainjob"}, suspend=True))
    assert job_patch(job, admitted_trainjob(job)) is None


def test_an_outdated_operator_runtime_patch_is_replaced_and_kueues_kept() -> None:
    _, job = desired(kueue_doc(trainer={"backend": "trainjob"}, suspend=True))
    observed = admitted_trainjob(job)
    ours = backends.node_pod_patch(observed)
    ours["metadata"]["labels"] = {"rlhf.dev/run": "demo"}  # an older operator's entry
    ours["spec"]["volumes"] = ours["spec"]["volumes"][:2]
    patch = job_patch(job, observed)
    assert patch is not None and list(patch) == ["spec"] and list(patch["spec"]) == [
        "runtimePatches"
    ], "one field: the whole list, as a merge patch replaces lists"
    sent = patch["spec"]["runtimePatches"]
    assert [p["manager"] for p in sent] == ["kueue.x-k8s.io/manager", "rlhf.dev/operator"]
    assert sent[0] == KUEUE_ENTRY, "Kueue's entry goes back exactly as Kueue wrote it"
    assert sent[1] == job["spec"]["runtimePatches"][0]
    applied = merge(observed, patch)
    assert job_patch(job, applied) is None, "a second reconcile writes nothing"
    assert not backends.is_suspended(applied), "the admission stands"


def test_a_missing_operator_runtime_patch_is_appended() -> None:
    _, job = desired(manifest(trainer={"backend": "trainjob"}))
    observed = as_served(job)
    observed["spec"]["runtimePatches"] = [copy.deepcopy(KUEUE_ENTRY)]
    patch = job_patch(job, observed)
    assert patch == {"spec": {"runtimePatches": [KUEUE_ENTRY, job["spec"]["runtimePatches"][0]]}}
    assert job_patch(job, merge(observed, patch)) is None


def test_every_child_has_the_controller_owner_reference() -> None:
    """Deleting a run deletes its children through garbage collection (the emulator has none)."""
    docs = [manifest(), manifest(trainer={"backend": "trainjob"})]
    for doc in docs:
        run = make_run(doc)
        p0 = plan(run, Observed())
        running = [job_with(c, "Succeeded") if c["kind"] in backends.JOB_KINDS else c
                   for c in p0.children]
        p1 = plan(run.model_copy(update={"status": p0.status}), Observed(children=running))
        for child in p0.children + p1.children:
            refs = child["metadata"]["ownerReferences"]
            assert refs == [{
                "apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFRun", "name": "demo",
                "uid": "uid-1", "controller": True, "blockOwnerDeletion": True,
            }], child["metadata"]["name"]
            assert sync.owned_by(child, "uid-1")


def test_status_patch_only_on_change() -> None:
    run = make_run()
    status = plan(run, Observed(now="t0")).status.dump()
    assert sync.status_patch(status, status) is None
    again = plan(run.model_copy(update={"status": plan(run, Observed(now="t0")).status}),
                 Observed(now="t5")).status.dump()
    assert sync.status_patch(status, again) is None, "a later clock alone changes nothing"
    changed = {**status, "phase": "Running"}
    assert sync.status_patch(status, changed) == {"phase": "Running"}
    assert sync.status_patch(None, status) == status


def test_status_patch_removes_dropped_fields_but_not_foreign_ones() -> None:
    old = {"phase": "Running", "currentStage": "sft", "step": 3, "kopf": {"progress": {}}}
    new = {"phase": "Succeeded"}
    assert sync.status_patch(old, new) == {
        "phase": "Succeeded", "currentStage": None, "step": None
    }


def pod(stage: str, progress: Any, name: str = "p") -> Obj:
    raw = progress if isinstance(progress, str) else json.dumps(progress)
    return {"metadata": {"name": name, "labels": {"rlhf.dev/stage": stage},
                         "annotations": {"rlhf.dev/progress": raw}}}


def test_progress_from_pods_newest_report_wins() -> None:
    pods = [
        pod("sft", {"step": 9, "totalSteps": 10, "metrics": {"loss": 1.0}, "updatedAt": "t1"}),
        pod("sft", {"step": 2, "totalSteps": 10, "metrics": {"loss": 3.0}, "updatedAt": "t2"}),
        pod("rm", {"step": 1, "totalSteps": 4, "metrics": {"reward": 0.5, "kl": 0.1}}),
        pod("x", "{torn"),
        pod("y", [1, 2]),
        {"metadata": {"labels": {"rlhf.dev/stage": "z"}}},
    ]
    progress = sync.progress_by_stage(pods)
    assert set(progress) == {"sft", "rm"}
    assert progress["sft"].step == 2 and progress["sft"].loss == 3.0, "the replaced job's pod"
    assert progress["rm"].reward == 0.5 and progress["rm"].kl == 0.1


def test_progress_drops_values_json_cannot_carry() -> None:
    raw = '{"step": 1, "totalSteps": true, "metrics": {"loss": NaN, "reward": "high"}}'
    metrics = sync.progress_by_stage([pod("sft", raw)])["sft"]
    assert metrics.step == 1 and metrics.total_steps is None
    assert metrics.loss is None and metrics.reward is None
