"""What the planner does with a stage's existing trainer job: keep it, retry it, or leave it
running through a spec edit. Pure functions, used by `planner.plan`.

- **Retries.** A failed job is recreated, as attempt n+1, while the stage has retries left
  (`stages[].backoffLimit`, else `spec.backoffLimit`; default 0). The trainer resumes from its
  last checkpoint. A spec edited after the failure starts over at attempt 1.
- **Edits to the running stage** are not applied: a job that is running keeps its spec, its
  ConfigMap and its servers, and the run reports `Degraded` (reason `RunningStageEdited`)
  naming the stage and the fix. Suspending the run applies the edit (a suspended job is
  replaced); reverting it clears the condition.

The attempt number lives on the job (annotation `rlhf.dev/attempt`) and the reason of the
previous attempt's failure beside it, so both are observed rather than remembered: an
operator restarted mid-retry counts on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from rlhf_operator import api, backends, builders
from rlhf_operator.objects import Obj

ANNOTATION_ATTEMPT = "rlhf.dev/attempt"
ANNOTATION_PREVIOUS_FAILURE = "rlhf.dev/previous-failure"
EDIT_REASON = "RunningStageEdited"

# Metadata the API server fills in; a child kept as observed is desired without them.
SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation")


# The trainer's exit status for a bad input (its one `error:` line says which): retrying the
# job cannot help, so the stage fails at once (a changed re-run, a bad row, a bad setting).
USER_ERROR_EXIT = 2


@dataclass(frozen=True)
class StageFailure:
    """Why a stage's trainer container last stopped with an error, read from its pod: the
    termination message (the trainer's `error:` line) and the exit status."""

    message: str
    exit_code: int


@dataclass(frozen=True)
class StageJob:
    """The planner's decision for one stage's job.

    `observed` is the job the stage's phase is read from (None: a new job is due), `desired`
    the job to ask for, `attempt` its attempt number, `previous_failure` why the attempt
    before it failed (None on a first attempt), and `edited` whether a running job is being
    left as it is although the spec now renders a different one.
    """

    observed: Obj | None
    desired: Obj
    attempt: int
    previous_failure: str | None = None
    edited: bool = False


def notes_of(obj: Obj) -> dict[str, str]:
    return dict(obj.get("metadata", {}).get("annotations") or {})


def attempt_of(job: Obj) -> int:
    try:
        return max(int(notes_of(job).get(ANNOTATION_ATTEMPT, 1)), 1)
    except ValueError:
        return 1


def job_message(job: Obj) -> str | None:
    """The message of the job's Failed condition, else of its newest condition."""
    conditions = (job.get("status") or {}).get("conditions") or []
    failed = [c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"]
    chosen = failed or conditions
    return str(chosen[-1].get("message")) if chosen else None


def with_attempt(job: Obj, attempt: int, previous_failure: str | None) -> Obj:
    """The desired job as attempt `attempt`. A retry carries a different config hash, so the
    executors replace the failed job; attempt 1 is the job unchanged."""
    if attempt == 1:
        return job
    out = copy.deepcopy(job)
    notes = out["metadata"].setdefault("annotations", {})
    notes[builders.ANNOTATION_HASH] = f"{notes[builders.ANNOTATION_HASH]}-{attempt}"
    notes[ANNOTATION_ATTEMPT] = str(attempt)
    if previous_failure is not None:
        notes[ANNOTATION_PREVIOUS_FAILURE] = previous_failure[:1024]
    return out


def decide(
    run: api.RLHFRun,
    stage: api.Stage,
    desired: Obj,
    job: Obj | None,
    failure: StageFailure | None = None,
) -> StageJob:
    """Keep, retry, or leave running the stage's observed `job`, given the `desired` one
    rendered from the spec; a job whose trainer refused its input is not retried."""
    if job is None:
        return StageJob(observed=None, desired=desired, attempt=1)
    attempt = attempt_of(job)
    previous = notes_of(job).get(ANNOTATION_PREVIOUS_FAILURE)
    want = with_attempt(desired, attempt, previous)
    unchanged = notes_of(want).get(builders.ANNOTATION_HASH) == notes_of(job).get(
        builders.ANNOTATION_HASH
    )
    phase = backends.for_kind(str(job.get("kind"))).job_phase(job)
    if phase == "Failed" and not unchanged:
        return StageJob(observed=None, desired=desired, attempt=1)  # edited: start over
    refused = failure is not None and failure.exit_code == USER_ERROR_EXIT
    if phase == "Failed" and attempt <= run.spec.stage_backoff_limit(stage) and not refused:
        reason = (failure.message if failure else None) or job_message(job) or "the job failed"
        retry = with_attempt(desired, attempt + 1, reason)
        return StageJob(observed=None, desired=retry, attempt=attempt + 1, previous_failure=reason)
    if phase == "Running" and not unchanged:
        kept = as_desired(job)
        set_suspended(kept, builders.held(run))
        return StageJob(job, kept, attempt, previous, edited=True)
    return StageJob(job, want, attempt, previous)


def as_desired(obj: Obj) -> Obj:
    """An observed child as a desired one: without status and server-set metadata, so the
    executors find nothing to change."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k not in SERVER_FIELDS}
    return {**{k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}, "metadata": meta}


def set_suspended(job: Obj, suspend: bool) -> None:
    node = job
    *parents, leaf = backends.for_kind(str(job["kind"])).suspend_path
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = suspend


def running_children(children: list[Obj], stage: str, job: Obj) -> list[Obj]:
    """A running stage left through an edit keeps every object it runs with (ConfigMap,
    servers) as observed, and `job` (the observed job, suspended if the run is)."""
    kept = []
    for child in children:
        labels = child.get("metadata", {}).get("labels") or {}
        if labels.get(builders.LABEL_STAGE) != stage:
            continue
        kept.append(job if child.get("kind") in backends.JOB_KINDS else as_desired(child))
    return kept


def edit_message(run: api.RLHFRun, index: int, decided: StageJob) -> str:
    assert decided.observed is not None
    stage = run.spec.stages[index]
    kind, name = decided.observed["kind"], decided.observed["metadata"]["name"]
    return (
        f"spec.stages[{index}] ({stage.name}): the spec was edited while the stage runs; "
        f"{kind} {name} keeps running unchanged and the edit is not applied. To apply it, "
        f"set spec.suspend: true and then false (the stage restarts with the edit from its last "
        f"checkpoint); to clear this condition, revert the edit"
    )


def stage_status(
    run: api.RLHFRun,
    stage: api.Stage,
    status: api.StageStatus,
    decided: StageJob,
    before: api.StageStatus | None,
) -> api.StageStatus:
    """The stage's status with its attempt count and, on a retry, why it is retrying."""
    if decided.observed is None and decided.previous_failure is None:
        return status  # no job yet
    update: dict[str, Any] = {"attempts": decided.attempt}
    tries = run.spec.stage_backoff_limit(stage) + 1
    if decided.previous_failure is not None and status.phase != "Failed":
        update["message"] = (
            f"Attempt {decided.attempt - 1} of {tries} failed: {decided.previous_failure}"
        )
        if status.start_time is None and before is not None:
            update["start_time"] = before.start_time
    elif status.phase == "Failed" and tries > 1:
        failure = status.message or "the job failed"
        update["message"] = f"{failure} (attempt {decided.attempt} of {tries})"
    return status.model_copy(update=update)
