"""`plan(run, observed) -> Plan`: the one pure function both executors reconcile through.

Given the typed run and what is observed (its child objects with their status, and the
training progress each stage reported), it returns the desired children, the new status and
the events to post. No I/O: the caller passes in the clock.

Semantics:
- Stages run in order; a stage starts once every stage before it has succeeded.
- A failed stage is retried up to its backoffLimit (a new job, attempt n+1), then fails the
  run; later stages never start. See `stage_job`.
- A finished stage keeps its job as a desired child (its status is the record) and is not
  re-run when the spec changes. A stage not started yet runs the spec as it is when it
  starts. A pending, suspended or failed stage whose rendered job changed gets a new config
  hash, and the executor replaces the job (it resumes from its checkpoint). A running job is
  not replaced: the edit is reported as Degraded (RunningStageEdited) instead.
- `spec.suspend` suspends the active job; the run's phase becomes Suspended. A run Kueue queues
  (the queue-name label) is the exception: its jobs are created suspended and Kueue owns their
  `suspend` from then on; the phase follows the job (Suspended until Kueue admits it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_operator import (
    api,
    backends,
    builders,
    engine_versions,
    env_servers,
    judge_servers,
    servers,
    stage_job,
)
from rlhf_operator.objects import Obj

# What the planner refuses lives with the other spec checks; re-exported for its callers.
from rlhf_operator.spec_checks import SUPPORTED_BACKENDS as SUPPORTED_BACKENDS
from rlhf_operator.spec_checks import SUPPORTED_STAGE_TYPES as SUPPORTED_STAGE_TYPES
from rlhf_operator.spec_checks import refusal as refusal

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "Succeeded")


@dataclass(frozen=True)
class Observed:
    """What exists now: child objects (any kind, with status) and per-stage progress."""

    children: list[Obj] = field(default_factory=list)
    progress: dict[str, api.StageMetrics] = field(default_factory=dict)
    failures: dict[str, stage_job.StageFailure] = field(default_factory=dict)
    workspace: str = builders.WORKSPACE_MOUNT
    now: str = "1970-01-01T00:00:00Z"


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    children: list[Obj]
    status: api.RunStatus
    events: list[Event]


def job_phase(job: Obj) -> api.Phase:
    """Phase of a trainer job, read by its backend from the status its controller writes."""
    return backends.for_kind(str(job.get("kind"))).job_phase(job)


def _jobs_by_stage(children: list[Obj]) -> dict[str, Obj]:
    out = {}
    for child in children:
        if child.get("kind") in backends.JOB_KINDS:
            stage = (child.get("metadata", {}).get("labels") or {}).get(builders.LABEL_STAGE)
            if stage:
                out[stage] = child
    return out


def plan(run: api.RLHFRun, observed: Observed) -> Plan:
    previous = run.status or api.RunStatus()
    problem = refusal(run)
    if problem is not None:
        # A spec refused mid-run (say, edited to a type this version lacks) keeps what exists:
        # running work is neither deleted nor forgotten until the spec is fixed.
        kept = [c for name in _stage_names(observed.children) for c in _kept_children(
            observed.children, name
        )]
        phase = previous.phase if previous.stages else "Pending"
        status = _status(
            run, previous, observed, list(previous.stages), phase, previous.current_stage, problem
        )
        return Plan(children=kept, status=status, events=_events(previous, status, problem))
    jobs = _jobs_by_stage(observed.children)
    children: list[Obj] = []
    stages: list[api.StageStatus] = []
    current: str | None = None
    edited: str | None = None
    for index, stage in enumerate(run.spec.stages):
        if current is not None:
            stages.append(api.StageStatus(name=stage.name, type=stage.type))
            continue
        desired = backends.build_stage_children(run, stage)
        failure = observed.failures.get(stage.name)
        decided = stage_job.decide(run, stage, desired[-1], jobs.get(stage.name), failure)
        job = decided.observed
        rollout = [
            *servers.rollout_children(run, stage),
            *judge_servers.judge_children(run, stage),
            *env_servers.environment_children(run, stage),
        ]
        gate = servers.readiness(rollout, observed.children)
        stage_status = _stage_status(run, stage, job, observed, previous)
        if job is None:
            stage_status = _gated(run, stage_status, gate, previous, observed.now)
        before = next((s for s in previous.stages if s.name == stage.name), None)
        stage_status = stage_job.stage_status(run, stage, stage_status, decided, before)
        stages.append(stage_status)
        if stage_status.phase in ("Succeeded", "Failed"):
            children.extend(_kept_children(observed.children, stage.name))
        elif decided.edited:
            kept = stage_job.running_children(observed.children, stage.name, decided.desired)
            children.extend(kept)
            edited = stage_job.edit_message(run, index, decided)
        else:
            # Servers come first; the trainer starts once every one is available.
            children.extend([*desired[:-1], *rollout])
            if job is not None or gate.ready:
                children.append(decided.desired)
        if stage_status.phase != "Succeeded":
            current = stage.name
    phase = _run_phase(run, stages)
    status = _status(run, previous, observed, stages, phase, current, None, edited)
    events = _events(previous, status, None) + _image_events(run, previous)
    return Plan(children=children, status=status, events=events)


def _image_events(run: api.RLHFRun, previous: api.RunStatus) -> list[Event]:
    """Server images whose version could not be checked: once per spec generation."""
    if previous.observed_generation == run.metadata.generation:
        return []
    return [Event("Warning", "ServerImageUnverified", w) for w in engine_versions.warnings(run)]


def _stage_names(children: list[Obj]) -> list[str]:
    labels = [c.get("metadata", {}).get("labels") or {} for c in children]
    return list(dict.fromkeys(n for n in (x.get(builders.LABEL_STAGE) for x in labels) if n))


def config_hash(obj: Obj) -> str | None:
    annotations = obj.get("metadata", {}).get("annotations") or {}
    value = annotations.get(builders.ANNOTATION_HASH)
    return str(value) if value is not None else None


def _gated(
    run: api.RLHFRun,
    status: api.StageStatus,
    gate: servers.Readiness,
    previous: api.RunStatus,
    now: str,
) -> api.StageStatus:
    """A stage without a job yet waits for its rollout servers, or fails when one cannot start.

    A server failure stays in the status (the failed Deployment is removed) until the spec
    changes, which retries the stage.
    """
    before = next((s for s in previous.stages if s.name == status.name), None)
    sticky = (
        before is not None
        and before.phase == "Failed"
        and before.job_name is None
        and previous.observed_generation == run.metadata.generation
    )
    if gate.failure is not None or sticky:
        message = gate.failure or (before.message if before else None)
        started = (before.start_time if before else None) or now
        done = (before.completion_time if sticky and before else None) or now
        return status.model_copy(
            update={
                "phase": "Failed",
                "message": message,
                "start_time": started,
                "completion_time": done,
            }
        )
    if gate.waiting is not None and status.phase == "Pending":
        return status.model_copy(update={"message": gate.waiting})
    return status


def _kept_children(children: list[Obj], stage: str) -> list[Obj]:
    """A finished stage keeps the objects it ran with, not ones rebuilt from an edited spec;
    its rollout, judge and environment servers go (their GPUs are free again)."""
    kept = []
    for child in children:
        labels = child.get("metadata", {}).get("labels") or {}
        if labels.get(builders.LABEL_STAGE) != stage:
            continue
        if labels.get(builders.LABEL_COMPONENT) in (
            servers.COMPONENT_ROLLOUT,
            judge_servers.COMPONENT_JUDGE,
            env_servers.COMPONENT_ENVIRONMENT,
        ):
            continue
        kept.append(stage_job.as_desired(child))
    return kept


def _stage_status(
    run: api.RLHFRun,
    stage: api.Stage,
    job: Obj | None,
    observed: Observed,
    previous: api.RunStatus,
) -> api.StageStatus:
    before = next((s for s in previous.stages if s.name == stage.name), None)
    phase: api.Phase = "Pending" if job is None else job_phase(job)
    if builders.held(run) and phase in ("Pending", "Running"):
        phase = "Suspended"
    active = phase in ("Running", "Succeeded", "Failed", "Suspended")
    started = before.start_time if before and active else None
    if phase in ("Running", "Succeeded", "Failed") and started is None:
        started = observed.now
    finished = before.completion_time if before and phase in ("Succeeded", "Failed") else None
    if phase in ("Succeeded", "Failed") and finished is None:
        finished = observed.now
    output = None
    if phase == "Succeeded":
        output = f"{observed.workspace}/{builders.stage_output_dir(run, stage.name)}/final"
    return api.StageStatus(
        name=stage.name,
        type=stage.type,
        phase=phase,
        job_name=builders.child_name(run, stage.name) if job is not None else None,
        start_time=started,
        completion_time=finished if phase in ("Succeeded", "Failed") else None,
        output=output,
        message=_failure_message(job, observed.failures.get(stage.name)) if phase == "Failed"
        else None,
        metrics=observed.progress.get(stage.name, before.metrics if before else None),
    )


def _failure_message(job: Obj | None, failure: stage_job.StageFailure | None) -> str | None:
    """The trainer's own reason (its pod's termination message) over the job controller's."""
    if failure is not None and failure.message:
        return failure.message
    return stage_job.job_message(job) if job is not None else None


def _run_phase(run: api.RLHFRun, stages: list[api.StageStatus]) -> api.Phase:
    if any(s.phase == "Failed" for s in stages):
        return "Failed"
    if all(s.phase == "Succeeded" for s in stages):
        return "Succeeded"
    queued_waiting = builders.kueue_queued(run) and any(s.phase == "Suspended" for s in stages)
    if builders.held(run) or queued_waiting:
        return "Suspended"  # held by spec.suspend, or a queued job Kueue has not admitted
    if any(s.phase in ("Running", "Succeeded") or (s.attempts or 0) > 1 for s in stages):
        return "Running"  # a stage between two attempts is still under way
    return "Pending"


def _status(
    run: api.RLHFRun,
    previous: api.RunStatus,
    observed: Observed,
    stages: list[api.StageStatus],
    phase: api.Phase,
    current: str | None,
    refused: str | None,
    edited: str | None = None,
) -> api.RunStatus:
    metrics = next((s.metrics for s in stages if s.name == current), None)
    wanted = _conditions(stages, phase, current, refused)
    if edited is not None and phase == "Running":
        wanted["Degraded"] = ("True", stage_job.EDIT_REASON, edited)
    conditions = []
    for ctype in CONDITION_TYPES:
        cstatus, reason, message = wanted[ctype]
        old = next((c for c in previous.conditions if c.type == ctype), None)
        since = old.last_transition_time if old and old.status == cstatus else observed.now
        conditions.append(
            api.Condition(
                type=ctype,
                status=cstatus,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=run.metadata.generation,
            )
        )
    return api.RunStatus(
        phase=phase,
        current_stage=current,
        step=metrics.step if metrics else None,
        reward=metrics.reward if metrics else None,
        stages=stages,
        conditions=conditions,
        observed_generation=run.metadata.generation,
    )


Wanted = dict[str, tuple[Literal["True", "False", "Unknown"], str, str]]


def _conditions(
    stages: list[api.StageStatus], phase: api.Phase, current: str | None, refused: str | None
) -> Wanted:
    if refused is not None:
        return {
            "Ready": ("False", "SpecRefused", refused),
            "Progressing": ("False", "SpecRefused", refused),
            "Degraded": ("True", "SpecRefused", refused),
            "Succeeded": ("False", "SpecRefused", refused),
        }
    failed = next((s for s in stages if s.phase == "Failed"), None)
    if failed is not None:
        why = f"Stage {failed.name} failed" + (f": {failed.message}" if failed.message else "")
        return {
            "Ready": ("False", "StageFailed", why),
            "Progressing": ("False", "StageFailed", why),
            "Degraded": ("True", "StageFailed", why),
            "Succeeded": ("False", "StageFailed", why),
        }
    if phase == "Succeeded":
        done = f"All {len(stages)} stages succeeded"
        return {
            "Ready": ("True", "Succeeded", done),
            "Progressing": ("False", "Succeeded", done),
            "Degraded": ("False", "Succeeded", done),
            "Succeeded": ("True", "Succeeded", done),
        }
    active = next((s for s in stages if s.name == current), None)
    if phase == "Suspended":
        note = f"Suspended at stage {current}"
        return {
            "Ready": ("False", "Suspended", note),
            "Progressing": ("False", "Suspended", note),
            "Degraded": ("False", "Suspended", note),
            "Succeeded": ("False", "Suspended", note),
        }
    running = active is not None and active.phase == "Running"
    note = f"Stage {current} is {'running' if running else 'starting'}"
    reason = "StageRunning" if running else "StageStarting"
    return {
        "Ready": ("True" if running else "False", reason, note),
        "Progressing": ("True", reason, note),
        "Degraded": ("False", "AsExpected", ""),
        "Succeeded": ("False", "InProgress", note),
    }


def _events(previous: api.RunStatus, status: api.RunStatus, refused: str | None) -> list[Event]:
    """Events for what changed between the previous status and the new one."""
    events: list[Event] = []
    if refused is not None:
        was = next((c for c in previous.conditions if c.type == "Degraded"), None)
        if was is None or was.message != refused:
            events.append(Event("Warning", "SpecRefused", refused))
        return events
    before = {s.name: s.phase for s in previous.stages}
    tries = {s.name: s.attempts or 1 for s in previous.stages}
    for stage in status.stages:
        if (stage.attempts or 1) > tries.get(stage.name, 1):
            retry = f"Retrying stage {stage.name}: {stage.message}"
            events.append(Event("Warning", "StageRetrying", retry))
        old = before.get(stage.name, "Pending")
        if stage.phase == old:
            continue
        if stage.phase == "Running":
            attempt = f" (attempt {stage.attempts})" if (stage.attempts or 1) > 1 else ""
            events.append(Event("Normal", "StageStarted", f"Started stage {stage.name}{attempt}"))
        elif stage.phase == "Succeeded":
            events.append(Event("Normal", "StageSucceeded", f"Stage {stage.name} succeeded"))
        elif stage.phase == "Failed":
            msg = f"Stage {stage.name} failed" + (f": {stage.message}" if stage.message else "")
            events.append(Event("Warning", "StageFailed", msg))
        elif stage.phase == "Suspended":
            events.append(Event("Normal", "StageSuspended", f"Suspended stage {stage.name}"))
    degraded = next((c for c in status.conditions if c.type == "Degraded"), None)
    was = next((c for c in previous.conditions if c.type == "Degraded"), None)
    if degraded is not None and degraded.reason == stage_job.EDIT_REASON and (
        was is None or was.message != degraded.message
    ):
        events.append(Event("Warning", stage_job.EDIT_REASON, degraded.message))
    if status.phase != previous.phase and status.phase in ("Succeeded", "Failed"):
        kind: Literal["Normal", "Warning"] = (
            "Normal" if status.phase == "Succeeded" else "Warning"
        )
        events.append(Event(kind, f"Run{status.phase}", f"Run {status.phase.lower()}"))
    return events
