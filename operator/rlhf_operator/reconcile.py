"""The kube executor's one reconcile: read the run and its children, plan, write the difference.

Every trigger (the run created, changed or resumed, the resync timer, a child's status, a
trainer pod's progress) ends here. It reads fresh state from the API server each time, so
it never acts on a stale cache, and it writes only what differs: a steady state makes no
write call at all.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from rlhf_operator import api, builders, sync
from rlhf_operator.defaults import with_install_defaults
from rlhf_operator.kube import BY_KIND, CHILDREN, PODS, RUNS, Kube, KubeError
from rlhf_operator.metrics import RunMetrics
from rlhf_operator.objects import Obj
from rlhf_operator.planner import CONDITION_TYPES, Event, Observed, plan

logger = logging.getLogger("rlhf_operator.reconcile")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did; `writes` counts create, patch and delete calls."""

    writes: int
    phase: str | None = None


@dataclass(frozen=True)
class Applied:
    """The writes of `Reconciler.apply`, and the run's children after them as the API server
    answered the writes; None when an answer does not tell (a delete, a create that found the
    object already there), so the children must be read again."""

    writes: int
    children: list[Obj] | None


def parse_body(body: Obj) -> api.RLHFRun:
    """The typed run from an API object; SpecError for a bad spec. Status is read leniently:
    a status the operator cannot read is recomputed, never an error."""
    run = api.parse_run({k: v for k, v in body.items() if k != "status"}, "RLHFRun")
    run = with_install_defaults(run, os.environ)
    return run.model_copy(update={"status": stored_status(body)})


def stored_status(body: Obj) -> api.RunStatus | None:
    raw = body.get("status")
    if not isinstance(raw, dict):
        return None
    known = {k: v for k, v in raw.items() if k in sync.STATUS_FIELDS}
    try:
        return api.RunStatus.model_validate(known)
    except ValueError:
        return None


def degraded_status(
    previous: api.RunStatus, reason: str, message: str, generation: int, now: str
) -> api.RunStatus:
    """`previous` with Degraded=True (and Ready, Progressing, Succeeded False) for `reason`;
    phase and stages stay as they were."""
    conditions = []
    for ctype in CONDITION_TYPES:
        status: Literal["True", "False"] = "True" if ctype == "Degraded" else "False"
        old = next((c for c in previous.conditions if c.type == ctype), None)
        since = old.last_transition_time if old and old.status == status else now
        conditions.append(
            api.Condition(
                type=ctype,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=generation,
            )
        )
    return previous.model_copy(
        update={"conditions": conditions, "observed_generation": generation}
    )


def event_object(body: Obj, event: Event, now: str, instance: str) -> Obj:
    """A core/v1 Event about the run, as `kubectl describe rlhf` shows it."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
            "namespace": meta["namespace"],
        },
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": "rlhf-operator"},
        "reportingComponent": "rlhf.dev/operator",
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class Reconciler:
    """Reconciles one run at a time through a `Kube` client."""

    def __init__(
        self,
        kube: Kube,
        clock: Callable[[], str] = now_iso,
        instance: str | None = None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self.kube = kube
        self.clock = clock
        self.instance = instance or socket.gethostname()
        self.metrics = metrics or RunMetrics()
        # (namespace, run) -> (kind, name) -> resourceVersion of each child as this process
        # last created or patched it: see `wrote_last`.
        self._written: dict[tuple[str, str], dict[tuple[str, str], str]] = {}

    def wrote_last(self, child: Mapping[str, Any]) -> bool:
        """Whether `child` is exactly as a reconcile of this process wrote it. Its watch
        event is then only the echo of that write, which that reconcile already planned with
        (it plans again after writing), so it needs no reconcile of its own."""
        meta = child.get("metadata") or {}
        run = (meta.get("labels") or {}).get(builders.LABEL_RUN)
        versions = self._written.get((meta.get("namespace", ""), run or ""), {})
        version = versions.get((str(child.get("kind")), str(meta.get("name"))))
        return version is not None and version == meta.get("resourceVersion")

    def forget(self, namespace: str, name: str) -> None:
        """A deleted run: drop what is kept about it."""
        self.metrics.forget_run(namespace, name)
        self._written.pop((namespace, name), None)

    def reconcile(self, namespace: str, name: str) -> Outcome:
        with self.metrics.reconcile_timer():
            return self._reconcile(namespace, name)

    def _reconcile(self, namespace: str, name: str) -> Outcome:
        body = self.kube.get(RUNS, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            # Gone or going: garbage collection removes the children (owner references).
            self.forget(namespace, name)
            return Outcome(writes=0)
        try:
            run = parse_body(body)
        except api.SpecError as err:
            self.metrics.forget_run(namespace, name)
            return self._refuse(body, err.problems)
        observed = self.observe(run)
        desired = plan(run, observed)
        try:
            applied = self.apply(run, desired.children, observed.children)
        except KubeError as err:
            if not err.transient:
                # Refused (RBAC, an admission webhook, a CRD's schema): say so on the run, and
                # let kopf retry after someone has acted.
                self._degrade(body, desired.status, "ChildRejected", str(err))
            raise
        writes = applied.writes
        if writes:
            # The status describes the children as they are now (a job just created has a
            # jobName), so the next reconcile finds nothing to write. The API server's
            # answers to the writes are those children, unless a delete or a conflict leaves
            # that open: then they are read again.
            if applied.children is not None:
                observed = replace(observed, children=applied.children)
            else:
                observed = self.observe(run)
            desired = plan(run, observed)
        self.metrics.observe_run(run, desired.status)
        writes += self.write_status(body, desired.status)
        writes += self.post(body, desired.events)
        return Outcome(writes=writes, phase=desired.status.phase)

    def observe(self, run: api.RLHFRun) -> Observed:
        namespace = run.metadata.namespace
        labels = {builders.LABEL_RUN: run.metadata.name}
        children = [
            child
            for resource in CHILDREN
            for child in self.kube.list(resource, namespace, labels)
        ]
        pods = self.kube.list(PODS, namespace, labels)
        return Observed(
            children=children,
            progress=sync.progress_by_stage(pods),
            failures=sync.failures_by_stage(pods),
            now=self.clock(),
        )

    def apply(self, run: api.RLHFRun, desired: list[Obj], observed: list[Obj]) -> Applied:
        namespace = run.metadata.namespace
        written = self._written.setdefault((namespace, run.metadata.name), {})
        children: dict[tuple[str, str], Obj] | None = {sync.key(obj): obj for obj in observed}
        writes = 0
        for action in sync.child_actions(desired, observed, run.metadata.uid):
            resource = BY_KIND[action.kind]
            what = f"{action.kind} {action.name}"
            if action.verb in ("delete", "replace"):
                self.kube.delete(resource, namespace, action.name)
                written.pop((action.kind, action.name), None)
                children = None  # gone, or still terminating: only a read tells
                writes += 1
                logger.info("Deleted %s%s", what, " to replace it" * (action.verb == "replace"))
            if action.verb in ("create", "replace"):
                assert action.body is not None
                writes += 1
                try:
                    answer = self.kube.create(action.body)
                except KubeError as err:
                    if err.status != 409:
                        raise
                    # Someone was first, or a replaced object is still terminating: the next
                    # reconcile sees it.
                    logger.info("Found %s already present; will reconcile it next", what)
                    children = None
                    continue
                logger.info("Created %s", what)
            elif action.verb == "patch":
                assert action.body is not None
                answer = self.kube.patch(resource, namespace, action.name, action.body)
                writes += 1
                logger.info("Patched %s: %s", what, ", ".join(sorted(action.body)))
            else:
                continue
            answer = {"apiVersion": resource.api_version, "kind": resource.kind, **answer}
            version = answer.get("metadata", {}).get("resourceVersion")
            if version:
                written[action.kind, action.name] = str(version)
            if children is not None:
                children[action.kind, action.name] = answer
        return Applied(writes, list(children.values()) if children is not None else None)

    def write_status(self, body: Obj, status: api.RunStatus) -> int:
        old = body.get("status") if isinstance(body.get("status"), dict) else None
        patch = sync.status_patch(old, status.dump())
        if patch is None:
            return 0
        meta = body["metadata"]
        self.kube.patch(RUNS, meta["namespace"], meta["name"], {"status": patch}, sub="status")
        logger.info(
            "Updated RLHFRun %s/%s status: phase %s, stage %s",
            meta["namespace"], meta["name"], status.phase, status.current_stage or "-",
        )
        return 1

    def post(self, body: Obj, events: list[Event]) -> int:
        now = self.clock()
        for event in events:
            try:
                self.kube.create(event_object(body, event, now, self.instance))
            except KubeError as err:
                # An event is a courtesy; losing one must not fail the reconcile.
                logger.warning("Failed to post Event %s: %s", event.reason, err)
        return len(events)

    def _refuse(self, body: Obj, problems: list[str]) -> Outcome:
        """A spec that does not parse: Degraded naming every bad field; nothing created."""
        message = "; ".join(p.removeprefix("RLHFRun: ") for p in problems)
        previous = stored_status(body) or api.RunStatus()
        writes = self._degrade(body, previous, "InvalidSpec", message)
        return Outcome(writes=writes, phase=previous.phase)

    def _degrade(self, body: Obj, previous: api.RunStatus, reason: str, message: str) -> int:
        """Write a Degraded status, and a Warning event when the message is new."""
        meta = body["metadata"]
        generation = int(meta.get("generation") or 1)
        status = degraded_status(previous, reason, message, generation, self.clock())
        stored = stored_status(body)
        was = next((c for c in stored.conditions if c.type == "Degraded"), None) if stored else None
        events = []
        if was is None or was.status != "True" or was.message != message:
            events.append(Event("Warning", reason, message))
            logger.warning("Degraded RLHFRun %s/%s: %s", meta["namespace"], meta["name"], message)
        return self.write_status(body, status) + self.post(body, events)

