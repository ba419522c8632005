"""The local executor: how pod commands become local processes, and how a signal stops them
(local_procs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import job_with, make_run, manifest
from rlhf_operator import api, local
from rlhf_operator.local import (
    LocalExecutor,
    LocalJob,
    expand,
    failure_message,
    local_argv,
    read_progress,
    remap,
)
from rlhf_operator.local_procs import (
    Interrupted,
    StopSignals,
    interrupted_status,
    report_interrupt,
)
from rlhf_operator.planner import Event, Observed, plan

pytestmark = pytest.mark.unit


def test_expand_follows_kubelet_rules() -> None:
    env = {"RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    assert expand("--node-rank=$(RANK)", env) == "--node-rank=1"
    assert expand("$(MASTER_ADDR):$(MISSING)", env) == "10.0.0.1:$(MISSING)"
    assert expand("$RANK and ${RANK}", env) == "$RANK and ${RANK}", "only $(VAR) is expanded"


def test_remap_rewrites_mount_paths_only_at_path_boundaries(tmp_path: Path) -> None:
    mounts = {"/workspace": tmp_path / "w", "/etc/rlhf": tmp_path / "cfg"}
    assert remap("/workspace", mounts) == str(tmp_path / "w")
    assert remap("/etc/rlhf/sft.yaml", mounts) == str(tmp_path / "cfg" / "sft.yaml")
    assert remap("/workspace2/x", mounts) == "/workspace2/x"
    assert remap("--flag=/workspace/x", mounts) == "--flag=/workspace/x"


def test_local_argv_uses_this_interpreter() -> None:
    argv = local_argv(["torchrun", "--nnodes=1", "-m", "rlhf_trainer"])
    assert argv[1:3] == ["-m", "torch.distributed.run"] and argv[3:] == ["--nnodes=1", "-m",
                                                                         "rlhf_trainer"]


def test_failure_message_prefers_the_trainers_error_line(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("noise\nerror: data/sft.jsonl line 7: missing field \"response\"\nmore\n")
    assert failure_message([log]).startswith("data/sft.jsonl line 7")
    other = tmp_path / "b.log"
    other.write_text("a\nb\nc\nd\n")
    assert failure_message([other]) == "b | c | d"
    assert failure_message([tmp_path / "missing.log"]) == "the trainer exited non-zero"


def test_read_progress_tolerates_torn_and_odd_files(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    assert read_progress(path) is None
    path.write_text('{"step": 3, "totalSteps"')
    assert read_progress(path) is None
    path.write_text(json.dumps({"step": 3, "totalSteps": 10, "metrics": {"loss": 1.25}}))
    metrics = read_progress(path)
    assert metrics is not None
    assert (metrics.step, metrics.total_steps, metrics.loss) == (3, 10, 1.25)
    path.write_text(json.dumps({"step": "3", "metrics": ["x"]}))
    odd = read_progress(path)
    assert odd is not None and odd.step is None and odd.loss is None


def test_preflight_names_each_missing_model_and_lets_stage_outputs_be(tmp_path: Path) -> None:
    """Local model paths must exist before the run starts, except a run's own stage outputs
    (a judge served from an earlier `sft` stage's final/), which are written during it."""
    (tmp_path / "models" / "policy").mkdir(parents=True)
    doc = manifest(model={"path": "models/policy"})
    doc["spec"]["stages"][0]["model"] = {"path": "models/judge-base"}
    doc["spec"]["stages"][0]["dataset"] = {"path": str(tmp_path / "missing.jsonl")}
    doc["spec"]["stages"][1]["dataset"] = {"path": f"{doc['metadata']['name']}/sft/final/x.jsonl"}
    doc["spec"]["judge"] = {"model": {"path": f"{doc['metadata']['name']}/sft/final"}}
    problems = local.preflight(make_run(doc), tmp_path)
    assert problems[0].startswith(
        f"spec.stages[0].model.path: {tmp_path / 'models' / 'judge-base'} does not exist"
    )
    assert "relative paths are relative to --workdir" in problems[0]
    assert problems[1].startswith("spec.stages[0].dataset.path:")
    assert len(problems) == 2  # the judge and the second dataset come from stage sft


def running_status(run: api.RLHFRun) -> api.RunStatus:
    """The planner's status with stage sft done and sft2 running at step 3 (of 10)."""
    first = plan(run, Observed(now="t0"))
    run = run.model_copy(update={"status": first.status})
    done = [job_with(c, "Succeeded") if c["kind"] == "PyTorchJob" else c for c in first.children]
    second = plan(run, Observed(children=done, now="t1"))
    run = run.model_copy(update={"status": second.status})
    jobs = {"demo-sft": ("Succeeded",), "demo-sft2": ("Created", "Running")}
    children = [
        job_with(c, *jobs[c["metadata"]["name"]]) if c["kind"] == "PyTorchJob" else c
        for c in second.children
    ]
    progress = {"sft2": api.StageMetrics(step=3, total_steps=10)}
    status = plan(run, Observed(children=children, progress=progress, now="t2")).status
    assert (status.phase, status.current_stage, status.step) == ("Running", "sft2", 3)
    return status


def test_interrupted_status_suspends_the_run_and_says_how_to_resume() -> None:
    before = running_status(make_run())
    status = interrupted_status(before, signal.SIGTERM, "t3")
    assert status.phase == "Suspended"
    assert [(s.name, s.phase) for s in status.stages] == [
        ("sft", "Succeeded"), ("sft2", "Suspended")
    ]
    note = (
        "Interrupted by SIGTERM at stage sft2 (step 3); the run's processes were stopped. "
        "Re-running `rlhf run` resumes each stage from its last checkpoint"
    )
    assert status.stages[1].message == note
    assert [(c.type, c.status, c.reason, c.message) for c in status.conditions] == [
        (ctype, "False", "Interrupted", note)
        for ctype in ("Ready", "Progressing", "Degraded", "Succeeded")
    ]
    since = {c.type: c.last_transition_time for c in status.conditions}
    was = {c.type: c.last_transition_time for c in before.conditions}
    assert since["Ready"] == since["Progressing"] == "t3"  # they were True
    assert since["Degraded"] == was["Degraded"]  # False already: no transition
    finished = before.model_copy(update={"phase": "Succeeded"})
    assert interrupted_status(finished, signal.SIGINT, "t3") == finished


def test_stop_signals_raise_once_then_hold_and_restore_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, StopSignals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs in this thread at once
    assert (caught.value.signum, caught.value.exit_code) == (signal.SIGTERM, 143)
    assert signal.getsignal(signal.SIGTERM) is before
    cleaned = False
    with pytest.raises(Interrupted) as caught, StopSignals() as signals:
        signals.hold()  # a cleanup is under way: signals wait for it
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        cleaned = True
    assert cleaned and caught.value.signum == signal.SIGHUP, "the first signal is the one"
    assert caught.value.exit_code == 129


def test_stop_signals_leave_an_ignored_signal_ignored() -> None:
    """`nohup rlhf run` ignores SIGHUP: a closed terminal must not stop the run."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_report_interrupt_exits_128_plus_the_signal(capsys: pytest.CaptureFixture[str]) -> None:
    assert report_interrupt(KeyboardInterrupt()) == 130
    assert report_interrupt(Interrupted(signal.SIGTERM)) == 143
    assert "Interrupted by SIGTERM; stopped the run's processes" in capsys.readouterr().err


def test_execute_stops_children_then_writes_the_interrupted_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM mid-run, as `kill` sends it: the children are stopped, status.json says
    Suspended (Interrupted), and `Interrupted` carries exit status 143 to `rlhf run`."""
    events: list[Event] = []
    executor = LocalExecutor(make_run(), tmp_path, on_event=events.append)
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    executor.jobs["demo-sft2"] = LocalJob(obj={"kind": "PyTorchJob"}, procs=[child], logs=[])
    running = running_status(executor.run)

    def reconcile() -> None:
        executor.run = executor.run.model_copy(update={"status": running})
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(executor, "reconcile", reconcile)
    with pytest.raises(Interrupted) as caught:
        executor.execute()
    assert caught.value.exit_code == 143
    assert child.returncode == -signal.SIGTERM
    status = json.loads((tmp_path / "demo" / "status.json").read_text())
    assert status["phase"] == "Suspended"
    assert status["stages"][1]["phase"] == "Suspended"
    assert {c["reason"] for c in status["conditions"]} == {"Interrupted"}
    assert events[-1].reason == "RunInterrupted" and "SIGTERM" in events[-1].message


PARENT = """
import subprocess, sys, time
from rlhf_operator.local_procs import die_with_parent
hook = die_with_parent() if sys.argv[1] == "hook" else None
child = subprocess.Popen(["sleep", "60"], preexec_fn=hook, start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Running, or stopped: neither gone nor a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize("hook", ["hook", "none"])
def test_a_child_dies_with_its_parent_even_by_sigkill(hook: str) -> None:
    """A parent that spawned a child with `die_with_parent` is SIGKILLed (no handler runs):
    the kernel SIGTERMs the child. Without the hook the child is orphaned, as it used to be."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, hook], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + (10 if hook == "hook" else 1)
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert alive(child) == (hook == "none")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
