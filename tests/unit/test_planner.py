"""The planner: stage progression, failure, suspension, spec edits, conditions and events."""

from __future__ import annotations

import copy

import pytest

from helpers import job_with, make_run, manifest
from rlhf_operator import api, builders, spec_checks
from rlhf_operator.planner import Observed, Plan, config_hash, job_phase, plan

pytestmark = pytest.mark.unit


def kinds(p: Plan) -> list[tuple[str, str]]:
    return [(c["kind"], c["metadata"]["name"]) for c in p.children]


def stage_phases(p: Plan) -> dict[str, str]:
    return {s.name: s.phase for s in p.status.stages}


def condition(p: Plan, ctype: str) -> api.Condition:
    return next(c for c in p.status.conditions if c.type == ctype)


def advance(run: api.RLHFRun, p: Plan) -> api.RLHFRun:
    """What an executor does between reconciles: store the status it was given."""
    return run.model_copy(update={"status": p.status})


def observed_for(
    p: Plan,
    stage: str,
    *conds: str,
    now: str = "t1",
    message: str = "",
    done: tuple[str, ...] = (),
) -> Observed:
    """The plan's children as observed: `stage`'s job with `conds`, `done` stages Succeeded."""
    children = []
    for child in p.children:
        name = child["metadata"]["labels"]["rlhf.dev/stage"]
        if child["kind"] == "PyTorchJob" and name == stage:
            children.append(job_with(child, *conds, message=message))
        elif child["kind"] == "PyTorchJob" and name in done:
            children.append(job_with(child, "Succeeded"))
        else:
            children.append(copy.deepcopy(child))
    return Observed(children=children, now=now)


def test_fresh_run_creates_first_stage_only() -> None:
    p = plan(make_run(), Observed(now="t0"))
    assert kinds(p) == [("ConfigMap", "demo-sft-config"), ("PyTorchJob", "demo-sft")]
    assert p.status.phase == "Pending"
    assert p.status.current_stage == "sft"
    assert stage_phases(p) == {"sft": "Pending", "sft2": "Pending"}
    assert condition(p, "Progressing").status == "True"
    assert condition(p, "Ready").status == "False"
    assert p.status.observed_generation == 1


def test_running_then_succeeded_moves_to_next_stage() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    run = advance(run, p0)
    p1 = plan(run, observed_for(p0, "sft", "Created", "Running", now="t1"))
    assert p1.status.phase == "Running"
    assert stage_phases(p1)["sft"] == "Running"
    assert p1.status.stages[0].start_time == "t1"
    assert condition(p1, "Ready").status == "True"
    assert [e.reason for e in p1.events] == ["StageStarted"]
    run = advance(run, p1)
    p2 = plan(run, observed_for(p1, "sft", "Created", "Running", "Succeeded", now="t2"))
    assert stage_phases(p2) == {"sft": "Succeeded", "sft2": "Pending"}
    assert p2.status.current_stage == "sft2"
    assert p2.status.stages[0].start_time == "t1"
    assert p2.status.stages[0].completion_time == "t2"
    assert p2.status.stages[0].output == "/workspace/demo/sft/final"
    assert ("PyTorchJob", "demo-sft2") in kinds(p2)
    assert ("PyTorchJob", "demo-sft") in kinds(p2), "finished jobs stay as the stage's record"
    assert [e.reason for e in p2.events] == ["StageSucceeded"]


def test_from_stage_initialises_from_its_output() -> None:
    run = make_run()
    stage = run.spec.stages[1]
    config = builders.build_stage_config(run, stage)
    assert config.model.path == "demo/sft/final"
    assert builders.build_stage_config(run, run.spec.stages[0]).model.path == "models/tiny-llama"


def test_all_stages_succeeded() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    p1 = plan(advance(run, p0), observed_for(p0, "sft", "Succeeded", now="t1"))
    p2 = plan(advance(run, p1), observed_for(p1, "sft2", "Succeeded", now="t2", done=("sft",)))
    assert p2.status.phase == "Succeeded"
    assert condition(p2, "Succeeded").status == "True"
    assert condition(p2, "Progressing").status == "False"
    assert p2.status.current_stage is None
    assert "RunSucceeded" in [e.reason for e in p2.events]


def test_stage_failure_fails_run_and_blocks_later_stages() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    p1 = plan(
        advance(run, p0),
        observed_for(p0, "sft", "Running", "Failed", message="OOMKilled", now="t1"),
    )
    assert p1.status.phase == "Failed"
    assert stage_phases(p1) == {"sft": "Failed", "sft2": "Pending"}
    assert p1.status.stages[0].message == "OOMKilled"
    assert condition(p1, "Degraded").status == "True"
    assert condition(p1, "Degraded").reason == "StageFailed"
    assert "OOMKilled" in condition(p1, "Degraded").message
    assert all(c["metadata"]["labels"]["rlhf.dev/stage"] == "sft" for c in p1.children)
    reasons = [e.reason for e in p1.events]
    assert "StageFailed" in reasons and "RunFailed" in reasons
    assert all(e.type == "Warning" for e in p1.events)


def test_failed_stage_retries_after_spec_edit() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    failed = observed_for(p0, "sft", "Failed", message="bad lr", now="t1")
    p1 = plan(advance(run, p0), failed)
    assert p1.status.phase == "Failed"
    doc = manifest()
    doc["metadata"]["generation"] = 2
    doc["spec"]["stages"][0]["hyperparameters"] = {"learningRate": 1e-4}
    edited = make_run(doc).model_copy(update={"status": p1.status})
    p2 = plan(edited, Observed(children=failed.children, now="t2"))
    assert stage_phases(p2)["sft"] == "Pending"
    assert p2.status.phase == "Pending"
    assert p2.status.stages[0].completion_time is None
    new_job = next(c for c in p2.children if c["kind"] == "PyTorchJob")
    old_job = next(c for c in failed.children if c["kind"] == "PyTorchJob")
    assert config_hash(new_job) != config_hash(old_job)
    assert p2.status.observed_generation == 2
    assert all(c.observed_generation == 2 for c in p2.status.conditions)


def edited_run(status: api.RunStatus, **stage0: object) -> api.RLHFRun:
    """The run at generation 2, every stage's learning rate edited (and stage 0 updated)."""
    doc = manifest()
    doc["metadata"]["generation"] = 2
    for stage in doc["spec"]["stages"]:
        stage["hyperparameters"] = {"learningRate": 5e-5}
    doc["spec"]["stages"][0].update(stage0)
    return make_run(doc).model_copy(update={"status": status})


def jobs_of(children: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {c["metadata"]["name"]: c for c in children if c["kind"] == "PyTorchJob"}  # type: ignore[index]


def test_edit_to_the_running_stage_is_degraded_and_leaves_its_job() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    p1 = plan(advance(run, p0), observed_for(p0, "sft", "Succeeded", now="t1"))
    running = observed_for(p1, "sft2", "Running", now="t2", done=("sft",))
    p2 = plan(advance(run, p1), running)
    p3 = plan(edited_run(p2.status), Observed(children=running.children, now="t3"))
    jobs, old = jobs_of(p3.children), jobs_of(running.children)
    assert config_hash(jobs["demo-sft"]) == config_hash(old["demo-sft"]), "finished: untouched"
    assert config_hash(jobs["demo-sft2"]) == config_hash(old["demo-sft2"]), "running: kept"
    configs = {c["metadata"]["name"]: c for c in p3.children if c["kind"] == "ConfigMap"}
    assert "5e-05" not in str(configs["demo-sft2-config"]["data"]), "its config is kept too"
    assert stage_phases(p3) == {"sft": "Succeeded", "sft2": "Running"}
    degraded = condition(p3, "Degraded")
    assert degraded.status == "True" and degraded.reason == "RunningStageEdited"
    assert "spec.stages[1] (sft2)" in degraded.message
    assert "PyTorchJob demo-sft2" in degraded.message
    assert "spec.suspend" in degraded.message and "revert" in degraded.message
    assert condition(p3, "Ready").status == "True", "the run itself is fine"
    assert p3.status.observed_generation == 2
    assert [e.reason for e in p3.events] == ["RunningStageEdited"]
    again = plan(advance(edited_run(p2.status), p3), Observed(children=running.children))
    assert again.events == [], "reported once"
    reverted = make_run().model_copy(update={"status": p3.status})
    p4 = plan(reverted, Observed(children=running.children, now="t4"))
    assert condition(p4, "Degraded").status == "False"


def test_suspending_applies_an_edit_to_the_running_stage() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    running = observed_for(p0, "sft", "Running", now="t1")
    p1 = plan(advance(run, p0), running)
    p2 = plan(edited_run(p1.status), running)
    assert condition(p2, "Degraded").reason == "RunningStageEdited"
    doc = manifest(suspend=True)
    doc["spec"]["stages"][0]["hyperparameters"] = {"learningRate": 5e-5}
    suspending = make_run(doc).model_copy(update={"status": p2.status})
    p3 = plan(suspending, running)
    kept = jobs_of(p3.children)["demo-sft"]
    assert kept["spec"]["runPolicy"]["suspend"] is True, "the kept job is suspended"  # type: ignore[index]
    assert config_hash(kept) == config_hash(jobs_of(running.children)["demo-sft"])
    suspended = observed_for(p0, "sft", "Running", "Suspended", now="t3")
    p4 = plan(suspending.model_copy(update={"status": p3.status}), suspended)
    new = jobs_of(p4.children)["demo-sft"]
    assert config_hash(new) != config_hash(kept), "suspended: replaced with the edit"
    assert condition(p4, "Degraded").status == "False"


def test_edits_to_stages_not_started_or_pending_take_effect() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    pending = observed_for(p0, "sft", "Created", now="t1")
    p1 = plan(advance(run, p0), pending)
    p2 = plan(edited_run(p1.status), pending)
    old = jobs_of(pending.children)["demo-sft"]
    assert config_hash(jobs_of(p2.children)["demo-sft"]) != config_hash(old), "pending: replaced"
    assert condition(p2, "Degraded").status == "False"
    running = observed_for(p0, "sft", "Running", now="t2")
    p3 = plan(edited_run(p2.status), running)
    done = observed_for(p3, "sft", "Succeeded", now="t3")
    p4 = plan(edited_run(p3.status), done)
    configs = {c["metadata"]["name"]: c for c in p4.children if c["kind"] == "ConfigMap"}
    assert "5.0e-05" in configs["demo-sft2-config"]["data"]["sft2.yaml"], "not started: edited"
    assert condition(p4, "Degraded").status == "False", "the edited stage has finished"


def retried(run: api.RLHFRun, p: Plan, message: str, now: str) -> tuple[Plan, Observed]:
    """The current job fails with `message`; the plan after it, and what it observed."""
    failed = observed_for(p, "sft", "Running", "Failed", message=message, now=now)
    return plan(advance(run, p), failed), failed


def test_failed_stage_retries_up_to_its_backoff_limit_then_fails() -> None:
    run = make_run(manifest(backoffLimit=2))
    p0 = plan(run, Observed(now="t0"))
    p1 = plan(advance(run, p0), observed_for(p0, "sft", "Running", now="t1"))
    p2, failed = retried(run, p1, "OOMKilled", "t2")
    assert stage_phases(p2)["sft"] == "Pending" and p2.status.phase == "Running"
    stage = p2.status.stages[0]
    assert stage.attempts == 2 and stage.start_time == "t1"
    assert stage.message == "Attempt 1 of 3 failed: OOMKilled"
    [job] = jobs_of(p2.children).values()
    assert config_hash(job) != config_hash(jobs_of(failed.children)["demo-sft"]), "replaced"
    assert job["metadata"]["annotations"]["rlhf.dev/attempt"] == "2"  # type: ignore[index]
    assert [e.reason for e in p2.events] == ["StageRetrying"]
    assert "OOMKilled" in p2.events[0].message and p2.events[0].type == "Warning"
    # The new job exists (no status yet): the attempt count is read from it.
    p3 = plan(advance(run, p2), Observed(children=p2.children, now="t3"))
    assert p3.status.stages[0].attempts == 2 and p3.events == []
    assert p3.status.stages[0].message == "Attempt 1 of 3 failed: OOMKilled"
    p4 = plan(advance(run, p3), observed_for(p3, "sft", "Running", now="t4"))
    assert [e.message for e in p4.events] == ["Started stage sft (attempt 2)"]
    p5, _ = retried(run, p4, "NCCL timeout", "t5")
    assert p5.status.stages[0].attempts == 3
    p6, _ = retried(run, plan(advance(run, p5), Observed(children=p5.children)), "OOM", "t6")
    assert p6.status.phase == "Failed" and stage_phases(p6)["sft"] == "Failed"
    assert p6.status.stages[0].message == "OOM (attempt 3 of 3)"
    assert "OOM (attempt 3 of 3)" in condition(p6, "Degraded").message
    assert [e.reason for e in p6.events] == ["StageFailed", "RunFailed"]


def test_stage_backoff_limit_overrides_the_runs() -> None:
    doc = manifest(backoffLimit=5)
    doc["spec"]["stages"][0]["backoffLimit"] = 0
    run = make_run(doc)
    p0 = plan(run, Observed(now="t0"))
    p1, _ = retried(run, p0, "OOMKilled", "t1")
    assert p1.status.phase == "Failed", "no retries for this stage"
    assert p1.status.stages[0].message == "OOMKilled" and p1.status.stages[0].attempts == 1


def test_removed_stage_children_are_no_longer_desired() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    doc = manifest(stages=[{"name": "other", "type": "sft", "dataset": {"path": "d.jsonl"}}])
    p1 = plan(make_run(doc), observed_for(p0, "sft", "Running"))
    assert [c["metadata"]["name"] for c in p1.children] == ["demo-other-config", "demo-other"]


def test_suspend_sets_job_suspended_and_resume_clears_it() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    running = observed_for(p0, "sft", "Running", now="t1")
    p1 = plan(advance(run, p0), running)
    suspended_run = make_run(manifest(suspend=True)).model_copy(update={"status": p1.status})
    p2 = plan(suspended_run, running)
    job = next(c for c in p2.children if c["kind"] == "PyTorchJob")
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert config_hash(job) == config_hash(running.children[1]), "suspension patches in place"
    assert p2.status.phase == "Suspended"
    assert stage_phases(p2)["sft"] == "Suspended"
    assert condition(p2, "Progressing").reason == "Suspended"
    assert "StageSuspended" in [e.reason for e in p2.events]
    resumed = make_run().model_copy(update={"status": p2.status})
    p3 = plan(resumed, running)
    assert next(c for c in p3.children if c["kind"] == "PyTorchJob")["spec"]["runPolicy"][
        "suspend"
    ] is False
    assert p3.status.phase == "Running"


@pytest.mark.parametrize("stage_type", ["reward", "dpo"])
def test_unsupported_stage_type_is_refused_with_degraded(
    stage_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Which types lack a trainer changes as they land; the refusal path must keep working.
    monkeypatch.setattr(spec_checks, "SUPPORTED_STAGE_TYPES", frozenset({"sft"}))
    stage = {"name": "x", "type": stage_type,
             "dataset": {"path": "d.jsonl", "format": "preference"}}  # fmt: skip
    run = make_run(manifest(stages=[stage]))
    p = plan(run, Observed(now="t0"))
    assert p.children == []
    assert p.status.phase == "Pending"
    degraded = condition(p, "Degraded")
    assert degraded.status == "True"
    assert "not supported yet" in degraded.message
    assert "spec.stages[0].type" in degraded.message
    assert [e.reason for e in p.events] == ["SpecRefused"]
    again = plan(advance(run, p), Observed(now="t1"))
    assert again.events == [], "the same refusal is not announced twice"


def test_plan_is_deterministic_and_steady_state_has_no_events() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    obs = observed_for(p0, "sft", "Running", now="t1")
    p1 = plan(advance(run, p0), obs)
    p2 = plan(advance(run, p1), Observed(children=obs.children, now="t9"))
    assert p2.children == p1.children
    assert p2.status == p1.status, "nothing changed, so the status (timestamps too) is equal"
    assert p2.events == []


def test_condition_transition_time_changes_only_on_status_change() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    ready0 = condition(p0, "Ready")
    p1 = plan(advance(run, p0), observed_for(p0, "sft", "Running", now="t1"))
    assert condition(p1, "Ready").last_transition_time == "t1" != ready0.last_transition_time
    assert condition(p1, "Progressing").last_transition_time == "t0"


def test_progress_flows_into_status() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    obs = observed_for(p0, "sft", "Running", now="t1")
    metrics = api.StageMetrics(step=7, total_steps=20, loss=1.5)
    p1 = plan(advance(run, p0), Observed(children=obs.children, progress={"sft": metrics}))
    assert p1.status.stages[0].metrics == metrics
    assert p1.status.step == 7


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([], "Pending"),
        (["Created"], "Pending"),
        (["Created", "Running"], "Running"),
        (["Created", "Running", "Restarting"], "Running"),
        (["Created", "Running", "Succeeded"], "Succeeded"),
        (["Created", "Running", "Failed"], "Failed"),
        (["Created", "Suspended"], "Suspended"),
    ],
)
def test_job_phase_from_conditions(conditions: list[str], phase: str) -> None:
    job = job_with({"kind": "PyTorchJob"}, *conditions)
    assert job_phase(job) == phase


def test_kueue_label_and_owner_reference_reach_children() -> None:
    doc = manifest()
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    p = plan(make_run(doc), Observed())
    for child in p.children:
        meta = child["metadata"]
        assert meta["labels"]["rlhf.dev/run"] == "demo"
        assert meta["labels"]["rlhf.dev/stage"] == "sft"
        assert meta["ownerReferences"][0]["uid"] == "uid-1"
        assert meta["ownerReferences"][0]["controller"] is True
    job = p.children[1]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_spec_refused_mid_run_keeps_children_and_stage_status() -> None:
    run = make_run()
    p0 = plan(run, Observed(now="t0"))
    running = observed_for(p0, "sft", "Running", now="t1")
    p1 = plan(advance(run, p0), running)
    doc = manifest(trainer={"backend": "trainjob", "schedulerName": "volcano"})
    doc["metadata"]["generation"] = 2
    refused = make_run(doc).model_copy(update={"status": p1.status})
    p2 = plan(refused, running)
    assert condition(p2, "Degraded").status == "True"
    assert sorted(c["metadata"]["name"] for c in p2.children) == ["demo-sft", "demo-sft-config"]
    assert all("status" not in c for c in p2.children)
    assert stage_phases(p2) == {"sft": "Running", "sft2": "Pending"}
    assert p2.status.phase == "Running" and p2.status.observed_generation == 2


def test_a_queued_run_is_created_suspended_and_then_follows_its_job() -> None:
    """Kueue queues the run (its label): spec.suspend is not the operator's gate. The job is
    created suspended for Kueue to admit; the phase is Suspended while the job is, and Running
    once Kueue admits it, whatever spec.suspend says; the run holds no server at zero."""
    doc = manifest(suspend=True)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    run = make_run(doc)
    p0 = plan(run, Observed(now="t0"))
    job = next(c for c in p0.children if c["kind"] == "PyTorchJob")
    assert job["spec"]["runPolicy"]["suspend"] is True
    waiting = observed_for(p0, "sft", "Created", "Suspended", now="t1")
    p1 = plan(advance(run, p0), waiting)
    assert p1.status.phase == "Suspended" and stage_phases(p1)["sft"] == "Suspended"
    admitted = observed_for(p0, "sft", "Created", "Suspended", "Running", now="t2")
    p2 = plan(advance(run, p1), admitted)
    assert p2.status.phase == "Running" and stage_phases(p2)["sft"] == "Running"
    unqueued = make_run(manifest(suspend=True))
    assert not builders.kueue_queued(unqueued) and builders.held(unqueued)
    assert builders.kueue_queued(run) and not builders.held(run)


def trainer_pod(stage: str, code: int, message: str, when: str = "t2") -> dict[str, object]:
    """A trainer pod whose container stopped with `code` and a termination message."""
    return {
        "metadata": {"labels": {"rlhf.dev/stage": stage, "rlhf.dev/component": "trainer"}},
        "status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": {
            "exitCode": code, "message": message, "finishedAt": when}}}]},
    }  # fmt: skip


def test_a_trainer_that_refused_its_input_fails_the_stage_at_once_saying_why() -> None:
    """Exit 2 is a bad input (here a changed re-run): a retry cannot help, so the stage fails
    at once, whatever its backoffLimit, with the trainer's own line instead of the job
    controller's; other exits are retried, the reason carried into the next attempt."""
    from rlhf_operator import sync

    run = make_run(manifest(backoffLimit=2))
    p0 = plan(run, Observed(now="t0"))
    p1 = plan(advance(run, p0), observed_for(p0, "sft", "Running", now="t1"))
    line = "error: sft: the stage's inputs changed since its final output: maxSteps 3 -> 4"
    failed = observed_for(p1, "sft", "Running", "Failed", message="job failed", now="t2")
    refused = Observed(
        children=failed.children, now="t2",
        failures=sync.failures_by_stage([trainer_pod("sft", 2, "torchrun noise\n" + line)]),
    )  # fmt: skip
    p2 = plan(advance(run, p1), refused)
    assert p2.status.phase == "Failed" and stage_phases(p2)["sft"] == "Failed"
    assert p2.status.stages[0].message is not None and line in p2.status.stages[0].message
    crashed = Observed(children=failed.children, now="t2",
                       failures=sync.failures_by_stage([trainer_pod("sft", 1, "error: OOM")]))
    p3 = plan(advance(run, p1), crashed)
    assert stage_phases(p3)["sft"] == "Pending" and p3.status.stages[0].attempts == 2
    assert p3.status.stages[0].message == "Attempt 1 of 3 failed: error: OOM"


def test_failures_are_read_from_the_newest_terminated_trainer_container() -> None:
    from rlhf_operator import sync

    old, new = trainer_pod("sft", 2, "error: old", "t1"), trainer_pod("sft", 2, "error: new", "t3")
    ok = trainer_pod("sft", 0, "fine", "t9")
    server = trainer_pod("ppo", 1, "error: vllm")
    server["metadata"] = {"labels": {"rlhf.dev/stage": "ppo", "rlhf.dev/component": "rollout"}}
    failures = sync.failures_by_stage([old, new, ok, server])
    assert failures == {"sft": sync.stage_job.StageFailure("error: new", 2)}
