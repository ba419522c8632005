"""Pure reconcile arithmetic for the kube executor: which child to create, patch, replace or
delete, the status patch, and the progress read from trainer pods. No I/O.

Create-or-patch compares only the fields the operator sets: what the API server, admission
webhooks or other controllers add (defaults, Kueue's node selectors, a training operator's
ports) never counts as drift, so a steady state patches nothing. A changed
`rlhf.dev/config-hash` means the job must be replaced: Kubeflow jobs are immutable in the
fields that matter, and the trainer resumes from its checkpoint.

Two fields are shared with Kueue: a queued job's suspend field is Kueue's once the job exists
(`kueue_owns_suspend`), and a TrainJob's `spec.runtimePatches` holds an entry per manager, of
which the operator writes only its own (`shared_list`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_operator import api, backends, builders, stage_job
from rlhf_operator.objects import Obj

Verb = Literal["create", "patch", "replace", "delete"]

# The fields of metadata the operator owns; the rest (uid, resourceVersion, finalizers, ...)
# belongs to the API server and other controllers.
OWNED_METADATA = ("labels", "annotations", "ownerReferences")

# Wire names of the status fields the operator writes; anything else in status is not ours.
STATUS_FIELDS: tuple[str, ...] = tuple(
    field.alias or name for name, field in api.RunStatus.model_fields.items()
)


@dataclass(frozen=True)
class Action:
    """One write: `body` is the object to create (create, replace) or the merge patch."""

    verb: Verb
    kind: str
    name: str
    body: Obj | None = None


def key(obj: Obj) -> tuple[str, str]:
    return str(obj["kind"]), str(obj["metadata"]["name"])


# Keys of the list items that Kubernetes merges as maps: `name` (containers, env, ports,
# volumes, replicatedJobs) and `manager` (a TrainJob's runtimePatches, an entry per writer).
LIST_KEYS = ("name", "manager")


def list_key(items: list[Any]) -> str | None:
    """The key a non-empty list of objects is a map by, or None for an ordinary list."""
    for name in LIST_KEYS:
        if items and all(isinstance(i, dict) and name in i for i in items):
            return name
    return None


def covers(have: Any, want: Any) -> bool:
    """Whether the observed value holds every field of the desired one.

    Dicts may carry extra keys. Lists of keyed items (`LIST_KEYS`) are maps, as Kubernetes
    merges them, so an item a webhook or another controller added (the training operator's
    port, Kueue's runtime patch) is not drift; other lists must match item by item. An int and
    its decimal string are equal (quantities come back from the server as strings).
    """
    if isinstance(want, dict):
        return isinstance(have, dict) and all(covers(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        key = list_key(want)
        if key is not None:
            keyed = {h.get(key): h for h in have if isinstance(h, dict)}
            return all(covers(keyed.get(w[key]), w) for w in want)
        return len(have) == len(want) and all(
            covers(h, w) for h, w in zip(have, want, strict=True)
        )
    if isinstance(want, bool) or isinstance(have, bool):
        return have is want
    if isinstance(want, int | float) and isinstance(have, int | float):
        return have == want  # JSON does not keep 1 and 1.0 apart
    if isinstance(want, int) and isinstance(have, str):
        return have == str(want)
    return bool(have == want)


def shared_list(have: Any, want: list[Any]) -> list[Any]:
    """The whole list to send for a list whose items belong to several writers (keyed by
    `manager`): the observed items with ours put in place of their namesakes, or appended. A
    merge patch replaces a list wholesale, so sending only ours would delete the others'."""
    out = [item for item in have if isinstance(item, dict)] if isinstance(have, list) else []
    for item in want:
        at = next((i for i, h in enumerate(out) if h.get("manager") == item["manager"]), None)
        if at is None:
            out.append(item)
        else:
            out[at] = item
    return out


def _dict_patch(have: Any, want: Obj) -> Obj:
    """A JSON merge patch (RFC 7386) that makes `have` cover `want`. Lists go whole: the
    desired one, or for a list shared by managers the observed one with ours replaced."""
    current: Obj = have if isinstance(have, dict) else {}
    patch: Obj = {}
    for name, value in want.items():
        if isinstance(value, dict) and isinstance(current.get(name), dict):
            sub = _dict_patch(current[name], value)
            if sub:
                patch[name] = sub
        elif covers(current.get(name), value):
            continue
        elif isinstance(value, list) and list_key(value) == "manager":
            patch[name] = shared_list(current.get(name), value)
        else:
            patch[name] = value
    return patch


def merge_patch(desired: Obj, observed: Obj) -> Obj | None:
    """The merge patch that brings `observed` to `desired`, or None when nothing drifted."""
    want = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
    meta = desired.get("metadata") or {}
    want["metadata"] = {k: meta[k] for k in OWNED_METADATA if k in meta}
    return _dict_patch(observed, want) or None


def needs_replace(desired: Obj, observed: Obj) -> bool:
    """A job whose config hash differs runs something else now: delete and recreate it."""
    wanted = (desired["metadata"].get("annotations") or {}).get(builders.ANNOTATION_HASH)
    if wanted is None:
        return False
    have = (observed["metadata"].get("annotations") or {}).get(builders.ANNOTATION_HASH)
    return bool(have != wanted)


def owned_by(obj: Obj, uid: str | None) -> bool:
    """Whether `obj` has the run with `uid` as its controller."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid for r in refs)


def queued(obj: Obj) -> bool:
    return builders.KUEUE_QUEUE_LABEL in (obj.get("metadata", {}).get("labels") or {})


def kueue_owns_suspend(desired: Obj, observed: Obj) -> Obj:
    """`desired` without its suspend field when the job is Kueue's (it carries the queue label).

    Kueue's webhook suspends a queued job at creation, Kueue un-suspends it on admission and
    suspends it again on preemption: from creation on, the field is Kueue's. The operator sets
    it when it creates the job (from spec.suspend) and never patches it afterwards; patching it
    back would undo an admission or a preemption, and the two controllers would flip it.
    """
    if desired["kind"] not in backends.JOB_KINDS or not (queued(desired) or queued(observed)):
        return desired
    out = copy.deepcopy(desired)
    node = out
    *parents, leaf = backends.for_kind(desired["kind"]).suspend_path
    for name in parents:
        node = node.get(name) or {}
    node.pop(leaf, None)
    return out


def child_actions(desired: list[Obj], observed: list[Obj], uid: str | None) -> list[Action]:
    """Writes that turn the observed children into the desired ones, deletions first.

    `observed` holds the objects labelled with the run. Only those the run controls are
    patched, replaced or deleted (one left by an earlier run of the same name waits for the
    garbage collector), and an object on its way out (deletionTimestamp) is left alone until
    it is gone.
    """
    have = {key(obj): obj for obj in observed}
    wanted = {key(obj) for obj in desired}
    actions = [
        Action("delete", kind, name)
        for (kind, name), obj in have.items()
        if (kind, name) not in wanted and owned_by(obj, uid) and not _terminating(obj)
    ]
    for obj in desired:
        current = have.get(key(obj))
        if current is None:
            actions.append(Action("create", *key(obj), obj))
        elif _terminating(current) or not owned_by(current, uid):
            continue
        elif needs_replace(obj, current):
            actions.append(Action("replace", *key(obj), obj))
        else:
            patch = merge_patch(kueue_owns_suspend(obj, current), current)
            if patch is not None:
                actions.append(Action("patch", *key(obj), patch))
    return actions


def _terminating(obj: Obj) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def status_patch(old: Obj | None, new: Obj) -> Obj | None:
    """The merge patch from the stored status to the new one, or None when equal.

    A field the new status leaves out is removed (null), but only among the operator's own
    fields: whatever else lives in status is not touched.
    """
    old = old or {}
    patch: Obj = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in STATUS_FIELDS if k in old and k not in new})
    return patch or None


def failures_by_stage(pods: list[Obj]) -> dict[str, stage_job.StageFailure]:
    """Per stage, the newest error a trainer container stopped with: its termination message
    (the trainer writes its one `error:` line there) and exit status, from the container's
    state or, after a restart, its last state."""
    best: dict[str, tuple[str, stage_job.StageFailure]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        stage = labels.get(builders.LABEL_STAGE)
        if not stage or labels.get(builders.LABEL_COMPONENT) != "trainer":
            continue
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (status.get("state"), status.get("lastState")):
                ended = (state or {}).get("terminated") or {}
                code = int(ended.get("exitCode") or 0)
                message = str(ended.get("message") or "").strip()
                if code == 0 or not message:
                    continue
                lines = [line for line in message.splitlines() if line.startswith("error: ")]
                failure = stage_job.StageFailure((lines or [message])[-1][:1024], code)
                when = str(ended.get("finishedAt") or "")
                if stage not in best or when > best[stage][0]:
                    best[stage] = (when, failure)
    return {stage: failure for stage, (_, failure) in best.items()}


def progress_by_stage(pods: list[Obj]) -> dict[str, api.StageMetrics]:
    """Stage metrics from the `rlhf.dev/progress` annotations of trainer pods.

    Several pods of a stage may carry one (a replaced job's pod lingers): the newest report
    wins, by its `updatedAt`, then by step.
    """
    best: dict[str, tuple[tuple[str, int], api.StageMetrics]] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        stage = (meta.get("labels") or {}).get(builders.LABEL_STAGE)
        raw = (meta.get("annotations") or {}).get(builders.ANNOTATION_PROGRESS)
        if not stage or not raw:
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        metrics = api.StageMetrics.from_progress(data)
        if metrics is None:
            continue
        rank = (str(data.get("updatedAt") or ""), metrics.step or 0)
        if stage not in best or rank > best[stage][0]:
            best[stage] = (rank, metrics)
    return {stage: metrics for stage, (_, metrics) in best.items()}
